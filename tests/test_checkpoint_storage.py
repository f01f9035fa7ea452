"""lingua/checkpoint_storage.py in one process: the raw shard format, its crc32 taken from the write, checkpoints
written by DCP's own writer (earlier lingua versions, other frameworks), damaged shards, and a failed load."""

import errno
import os
import random
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from lingua import checkpoint_storage
from lingua.checkpoint import CheckpointError, file_crc32, load_model_optim, model_optim_state
from lingua.checkpoint_storage import RAW, ShardWriter, dcp_load, read_metadata, write_buffered, write_direct
from lingua.files import crc32


def _save(state: dict, path: str, writer=None) -> dict:
    crcs: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, storage_writer=writer or ShardWriter(path, crcs), no_dist=True)
    return crcs


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
                      "step": torch.tensor(3.0), "empty": torch.zeros(0, 4)},
            "optim": {"lr": 0.1, "t": torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, 1:]}}  # not contiguous


def _zeros_like(state: dict) -> dict:
    return {k: _zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in state.items()}


def _assert_equal(a: dict, b: dict) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            _assert_equal(v, b[k])
        elif isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


def test_raw_shards_round_trip_with_the_crc32_of_their_bytes(tmp_path):
    state = _state()
    crcs = _save(state, str(tmp_path / "ck"))
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == [".metadata", "__0_0.distcp"]
    # The shard's crc32, recorded while writing, is the crc32 of its bytes (.metadata's is read back by the caller).
    assert crcs == {"__0_0.distcp": file_crc32(str(tmp_path / "ck" / "__0_0.distcp"))}
    md = read_metadata(str(tmp_path / "ck"))
    tensor_infos = [v for k, v in md.storage_data.items() if k.fqn != "optim.lr"]
    assert all(list(v.transform_descriptors) == [RAW] for v in tensor_infos)
    # Every tensor piece is its bytes in C order, nothing else.
    assert os.path.getsize(tmp_path / "ck" / "__0_0.distcp") == sum(v.length for v in md.storage_data.values())
    w = next(v for k, v in md.storage_data.items() if k.fqn == "model.w")
    with open(tmp_path / "ck" / "__0_0.distcp", "rb") as f:
        f.seek(w.offset)
        assert f.read(w.length) == state["model"]["w"].numpy().tobytes()
    loaded = _zeros_like(state)
    dcp_load(loaded, str(tmp_path / "ck"), no_dist=True)
    _assert_equal(state, loaded)


def test_the_project_crc32_gives_zlibs_values(tmp_path):
    """lingua.files.crc32 (zlib-ng's) must give zlib's values: checkpoints and data states recorded by earlier
    versions (zlib) still check, and a machine without zlib-ng checks ours."""
    assert crc32.__module__.startswith("zlib_ng")  # installed by setup.py: without it saves are ~7x slower to sum
    rng = random.Random(0)
    data = rng.randbytes(3 << 20)
    for start in (0, 1, 0xFFFFFFFF, 123456789):
        a = b = start
        cut = 0
        while cut < len(data):  # the same running value over random pieces, as the shard writer and data readers do
            n = rng.choice([0, 1, 7, 4096, 1 << 20])
            piece = memoryview(np.frombuffer(data[cut:cut + n], dtype=np.uint8))  # as a tensor's bytes
            a, b, cut = crc32(piece, a), zlib.crc32(piece, b), cut + n
        assert a == b == zlib.crc32(data, start)
    (tmp_path / "f").write_bytes(data)
    assert file_crc32(str(tmp_path / "f")) == zlib.crc32(data)


