"""The recovery drill (lingua.drill) on a tiny CPU config: it passes with sync and async saving (every fault kind
of the plan injected, each rerun resuming bit for bit), fails when the config cannot resume exactly
(checkpoint.reset_data_state=true) naming the first divergent step and the fault before it, runs as a SLURM job
on the local cluster, and prints its plan with --dry-run."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env, tiny_config

DRILL = [sys.executable, "-m", "lingua.drill"]


@pytest.fixture(scope="module")
def config(tmp_path_factory, shared_corpus):
    return tiny_config(str(tmp_path_factory.mktemp("drillcfg") / "c.yaml"), shared_corpus)


def drill(config, dump, *args, env=None, timeout=600):
    return subprocess.run([*DRILL, f"config={config}", f"dump_dir={dump}", *args], cwd=REPO, env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout)


def report(dump) -> dict:
    with open(os.path.join(dump, "drill", "report.json")) as f:
        return json.load(f)


def test_dry_run_prints_the_seeded_plan(config, tmp_path):
    args = ("drill.steps=24", "drill.faults=8", "drill.seed=3", "--dry-run")
    first, second = drill(config, tmp_path / "a", *args), drill(config, tmp_path / "a", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # the same seed, the same plan
    faults = re.findall(r"^\s+\d+\. (.*)\[LINGUA_FAULTS=(.*)\]$", first.stdout, re.M)
    assert len(faults) == 8 and "under " + str(tmp_path / "a" / "drill") in first.stdout
    steps = [int(m) for _, rule in faults for m in re.findall(r"@(\d+)", rule)]
    assert steps == sorted(steps) and max(steps) < 24
    assert not os.path.exists(tmp_path / "a")  # a dry run writes nothing
    other = drill(config, tmp_path / "a", "drill.steps=24", "drill.faults=8", "drill.seed=4", "--dry-run")
    assert other.stdout != first.stdout
    bad = drill(config, tmp_path / "a", "drill.kinds=[explode]", "--dry-run")
    assert bad.returncode == 2 and "drill.kinds: unknown ['explode']" in bad.stderr


@pytest.mark.e2e
def test_drill_passes_with_every_fault_kind(config, tmp_path):
    dump = tmp_path / "run"
    res = drill(config, dump, "drill.steps=14", "drill.faults=8", "drill.seed=1")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "drill PASS" in res.stdout and re.search(r"fault 8 of 8", res.stdout)
    rep = report(dump)
    kinds = {f["kind"] for f in rep["faults"]}
    assert kinds == {"kill_rank", "kill_all", "startup", "mid_step", "sync_save", "preempt", "corrupt", "layout"}
    assert rep["verdict"] == "PASS" and rep["problems"] == []
    checks = rep["checks"]
    assert checks["data_stream_identical"] and checks["stray_files"] == []
    assert checks["max_loss_rel_diff"] <= 1e-4 and checks["final_model_max_rel_diff"] <= 1e-4
    corrupt = [f for f in rep["faults"] if f["kind"] == "corrupt"][0]
    assert (corrupt["corrupted"].startswith("step ")
            and corrupt["resumed_from"] < int(corrupt["corrupted"].split()[1][:-1]))
    assert all("resumed_from" in f for f in rep["faults"])
    md = open(os.path.join(dump, "drill", "report.md")).read()
    assert md.startswith("# Recovery drill: PASS") and md.count("| ok |") == 8
    assert os.path.getsize(os.path.join(dump, "drill", "report.png")) > 1000
    assert not os.path.exists(os.path.join(dump, "checkpoints"))  # the real run's folder is untouched


@pytest.mark.e2e
def test_drill_passes_with_async_saves(config, tmp_path):
    dump = tmp_path / "run"
    res = drill(config, dump, "drill.steps=10", "drill.faults=2", "drill.kinds=[async_write,preempt]",
                "checkpoint.async_save=true")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rep = report(dump)
    assert rep["async_save"] and {f["kind"] for f in rep["faults"]} == {"async_write", "preempt"}
    assert rep["checks"]["final_model_bitwise"] and rep["checks"]["final_optim_bitwise"]


@pytest.mark.e2e
def test_drill_fails_when_the_run_cannot_resume_exactly(config, tmp_path):
    dump = tmp_path / "run"
    res = drill(config, dump, "drill.steps=8", "drill.faults=1", "drill.kinds=[kill_all]",
                "checkpoint.reset_data_state=true")
    assert res.returncode == 1
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("drill FAIL")][0]
    assert re.search(r"first divergent step \d+", line) and "the fault before it: kill -9 of every rank" in line
    assert "checkpoint.reset_data_state=true restarts the data stream" in line
    assert report(dump)["verdict"] == "FAIL"


@pytest.mark.e2e
def test_drill_as_a_slurm_job(slurm_cluster, config, tmp_path):
    dump = tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = slurm_cluster.client_env(clean_env())
    res = subprocess.run([sys.executable, "-m", "lingua.stool", "script=lingua.drill", f"config={config}", "nodes=1",
                          f"partition={slurm_cluster.partition}", "ngpu=0", "ntasks_per_node=2", "ncpu=1", "--",
                          f"dump_dir={dump}", "drill.steps=8", "drill.faults=1", "drill.kinds=[kill_rank]"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"submitted job (\d+)", res.stdout).group(1)
    info = slurm_cluster.wait_job(job, timeout=300)
    logs = "".join(open(os.path.join(d, n)).read()[-3000:] for d, _, names in os.walk(dump / "drill" / "logs")
                   for n in names)
    assert info.get("JobState") == "COMPLETED", (info, logs)
    rep = report(dump)
    assert rep["verdict"] == "PASS" and rep["launcher"] == "srun" and rep["nproc"] == 2, logs
    assert (dump / "drill" / "submit.slurm").exists() and not (dump / "submit.slurm").exists()
