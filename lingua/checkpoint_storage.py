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

import io
import os
import pickle
import queue
import sys
import threading
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
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
    async save: DCP writes from a thread of its own) lowers the writing thread's priority to that nice value."""

    def __init__(self, path: str, crcs: dict, checksums: bool = True, nice: int = 0):
        super().__init__(path, single_file_per_rank=True, sync_files=True)
        self.crcs = crcs
        self.checksums = checksums
        self.nice = nice

    @torch.no_grad()  # resolve_data takes each DTensor's local shard: a view that autograd would record (~50 us)
    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        if self.nice > 0:
            lower_thread_priority(self.nice)
        # The shard's crc32 is computed by a thread from the buffers as they are written (it releases the GIL, so
        # it runs while this thread is in write() and fsync()); with zlib-ng ~0.01 s per 342 MB, zlib's ~0.09 s.
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        crc = [0]

        def checksum():
            while (buf := pieces.get()) is not None:
                crc[0] = crc32(buf, crc[0])

        thread = threading.Thread(target=checksum, name="shard-crc32", daemon=True) if self.checksums else None
        if thread:
            thread.start()
        results, offset = [], 0
        try:
            with open(self.fs.concat_path(self.path, name), "wb") as f:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    if item.type == WriteItemType.BYTE_IO:
                        buf, descriptors = data.getbuffer(), None
                    else:
                        if data.device.type != "cpu":
                            data = data.cpu()
                        buf, descriptors = _tensor_bytes(data), [RAW]
                    f.write(buf)
                    if thread:
                        pieces.put(buf)
                    results.append(WriteResult(index=item.index, size_in_bytes=buf.nbytes,
                                               storage_data=_StorageInfo(name, offset, buf.nbytes, descriptors)))
                    offset += buf.nbytes
                f.flush()
                os.fsync(f.fileno())
        finally:
            if thread:
                pieces.put(None)
                thread.join()
        if thread:
            self.crcs[name] = crc[0]
        fut: Future = Future()
        fut.set_result(results)
        return fut


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread (and the threads it starts) a nice value of at least `nice` (Linux: a priority
    is per thread). Not undone: an unprivileged process cannot raise a priority again, so call it only on
    threads that do background work alone. Elsewhere a thread id is not a process id: nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # not permitted here (e.g. a seccomp policy): the write goes on at training's priority
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