def test_an_async_writer_yields_to_training_and_a_sync_one_does_not(tmp_path, monkeypatch):
    """checkpoint.writer_nice and writer_idle: the thread that writes an async save's shard lowers its own
    priority and goes under SCHED_IDLE (Linux: both are per thread), and so do the threads it starts for its
    direct writes; the training thread keeps its own, and a sync save (nice=0, not idle) changes nothing."""
    def nice_of(tid):
        return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)

    seen = {}
    writes = []  # ((nice, policy) of the writing thread, the file): a spy, every write goes through
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        writes.append((nice_of(threading.get_native_id()), os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)

    class Probe(ShardWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            seen[self.nice] = (threading.get_native_id(), nice_of(threading.get_native_id()))
            return fut

    main = nice_of(threading.get_native_id())
    assert main[1] == os.SCHED_OTHER
    lowered = (main[0] + 7, os.SCHED_IDLE)
    state = _state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.async_save(state, storage_writer=Probe(str(tmp_path / "a"), {}, nice=lowered[0], direct=True, idle=True),
                       no_dist=True).result()
        dcp.save(state, storage_writer=Probe(str(tmp_path / "s"), {}, direct=True), no_dist=True)
    tid, nice = seen[lowered[0]]
    assert tid != threading.get_native_id() and nice == lowered  # DCP's writer thread, lowered
    assert seen[0] == (threading.get_native_id(), main)  # the sync save wrote from this thread, left as it was
    assert nice_of(threading.get_native_id()) == main
    assert {n for n, d in writes if d == str(tmp_path / "a")} == {lowered}
    assert {n for n, d in writes if d == str(tmp_path / "s")} == {main}
    loaded = _zeros_like(state)
    dcp_load(loaded, str(tmp_path / "a"), no_dist=True)
    _assert_equal(state, loaded)


def test_a_piece_is_converted_to_the_destinations_dtype(tmp_path):
    _save({"w": torch.randn(4, 4)}, str(tmp_path / "ck"))
    dest = {"w": torch.zeros(4, 4, dtype=torch.bfloat16)}
    dcp_load(dest, str(tmp_path / "ck"), no_dist=True)
    src = torch.zeros(4, 4)
    dcp_load({"w": src}, str(tmp_path / "ck"), no_dist=True)
    assert torch.equal(dest["w"], src.to(torch.bfloat16))


def test_checkpoints_of_dcps_own_writer_still_load(tmp_path):
    """torch.save'd pieces (lingua before the raw format, other DCP users) are read as DCP reads them."""
    state = _state()
    _save(state, str(tmp_path / "ck"), dcp.FileSystemWriter(str(tmp_path / "ck")))
    md = read_metadata(str(tmp_path / "ck"))
    assert not any(v.transform_descriptors for v in md.storage_data.values())
    loaded = _zeros_like(state)
    dcp_load(loaded, str(tmp_path / "ck"), no_dist=True)
    _assert_equal(state, loaded)


def test_dcps_own_reader_refuses_raw_shards_instead_of_misreading_them(tmp_path):
    _save({"w": torch.randn(3)}, str(tmp_path / "ck"))
    with warnings.catch_warnings(), pytest.raises(BaseException, match="Unknown extension name='lingua.raw'"):
        warnings.simplefilter("ignore")
        dcp.load({"w": torch.zeros(3)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)


def test_a_truncated_shard_is_one_clear_error(tmp_path):
    _save({"w": torch.randn(100)}, str(tmp_path / "ck"))
    shard = tmp_path / "ck" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:150])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is truncated: 'w' needs bytes 0\.\.400"):
        dcp_load({"w": torch.zeros(100)}, str(tmp_path / "ck"), no_dist=True)


def test_a_shard_path_outside_the_checkpoint_is_refused(tmp_path):
    import pickle

    _save({"w": torch.randn(3)}, str(tmp_path / "ck"))
    md = read_metadata(str(tmp_path / "ck"))
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="names a shard outside the checkpoint folder: '../elsewhere.distcp'"):
        dcp_load({"w": torch.zeros(3)}, str(tmp_path / "ck"), no_dist=True)


def test_a_failed_load_leaves_no_uninitialised_optimizer_state(tmp_path):
    """The moments a load creates are left uninitialised for the checkpoint to fill: when it fails they go."""
    from lingua.transformer import LMTransformer, LMTransformerArgs

    margs = LMTransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seqlen=16)
    model = LMTransformer(margs)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randint(0, 64, (2, 9))[:, :-1], torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    _save(model_optim_state(model, opt), str(tmp_path / "ck"))

    fresh = LMTransformer(margs)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    load_model_optim(str(tmp_path / "ck"), fresh, fresh_opt, no_dist=True)
    _assert_equal(model_optim_state(model, opt), model_optim_state(fresh, fresh_opt))

    shard = tmp_path / "ck" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    broken = LMTransformer(margs)
    broken_opt = torch.optim.AdamW(broken.parameters(), lr=0.01)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_optim(str(tmp_path / "ck"), broken, broken_opt, no_dist=True)
    assert not broken_opt.state


def _big_state() -> dict:
    """Pieces of odd sizes, one larger than a direct write's buffer, so the stream crosses buffer boundaries."""
    g = torch.Generator().manual_seed(1)
    return {"model": {"a": torch.randn(3, generator=g), "big": torch.randn(3_000_001, generator=g),
                      "c": torch.randn(1001, 3, generator=g).to(torch.bfloat16)}, "optim": {"lr": 0.5}}


