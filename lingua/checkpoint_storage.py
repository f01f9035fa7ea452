"""The bytes of a checkpoint's model and optimizer state: DCP's planning and metadata, lingua's shard files.
Owned by lingua/checkpoint.py (which knows the rest of the format); nothing else writes or reads shards.

Shard files. DCP plans which rank saves which piece of which tensor and records it in `.metadata` (a pickle:
read here through an unpickler that only builds DCP's metadata classes). Each rank writes one file,
`__<rank>_0.distcp`, through `ShardWriter`: every tensor piece as its raw bytes in C order (its shape and dtype
are in `.metadata`), marked with the storage descriptor `RAW`; the non-tensor values (the optimizer's
hyperparameters) as DCP serializes them (torch.save, read back with weights_only=True). DCP's own writer calls
torch.save for every tensor instead: on a disk as fast as memory that serialization was ~10% of a save, and
reading it back (torch.load into a new tensor, then a copy) most of a warm load. `ShardReader` reads a raw piece
straight into the destination tensor's memory when it is whole and contiguous (what a same-layout resume reads),
into a buffer that is then narrowed and copied otherwise (a resharded resume); pieces without the descriptor
(checkpoints written by DCP's own writer: earlier lingua versions, other frameworks) are read as DCP reads them.
DCP's own reader refuses our shards with "Unknown extension name='lingua.raw'" instead of misreading them.

The crc32 of every shard is computed from the bytes as they are written (the commit record keeps it): no shard
is read back (only the small .metadata, which DCP writes itself).
"""

import concurrent.futures
import copy
import ctypes
import errno
import io
import mmap
import os
import pickle
import queue
import sys
import threading
import warnings
from typing import Iterable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from lingua.checkpoint_format import METADATA_FILE, CheckpointError
from lingua.files import crc32

RAW = "lingua.raw/1"  # storage descriptor of a tensor piece stored as its bytes (C order, dtype of .metadata)

# ------------------------------------------------------------------------------------------- metadata

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"ExtensionRegistry"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "device", "memory_format", "layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes (and torch dtypes / sizes / layouts): a crafted .metadata cannot call
    anything else."""

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of DCP checkpoint metadata)")


def read_metadata(ckpt_dir: str):
    """The DCP metadata of a checkpoint, through the restricted unpickler; CheckpointError if unreadable."""
    path = os.path.join(ckpt_dir, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no DCP metadata ({METADATA_FILE})") from None
    except Exception as e:  # noqa: BLE001 (garbled bytes raise anything from UnpicklingError to MemoryError)
        raise CheckpointError(f"{ckpt_dir}: DCP metadata {METADATA_FILE} is unreadable "
                              f"({type(e).__name__}: {e})") from None


# -------------------------------------------------------------------------------------------- writing


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in C order (a copy only if it is not contiguous)."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter(dcp.FileSystemWriter):
    """One file per rank (fsynced), tensors as raw bytes; `crcs` receives {file name: crc32} of the shard unless
    checksums is False (DCP's small .metadata is written by DCP's own code: its crc32 is read back). nice > 0 (an
    async save: DCP writes from a thread of its own) lowers the writing thread's priority to that nice value, and
    idle puts it under SCHED_IDLE (see `lower_thread_priority`). direct: write the shard with O_DIRECT where the
    file system allows it (see `write_direct`)."""

    def __init__(self, path: str, crcs: dict, checksums: bool = True, nice: int = 0, direct: bool = False,
                 idle: bool = False):
        super().__init__(path, single_file_per_rank=True, sync_files=True)
        self.crcs = crcs
        self.checksums = checksums
        self.nice = nice
        self.idle = idle
        self.direct = direct

    @torch.no_grad()  # resolve_data takes each DTensor's local shard: a view that autograd would record (~50 us)
    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        path = self.fs.concat_path(self.path, name)
        if self.nice > 0 or self.idle:
            lower_thread_priority(self.nice, self.idle)  # (threads started from here inherit it)
        results, crc = [], [0]

        def pieces():
            """The shard's bytes, piece by piece; records each piece's place and the crc32 (zlib-ng: ~0.01 s per
            342 MB). Can be started again (a write that falls back to buffered I/O)."""
            results.clear()
            crc[0], offset = 0, 0
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    buf, descriptors = data.getbuffer(), None
                else:
                    if data.device.type != "cpu":
                        data = data.cpu()
                    buf, descriptors = _tensor_bytes(data), [RAW]
                if self.checksums:
                    crc[0] = crc32(buf, crc[0])
                results.append(WriteResult(index=item.index, size_in_bytes=buf.nbytes,
                                           storage_data=_StorageInfo(name, offset, buf.nbytes, descriptors)))
                offset += buf.nbytes
                yield buf

        if not (self.direct and write_direct(path, pieces())):
            write_buffered(path, pieces())
        if self.checksums:
            self.crcs[name] = crc[0]
        fut: Future = Future()
        fut.set_result(results)
        return fut


try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux / glibc
    _sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Have the kernel start writing bytes [offset, offset + length) of a file to disk now, without waiting
    (Linux sync_file_range(SYNC_FILE_RANGE_WRITE)); whether it accepted. It promises nothing: durability still
    comes from the fsync. A no-op where the call is missing; an error from it is ignored for the same reason."""
    return _sync_file_range is not None and _sync_file_range(fd, offset, length, 2) == 0  # 2: SYNC_FILE_RANGE_WRITE


