"""Checkpoint save cost: lingua.checkpoint.CheckpointManager (sync and async) against raw writes of the same bytes.

One torchrun launch (N processes) builds the trainer's model and optimizer (lingua.transformer.build_model, one
optimizer step so that AdamW's moments exist) at a size whose checkpoint is a few hundred MB, then, `repeats`
times in rotating order:
  - raw:   every rank writes its local shards of the same tensors (model + optimizer state), padded to the bytes
           it wrote into the checkpoint, to one file (write + fsync); barrier to barrier, on rank 0. Three ways:
           through the page cache; the same with writeback started after every 8 MiB (sync_file_range, as a
           sync save writes); and with O_DIRECT from one aligned 64 MiB buffer (as `dd oflag=direct` would). The
           floor a save is compared with is the fastest of the three in each round;
  - sync:  CheckpointManager.save with checkpoint.async_save=false (everything: state dict, train state, DCP
           shards, fsync, crc32 records, commit), barrier to barrier; also with checkpoint.checksums=false, and
           through the page cache (checkpoint.sync_direct_io=false; the default writes with O_DIRECT);
  - async: CheckpointManager.save with checkpoint.async_save=true, then training steps as the trainer runs them
           (forward, backward, clip, wait_staged, optimizer step, poll) until the save is committed. `blocking` =
           the save() call + the wait for the copy of the state before the first optimizer step; `background` =
           from save() returning to the commit. The steps that overlapped the write are compared with steps with
           no save in flight, measured in the same round (the target: tokens/s >= 0.9 of those).
Each measurement follows a write of its own kind, as successive saves of a run do (page cache: raws, the sync
save through the cache; O_DIRECT: raw direct, sync, async); a sync save right after the O_DIRECT writes is
measured apart, since some VMs slow a buffered write+fsync that follows an O_DIRECT one. Each checkpoint is
deleted (untimed) before the next measurement. Then (the ckpt part, not ckpt_scaling) sync saves as a run makes
them: IDLE_S seconds after the last, the previous checkpoints kept, O_DIRECT and the page cache alternating,
IDLE_SAVES of each. With --device cuda the model lives on the GPU (bf16 compute): a save includes the copy to
host memory, the raw baseline writes bytes already there.

    python -m apps.bench.run --only ckpt
"""

import os
import shutil
import sys
import time

from apps.bench import common

TARGET_SYNC_BW = 0.8  # sync save bandwidth / raw write bandwidth
TARGET_ASYNC_BLOCK = 0.10  # async blocking time / sync save time
TARGET_OVERLAP = 0.9  # tokens/s of the steps overlapping an async write / tokens/s with no save in flight

# What one round measures, in order (for the progress messages; the order itself is in `worker`).
ROUND = ("raw, raw with early writeback, sync through the page cache, sync, sync without checksums, async, "
         "raw direct, sync")
# Then saves as a run makes them (the ckpt part only): IDLE_S seconds of nothing before each, the previous
# checkpoints kept (the manager's retention deletes older ones); O_DIRECT (the default) and the page cache alternate.
IDLE_SAVES, IDLE_S = 3, 10.0

# The worker's figures, one per timed round.
RUN_KEYS = ("raw_s", "raw_wb_s", "raw_direct_s", "sync_s", "sync_nocrc_s", "sync_cache_s", "sync_after_direct_s",
            "async_block_s", "async_save_call_s", "async_staged_wait_s", "async_background_s",
            "async_other_threads_cpu_s", "idle_other_threads_cpu_s", "async_main_cpu_s", "idle_main_cpu_s",
            "step_during_async_s", "step_s", "steps_overlapped")
# The saves made as a run makes them (after the rounds, the ckpt part only).
IDLE_KEYS = ("idle_sync_s", "idle_sync_cache_s")

# ~57M parameters: fp32 weights + two AdamW moments = ~690 MB per checkpoint.
MODEL = {"dim": 768, "n_layers": 8, "n_heads": 12, "n_kv_heads": 12, "multiple_of": 256}
QUICK_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}


def model_overrides(ctx: common.BenchContext) -> dict:
    """The checkpoint-sized model (shared with the resume benchmark): small batches, one logged step."""
    model = dict(QUICK_MODEL if ctx.quick else MODEL)
    model["max_seqlen"] = 64
    out = {"model": model, "data": {"batch_size": 1, "seq_len": 32 if ctx.quick else 64, "prefetch_size": 2},
           "logging": {"freq": 1}, "checkpoint": {"dump": {"every": -1}, "eval": {"every": -1}}}
    if ctx.device == "cuda":
        out["distributed"] = {"device": "cuda", "model_dtype": "bf16"}
    return out