def test_direct_and_buffered_writes_give_the_same_shard(tmp_path, monkeypatch):
    """checkpoint.direct_io: the shard written with O_DIRECT (through aligned buffers, its last block padded and
    then cut) has the same bytes, crc32 and metadata as one written through the page cache, and loads."""
    flags = []  # a spy: every open goes through
    real_open = os.open

    def spy_open(path, f, *a, **k):
        flags.append((str(path), f))
        return real_open(path, f, *a, **k)

    monkeypatch.setattr(os, "open", spy_open)
    state = _big_state()
    crcs = {}
    for kind in ("direct", "buffered"):
        crcs[kind] = {}
        _save(state, str(tmp_path / kind), ShardWriter(str(tmp_path / kind), crcs[kind], direct=kind == "direct"))
    shard = "__0_0.distcp"
    direct_opens = [p for p, f in flags if f & os.O_DIRECT]
    assert direct_opens and all(p.startswith(str(tmp_path / "direct")) for p in direct_opens)
    a, b = (tmp_path / "direct" / shard).read_bytes(), (tmp_path / "buffered" / shard).read_bytes()
    assert len(a) % 4096 and a == b  # not a whole number of blocks: the padding was cut off
    assert crcs["direct"] == crcs["buffered"] == {shard: zlib.crc32(a)}
    loaded = _zeros_like(state)
    dcp_load(loaded, str(tmp_path / "direct"), no_dist=True)
    _assert_equal(state, loaded)


def test_a_buffered_shard_starts_writeback_piece_by_piece_and_keeps_every_byte(tmp_path, monkeypatch):
    """A sync save's shard (through the page cache) asks the kernel to write back every 8 MiB or more of whole
    pages as soon as they are written (the real sync_file_range, accepted), the ranges cover the file once, in
    order, but for a tail under 8 MiB that the fsync writes, and the shard has the bytes and crc32 it would have
    without (the same state written with O_DIRECT)."""
    calls = []
    real = checkpoint_storage.start_writeback

    def spy(fd, offset, length):
        calls.append((offset, length, real(fd, offset, length)))
        return calls[-1][2]

    monkeypatch.setattr(checkpoint_storage, "start_writeback", spy)
    state, crcs = _big_state(), {"buffered": {}, "direct": {}}
    _save(state, str(tmp_path / "buffered"), ShardWriter(str(tmp_path / "buffered"), crcs["buffered"]))
    shard = tmp_path / "buffered" / "__0_0.distcp"
    size = shard.stat().st_size
    assert calls and all(ok for _, _, ok in calls)  # the kernel took every request
    assert [o for o, _, _ in calls] == [sum(n for _, n, _ in calls[:i]) for i in range(len(calls))]
    piece, page = checkpoint_storage._PIECE, checkpoint_storage._ALIGN
    assert all(n >= piece and (o + n) % page == 0 for o, n, _ in calls)
    assert 0 <= size - sum(n for _, n, _ in calls) < piece + page and len(calls) >= size // (2 * piece)
    n_direct = len(calls)
    _save(state, str(tmp_path / "direct"), ShardWriter(str(tmp_path / "direct"), crcs["direct"], direct=True))
    assert len(calls) == n_direct  # O_DIRECT writes bypass the page cache: nothing to write back
    assert shard.read_bytes() == (tmp_path / "direct" / "__0_0.distcp").read_bytes()
    assert crcs["buffered"] == crcs["direct"] == {"__0_0.distcp": zlib.crc32(shard.read_bytes())}


def test_a_full_disk_fails_a_buffered_write_with_enospc(small_disk):
    folder = small_disk("8m")
    with pytest.raises(OSError) as e:
        write_buffered(os.path.join(folder, "big"), [memoryview(bytes(6 << 20)), memoryview(bytes(6 << 20))])
    assert e.value.errno == errno.ENOSPC


def test_a_file_system_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    """Where open(O_DIRECT) fails with EINVAL (FUSE, older tmpfs) the shard is written through the page cache.
    Mocked: every file system on this machine accepts O_DIRECT (tmpfs does since Linux 6.6)."""
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refusing_open)
    state = _big_state()
    crcs: dict = {}
    _save(state, str(tmp_path / "ck"), ShardWriter(str(tmp_path / "ck"), crcs, direct=True))
    assert crcs == {"__0_0.distcp": file_crc32(str(tmp_path / "ck" / "__0_0.distcp"))}
    loaded = _zeros_like(state)
    dcp_load(loaded, str(tmp_path / "ck"), no_dist=True)
    _assert_equal(state, loaded)


def test_a_full_disk_fails_a_direct_write_with_enospc_and_keeps_its_buffers(small_disk):
    """A direct write that runs out of space raises ENOSPC (the save then fails and is abandoned by its caller);
    the bounce buffers go back to the pool for the next save."""
    folder = small_disk("24m")
    pool = checkpoint_storage._free_buffers
    assert write_direct(os.path.join(folder, "small"), [memoryview(b"x" * 5000)])  # this tmpfs accepts O_DIRECT
    assert open(os.path.join(folder, "small"), "rb").read() == b"x" * 5000
    before = pool.qsize()
    with pytest.raises(OSError) as e:
        write_direct(os.path.join(folder, "big"), [memoryview(bytes(20 << 20)), memoryview(bytes(20 << 20))])
    assert e.value.errno == errno.ENOSPC
    assert pool.qsize() == before