def write_buffered(path: str, pieces: Iterable, writeback: bool = True) -> None:
    """Write the pieces (buffers) to a new file through the page cache, then fsync. Writeback starts as soon as
    _PIECE bytes are written (`start_writeback`), so the disk works while the rest is copied: a rank's 342 MB in
    0.10 s against 0.15 s for write + fsync alone (docs/benchmarks.md). writeback=False: write + fsync alone
    (the benchmark's plain baseline)."""
    with open(path, "wb", buffering=0) as f:
        fd, offset, started = f.fileno(), 0, 0  # started: writeback asked for bytes [0, started)
        for buf in pieces:
            view = memoryview(buf).cast("B") if buf.nbytes else memoryview(b"")
            for start in range(0, len(view), _PIECE):
                part = view[start : start + _PIECE]
                done = 0
                while done < len(part):  # (a write to a regular file may be short, e.g. on a signal)
                    done += f.write(part[done:])
                offset += len(part)
                # Whole pages, _PIECE at least: not one call per small tensor (171 a save per rank at 11M
                # params), and a write into a page already under writeback can wait for it.
                end = offset - offset % _ALIGN
                if writeback and end - started >= _PIECE:
                    start_writeback(fd, started, end - started)
                    started = end
        os.fsync(fd)


# O_DIRECT needs the buffer's address, each write's length and its file offset aligned to the device's logical
# block size (512 or 4096 bytes): 4096 serves both.
_ALIGN = 4096
_PIECE = 8 << 20  # bytes per write (8, 16, 32 MiB: the same speed here; 4 buffers of 8 MiB stay allocated)
_WRITERS = 4  # writes in flight (threads): one write at a time leaves the device idle between writes
_free_buffers: queue.SimpleQueue = queue.SimpleQueue()  # page-aligned bounce buffers, kept from save to save


