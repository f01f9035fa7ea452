"""Resume cost: time from process start to the first step of a resumed run against a fresh start of the same
config, and checkpoint load time against a raw read of the same bytes.

Start-up, `repeats` times (the checkpoint-sized model of ckpt_bench, N processes):
  - fresh:  `torchrun -m apps.main.train config=... steps=1` in a new dump dir. Time to first step = the
            `created_at` of its metrics record for step 1 minus the launch time (torchrun start, imports,
            model build and init, resolve, data loader start, one step). It ends with a save of step 1.
  - resume: the same command with steps=8 in the same dump dir, after evicting the checkpoint's files from the
            page cache (a restart rarely finds them cached): launch to the record of step 2, which includes
            resolve (validation on every rank, checksums in the background: checkpoint.verify=true, the default)
            and the DCP load of model + optimizer. Its first step's time (`speed/step_time_s`, which includes
            waiting for the first batch) against the median of steps 4-8.
  - resume without checksums: the same from a copy of the dump dir with checkpoint.verify=false (the cost of
            verifying by default).
Load, in one torchrun launch on the last checkpoint, alternating, from a cold page cache and then warm:
  - load: lingua.checkpoint.load_model_optim (what the trainer's restore does) into a new model + optimizer
          (built untimed before each load, as a resuming trainer has them);
  - raw:  every rank reads its own files of that checkpoint with plain reads (the same bytes in total) into one
          reused buffer;
  - raw into new memory (warm, informative): the same reads into newly allocated tensors, as a load into a new
          model must (the first touch of every page costs a page fault): what is left of the warm load's gap.

    python -m apps.bench.run --only resume
"""

import json
import os
import re
import shutil
import sys
import time

from apps.bench import ckpt_bench, common

# ------------------------------------------------------------------------------------------ runner side


def _first_record(metrics: str) -> dict:
    with open(metrics) as f:
        return json.loads(f.readline())


def _log_elapsed(train_log: str, pattern: str):
    """Seconds-since-start field of the first rank-0 log line matching `pattern` (None if absent)."""
    try:
        with open(train_log, errors="replace") as f:
            for line in f:
                if " r0 " in line and re.search(pattern, line):
                    m = re.match(r"^\S\s+\S+\s+([\d.]+)s\s", line)
                    if m:
                        return float(m.group(1))
    except OSError:
        pass
    return None


def _ckpt_files(ckpt_dir: str) -> list:
    return [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, n))]


LOAD_FIGURES = ("load_s", "raw_read_s", "load_vs_raw_read", "load_warm_s", "raw_read_warm_s", "load_vs_raw_read_warm")
LOAD_RATIOS = {"load_vs_raw_read": ("load_s", "raw_s"), "load_vs_raw_read_warm": ("load_warm_s", "raw_warm_s")}


def load_figures(load: dict) -> dict:
    """LOAD_FIGURES of a load worker's timings (medians; the ratios are the medians of the ratios per repeat, cold
    and warm cache, against raw reads of the same bytes), and those per-repeat ratios under "per_repeat"."""
    per_repeat = {key: common.ratios(load[a], load[b]) for key, (a, b) in LOAD_RATIOS.items()}
    values = (common.median(load["load_s"]), common.median(load["raw_s"]),
              common.median(per_repeat["load_vs_raw_read"]), common.median(load["load_warm_s"]),
              common.median(load["raw_warm_s"]), common.median(per_repeat["load_vs_raw_read_warm"]))
    return {**dict(zip(LOAD_FIGURES, values)), "per_repeat": per_repeat}


