"""Run the benchmarks, print one table, write JSON.

    python -m apps.bench.run [--only train,scaling,ckpt,resume,ckpt_scaling,data] [--out bench.json] [--quick]
    python -m apps.bench.run --device cuda --nproc 1 --only train,ckpt     # on a GPU: bf16, NCCL

Parts (each a ratio against a baseline measured in the same run; see docs/benchmarks.md):
  train    the trainer's tokens/s against a plain FSDP2 loop (2 processes), MFU against a measured matmul peak
  scaling  the same with 1, 2, ... processes
  ckpt     checkpoint save (sync, async) against raw write + fsync of the same bytes
  resume   process start -> first step when resuming vs a fresh start; checkpoint load vs raw read
  ckpt_scaling  the ckpt and load measurements at ~10M, ~60M and ~250M parameters (~60M: reused from ckpt, resume)
  data     the data loader (apps/bench/data_bench.py) and its headroom over what the trainer consumes
With --device cuda the train part uses a GPU-sized model (bf16 compute, fp32 master weights) and reports MFU
against the GPU's data-sheet bf16 dense peak as well as a measured bf16 matmul; the ckpt part saves the same
model as on the CPU from GPU memory. A part that fails is reported in the JSON (and the exit code is 1); the
others still run.
"""

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback

from apps.bench import common

PARTS = ("train", "scaling", "ckpt", "resume", "ckpt_scaling", "data")
GPU_PARTS = ("train", "ckpt")  # the others measure CPU processes (or the loader, which does not use the GPU)
MODULES = {"train": "apps.bench.train_bench", "scaling": "apps.bench.scaling_bench", "ckpt": "apps.bench.ckpt_bench",
           "ckpt_scaling": "apps.bench.ckpt_scaling_bench", "resume": "apps.bench.resume_bench",
           "data": "apps.bench.data_bench"}


def data_vs_trainer(data_res: dict, train_res: dict) -> dict:
    """Loader headroom: tokens/s one loader process makes (bytes tokenizer, async, as the debug config) against
    the tokens/s one trainer rank consumes (each rank has its own loader process)."""
    made = data_res.get("bytes", {}).get("async", {}).get("tokens_per_s")
    consumed = train_res["trainer_tokens_per_s"] / train_res["nproc"] if train_res.get("trainer_tokens_per_s") else None
    return {"loader_tokens_per_s": made, "trainer_tokens_per_s_per_rank": consumed,
            "headroom": common.ratio(made, consumed)}


def headroom_rows(h: dict) -> list:
    return [common.Row("data", "loader tokens/s (bytes, async) vs one trainer rank's use", h["loader_tokens_per_s"],
                       "tok/s", h["trainer_tokens_per_s_per_rank"], "trainer rank consumes", h["headroom"], ">= 1.0",
                       common.check(h["headroom"], ">= 1.0"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apps.bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts, of {','.join(PARTS)}")
    p.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test, not figures")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per measurement (median)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed parts (default 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1, as torchrun)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help=f"cuda: the parts {','.join(GPU_PARTS)} on GPUs, one a process (default cpu)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, configs)")
    p.add_argument("--markdown", default=None, help="also write the table with the machine line to this file")
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
        if any(x not in GPU_PARTS for x in parts):
            p.error(f"--device cuda runs only the parts {','.join(GPU_PARTS)} (pass --only)")
    # fixed order: scaling reuses train, ckpt_scaling reuses ckpt and resume, data compares with train
    parts = [x for x in PARTS if x in parts]

    work = a.work_dir or tempfile.mkdtemp(prefix="lingua_bench_")
    os.makedirs(work, exist_ok=True)
    ctx = common.BenchContext(work_dir=work, quick=a.quick, repeats=a.repeats, nproc=a.nproc, threads=a.threads,
                              device=a.device)
    machine = common.machine_info()
    ctx.say(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; parts {parts}; work dir {work}")
    report = {"machine": machine, "git": common.git_revision(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "quick": a.quick, "device": a.device, "repeats": a.repeats, "nproc": a.nproc, "threads": a.threads,
              "parts": {}, "errors": {}}
    rows = []
    t_start = time.time()
    for part in parts:
        t0 = time.time()
        try:
            mod = importlib.import_module(MODULES[part])
            res = mod.run(ctx)
            res["seconds"] = round(time.time() - t0, 1)
            ctx.results[part] = res
            report["parts"][part] = res
            rows += [r.as_dict() for r in mod.rows(res)]
            if part == "data" and "train" in ctx.results:
                res["vs_trainer"] = data_vs_trainer(res, ctx.results["train"])
                rows += [r.as_dict() for r in headroom_rows(res["vs_trainer"])]
            ctx.say(f"{part}: done in {time.time() - t0:.0f}s")
        except Exception as e:  # noqa: BLE001 (report it, run the other parts)
            report["errors"][part] = f"{type(e).__name__}: {e}"
            ctx.say(f"{part}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    report["seconds"] = round(time.time() - t_start, 1)
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["rows"] = rows
    table = common.format_table(rows)
    report["table"] = table
    common.write_json(a.out, report)
    gpu = f"{machine['gpu']} ({a.nproc} used), " if a.device == "cuda" else ""
    machine_line = (f"{gpu}{machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
                    f"{machine['mem_gib']} GiB RAM, torch {machine['torch']}, Python {machine['python']}; "
                    f"{a.nproc} processes x {a.threads} thread; load average {machine['load_avg_at_start'][0]} at "
                    f"start, {report['load_avg_at_end'][0]} at end; {report['seconds']:.0f} s in all")
    if a.quick:
        machine_line += "\nQUICK MODE (--quick): tiny sizes, one repeat; a smoke test, the figures mean nothing"
    print(table)
    print(machine_line)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"{table}\n\n{machine_line}\n")
    if report["errors"]:
        print("FAILED parts: " + "; ".join(f"{k}: {v}" for k, v in report["errors"].items()), file=sys.stderr)
    if not a.work_dir and not a.keep:
        common.clean_dir(work)
    elif a.keep:
        ctx.say(f"kept {work}")
    ctx.say(f"wrote {a.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