def write_direct(path: str, pieces: Iterable) -> bool:
    """Write the concatenated buffers `pieces` to a new file `path` with O_DIRECT (from the buffers straight to
    the device, bypassing the page cache), then fsync it; False, with nothing consumed from `pieces`, where the
    file system refuses O_DIRECT (some FUSE, tmpfs before Linux 6.6): the caller writes through the page cache.

    Why: a buffered write copies every byte into the page cache and the kernel then writes it back, CPU time
    that an async save takes from training (this project's 342 MB shard, two processes writing at once: 0.06 s
    of the writer's CPU direct, 0.09-0.47 s buffered; wall ~10% longer direct on the benchmark's disk). The
    bytes are copied into reused page-aligned buffers (the tensors' memory is not aligned) that `_WRITERS`
    threads write at once. The last piece is padded to the block size and the file then truncated to its length."""
    if not hasattr(os, "O_DIRECT"):  # (not Linux)
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    try:
        buffers = [_free_buffers.get() if not _free_buffers.empty() else mmap.mmap(-1, _PIECE)
                   for _ in range(_WRITERS)]
        try:
            os.pwrite(fd, memoryview(buffers[0])[:_ALIGN], 0)  # some file systems accept the flag, not the write
        except OSError as e:
            for b in buffers:
                _free_buffers.put(b)
            if e.errno != errno.EINVAL:
                raise
            return False
        _write_pieces(fd, path, pieces, buffers)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _write_pieces(fd: int, path: str, pieces: Iterable, buffers: list) -> None:
    free: queue.SimpleQueue = queue.SimpleQueue()  # buffers ready to fill
    jobs: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, length, file offset) to write; None: stop
    errors: list = []

    def writer():
        while (job := jobs.get()) is not None:
            buf, n, offset = job
            try:
                if not errors:
                    view = memoryview(buf)[:n]
                    done = 0
                    while done < n:
                        k = os.pwrite(fd, view[done:], offset + done)
                        if k <= 0:
                            raise OSError(errno.EIO, f"{path}: write returned {k} at byte {offset + done}")
                        done += k
            except OSError as e:
                errors.append(e)
            free.put(buf)

    for b in buffers:
        free.put(b)
    threads = [threading.Thread(target=writer, name="shard-write", daemon=True) for _ in range(_WRITERS)]
    for t in threads:
        t.start()
    size = 0
    try:
        buf, fill = free.get(), 0
        for piece in pieces:
            src = np.frombuffer(piece, dtype=np.uint8)  # (no copy; its address for memmove)
            pos = 0
            while pos < len(src) and not errors:
                n = min(len(src) - pos, _PIECE - fill)
                # ctypes.memmove releases the GIL (a slice assignment holds it): an async save's copy does not
                # stall the training thread, which needs the GIL for every op it launches.
                ctypes.memmove(_address(buf) + fill, src.ctypes.data + pos, n)
                fill, pos = fill + n, pos + n
                if fill == _PIECE:
                    jobs.put((buf, fill, size))
                    size += fill
                    buf, fill = free.get(), 0
            if errors:
                break
        if fill and not errors:
            padded = -(-fill // _ALIGN) * _ALIGN
            buf[fill:padded] = bytes(padded - fill)
            jobs.put((buf, padded, size))
            size += fill
        else:
            free.put(buf)
    finally:
        for _ in threads:
            jobs.put(None)
        for t in threads:
            t.join()
        while not free.empty():
            _free_buffers.put(free.get())
    if errors:
        raise errors[0]
    os.ftruncate(fd, size)


class Stager:
    """An async save's copy of the state (DCP's AsyncStager protocol), made by a background thread into CPU
    buffers kept from save to save (at most one save in flight). DCP's DefaultStager copies each storage with
    UntypedStorage.copy_, which holds the GIL throughout: the training thread, which needs the GIL to launch each
    op, stalled behind it (py-spy --gil: the stager's copies held it for as many samples as all the shard writes).
    Tensor.copy_ releases it. pin: page-locked buffers (a copy from GPU memory)."""

    should_synchronize_after_execute = False  # (protocol) the copy's own Future says when it is done

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._staged: dict = {}  # key path -> the staged tensor (a DTensor over a reused local buffer, or a tensor)

    def stage(self, state_dict) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                with torch.no_grad():
                    out = self._copy(state_dict, ())
                    if self.pin:
                        torch.cuda.synchronize()  # the non-blocking copies from GPU memory are done
                fut.set_result(out)
            except BaseException as e:  # noqa: BLE001 (DCP's writer and wait_staged() report it)
                fut.set_exception(e)

        threading.Thread(target=run, name="ckpt-stage", daemon=True).start()
        return fut

    def _copy(self, obj, path: tuple):
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, (*path, i)) for i, v in enumerate(obj))
        if not isinstance(obj, torch.Tensor):
            return copy.deepcopy(obj)
        sharded = isinstance(obj, DTensor)
        local = obj.to_local() if sharded else obj
        staged = self._staged.get(path)
        buf = staged.to_local() if isinstance(staged, DTensor) else staged
        if (buf is None or isinstance(staged, DTensor) != sharded or staged.shape != obj.shape
                or buf.shape != local.shape or buf.dtype != local.dtype):
            buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=self.pin)
            staged = (DTensor.from_local(buf, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape,
                                         stride=obj.stride()) if sharded else buf)
            self._staged[path] = staged
        buf.copy_(local, non_blocking=self.pin)
        return staged

    def synchronize_staging(self) -> None:  # (protocol)
        pass

    def close(self) -> None:  # (protocol) nothing to release but the buffers
        self._staged.clear()


