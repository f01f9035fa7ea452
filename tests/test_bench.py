"""The benchmarks on tiny sizes: every part runs end to end, writes well-formed JSON, and measures what it says
it measures (the raw baselines move the same bytes as the checkpoint, the resume runs really resumed, the elastic
and same-layout resumes start at the same data position, ...).

No timing is asserted (the figures come from `python -m apps.bench.run`, see docs/benchmarks.md).
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from apps.bench import common

pytestmark = pytest.mark.e2e  # real torchrun / SLURM / benchmark processes

REPO = common.REPO_ROOT


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory):
    """One quick run of every part (a few torchrun launches on a tiny model; about a minute on 2 cores)."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    md = work / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "apps.bench.run", "--quick", "--out", str(out), "--markdown", str(md),
         "--work-dir", str(work / "scratch")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), f"no JSON written\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out) as f:
        report = json.load(f)
    report["_proc"] = proc
    report["_md"] = md.read_text() if md.exists() else ""
    return report


def test_every_part_ran(bench_report):
    proc = bench_report["_proc"]
    assert bench_report["errors"] == {}, f"{bench_report['errors']}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0
    assert set(bench_report["parts"]) == {"train", "scaling", "ckpt", "ckpt_scaling", "resume", "data"}
    for key in ("cpu", "cores", "torch"):
        assert bench_report["machine"][key]


def test_train_part(bench_report):
    t = bench_report["parts"]["train"]
    assert t["nproc"] == 2
    for key in ("trainer_tokens_per_s", "reference_tokens_per_s", "ratio", "matmul_peak_flops", "mfu",
                "flops_per_token"):
        assert _finite(t[key]), (key, t[key])
    assert len(t["trainer_tokens_per_s_runs"]) == len(t["reference_tokens_per_s_runs"]) >= 1


def test_scaling_part(bench_report):
    s = bench_report["parts"]["scaling"]
    assert s["counts"][:2] == [1, 2]
    assert s["runs"]["2"]["reused_from"] == "train"  # not measured twice
    for n in s["counts"]:
        assert _finite(s["runs"][str(n)]["trainer_tokens_per_s"])
    assert _finite(s["runs"]["2"]["efficiency"])


def test_ckpt_part(bench_report):
    c = bench_report["parts"]["ckpt"]
    for key in ("bytes", "raw_write_s", "sync_save_s", "async_blocking_s", "async_background_s",
                "sync_vs_raw_bandwidth", "async_blocking_vs_sync", "overlap_tokens_per_s_vs_idle"):
        assert _finite(c[key]), (key, c[key])
    # the raw baseline writes the bytes a checkpoint holds (sized on the previous save: the train state's step
    # number may differ by a digit or so)
    assert abs(c["raw_bytes"] - c["bytes"]) <= 64, (c["raw_bytes"], c["bytes"])
    assert c["steps_overlapped"] >= 1  # the overlap figure comes from steps that ran during an async write


def test_ckpt_scaling_part(bench_report):
    sizes = list(bench_report["parts"]["ckpt_scaling"]["sizes"].values())
    assert len(sizes) == 2 and sizes[0]["bytes"] < sizes[1]["bytes"]  # two model sizes, growing checkpoints
    # the first is the ckpt and resume parts' model: their figures, not measured twice; the second is measured
    assert sizes[0]["reused_from"] == "ckpt, resume" and sizes[1]["reused_from"] is None
    parts = bench_report["parts"]
    assert sizes[0]["sync_save_s"] == parts["ckpt"]["sync_save_s"]
    assert sizes[0]["load_warm_s"] == parts["resume"]["load_warm_s"]
    for s in sizes:
        for key in ("sync_vs_raw_bandwidth", "load_vs_raw_read", "load_vs_raw_read_warm", "async_blocking_s"):
            assert _finite(s[key]), (key, s[key])


def test_resume_part(bench_report):
    r = bench_report["parts"]["resume"]
    for key in ("fresh_start_to_first_step_s", "resume_start_to_first_step_s", "resume_vs_fresh", "load_s",
                "raw_read_s", "load_vs_raw_read", "ckpt_bytes", "verify_cost", "first_step_vs_steady",
                "load_vs_raw_read_warm"):
        assert _finite(r[key]), (key, r[key])
    assert r["resumed_from_step_1"]  # the resume figures come from runs that resumed (with and without checksums)
    assert r["raw_read_bytes"] == r["ckpt_bytes"]  # the raw baseline reads every byte of the checkpoint


def test_data_part(bench_report):
    d = bench_report["parts"]["data"]
    assert _finite(d["bytes"]["async"]["tokens_per_s"])
    assert _finite(d["vs_trainer"]["headroom"])
    assert d["elastic"]["same_batch"]  # resharded and same-layout resumes start at the same data position
    assert _finite(d["elastic"]["ratio"]) and _finite(d["trace"]["ratio"])


def test_table(bench_report):
    rows = bench_report["rows"]
    assert {r["part"] for r in rows} == {"train", "scaling", "ckpt", "ckpt_scaling", "resume", "data"}
    for r in rows:
        assert set(r) >= {"part", "metric", "value", "unit", "baseline", "ratio", "target", "ok"}
    assert bench_report["table"].startswith("| part")
    with_runs = [r for r in rows if r.get("runs")]  # the goal ratios, each the median of its per-repeat ratios
    assert {r["part"] for r in with_runs} == {"train", "ckpt", "ckpt_scaling", "resume"}
    for r in with_runs:
        assert r["ratio"] == pytest.approx(statistics.median(r["runs"])), r
    assert "torch" in bench_report["_md"] and "| part" in bench_report["_md"]
    json.dumps(bench_report["parts"])  # plain JSON all the way down


def test_table_shows_the_range_of_the_per_repeat_ratios():
    rows = [common.Row("ckpt", "sync save", 0.4, "s", 0.36, "raw", 0.9, ">= 0.8", True, [0.97, 0.85, 0.9]).as_dict(),
            common.Row("resume", "one repeat", 1.0, "s", 1.0, "fresh", 1.0, runs=[1.0]).as_dict()]
    header, _, three, one = [[c.strip() for c in line.split("|")[1:-1]]
                             for line in common.format_table(rows).splitlines()]
    assert header[4:] == ["ratio", "range (n)", "target"]
    assert three[4:] == ["0.900", "0.850-0.970 (3)", ">= 0.8 ok"]  # min-max, how many
    assert one[4:6] == ["1.000", ""]  # a single repeat has no range


def test_unknown_part_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apps.bench.run", "--only", "trian", "--out",
                           str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "trian" in proc.stderr
    assert not os.path.exists(tmp_path / "x.json")


def test_device_cuda_is_checked_before_anything_runs(tmp_path):
    """--device cuda needs a GPU and runs only the GPU parts; both are one-line errors up front. (The GPU path
    itself ran on an H200 through the device tool: docs/benchmarks.md, "On a GPU".)"""
    import torch

    proc = subprocess.run([sys.executable, "-m", "apps.bench.run", "--device", "cuda", "--only", "resume", "--out",
                           str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    want = "runs only the parts train,ckpt" if torch.cuda.is_available() else "no CUDA device is available"
    assert proc.returncode == 2 and want in proc.stderr
    assert not os.path.exists(tmp_path / "x.json")
