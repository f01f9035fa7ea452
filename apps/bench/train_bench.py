"""Training throughput: the real trainer against a minimal reference loop, in the same processes.

One torchrun launch (N processes) runs, alternately and `repeats` times:
  - the trainer: `apps.main.train.main([config=..., ...])`, the exact code path of
    `torchrun -m apps.main.train config=...` (FSDP2 via parallelize_model, data loader process, logging,
    preemption agreement, checkpointing off apart from the final save, which falls outside the timed window).
    Its tokens/s come from its own metrics.jsonl: the `created_at` times of the records at step `warmup` and at
    the last step (so start-up, the first batches and the final save are excluded).
  - the reference: plain PyTorch around the same model class: `fully_shard` on each block and the root over a
    1-D mesh of the same processes, the same batch shape (in memory), AdamW (fused or foreach, as the trainer
    is configured), clip_grad_norm_, and a barrier-timed loop over the same steps.
The ratio trainer / reference is taken per pair and the median reported. MFU uses the FLOPs per token of
lingua.transformer.flops_per_token against the matmul peak measured in the same processes (each rank times
a large torch.mm at the same time; the peaks are summed). With --device cuda: a GPU-sized model (GPU_MODEL,
bf16 compute), NCCL, one GPU a process, and MFU also against the GPU's data-sheet bf16 dense peak.

    python -m apps.bench.run --only train
"""

import gc
import json
import os
import sys
import time

from apps.bench import common

TARGET_RATIO = 0.98
TRAIN_REPEATS = 5  # interleaved trainer / reference pairs (at least): the ratio is within a few % of 1
# ~380M parameters, 8k tokens a step: big enough for a GPU's matmuls, a 4.5 GB final checkpoint per trainer run.
GPU_MODEL = {"dim": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 8, "multiple_of": 256, "max_seqlen": 2048}
GPU_DATA = {"batch_size": 4, "seq_len": 2048}


# ------------------------------------------------------------------------------------------ runner side


def sizes(ctx: common.BenchContext) -> dict:
    if ctx.quick:
        return {"steps": 6, "warmup": 2, "log_freq": 2, "repeats": 1, "mm": 256}
    if ctx.device == "cuda":  # GPU steps are short: more of them; fewer repeats (device time is scarce)
        return {"steps": 120, "warmup": 20, "log_freq": 10, "repeats": ctx.repeats, "mm": 8192}
    return {"steps": 70, "warmup": 20, "log_freq": 10, "repeats": max(ctx.repeats, TRAIN_REPEATS), "mm": 2048}


def launch(ctx: common.BenchContext, nproc: int, mode: str = "both", tag: str = "train") -> dict:
    """Run the worker under torchrun with `nproc` processes; returns its JSON result."""
    sz = sizes(ctx)
    overrides = {"logging": {"freq": sz["log_freq"]}, "steps": sz["steps"],
                 "checkpoint": {"dump": {"every": -1}, "eval": {"every": -1}}}
    if ctx.device == "cuda":
        overrides["model"], overrides["data"] = dict(GPU_MODEL), dict(GPU_DATA)
        overrides["distributed"] = {"device": "cuda", "model_dtype": "bf16"}
    if ctx.quick:
        overrides["model"] = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
        overrides["data"] = {"batch_size": 2, "seq_len": 32, "prefetch_size": 4}
    config = common.write_config(ctx, f"{tag}_{nproc}", overrides)
    work = os.path.join(ctx.work_dir, f"{tag}_{nproc}")
    common.clean_dir(work)
    os.makedirs(work)
    out = os.path.join(work, "result.json")
    args = ["--worker", "--config", config, "--work", work, "--out", out, "--mode", mode,
            "--steps", str(sz["steps"]), "--warmup", str(sz["warmup"]), "--repeats", str(sz["repeats"]),
            "--mm", str(sz["mm"]), "--device", ctx.device]
    ctx.say(f"{tag}: torchrun x{nproc}, {sz['repeats']} x ({mode}), {sz['steps']} steps each")
    common.run_logged(common.torchrun_cmd(nproc, "apps.bench.train_bench", args), os.path.join(work, "log.txt"),
                      common.bench_env(ctx.threads), timeout=1800)
    res = common.read_json(out)
    res["config"] = config
    return res