def lower_thread_priority(nice: int, idle: bool = False) -> None:
    """Give the calling thread (and the threads it starts) a nice value of at least `nice` (Linux: a priority
    is per thread; the nice value also sets the default I/O priority) and, if idle, the SCHED_IDLE policy: the
    thread then runs only when a core has nothing else to run. Not undone: an unprivileged process cannot raise a
    priority again, so call it only on threads that do background work alone. Elsewhere a thread id is not a
    process id: nothing is done. What is refused (e.g. by a seccomp policy) is left as it was."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass
    if idle:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def save_planner():
    """DCP's default planner, with plan caching: from the second save of the same state layout on, ranks skip
    gathering their plans on the coordinator (torch compares each plan with the cached one and recomputes it when
    the layout changed). About 0.1 s of every save of the 57M-parameter benchmark model on CPU."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    return DefaultSavePlanner(enable_plan_caching=True)


# -------------------------------------------------------------------------------------------- reading


class ShardReader(dcp.FileSystemReader):
    """Reads lingua's raw pieces into their destinations; everything else as DCP's reader does. The metadata
    goes through the restricted unpickler."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_metadata(str(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.tensor_md = metadata.state_dict_metadata

    def read_data(self, plan: LoadPlan, planner) -> Future:
        raw, other = [], []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            is_raw = req.type == LoadItemType.TENSOR and list(info.transform_descriptors or ()) == [RAW]
            (raw if is_raw else other).append(req)
        by_file: dict = {}
        for req in raw:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in by_file.items():
            if os.path.basename(rel) != rel or rel in ("", ".", ".."):  # .metadata is user data
                raise CheckpointError(f"{self.path}: .metadata names a shard outside the checkpoint folder: {rel!r}")
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            with open(os.path.join(str(self.path), rel), "rb", buffering=0) as f:
                for req in reqs:
                    self._read_raw(f, rel, req, planner)
        if other:
            return super().read_data(LoadPlan(other, plan.storage_data, plan.planner_data), planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _chunk(self, index):
        """(shape, dtype) of the stored piece `index` (a MetadataIndex) from .metadata."""
        md = self.tensor_md[index.fqn]
        chunks = md.chunks
        if index.index is not None and index.index < len(chunks) and chunks[index.index].offsets == index.offset:
            return chunks[index.index].sizes, md.properties.dtype
        for c in chunks:
            if c.offsets == index.offset:
                return c.sizes, md.properties.dtype
        raise CheckpointError(f"{self.path}: .metadata has no piece of '{index.fqn}' at {list(index.offset)}")

    def _read_raw(self, f, rel: str, req, planner) -> None:
        info = self.storage_data[req.storage_index]
        sizes, dtype = self._chunk(req.storage_index)
        nbytes = torch.Size(sizes).numel() * dtype.itemsize
        if info.length != nbytes:
            raise CheckpointError(f"{self.path}/{rel}: '{req.storage_index.fqn}' holds {info.length} bytes, "
                                  f".metadata says {list(sizes)} {dtype} ({nbytes} bytes)")
        target = planner.resolve_tensor(req).detach()
        whole = all(o == 0 for o in req.storage_offsets) and list(req.lengths) == list(sizes)
        direct = whole and target.is_contiguous() and target.dtype == dtype and target.device.type == "cpu"
        buf = target if direct else torch.empty(sizes, dtype=dtype)
        f.seek(info.offset)
        view = _tensor_bytes(buf) if buf.numel() else memoryview(b"")
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.path}/{rel} is truncated: '{req.storage_index.fqn}' needs bytes "
                                      f"{info.offset}..{info.offset + nbytes}")
            got += n
        if not direct:
            target.copy_(narrow_tensor_by_index(buf, req.storage_offsets, req.lengths))
        planner.commit_tensor(req, target)


def load_planner():
    """DCP's load planner, but the non-tensor values (e.g. the optimizer's hyperparameters) are read with
    torch.load(weights_only=True) instead of an unrestricted unpickle."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def dcp_load(state: dict, ckpt_dir: str, no_dist: bool = False) -> None:
    """Fill `state` (resharding as needed) from a checkpoint, reading nothing that can run code. CheckpointError
    (on every rank: DCP shares a rank's failure) if a shard cannot be read."""
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it assumes a single process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=ShardReader(ckpt_dir), planner=load_planner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: make it one clear line
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
        raise CheckpointError(f"{ckpt_dir}: a shard cannot be loaded: {' '.join(lines[-3:])[:600]}") from None