# ------------------------------------------------------------------------------------------ runner side


def run(ctx: common.BenchContext) -> dict:
    repeats = 1 if ctx.quick else ctx.repeats
    config = common.write_config(ctx, "ckpt", model_overrides(ctx))
    ctx.say(f"ckpt: torchrun x{ctx.nproc}, {repeats} x ({ROUND})")
    return measure(ctx, config, os.path.join(ctx.work_dir, "ckpt"), repeats,
                   idle=(1, 0.0) if ctx.quick else (IDLE_SAVES, IDLE_S))


def measure(ctx: common.BenchContext, config: str, work: str, repeats: int, keep_last: bool = False,
            idle: tuple = (0, 0.0)) -> dict:
    """One worker launch on `config`; the summarized figures. keep_last: the last sync checkpoint stays (its path
    in "kept"), for a load measurement. idle: (saves of each kind, seconds before each) as a run makes them."""
    common.clean_dir(work)
    os.makedirs(work)
    out = os.path.join(work, "result.json")
    common.run_logged(
        common.torchrun_cmd(ctx.nproc, "apps.bench.ckpt_bench",
                            ["--worker", "--config", config, "--work", work, "--out", out, "--repeats", str(repeats),
                             "--idle-saves", str(idle[0]), "--idle-s", str(idle[1]),
                             *(["--keep-last"] if keep_last else [])]),
        os.path.join(work, "log.txt"), common.bench_env(ctx.threads), timeout=3600)
    raw = common.read_json(out)
    if not keep_last:
        common.clean_dir(os.path.join(work, "dump"))
    common.clean_dir(os.path.join(work, "raw"))
    nbytes = raw["bytes"]
    floor = [min(w) for w in zip(raw["raw_s"], raw["raw_wb_s"], raw["raw_direct_s"])]  # each round's fastest
    raw_s, sync_s = common.median(floor), common.median(raw["sync_s"])
    block_s, bg_s = common.median(raw["async_block_s"]), common.median(raw["async_background_s"])
    # Ratios per interleaved round, then the median.
    per_repeat = {
        "sync_vs_raw_bandwidth": common.ratios(floor, raw["sync_s"]),
        "sync_no_checksums_vs_raw_bandwidth": common.ratios(floor, raw["sync_nocrc_s"]),
        "sync_after_direct_vs_raw_bandwidth": common.ratios(floor, raw["sync_after_direct_s"]),
        "sync_cache_vs_raw_bandwidth": common.ratios(floor, raw["sync_cache_s"]),
        "idle_sync_direct_vs_cache": common.ratios(raw["idle_sync_s"], raw["idle_sync_cache_s"]),
        "async_blocking_vs_sync": common.ratios(raw["async_block_s"], raw["sync_s"]),
        "overlap_tokens_per_s_vs_idle": common.ratios(raw["step_s"], raw["step_during_async_s"]),
    }
    medians = {k: common.median(v) for k, v in per_repeat.items()}
    return {
        "nproc": raw["world_size"],
        "device": ctx.device,
        "n_params": raw["n_params"],
        "bytes": nbytes,
        "raw_write_s": raw_s,
        "raw_write_bytes_per_s": nbytes / raw_s,
        "raw_buffered_write_s": common.median(raw["raw_s"]),
        "raw_writeback_write_s": common.median(raw["raw_wb_s"]),
        "raw_direct_write_s": common.median(raw["raw_direct_s"]),
        "sync_save_s": sync_s,
        "sync_save_bytes_per_s": nbytes / sync_s,
        "sync_vs_raw_bandwidth": medians["sync_vs_raw_bandwidth"],
        "sync_save_no_checksums_s": common.median(raw["sync_nocrc_s"]),
        "sync_no_checksums_vs_raw_bandwidth": medians["sync_no_checksums_vs_raw_bandwidth"],
        "sync_save_after_direct_s": common.median(raw["sync_after_direct_s"]),
        "sync_after_direct_vs_raw_bandwidth": medians["sync_after_direct_vs_raw_bandwidth"],
        "sync_save_cache_s": common.median(raw["sync_cache_s"]),
        "sync_cache_vs_raw_bandwidth": medians["sync_cache_vs_raw_bandwidth"],
        "idle_s": idle[1],
        "idle_sync_save_s": common.median(raw["idle_sync_s"]),  # (None without the idle saves)
        "idle_sync_save_cache_s": common.median(raw["idle_sync_cache_s"]),
        "idle_sync_direct_vs_cache": medians["idle_sync_direct_vs_cache"],
        "async_blocking_s": block_s,
        "async_background_s": bg_s,
        "async_save_call_s": common.median(raw["async_save_call_s"]),
        "async_staged_wait_s": common.median(raw["async_staged_wait_s"]),
        "async_blocking_vs_sync": medians["async_blocking_vs_sync"],
        "step_s": common.median(raw["step_s"]),
        "step_during_async_s": common.median(raw["step_during_async_s"]),
        "steps_overlapped": common.median(raw["steps_overlapped"]),
        "overlap_tokens_per_s_vs_idle": medians["overlap_tokens_per_s_vs_idle"],
        "async_other_threads_cpu_s": common.median(raw["async_other_threads_cpu_s"]),
        "runs": {k: raw[k] for k in RUN_KEYS + IDLE_KEYS},
        "per_repeat": per_repeat,
        "checksums": raw["checksums"],
        "targets": {"sync_vs_raw_bandwidth": TARGET_SYNC_BW, "async_blocking_vs_sync": TARGET_ASYNC_BLOCK,
                    "overlap_tokens_per_s_vs_idle": TARGET_OVERLAP},
        "kept": raw.get("kept"),
        "raw_bytes": raw.get("raw_bytes"),
    }


