"""Resume cost: time from process start to the first step of a resumed run against a fresh start of the same
config, and checkpoint load time against a raw read of the same bytes.

Start-up, `repeats` times (the checkpoint-sized model of ckpt_bench, N processes):
  - fresh:  `torchrun -m apps.main.train config=... steps=1` in a new dump dir. Time to first step = the
            `created_at` of its metrics record for step 1 minus the launch time (torchrun start, imports,
            model build and init, resolve, data loader start, one step). It ends with a save of step 1.
  - resume: the same command with steps=2 in the same dump dir, after evicting the checkpoint's files from the
            page cache (a restart rarely finds them cached): launch to the record of step 2, which includes
            resolve (validation on every rank) and the DCP load of model + optimizer.
Load, in one torchrun launch on the last checkpoint, alternating, both from a cold page cache:
  - load: lingua.checkpoint.load_model_optim (what the trainer's restore does) into a new model + optimizer
          (built untimed before each load, as a resuming trainer has them);
  - raw:  every rank reads its own files of that checkpoint with plain reads (the same bytes in total).

    python -m apps.bench.run --only resume
"""

import argparse
import json
import os
import re
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


def run(ctx: common.BenchContext) -> dict:
    repeats = 1 if ctx.quick else ctx.repeats
    config = common.write_config(ctx, "resume", ckpt_bench.model_overrides(ctx))
    work = os.path.join(ctx.work_dir, "resume")
    common.clean_dir(work)
    os.makedirs(work)
    env = common.bench_env(ctx.threads)
    log = os.path.join(work, "log.txt")
    fresh, resumed, restore_s, cold = [], [], [], None
    ctx.say(f"resume: {repeats} x (fresh start, resume) with torchrun x{ctx.nproc}")
    dump = None
    for r in range(repeats):
        if dump:
            common.clean_dir(dump)
        dump = os.path.join(work, f"run_{r}")
        base = ["config=" + config, f"dump_dir={dump}"]
        start = common.run_logged(common.torchrun_cmd(ctx.nproc, "apps.main.train", base + ["steps=1"]), log, env,
                                  timeout=900)
        fresh.append(_first_record(os.path.join(dump, "metrics.jsonl"))["created_at"] - start)
        ckpt_dir = os.path.join(dump, "checkpoints", f"{1:010d}")
        cold = common.drop_page_cache(_ckpt_files(ckpt_dir))
        start = common.run_logged(common.torchrun_cmd(ctx.nproc, "apps.main.train", base + ["steps=2"]), log, env,
                                  timeout=900)
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            rec = [json.loads(line) for line in f][-1]
        if rec["global_step"] != 2:
            raise RuntimeError(f"resume run did not log step 2 (last record: step {rec['global_step']})")
        resumed.append(rec["created_at"] - start)
        t0 = _log_elapsed(os.path.join(dump, "train.log"), r"resuming from")
        t1 = _log_elapsed(os.path.join(dump, "train.log"), r"resumed from")
        restore_s.append(t1 - t0 if t0 is not None and t1 is not None else None)
    # Load against raw read, in one launch, on the last run's checkpoint of step 2.
    ckpt_dir = os.path.join(dump, "checkpoints", f"{2:010d}")
    out = os.path.join(work, "load.json")
    common.run_logged(
        common.torchrun_cmd(ctx.nproc, "apps.bench.resume_bench",
                            ["--worker", "--config", config, "--ckpt", ckpt_dir, "--out", out,
                             "--repeats", str(repeats)]), log, env, timeout=900)
    load = common.read_json(out)
    nbytes = sum(os.path.getsize(p) for p in _ckpt_files(ckpt_dir))
    common.clean_dir(work)
    return {
        "nproc": ctx.nproc,
        "fresh_start_to_first_step_s": common.median(fresh),
        "resume_start_to_first_step_s": common.median(resumed),
        "resume_vs_fresh": common.median([b / a for a, b in zip(fresh, resumed)]),
        "restore_in_trainer_s": common.median(restore_s),
        "ckpt_bytes": nbytes,
        "load_s": common.median(load["load_s"]),
        "raw_read_s": common.median(load["raw_s"]),
        "load_vs_raw_read": common.median([ld / rw for ld, rw in zip(load["load_s"], load["raw_s"])]),
        "cold_cache": cold and load["cold"],
        "runs": {"fresh": fresh, "resumed": resumed, "restore_in_trainer": restore_s, "load": load["load_s"],
                 "raw_read": load["raw_s"]},
    }


def rows(res: dict) -> list:
    cache = "cold cache" if res.get("cold_cache") else "page cache not dropped"
    return [
        common.Row("resume", "process start -> first step, resumed", res["resume_start_to_first_step_s"], "s",
                   res["fresh_start_to_first_step_s"], "fresh start", res["resume_vs_fresh"]),
        common.Row("resume", "  of which: checkpoint chosen -> restored (train.log)", res["restore_in_trainer_s"], "s"),
        common.Row("resume", f"checkpoint load ({cache})", res["load_s"], "s", res["raw_read_s"],
                   f"raw read of {res['ckpt_bytes'] / 1e6:.0f} MB", res["load_vs_raw_read"]),
    ]


# ------------------------------------------------------------------------------------------ worker side


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
    import torch.distributed as dist

    from apps.main.train import load_train_config
    from lingua.checkpoint import load_model_optim
    from lingua.distributed import setup_torch_distributed
    from lingua.optim import build_optimizer
    from lingua.tokenizer import build_tokenizer
    from lingua.transformer import build_model

    args = load_train_config([f"config={a.config}", f"dump_dir={os.path.dirname(a.out)}"])
    dist_state = setup_torch_distributed(args.distributed)
    args.model.vocab_size = build_tokenizer(args.data.tokenizer).n_words

    def fresh():
        """A new model + optimizer, as a resuming trainer has them (the first load is what a resume pays)."""
        model = build_model(args.model, dist_state, args.distributed)
        return model, build_optimizer(model, args.optim, args.steps)[0]
    rank, group = dist_state.env.rank, dist_state.cpu_group
    files = _ckpt_files(a.ckpt)
    mine = [p for p in files if os.path.basename(p).startswith(f"__{rank}_")]
    if rank == 0:
        mine += [p for p in files if not os.path.basename(p).startswith("__")]
    res = {"load_s": [], "raw_s": [], "cold": True}

    def timed(fn):
        if rank == 0:
            res["cold"] = common.drop_page_cache(files) and res["cold"]
        dist.barrier(group=group)
        t = time.perf_counter()
        fn()
        dist.barrier(group=group)
        return time.perf_counter() - t

    for r in range(a.repeats):
        order = ["load", "raw"] if r % 2 == 0 else ["raw", "load"]
        for kind in order:
            if kind == "load":
                model, optimizer = fresh()
                res["load_s"].append(timed(lambda: load_model_optim(a.ckpt, model, optimizer)))
                del model, optimizer
            else:
                res["raw_s"].append(timed(lambda: _raw_read(mine)))
    if rank == 0:
        common.write_json(a.out, res)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help="(internal) run as a torchrun worker")
    p.add_argument("--config")
    p.add_argument("--ckpt")
    p.add_argument("--out")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    from apps.bench.run import main as run_main

    return run_main(["--only", "resume"])


if __name__ == "__main__":
    sys.exit(main())