def summarize(raw: dict) -> dict:
    """Medians and the per-pair ratios of a worker result."""
    trainer, reference = raw.get("trainer_tps", []), raw.get("reference_tps", [])
    pairs = [t / r for t, r in zip(trainer, reference) if t and r]
    tps = common.median(trainer)
    out = {
        "nproc": raw["world_size"],
        "threads_per_proc": raw["threads"],
        "tokens_per_step_per_rank": raw["tokens_per_step"],
        "n_params": raw["n_params"],
        "flops_per_token": raw["flops_per_token"],
        "trainer_tokens_per_s": tps,
        "trainer_tokens_per_s_runs": trainer,
        "reference_tokens_per_s": common.median(reference),
        "reference_tokens_per_s_runs": reference,
        "ratio": common.median(pairs),
        "per_repeat": {"ratio": pairs},
        "matmul_peak_flops": raw["peak_flops"],
        "nominal_peak_flops": raw.get("nominal_peak_flops"),
        "device": raw.get("device", "cpu"),
        "gpu": raw.get("gpu"),
        "steps_timed": raw["steps"] - raw["warmup"],
    }
    for key, peak in (("", raw["peak_flops"]), ("_nominal", raw.get("nominal_peak_flops"))):
        if tps and peak:
            out[f"mfu{key}"] = raw["flops_per_token"] * tps / peak
        if out["reference_tokens_per_s"] and peak:
            out[f"reference_mfu{key}"] = raw["flops_per_token"] * out["reference_tokens_per_s"] / peak
    return out


def run(ctx: common.BenchContext) -> dict:
    res = summarize(launch(ctx, ctx.nproc, "both"))
    res["target_ratio"] = TARGET_RATIO
    return res


def rows(res: dict) -> list:
    n = res["nproc"]
    where = f"{n} GPU{'s' if n > 1 else ''}, bf16, {res['n_params'] / 1e6:.0f}M params" if res.get(
        "device") == "cuda" else f"{n} procs"
    peak = "bf16 matmul peak, measured" if res.get("device") == "cuda" else "matmul peak"
    out = [
        common.Row("train", f"tokens/s, trainer, {where}", res["trainer_tokens_per_s"], "tok/s",
                   res["reference_tokens_per_s"], "plain FSDP2 loop", res["ratio"], f">= {TARGET_RATIO}",
                   common.check(res["ratio"], f">= {TARGET_RATIO}"), common.per_repeat(res, "ratio")),
        common.Row("train", f"MFU, trainer (against the {peak})", res.get("mfu"), "%", res.get("reference_mfu"),
                   "plain loop MFU", None),
        common.Row("train", f"{peak} (sum of ranks)", res["matmul_peak_flops"], "FLOP/s"),
    ]
    if res.get("nominal_peak_flops"):
        out.append(common.Row("train", f"MFU, trainer (against the data-sheet bf16 dense peak, "
                                       f"{common.fmt(res['nominal_peak_flops'], 'FLOP/s')})", res.get("mfu_nominal"),
                              "%", res.get("reference_mfu_nominal"), "plain loop MFU", None))
    return out


# ------------------------------------------------------------------------------------------ worker side


def _trainer_tps(metrics_path: str, warmup: int, steps: int, tokens_per_step: int, world: int) -> float:
    """Tokens/s of all ranks between the logged steps `warmup` and `steps`, from the trainer's own records."""
    records = {}
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            records[r["global_step"]] = r
    t0, t1 = records[warmup]["created_at"], records[steps]["created_at"]
    return (steps - warmup) * tokens_per_step * world / (t1 - t0)


def _build_reference(train_args, mesh, device: str):
    import torch
    from torch.distributed.fsdp import fully_shard

    from lingua import distributed
    from lingua.transformer import LMTransformer

    if getattr(train_args.distributed, "keep_host_memory", False):  # the trainer's allocator setting (a process's)
        distributed.keep_host_memory()
    with torch.device("meta"):
        model = LMTransformer(train_args.model)
    mp = distributed.mixed_precision_policy(train_args.distributed)  # the trainer's mixed precision, as configured
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    model.init_weights()
    o = train_args.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.epsilon,
                            weight_decay=o.weight_decay, fused=o.fused, foreach=not o.fused)
    return model, opt


