"""Scaling: trainer throughput with 1, 2, ... processes (one intra-op thread each, the same per-process batch:
weak scaling), each against the plain reference loop at the same process count, measured in the same launch.

The largest count is the training benchmark's own run when it ran in the same invocation (not measured twice).
Efficiency = tokens/s(n) / (n x tokens/s(1)); 1.0 is perfect on a machine with at least n free cores.

    python -m apps.bench.run --only scaling
"""

import sys

from apps.bench import common, train_bench


def process_counts(ctx: common.BenchContext) -> list:
    cores = common.machine_info()["usable_cores"] or 1
    counts = [1, 2]
    n = 4
    while n <= cores and n <= 8:
        counts.append(n)
        n *= 2
    return counts


def run(ctx: common.BenchContext) -> dict:
    per_n = {}
    for n in process_counts(ctx):
        prior = ctx.results.get("train")
        if prior and prior.get("nproc") == n:
            per_n[n] = {**prior, "reused_from": "train"}
        else:
            per_n[n] = train_bench.summarize(train_bench.launch(ctx, n, "both", tag="scaling"))
    base = per_n[1]["trainer_tokens_per_s"]
    base_ref = per_n[1]["reference_tokens_per_s"]
    out = {"counts": sorted(per_n), "runs": {}}
    for n, res in sorted(per_n.items()):
        out["runs"][str(n)] = {
            "trainer_tokens_per_s": res["trainer_tokens_per_s"],
            "reference_tokens_per_s": res["reference_tokens_per_s"],
            "trainer_vs_reference": res["ratio"],
            "speedup_vs_1": common.ratio(res["trainer_tokens_per_s"], base),
            "efficiency": common.ratio(res["trainer_tokens_per_s"], n * base) if base else None,
            "reference_efficiency": common.ratio(res["reference_tokens_per_s"], n * base_ref) if base_ref else None,
            "reused_from": res.get("reused_from"),
        }
    return out


def rows(res: dict) -> list:
    out = []
    for n in res["counts"]:
        r = res["runs"][str(n)]
        out.append(common.Row("scaling", f"tokens/s, trainer, {n} proc{'s' if n > 1 else ''}",
                              r["trainer_tokens_per_s"], "tok/s", r["reference_tokens_per_s"],
                              f"plain loop, {n} proc{'s' if n > 1 else ''}", r["trainer_vs_reference"]))
        if n > 1:
            out.append(common.Row("scaling", f"weak-scaling efficiency, {n} procs", r["efficiency"], "",
                                  r["reference_efficiency"], "plain loop efficiency",
                                  common.ratio(r["efficiency"], r["reference_efficiency"])))
    return out


def main(argv=None) -> int:
    from apps.bench.run import main as run_main

    return run_main(["--only", "scaling"] + list(argv or sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
