"""End to end against a real single-node SLURM cluster (tests/slurm_cluster.py): stool submits the debug
config with 2 CPU tasks; USR2 preemption -> checkpoint -> requeue -> resume; a hard kill resumed with
`sbatch <dump_dir>/submit.slurm`; resubmitting a finished run is a no-op. Tiny model, a few seconds per job."""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e  # real torchrun / SLURM / benchmark processes

REPO = Path(__file__).resolve().parent.parent
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
STEPS = 200
CKPT_EVERY = 20
TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seqlen=64",
    "data.seq_len=64", "data.batch_size=2", "data.prefetch_size=4", "logging.freq=1",
    f"checkpoint.dump.every={CKPT_EVERY}", "checkpoint.dump.keep=2", "checkpoint.eval.every=-1",
]
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny jsonl corpus with the sources configs/debug.yaml names (2 chunk files each)."""
    root = tmp_path_factory.mktemp("corpus")
    sources = (yaml.safe_load(DEBUG_CONFIG.read_text()).get("data") or {}).get("sources") or {"stdlib": 1.0}
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while lingua trains small models on tiny data".split()
    for name in sources:
        (root / name).mkdir()
        for c in range(2):
            with open(root / name / f"{name}.chunk.{c:02d}.jsonl", "w") as f:
                for _ in range(300):
                    text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
                    f.write(json.dumps({"text": text}) + "\n")
    return root


def _env(cluster):
    env = cluster.client_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def submit(cluster, corpus, dump: Path, cwd: Path, steps: int = STEPS, extra=()) -> str:
    """`python -m lingua.stool ...` with 2 CPU tasks; returns the job id."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lingua.stool", "script=apps.main.train", f"config={DEBUG_CONFIG}", "nodes=1",
           f"partition={cluster.partition}", "ngpu=0", "ntasks_per_node=2", "ncpu=1", "signal_seconds=60",
           "--", f"dump_dir={dump}", f"steps={steps}", f"data.root_dir={corpus}", *TINY, *extra]
    res = subprocess.run(cmd, cwd=cwd, env=_env(cluster), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"stool failed:\n{res.stdout}\n{res.stderr}"
    m = re.search(r"submitted job (\d+)", res.stdout)
    assert m, res.stdout
    return m.group(1)


def sbatch(cluster, script: Path) -> str:
    res = subprocess.run(["sbatch", "--parsable", str(script)], cwd="/", env=_env(cluster), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def logs(dump: Path) -> str:
    """Every log of the run, for assertion messages."""
    out = []
    for f in sorted((dump / "logs").rglob("*")):
        if f.is_file():
            out.append(f"==== {f.relative_to(dump)}\n{f.read_text(errors='replace')[-4000:]}")
    return "\n".join(out)


def task_log(dump: Path, job: str, rank: int = 0) -> str:
    """stdout + stderr of one task of one job (srun writes them to logs/<job>/<job>.<rank>.std{out,err})."""
    return "".join((dump / "logs" / job / f"{job}.{rank}.{s}").read_text(errors="replace")
                   for s in ("stdout", "stderr") if (dump / "logs" / job / f"{job}.{rank}.{s}").exists())


def metrics(dump: Path) -> list:
    path = dump / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return rows


def last_step(dump: Path) -> int:
    rows = metrics(dump)
    return rows[-1]["global_step"] if rows else 0


def committed_steps(dump: Path) -> list:
    ckpts = dump / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / "COMMIT.json").exists())


def wait_for(cond, timeout: float, what: str, dump: Path, poll: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs(dump)}")


def wait_done(cluster, job_id: str, dump: Path) -> dict:
    try:
        return cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{logs(dump)}") from None


