"""Checkpoint cost against model size: the ckpt part's save measurements (sync save against raw write + fsync,
async blocking, the steps overlapping an async write) and the resume part's load measurement (cold and warm
cache, against a raw read of the same bytes) at three model sizes, ~10M, ~60M and ~250M parameters (fp32
weights + AdamW: ~12 bytes a parameter), to see how each cost grows with size. Two repeats per size. The ~60M
size is the ckpt and resume parts' model and checkpoint: when both parts ran before, their figures are reused.

    python -m apps.bench.run --only ckpt_scaling
"""

import os
import sys

from apps.bench import ckpt_bench, common

SIZES = {
    "10M": {"dim": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6, "multiple_of": 256},
    "60M": ckpt_bench.MODEL,
    "250M": {"dim": 1280, "n_layers": 12, "n_heads": 20, "n_kv_heads": 20, "multiple_of": 256},
}
QUICK_SIZES = {"tiny": ckpt_bench.QUICK_MODEL, "small": {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                                                          "multiple_of": 32}}


SAVE_KEYS = ("n_params", "bytes", "sync_vs_raw_bandwidth", "sync_save_s", "raw_write_s", "async_blocking_s",
             "async_blocking_vs_sync", "overlap_tokens_per_s_vs_idle")
SAVE_RATIOS = ("sync_vs_raw_bandwidth", "async_blocking_vs_sync", "overlap_tokens_per_s_vs_idle")


def _size_figures(save: dict, load: dict, reused_from) -> dict:
    """One size's figures: the save part's SAVE_KEYS, the load's LOAD_FIGURES, the per-repeat ratios of both."""
    from apps.bench.resume_bench import LOAD_FIGURES, LOAD_RATIOS

    per_repeat = {**{k: save["per_repeat"][k] for k in SAVE_RATIOS},
                  **{k: load["per_repeat"][k] for k in LOAD_RATIOS}}
    return {**{k: save[k] for k in SAVE_KEYS}, **{k: load[k] for k in LOAD_FIGURES}, "per_repeat": per_repeat,
            "reused_from": reused_from}


def run(ctx: common.BenchContext) -> dict:
    from apps.bench.resume_bench import load_figures

    repeats = 1 if ctx.quick else 2
    measured = ckpt_bench.QUICK_MODEL if ctx.quick else ckpt_bench.MODEL  # by the ckpt and resume parts
    out = {"sizes": {}}
    for name, model in (QUICK_SIZES if ctx.quick else SIZES).items():
        save, resume = ctx.results.get("ckpt"), ctx.results.get("resume")
        if model == measured and save and resume:
            out["sizes"][name] = _size_figures(save, resume, "ckpt, resume")
            continue
        overrides = ckpt_bench.model_overrides(ctx)
        overrides["model"] = {**model, "max_seqlen": overrides["model"]["max_seqlen"]}
        config = common.write_config(ctx, f"ckpt_scaling_{name}", overrides)
        work = os.path.join(ctx.work_dir, f"ckpt_scaling_{name}")
        ctx.say(f"ckpt_scaling {name}: save, {repeats} x ({ckpt_bench.ROUND})")
        save = ckpt_bench.measure(ctx, config, work, repeats, keep_last=True)
        ctx.say(f"ckpt_scaling {name}: load, {repeats} x (load, raw read), cold then warm")
        load_out = os.path.join(work, "load.json")
        common.run_logged(common.torchrun_cmd(ctx.nproc, "apps.bench.resume_bench",
                                              ["--worker", "--config", config, "--ckpt", save["kept"], "--out",
                                               load_out, "--repeats", str(repeats)]),
                          os.path.join(work, "log.txt"), common.bench_env(ctx.threads), timeout=3600)
        load = common.read_json(load_out)
        common.clean_dir(work)
        out["sizes"][name] = _size_figures(save, load_figures(load), None)
    return out


def rows(res: dict) -> list:
    out = []
    for name, r in res["sizes"].items():
        size = f"{r['n_params'] / 1e6:.0f}M params, {r['bytes'] / 1e6:.0f} MB"
        out.append(common.Row("ckpt_scaling", f"{size}: sync save", r["sync_save_s"], "s", r["raw_write_s"],
                              "fastest raw write+fsync", r["sync_vs_raw_bandwidth"], f">= {ckpt_bench.TARGET_SYNC_BW}",
                              common.check(r["sync_vs_raw_bandwidth"], f">= {ckpt_bench.TARGET_SYNC_BW}"),
                              common.per_repeat(r, "sync_vs_raw_bandwidth")))
        out.append(common.Row("ckpt_scaling", f"{size}: async save, training blocked", r["async_blocking_s"], "s",
                              r["sync_save_s"], "sync save", r["async_blocking_vs_sync"],
                              runs=common.per_repeat(r, "async_blocking_vs_sync")))
        out.append(common.Row("ckpt_scaling", f"{size}: tokens/s of steps overlapping the async write",
                              r["overlap_tokens_per_s_vs_idle"], "", 1.0, "steps with no save",
                              r["overlap_tokens_per_s_vs_idle"],
                              runs=common.per_repeat(r, "overlap_tokens_per_s_vs_idle")))
        out.append(common.Row("ckpt_scaling", f"{size}: load (cold cache)", r["load_s"], "s", r["raw_read_s"],
                              "raw read", r["load_vs_raw_read"], runs=common.per_repeat(r, "load_vs_raw_read")))
        out.append(common.Row("ckpt_scaling", f"{size}: load (warm cache)", r["load_warm_s"], "s", r["raw_read_warm_s"],
                              "raw read, warm", r["load_vs_raw_read_warm"],
                              runs=common.per_repeat(r, "load_vs_raw_read_warm")))
    return out


def main(argv=None) -> int:
    from apps.bench.run import main as run_main

    return run_main(["--only", "ckpt_scaling"] + list(argv or sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