def run(ctx: common.BenchContext) -> dict:
    repeats = 1 if ctx.quick else ctx.repeats
    config = common.write_config(ctx, "resume", ckpt_bench.model_overrides(ctx))
    work = os.path.join(ctx.work_dir, "resume")
    common.clean_dir(work)
    os.makedirs(work)
    env = common.bench_env(ctx.threads)
    log = os.path.join(work, "log.txt")
    steps = 4 if ctx.quick else 8
    fresh, restore_s, cold = [], [], None
    resumed, first_step, steady = {"verify": [], "noverify": []}, [], []
    ctx.say(f"resume: {repeats} x (fresh start, resume, resume without checksums) with torchrun x{ctx.nproc}")
    dump = None
    for r in range(repeats):
        if dump:
            common.clean_dir(dump)
            common.clean_dir(dump + "_noverify")
        dump = os.path.join(work, f"run_{r}")
        start = common.run_logged(common.torchrun_cmd(ctx.nproc, "apps.main.train",
                                                      [f"config={config}", f"dump_dir={dump}", "steps=1"]),
                                  log, env, timeout=900)
        fresh.append(_first_record(os.path.join(dump, "metrics.jsonl"))["created_at"] - start)
        shutil.copytree(dump, dump + "_noverify")
        kinds = [("verify", dump, []), ("noverify", dump + "_noverify", ["checkpoint.verify=false"])]
        for name, d, extra in (kinds if r % 2 == 0 else kinds[::-1]):  # interleaved
            cold = common.drop_page_cache(_ckpt_files(os.path.join(d, "checkpoints", f"{1:010d}")))
            start = common.run_logged(
                common.torchrun_cmd(ctx.nproc, "apps.main.train",
                                    [f"config={config}", f"dump_dir={d}", f"steps={steps}", *extra]),
                log, env, timeout=900)
            with open(os.path.join(d, "metrics.jsonl")) as f:
                recs = {rec["global_step"]: rec for rec in map(json.loads, f)}
            if 2 not in recs:
                raise RuntimeError(f"the resumed run did not log step 2 ({d})")
            resumed[name].append(recs[2]["created_at"] - start)
            if name == "verify":
                first_step.append(recs[2]["speed/step_time_s"])
                steady.append(common.median([recs[s]["speed/step_time_s"] for s in range(4, steps + 1)]))
                t0 = _log_elapsed(os.path.join(d, "train.log"), r"resuming from")
                t1 = _log_elapsed(os.path.join(d, "train.log"), r"resumed from")
                restore_s.append(t1 - t0 if t0 is not None and t1 is not None else None)
    # Load against raw read, in one launch, on the last run's final checkpoint.
    ckpt_dir = os.path.join(dump, "checkpoints", f"{steps:010d}")
    out = os.path.join(work, "load.json")
    common.run_logged(
        common.torchrun_cmd(ctx.nproc, "apps.bench.resume_bench",
                            ["--worker", "--config", config, "--ckpt", ckpt_dir, "--out", out,
                             "--repeats", str(repeats)]), log, env, timeout=900)
    load = common.read_json(out)
    nbytes = sum(os.path.getsize(p) for p in _ckpt_files(ckpt_dir))
    resumed_from_step_1 = all(_log_elapsed(os.path.join(d, "train.log"), r"resumed from \S+ at step 1$") is not None
                              for d in (dump, dump + "_noverify"))  # both resumed, neither started afresh
    common.clean_dir(work)
    figures = load_figures(load)
    per_repeat = {
        "resume_vs_fresh": common.ratios(resumed["verify"], fresh),
        "verify_cost": common.ratios(resumed["verify"], resumed["noverify"]),
        "first_step_vs_steady": common.ratios(first_step, steady),
        "load_vs_raw_read_new_warm": common.ratios(load["load_warm_s"], load["raw_new_warm_s"]),
        **figures.pop("per_repeat"),
    }
    return {
        "nproc": ctx.nproc,
        "fresh_start_to_first_step_s": common.median(fresh),
        "resume_start_to_first_step_s": common.median(resumed["verify"]),
        "resume_vs_fresh": common.median(per_repeat["resume_vs_fresh"]),
        "resume_no_checksums_s": common.median(resumed["noverify"]),
        "verify_cost": common.median(per_repeat["verify_cost"]),
        "first_resumed_step_s": common.median(first_step),
        "steady_step_s": common.median(steady),
        "first_step_vs_steady": common.median(per_repeat["first_step_vs_steady"]),
        "restore_in_trainer_s": common.median(restore_s),
        "ckpt_bytes": nbytes,
        **figures,
        "raw_read_new_warm_s": common.median(load["raw_new_warm_s"]),
        "load_vs_raw_read_new_warm": common.median(per_repeat["load_vs_raw_read_new_warm"]),
        "cold_cache": cold and load["cold"],
        "raw_read_bytes": load["read_bytes"],
        "resumed_from_step_1": resumed_from_step_1,
        "runs": {"fresh": fresh, "resumed": resumed, "first_step": first_step, "steady_step": steady,
                 "restore_in_trainer": restore_s, "load": load["load_s"], "raw_read": load["raw_s"],
                 "load_warm": load["load_warm_s"], "raw_read_warm": load["raw_warm_s"],
                 "raw_read_new_warm": load["raw_new_warm_s"]},
        "per_repeat": per_repeat,
    }


TARGET_RESUME = "<= 1.0"  # resumed start -> first step / fresh start -> first step
TARGET_FIRST_STEP = "<= 1.2"  # first resumed step / a steady step
TARGET_LOAD = "<= 1.5"  # checkpoint load / raw read of the same bytes