def assert_same_curve(dump: Path, reference: list) -> None:
    rows = metrics(dump)
    steps = [r["global_step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), f"gaps or duplicated steps: {steps}\n{logs(dump)}"
    ref = {r["global_step"]: r["loss/out"] for r in reference}
    diffs = {r["global_step"]: (r["loss/out"], ref[r["global_step"]]) for r in rows
             if r["loss/out"] != ref[r["global_step"]]}
    assert not diffs, (f"losses differ from the uninterrupted run at {len(diffs)} steps, "
                       f"first: {sorted(diffs.items())[:5]}")


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, corpus, tmp_path_factory):
    """(a) stool submits the debug config with 2 CPU tasks and it completes: the uninterrupted reference."""
    base = tmp_path_factory.mktemp("ref")
    dump = base / "dump"
    job = submit(slurm_cluster, corpus, dump, base / "cwd")
    info = wait_done(slurm_cluster, job, dump)
    return {"dump": dump, "job": job, "info": info, "metrics": metrics(dump)}


def test_a_stool_submits_and_job_completes(reference_run):
    dump, job, info = reference_run["dump"], reference_run["job"], reference_run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(dump)}"
    assert [r["global_step"] for r in reference_run["metrics"]] == list(range(1, STEPS + 1)), logs(dump)
    assert committed_steps(dump)[-1] == STEPS
    rank0 = task_log(dump, job, 0)
    assert "rank 0/2" in rank0 and "launcher slurm" in rank0, rank0
    assert (dump / "logs" / job / f"{job}.1.stdout").exists()  # one log per task
    assert f"job {job} (restart 0)" in (dump / "logs" / f"slurm-{job}.out").read_text()
    assert f"dump_dir: {dump}" in (dump / "base_config.yaml").read_text()
    assert (dump / "code" / "apps" / "main" / "train.py").exists()
    assert info.get("Requeue") == "1"


def test_b_usr2_checkpoints_requeues_and_resumes(slurm_cluster, corpus, reference_run, tmp_path):
    dump = tmp_path / "dump"
    job = submit(slurm_cluster, corpus, dump, tmp_path / "cwd")
    wait_for(lambda: last_step(dump) >= 5, JOB_TIMEOUT, "step 5", dump)
    # Signal the job's tasks (not the batch shell), as SLURM does before the time limit with --signal=USR2@N.
    slurm_cluster.run("scancel", "--signal=USR2", job)
    signalled_at = last_step(dump)

    def requeued():
        info = slurm_cluster.job_info(job)
        return info if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1 else None

    info = wait_for(requeued, 120, "the job to be requeued (PENDING, Restarts>=1)", dump, poll=0.5)
    preempted_at = last_step(dump)
    assert signalled_at <= preempted_at < STEPS, f"the run ended before the signal took effect\n{logs(dump)}"
    assert preempted_at in committed_steps(dump), f"no checkpoint at the preemption step {preempted_at}\n{logs(dump)}"
    # A requeued job waits ~2 minutes (its begin time is pushed back); start it now, once its first run has left
    # the node (started while that run's tasks were still being torn down, it once failed at once: exit 1, no output).
    slurm_cluster.wait_node_idle()
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = wait_done(slurm_cluster, job, dump)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(dump)}"
    assert int(info["Restarts"]) == 1
    rank0 = task_log(dump, job)
    assert "received SIGUSR2" in rank0 or "preempted" in rank0, rank0
    assert f"at step {preempted_at}" in rank0, rank0  # "resumed from ... at step k"
    batch_log = (dump / "logs" / f"slurm-{job}.out").read_text()
    assert f"job {job} (restart 0)" in batch_log and f"job {job} (restart 1)" in batch_log, batch_log
    assert_same_curve(dump, reference_run["metrics"])


def test_c_hard_kill_then_sbatch_submit_slurm_resumes(slurm_cluster, corpus, reference_run, tmp_path):
    dump = tmp_path / "dump"
    job = submit(slurm_cluster, corpus, dump, tmp_path / "cwd")
    # Kill after a checkpoint is committed and the run went on past it (those steps must be redone, once).
    wait_for(lambda: committed_steps(dump) and last_step(dump) >= CKPT_EVERY + 3, JOB_TIMEOUT,
             f"a committed checkpoint and step {CKPT_EVERY + 3}", dump)
    # SIGKILL straight to the tasks of step 0 (the srun). `scancel --signal=KILL <job>` would instead cancel the
    # job the polite way (SIGTERM, KillWait, SIGKILL), which the trainer answers with a checkpoint.
    slurm_cluster.run("scancel", "--signal=KILL", f"{job}.0")
    info = wait_done(slurm_cluster, job, dump)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0, f"{info}\n{logs(dump)}"
    assert "preempted" not in task_log(dump, job)  # it really died, no signal handler ran
    killed_at = last_step(dump)
    assert killed_at < STEPS, "the run finished before the kill"
    ckpt = committed_steps(dump)[-1]
    assert 0 < ckpt <= killed_at

    job2 = sbatch(slurm_cluster, dump / "submit.slurm")
    assert job2 != job
    info = wait_done(slurm_cluster, job2, dump)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(dump)}"
    rank0 = task_log(dump, job2)
    assert f"{ckpt:010d} at step {ckpt}" in rank0, rank0
    assert_same_curve(dump, reference_run["metrics"])