def rows(res: dict) -> list:
    return [
        common.Row("ckpt", f"checkpoint size ({res['n_params'] / 1e6:.3g}M params + AdamW"
                           f"{', saved from GPU memory' if res.get('device') == 'cuda' else ''})", res["bytes"], "B"),
        common.Row("ckpt", "sync save bandwidth", res["sync_save_bytes_per_s"], "B/s", res["raw_write_bytes_per_s"],
                   "fastest raw write+fsync", res["sync_vs_raw_bandwidth"], f">= {TARGET_SYNC_BW}",
                   common.check(res["sync_vs_raw_bandwidth"], f">= {TARGET_SYNC_BW}"),
                   common.per_repeat(res, "sync_vs_raw_bandwidth")),
        common.Row("ckpt", "sync save time", res["sync_save_s"], "s", res["raw_write_s"], "fastest raw write+fsync",
                   common.ratio(res["sync_save_s"], res["raw_write_s"])),
        common.Row("ckpt", "raw write+fsync, writeback started every 8 MiB, as a sync save writes",
                   res["raw_writeback_write_s"], "s", res["raw_buffered_write_s"], "raw write+fsync, page cache",
                   common.ratio(res["raw_writeback_write_s"], res["raw_buffered_write_s"])),
        common.Row("ckpt", "raw write+fsync with O_DIRECT",
                   res["raw_direct_write_s"], "s", res["raw_buffered_write_s"], "raw write+fsync, page cache",
                   common.ratio(res["raw_direct_write_s"], res["raw_buffered_write_s"])),
        common.Row("ckpt", "sync save bandwidth, checkpoint.checksums=false",
                   common.ratio(res["bytes"], res["sync_save_no_checksums_s"]), "B/s", res["raw_write_bytes_per_s"],
                   "fastest raw write+fsync", res["sync_no_checksums_vs_raw_bandwidth"],
                   runs=common.per_repeat(res, "sync_no_checksums_vs_raw_bandwidth")),
        common.Row("ckpt", "sync save bandwidth through the page cache (checkpoint.sync_direct_io=false)",
                   common.ratio(res["bytes"], res["sync_save_cache_s"]), "B/s", res["raw_write_bytes_per_s"],
                   "fastest raw write+fsync", res["sync_cache_vs_raw_bandwidth"],
                   runs=common.per_repeat(res, "sync_cache_vs_raw_bandwidth")),
        common.Row("ckpt", "sync save bandwidth right after an O_DIRECT write (async save, raw direct)",
                   common.ratio(res["bytes"], res["sync_save_after_direct_s"]), "B/s", res["raw_write_bytes_per_s"],
                   "fastest raw write+fsync", res["sync_after_direct_vs_raw_bandwidth"],
                   runs=common.per_repeat(res, "sync_after_direct_vs_raw_bandwidth")),
        *([common.Row("ckpt", f"sync save {res['idle_s']:.0f} s after the last, previous ones kept (as in a run)",
                      res["idle_sync_save_s"], "s", res["idle_sync_save_cache_s"], "the same through the page cache",
                      res["idle_sync_direct_vs_cache"], runs=common.per_repeat(res, "idle_sync_direct_vs_cache"))]
          if res.get("idle_sync_save_s") else []),
        common.Row("ckpt", "async save: training blocked", res["async_blocking_s"], "s", res["sync_save_s"],
                   "sync save", res["async_blocking_vs_sync"], f"<= {TARGET_ASYNC_BLOCK}",
                   common.check(res["async_blocking_vs_sync"], f"<= {TARGET_ASYNC_BLOCK}"),
                   common.per_repeat(res, "async_blocking_vs_sync")),
        common.Row("ckpt", "async save: CPU of the threads besides training's, save() to commit (rank 0)",
                   res["async_other_threads_cpu_s"], "s", res["step_s"], "a step with no save",
                   common.ratio(res["async_other_threads_cpu_s"], res["step_s"])),
        common.Row("ckpt", "async save: background until commit", res["async_background_s"], "s", res["sync_save_s"],
                   "sync save", common.ratio(res["async_background_s"], res["sync_save_s"])),
        common.Row("ckpt", f"tokens/s of the steps overlapping an async write ({res['steps_overlapped']:.0f} steps)",
                   common.ratio(1.0, res["step_during_async_s"]), "step/s", common.ratio(1.0, res["step_s"]),
                   "steps with no save", res["overlap_tokens_per_s_vs_idle"], f">= {TARGET_OVERLAP}",
                   common.check(res["overlap_tokens_per_s_vs_idle"], f">= {TARGET_OVERLAP}"),
                   common.per_repeat(res, "overlap_tokens_per_s_vs_idle")),
    ]