def rows(res: dict) -> list:
    cache = "cold cache" if res.get("cold_cache") else "page cache not dropped"
    mb = f"{res['ckpt_bytes'] / 1e6:.0f} MB"
    return [
        common.Row("resume", "process start -> first step, resumed", res["resume_start_to_first_step_s"], "s",
                   res["fresh_start_to_first_step_s"], "fresh start", res["resume_vs_fresh"], TARGET_RESUME,
                   common.check(res["resume_vs_fresh"], TARGET_RESUME), common.per_repeat(res, "resume_vs_fresh")),
        common.Row("resume", "  of which: checkpoint chosen -> restored (train.log)", res["restore_in_trainer_s"], "s"),
        common.Row("resume", "  with checksums verified (default) vs checkpoint.verify=false",
                   res["resume_start_to_first_step_s"], "s", res["resume_no_checksums_s"], "verify=false",
                   res["verify_cost"], runs=common.per_repeat(res, "verify_cost")),
        common.Row("resume", "first step after the resume (incl. its first batch)", res["first_resumed_step_s"], "s",
                   res["steady_step_s"], "steady step", res["first_step_vs_steady"], TARGET_FIRST_STEP,
                   common.check(res["first_step_vs_steady"], TARGET_FIRST_STEP),
                   common.per_repeat(res, "first_step_vs_steady")),
        common.Row("resume", f"checkpoint load ({cache})", res["load_s"], "s", res["raw_read_s"],
                   f"raw read of {mb}", res["load_vs_raw_read"], TARGET_LOAD,
                   common.check(res["load_vs_raw_read"], TARGET_LOAD), common.per_repeat(res, "load_vs_raw_read")),
        common.Row("resume", "checkpoint load (warm cache)", res["load_warm_s"], "s", res["raw_read_warm_s"],
                   f"raw read of {mb}, warm", res["load_vs_raw_read_warm"], TARGET_LOAD,
                   common.check(res["load_vs_raw_read_warm"], TARGET_LOAD),
                   common.per_repeat(res, "load_vs_raw_read_warm")),
        common.Row("resume", "checkpoint load (warm cache) vs reading into new memory", res["load_warm_s"], "s",
                   res["raw_read_new_warm_s"], f"raw read of {mb} into new tensors, warm",
                   res["load_vs_raw_read_new_warm"], runs=common.per_repeat(res, "load_vs_raw_read_new_warm")),
    ]


# ------------------------------------------------------------------------------------------ worker side


def _raw_read_new(paths: list) -> int:
    """Every file into a newly allocated tensor of its size (one readinto per file)."""
    import torch

    total = 0
    for p in paths:
        buf = torch.empty(os.path.getsize(p), dtype=torch.uint8)
        with open(p, "rb", buffering=0) as f:
            view = memoryview(buf.numpy())
            while len(view):
                n = f.readinto(view)
                if not n:
                    break
                total += n
                view = view[n:]
    return total


def _raw_read(paths: list, chunk: int = 64 << 20) -> int:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def worker(a) -> int:
    import torch
    import torch.distributed as dist

    from apps.main.train import load_train_config
    from lingua.checkpoint import load_model_optim, written_by
    from lingua.distributed import setup_torch_distributed
    from lingua.optim import build_optimizer
    from lingua.tokenizer import build_tokenizer
    from lingua.transformer import build_model

    args = load_train_config([f"config={a.config}", f"dump_dir={os.path.dirname(a.out)}"])
    dist_state = setup_torch_distributed(args.distributed)
    args.model.vocab_size = build_tokenizer(args.data.tokenizer).n_words

    def fresh():
        """A new model + optimizer, as a resuming trainer has them (the first load is what a resume pays)."""
        common.release_freed_memory()  # the last model's memory is not reused: a resume runs in a new process
        model = build_model(args.model, dist_state, args.distributed)
        return model, build_optimizer(model, args.optim, args.steps)[0]
    rank, group = dist_state.env.rank, dist_state.cpu_group
    files = _ckpt_files(a.ckpt)
    mine = [p for p in files if written_by(os.path.basename(p), rank, dist_state.dp_rank)]  # every file once
    res = {"load_s": [], "raw_s": [], "load_warm_s": [], "raw_warm_s": [], "raw_new_warm_s": [], "cold": True,
           "read_bytes": 0}
    read = []  # bytes each raw read of this rank got

    def timed(fn, cold=True):
        if rank == 0 and cold:
            res["cold"] = common.drop_page_cache(files) and res["cold"]
        dist.barrier(group=group)
        t = time.perf_counter()
        fn()
        dist.barrier(group=group)
        return time.perf_counter() - t

    for r in range(a.repeats):
        order = ["load", "raw"] if r % 2 == 0 else ["raw", "load"]
        for kind in order:
            for cold, suffix in ((True, "_s"), (False, "_warm_s")):  # the cold read leaves the files cached
                if kind == "load":
                    model, optimizer = fresh()
                    res["load" + suffix].append(timed(lambda: load_model_optim(a.ckpt, model, optimizer), cold))
                    del model, optimizer
                else:
                    res["raw" + suffix].append(timed(lambda: read.append(_raw_read(mine)), cold))
                    if not cold:
                        res["raw_new_warm_s"].append(timed(lambda: read.append(_raw_read_new(mine)), False))
    t = torch.tensor([read[-1]], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    res["read_bytes"] = int(t.item())  # the raw baseline read every byte of the checkpoint
    if rank == 0:
        common.write_json(a.out, res)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    return common.part_main(argv, "resume", __doc__.split("\n")[0], worker, lambda p: p.add_argument("--ckpt"))


if __name__ == "__main__":
    sys.exit(main())