def test_d_resubmitting_a_finished_run_is_a_noop(slurm_cluster, reference_run):
    dump = reference_run["dump"]
    before_metrics = (dump / "metrics.jsonl").read_bytes()
    before_ckpts = committed_steps(dump)
    job = sbatch(slurm_cluster, dump / "submit.slurm")
    info = wait_done(slurm_cluster, job, dump)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(dump)}"
    rank0 = task_log(dump, job)
    assert "already complete" in rank0, rank0
    assert (dump / "metrics.jsonl").read_bytes() == before_metrics
    assert committed_steps(dump) == before_ckpts


def test_e_scancel_stops_the_run_for_good(slurm_cluster, corpus, tmp_path):
    """`scancel <job>` sends SIGTERM first; the trainer checkpoints, but must not requeue a cancelled job."""
    dump = tmp_path / "dump"
    job = submit(slurm_cluster, corpus, dump, tmp_path / "cwd")
    wait_for(lambda: last_step(dump) >= 5, JOB_TIMEOUT, "step 5", dump)
    slurm_cluster.run("scancel", job)
    info = wait_done(slurm_cluster, job, dump)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, f"{info}\n{logs(dump)}"
    time.sleep(2)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, f"{info}\n{logs(dump)}"
    rank0 = task_log(dump, job)
    if "preempted" in rank0:  # the trainer reached its requeue call before SIGKILL: it must have declined
        assert "not requeueing" in rank0 and "not RUNNING" in rank0, rank0


def test_f_requeue_limit(slurm_cluster, corpus, tmp_path):
    """max_requeues bounds self-requeueing: at the limit a preempted job checkpoints and stops (exit 0)."""
    dump = tmp_path / "dump"
    job = submit(slurm_cluster, corpus, dump, tmp_path / "cwd", extra=["max_requeues=0"])
    wait_for(lambda: last_step(dump) >= 5, JOB_TIMEOUT, "step 5", dump)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    info = wait_done(slurm_cluster, job, dump)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(dump)}"
    assert int(info["Restarts"]) == 0
    rank0 = task_log(dump, job)
    assert "not requeueing" in rank0 and "limit is 0" in rank0, rank0
    assert last_step(dump) in committed_steps(dump) and last_step(dump) < STEPS


def test_g_sbatch_rejection_leaves_nothing(slurm_cluster, corpus, tmp_path):
    """A submission the controller refuses (unknown partition) fails clearly and leaves no dump dir."""
    dump = tmp_path / "dump"
    cmd = [sys.executable, "-m", "lingua.stool", "script=apps.main.train", f"config={DEBUG_CONFIG}",
           "partition=no_such_partition", "ngpu=0", "ntasks_per_node=2", "ncpu=1",
           "--", f"dump_dir={dump}", f"data.root_dir={corpus}", *TINY]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "sbatch failed" in res.stderr and "partition" in res.stderr.lower(), res.stderr
    assert not dump.exists()


def test_h_lock_of_a_slurm_job_elsewhere_is_stale_once_the_job_is_gone(slurm_cluster, monkeypatch):
    """The dump-dir lock of a run on another host is taken over as soon as squeue no longer lists its job alive
    (no waiting for the heartbeat to go stale), and not while it does."""
    from lingua.lock import why_dead

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    job = slurm_cluster.run("sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 300").stdout.split(";")[0]
    job = job.strip()
    try:
        slurm_cluster.wait_job(job, states=("RUNNING",), timeout=60)
        holder = {"host": "another-host", "pid": 1, "slurm_job_id": job, "slurm_restart": 0, "age_s": 1.0}
        assert why_dead(holder) is None
        slurm_cluster.run("scancel", job)
        slurm_cluster.wait_job(job, states=("CANCELLED",), timeout=60)
        assert why_dead(holder) == f"its SLURM job {job} is no longer running"
    finally:
        slurm_cluster.run("scancel", job, check=False)