# ------------------------------------------------------------------------------------------ worker side


def _local_tensors(model, optimizer) -> list:
    """This rank's shards of every tensor a checkpoint holds (model + optimizer state), as byte views."""
    import torch

    from lingua.checkpoint import _flatten, model_optim_state

    out = []
    for _, v in _flatten(model_optim_state(model, optimizer), ""):
        if isinstance(v, torch.Tensor):
            t = (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().contiguous().reshape(-1)
            out.append(t.view(torch.uint8).numpy())
    return out


def _raw_pieces(arrays: list, nbytes: int) -> list:
    """The tensors' bytes, cut or padded with zeros to nbytes (what one rank wrote into the checkpoint)."""
    views, left = [], nbytes
    for a in arrays:
        views.append(memoryview(a).cast("B")[:left])
        left -= len(views[-1])
    return views + [memoryview(bytes(left))]


def _raw_write(path: str, arrays: list, nbytes: int, writeback: bool = False) -> None:
    """The raw pieces into one file, write + fsync; writeback: started after every 8 MiB, as a sync save does."""
    from lingua.checkpoint_storage import write_buffered

    write_buffered(path, _raw_pieces(arrays, nbytes), writeback=writeback)


def _raw_write_writeback(path: str, arrays: list, nbytes: int) -> None:
    _raw_write(path, arrays, nbytes, writeback=True)


def _raw_write_direct(path: str, arrays: list, nbytes: int) -> None:
    """As _raw_write, with O_DIRECT: the bytes copied into one page-aligned buffer, written whenever it is full
    (the last write padded to 4096 bytes, then the file cut to nbytes), then fsync."""
    import mmap

    buf, fill, offset = mmap.mmap(-1, 64 << 20), 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        def flush(n):
            assert os.pwrite(fd, memoryview(buf)[:n], offset) == n

        for a in _raw_pieces(arrays, nbytes):
            pos = 0
            while pos < len(a):
                n = min(len(a) - pos, len(buf) - fill)
                buf[fill:fill + n] = a[pos:pos + n]
                fill, pos = fill + n, pos + n
                if fill == len(buf):
                    flush(fill)
                    offset, fill = offset + fill, 0
        if fill:
            padded = -(-fill // 4096) * 4096
            buf[fill:padded] = bytes(padded - fill)
            flush(padded)
        os.ftruncate(fd, offset + fill)
        os.fsync(fd)
    finally:
        os.close(fd)


RAW_WRITES = {"raw": _raw_write, "raw_wb": _raw_write_writeback, "raw_direct": _raw_write_direct}


def _cpu() -> tuple:
    """(CPU seconds of the calling thread (training's), CPU seconds of the whole process, ended threads included)."""
    return time.thread_time(), time.process_time()


def _other_cpu(before: tuple, after: tuple) -> float:
    """CPU seconds between two _cpu() of the threads other than training's (gloo's, the save's)."""
    return (after[1] - before[1]) - (after[0] - before[0])


def _train_step(model, optimizer, tokens, ckpt=None) -> tuple:
    """One step as the trainer runs it: (step seconds, seconds waiting for an async save's copy)."""
    import torch

    t0 = time.perf_counter()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0, foreach=True)
    waited = 0.0
    if ckpt is not None:
        t = time.perf_counter()
        getattr(ckpt, "wait_staged", lambda: None)()  # (absent in older trees: A/B runs)
        waited = time.perf_counter() - t
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    common.synchronize(tokens.device.type)
    return time.perf_counter() - t0, waited


def build_trained(config: str, dump_dir: str, extra=()):
    """(args, dist_state, model, optimizer, scheduler) of the trainer after one real optimizer step."""
    import torch

    from apps.main.train import load_train_config
    from lingua.distributed import setup_torch_distributed
    from lingua.optim import build_optimizer
    from lingua.tokenizer import build_tokenizer
    from lingua.transformer import build_model

    args = load_train_config([f"config={config}", f"dump_dir={dump_dir}", *extra])
    dist_state = setup_torch_distributed(args.distributed)
    args.model.vocab_size = build_tokenizer(args.data.tokenizer).n_words
    model = build_model(args.model, dist_state, args.distributed, init=True)
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    g = torch.Generator().manual_seed(dist_state.env.rank)
    tokens = torch.randint(0, args.model.vocab_size, (args.data.batch_size, args.data.seq_len + 1),
                           generator=g).to(dist_state.device)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return args, dist_state, model, optimizer, scheduler


def worker(a) -> int:
    import torch
    import torch.distributed as dist

    from lingua.args import config_to_dict
    from lingua.checkpoint import CheckpointManager, TrainState, read_commit, written_by
    from lingua.transformer import num_params

    dump = os.path.join(a.work, "dump")
    args, dist_state, model, optimizer, scheduler = build_trained(a.config, dump)
    rank, world = dist_state.env.rank, dist_state.env.world_size
    group = dist_state.cpu_group
    train_state = TrainState(scheduler, data={"bench": True})
    managers = {}
    for kind in ("sync", "async", "sync_nocrc", "sync_cache"):
        cargs = type(args.checkpoint)(**{**args.checkpoint.__dict__})
        cargs.async_save = kind == "async"
        cargs.checksums = args.checkpoint.checksums and kind != "sync_nocrc"
        cargs.sync_direct_io = kind != "sync_cache"
        cargs.path = os.path.join(dump, f"checkpoints_{kind}")
        managers[kind] = CheckpointManager(cargs, dump, dist_state, config_to_dict(args))
        managers[kind].prepare()
    raw_dir = os.path.join(a.work, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    arrays = _local_tensors(model, optimizer)
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.model.vocab_size, (args.data.batch_size, args.data.seq_len + 1),
                           generator=g).to(dist_state.device)
    res = {"world_size": world, "n_params": num_params(model), "checksums": args.checkpoint.checksums, "bytes": None,
           **{k: [] for k in RUN_KEYS + IDLE_KEYS}}
    my_bytes = None
    step = 1000

    def timed(fn):
        common.synchronize(dist_state.device.type)
        dist.barrier(group=group)
        t = time.perf_counter()
        out = fn()
        common.synchronize(dist_state.device.type)
        dist.barrier(group=group)
        return time.perf_counter() - t, out

    def rank_sum(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        return t.item()

    def rank_max(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.item()

    def remove(path):
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier(group=group)

    # Round 0 is untimed: it learns the byte counts and warms every code path. Each measurement follows a write
    # of its own kind, as successive saves of one run do: on some VMs a buffered write+fsync right after an
    # O_DIRECT write is 2-3x slower (docs/benchmarks.md), so the buffered kinds rotate among themselves, then the
    # O_DIRECT ones (sync saves write with O_DIRECT by default, checkpoint.sync_direct_io), and a sync save right
    # after them is measured apart ("sync_after_direct").
    buffered, direct = ["sync_cache", "raw", "raw_wb"], ["sync", "async", "sync_nocrc", "raw_direct"]  # a save first
    for r in range(a.repeats + 1):
        cpu0 = _cpu()
        idle = [_train_step(model, optimizer, tokens)[0] for _ in range(3)]  # steps with no save in flight
        cpu1 = _cpu()
        if r:
            res["step_s"].append(rank_max(sum(idle) / len(idle)))
            res["idle_other_threads_cpu_s"].append(_other_cpu(cpu0, cpu1) / len(idle))
            res["idle_main_cpu_s"].append((cpu1[0] - cpu0[0]) / len(idle))
        for kind in buffered + direct + ["sync_after_direct"]:
            step += 1
            train_state.step = step
            if kind in RAW_WRITES:
                path = os.path.join(raw_dir, f"rank_{rank:05d}.bin")
                write = RAW_WRITES[kind]
                s, _ = timed(lambda: write(path, arrays, my_bytes))
                written = rank_sum(os.path.getsize(path))
                os.remove(path)
                if r:
                    res[f"{kind}_s"].append(s)
                    res["raw_bytes"] = int(written)  # the baseline wrote as many bytes as the checkpoint holds
                continue
            mgr = managers["sync" if kind == "sync_after_direct" else kind]
            if kind != "async":
                s, ok = timed(lambda: mgr.save(model, optimizer, train_state, ["dump"]))
                assert ok, "sync save failed"
                if r:
                    res[f"{kind}_s"].append(s)
            else:
                cpu0 = _cpu()
                call, ok = timed(lambda: mgr.save(model, optimizer, train_state, ["dump"]))
                assert ok, "async save failed"
                t_return = time.perf_counter()
                during, waited = [], None
                while True:  # train as the trainer does until the save is committed
                    d, w = _train_step(model, optimizer, tokens, mgr)
                    during.append(d)
                    waited = w if waited is None else waited
                    if mgr.poll() or len(during) >= 100:
                        break
                mgr.wait()
                cpu1 = _cpu()
                dist.barrier(group=group)
                background = time.perf_counter() - t_return
                if r:
                    waited, mean = rank_max(waited), rank_max(sum(during) / len(during))
                    res["async_save_call_s"].append(call)
                    res["async_staged_wait_s"].append(waited)
                    res["async_block_s"].append(call + waited)
                    res["async_background_s"].append(background)
                    res["step_during_async_s"].append(mean)
                    res["steps_overlapped"].append(len(during))
                    # CPU seconds of the threads other than training's, from save() to the commit (rank 0)
                    res["async_other_threads_cpu_s"].append(_other_cpu(cpu0, cpu1))
                    res["async_main_cpu_s"].append(cpu1[0] - cpu0[0])
            ckpt_dir = os.path.join(mgr.root, f"{step:010d}")
            files = read_commit(ckpt_dir)["files"] if rank == 0 else None
            box = [files]
            dist.broadcast_object_list(box, src=0, group=group)
            files = box[0]
            res["bytes"] = sum(f["size"] for f in files.values())
            # The files this rank wrote: its shards and train state; rank 0 also the shared ones.
            mine = [n for n in files if written_by(n, rank, dist_state.dp_rank)]
            my_bytes = sum(files[n]["size"] for n in mine)
            if a.keep_last and kind == "sync_after_direct" and r == a.repeats:  # the last save of all
                res["kept"] = ckpt_dir
                continue
            remove(ckpt_dir)
        buffered, direct = buffered[1:] + buffered[:1], direct[1:] + direct[:1]  # each kind in a new place each round
    for i in range(2 * a.idle_saves):  # saves as a run makes them (IDLE_SAVES above); the first kind alternates
        kind = ("sync", "sync_cache")[(i + i // 2) % 2]
        time.sleep(a.idle_s)
        step += 1
        train_state.step = step
        s, ok = timed(lambda: managers[kind].save(model, optimizer, train_state, ["dump"]))
        assert ok, "sync save failed"
        res[f"idle_{kind}_s"].append(s)
    if rank == 0:
        common.write_json(a.out, res)
    dist.destroy_process_group()
    return 0


def _worker_args(p) -> None:
    p.add_argument("--work")
    p.add_argument("--keep-last", action="store_true", help="(internal) keep the last sync checkpoint")
    p.add_argument("--idle-saves", type=int, default=0, help="(internal) saves of each kind after an idle time")
    p.add_argument("--idle-s", type=float, default=IDLE_S, help="(internal) the idle time before each of them")


def main(argv=None) -> int:
    return common.part_main(argv, "ckpt", __doc__.split("\n")[0], worker, _worker_args)


if __name__ == "__main__":
    sys.exit(main())