def _init_group(device: str) -> None:
    """The phase's process group: NCCL on this rank's GPU, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")


def _summed_peak(mm: int, device: str) -> float:
    """The matmul peak of every rank timed at the same time, summed (a collective)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t = torch.tensor([common.matmul_peak_flops(mm, device=device)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def _reference_tps(train_args, steps: int, warmup: int, mm: int, rdzv, device: str):
    """(tokens/s of all ranks, summed matmul FLOP/s of all ranks timed at the same time) of the plain loop."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rdzv.next()
    _init_group(device)
    try:
        world = dist.get_world_size()
        peak = _summed_peak(mm, device) if mm else None
        mesh = init_device_mesh(device, (world,), mesh_dim_names=("dp",))
        model, opt = _build_reference(train_args, mesh, device)
        d = train_args.data
        g = torch.Generator().manual_seed(dist.get_rank())
        batches = [torch.randint(0, train_args.model.vocab_size, (d.batch_size, d.seq_len + 1), generator=g)
                   .to(device) for _ in range(8)]
        clip = train_args.optim.clip if train_args.optim.clip > 0 else float("inf")
        gc.disable()  # as the trainer does
        t0 = None
        for step in range(steps):
            if step == warmup:
                common.synchronize(device)
                dist.barrier()
                t0 = time.perf_counter()
            b = batches[step % len(batches)]
            loss = model(b[:, :-1], b[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        common.synchronize(device)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        gc.enable()
        return (steps - warmup) * d.batch_size * d.seq_len * world / elapsed, peak
    finally:
        dist.destroy_process_group()


def worker(a) -> int:
    import torch

    from apps.main.train import load_train_config
    from apps.main.train import main as train_main
    from lingua.metrics import gpu_peak_flops
    from lingua.tokenizer import build_tokenizer
    from lingua.transformer import flops_per_token, num_params

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rdzv = common.Rendezvous()
    base = [f"config={a.config}", f"steps={a.steps}"]
    targs = load_train_config(base)
    if targs.model.vocab_size < 0:
        targs.model.vocab_size = build_tokenizer(targs.data.tokenizer).n_words
    with torch.device("meta"):
        from lingua.transformer import LMTransformer

        n_params = num_params(LMTransformer(targs.model))
    tokens_per_step = targs.data.batch_size * targs.data.seq_len * targs.grad_acc_steps
    if a.warmup % targs.logging.freq or a.steps % targs.logging.freq:
        raise SystemExit("--warmup and --steps must be multiples of logging.freq")
    result = {"world_size": world, "threads": torch.get_num_threads(), "steps": a.steps, "warmup": a.warmup,
              "tokens_per_step": tokens_per_step, "n_params": n_params,
              "flops_per_token": flops_per_token(targs.model, n_params, targs.data.seq_len),
              "trainer_tps": [], "reference_tps": [], "peak_flops": None, "peak_flops_runs": [],
              "device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
              "nominal_peak_flops": None}
    nominal = gpu_peak_flops(torch.device(a.device))  # the data sheet's bf16 dense peak (the trainer's table)
    if nominal:
        result["nominal_peak_flops"] = nominal * world
    for r in range(a.repeats):
        order = ["trainer", "reference"] if r % 2 == 0 else ["reference", "trainer"]
        if a.mode != "both":
            order = [a.mode]
        for kind in order:
            if kind == "trainer":
                dump = os.path.join(a.work, f"trainer_{r}")
                rdzv.next()
                rc = train_main(base + [f"dump_dir={dump}"])
                if rc != 0:
                    raise SystemExit(f"trainer exited with {rc}")
                if rank == 0:
                    result["trainer_tps"].append(
                        _trainer_tps(os.path.join(dump, "metrics.jsonl"), a.warmup, a.steps, tokens_per_step, world))
            else:
                # The matmul peak is timed in every reference phase; the best is the machine's peak.
                tps, peak = _reference_tps(targs, a.steps, a.warmup, a.mm, rdzv, a.device)
                result["reference_tps"].append(tps)
                result["peak_flops_runs"].append(peak)
                result["peak_flops"] = max(result["peak_flops_runs"])
    if result["peak_flops"] is None:  # trainer-only mode: measure the peak on its own
        import torch.distributed as dist

        rdzv.next()
        _init_group(a.device)
        result["peak_flops"] = _summed_peak(a.mm, a.device)
        dist.destroy_process_group()
    if rank == 0:
        common.write_json(a.out, result)
    return 0


def _worker_args(p) -> None:
    p.add_argument("--work")
    p.add_argument("--mode", default="both", choices=["both", "trainer", "reference"])
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--mm", type=int, default=2048)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def main(argv=None) -> int:
    return common.part_main(argv, "train", __doc__.split("\n")[0], worker, _worker_args)


if __name__ == "__main__":
    sys.exit(main())
