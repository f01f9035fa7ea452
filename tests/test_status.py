"""lingua.status: a finished, a killed, a live and a preempted SLURM run (real processes), the disk forecast on a
real small filesystem, the plot's data, a large synthetic run's speed, bad input, and request_fits against sinfo."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from lingua import slurm, status
from tests.helpers import REPO, clean_env, output, run_train, tiny_config


def cli(*args, env=None) -> subprocess.CompletedProcess:
    """`python -m lingua.status ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lingua.status", *args], cwd=REPO, env=clean_env(env),
                          capture_output=True, text=True, timeout=120)


def snapshot(folder: str) -> dict:
    """Every path under folder with its size and mtime: what a read-only tool must leave as it was."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def config(cfg):
    return cfg  # the shared tiny config (tests/conftest.py)


@pytest.fixture(scope="module")
def killed_then_finished(tmp_path_factory, config):
    """A 12-step run killed after step 6 (checkpoints every 4), copied as it was, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("runs")
    dump = str(tmp / "run")
    proc = run_train(config, dump, nproc=2, env={"LINGUA_FAULTS": "step@6=kill"})
    assert proc.returncode != 0, output(proc)[-3000:]
    killed = str(tmp / "killed")
    shutil.copytree(dump, killed)  # copy2: mtimes kept
    proc = run_train(config, dump, nproc=2)
    assert proc.returncode == 0, output(proc)[-3000:]
    return {"killed": killed, "finished": dump}


# ------------------------------------------------------------------------------------------------ real runs


@pytest.mark.e2e
def test_killed_run_is_stopped_and_resumable_from_the_last_checkpoint(killed_then_finished):
    s = status.summarize(status.load_run(killed_then_finished["killed"]))
    assert s["state"]["state"] == "stopped"
    assert s["state"]["how"].startswith("killed at step 6"), s["state"]
    assert s["state"]["resumable_from"] == 4
    assert s["progress"]["step"] == 6 and s["progress"]["steps"] == 12
    assert [c["step"] for c in s["checkpoints"]["committed"]] == [4]
    assert [launch["end"] for launch in s["launches"]] == ["killed"]
    assert (s["disk"]["current_step"], s["disk"]["saves_left"]) == (4, 2)  # the rerun saves steps 8 and 12 again
    assert any("run.lock was left by a dead run" in p for p in s["problems"]), s["problems"]
    text = status.format_text(s)
    assert "stopped: killed at step 6" in text and "resumable from step 4" in text, text


@pytest.mark.e2e
def test_finished_run_read_only_text_and_json(killed_then_finished, tmp_path):
    dump = killed_then_finished["finished"]
    before = snapshot(dump)
    res = cli(dump)
    assert res.returncode == 0, output(res)
    print(res.stdout)  # the example in docs/status.md
    res_json = cli(dump, "--json", "--plot", str(tmp_path / "p.png"))
    assert res_json.returncode == 0, output(res_json)
    assert snapshot(dump) == before  # read-only: nothing created, written or touched

    text = res.stdout
    assert "state       finished: training complete at step 12" in text, text
    assert "step 12/12 (100.0%)" in text and "tokens/s" in text
    assert re.search(r"#1 .* fresh start .* killed at step 6", text), text
    assert re.search(r"#2 .* resumed from step 4 .* training complete at step 12", text), text
    s = json.loads(res_json.stdout)
    assert s["state"]["state"] == "finished" and s["progress"]["percent"] == 100.0
    assert s["progress"]["tokens_seen"] == 12 * 2 * 32 * 2  # steps x batch x seq_len x ranks
    assert [launch["resumed_from"] for launch in s["launches"]] == [None, 4]
    assert [c["step"] for c in s["checkpoints"]["committed"]] == [12, 8, 4]
    assert all(c["kinds"] == ["dump"] and not c["pinned"] and c["bytes"] > 0 for c in s["checkpoints"]["committed"])
    assert s["disk"]["bytes_per_checkpoint"] == s["checkpoints"]["committed"][0]["bytes"]
    assert s["disk"]["saves_left"] == 0 and s["disk"]["warning"] is None
    # The launches are dated from metrics.jsonl: the first started before its first record, the second after.
    first_record = json.loads(open(os.path.join(dump, "metrics.jsonl")).readline())["created_at"]
    assert first_record - 60 < s["launches"][0]["started_at"] < first_record
    assert s["launches"][0]["started_at"] < s["launches"][1]["started_at"] <= time.time()


@pytest.mark.e2e
def test_status_reads_checkpoints_without_torch(killed_then_finished, tmp_path):
    """status reads checkpoints through lingua.checkpoint_format (the format without torch), so it starts fast."""
    from lingua import checkpoint

    code = "import sys, lingua.status; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert res.stdout.strip() == "False", res.stderr
    root = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(killed_then_finished["finished"], "checkpoints"), root)
    with open(os.path.join(root, "0000000008", "__1_0.distcp"), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(root, "0000000004", "COMMIT.json"))
    # the trainer passes its CheckpointArgs to the forecast
    args = checkpoint.CheckpointArgs(dump=checkpoint.SaveEvery(every=4, keep=0))
    forecast = status.disk_forecast(root, args, steps=20, current_step=12, free_bytes=10**9)
    assert (forecast.saves_left, forecast.saves_fit, forecast.margin, forecast.warning) == (2, 2, 1.1, None)
    scan = status.scan_checkpoints(root)
    assert [c["step"] for c in scan["committed"]] == [12]
    assert {o["name"]: o["status"] for o in scan["others"]} == {"0000000004": "invalid", "0000000008": "invalid"}


@pytest.mark.e2e
def test_plot_data_has_the_restart_markers_and_the_png_is_written(killed_then_finished, tmp_path):
    runs = [status.load_run(killed_then_finished["finished"]), status.load_run(killed_then_finished["killed"])]
    data = status.plot_data(runs)
    done, killed = data
    assert (done["label"], killed["label"]) == ("run", "killed")
    assert done["restarts"] == [4] and killed["restarts"] == []
    assert done["checkpoints"] == [4, 8, 12] and done["evals"] == []
    assert done["loss"][0] == list(range(1, 13)) and len(done["loss"][1]) == 12
    assert done["lr"][0] == list(range(1, 13))
    # tokens/s between consecutive records of one launch only: not across the restart (records 4 -> 5)
    assert 5 not in done["tokens_per_s"][0] and {6, 12} <= set(done["tokens_per_s"][0])
    assert all(v > 0 for v in done["tokens_per_s"][1])
    out = tmp_path / "runs.png"
    status.draw_plot(data, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_live_run_is_running_with_its_holder(tmp_path, config):
    dump = str(tmp_path / "live")
    cmd = [sys.executable, "-m", "apps.main.train", f"config={config}", f"dump_dir={dump}", "steps=200"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env({"LINGUA_FAULTS": "step=sleep(0.5)"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(os.path.join(dump, "run.lock")) and len(_lines(dump)) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the run ended or did not start"
            time.sleep(0.2)
        lock_before = open(os.path.join(dump, "run.lock")).read()
        res = cli(dump, "--json")
        assert res.returncode == 0, output(res)
        s = json.loads(res.stdout)
        assert s["state"]["state"] == "running", s["state"]
        assert s["state"]["holder"]["pid"] == proc.pid and s["state"]["holder"]["host"] == socket.gethostname()
        assert s["launches"][-1]["end"] == "running" and s["launches"][-1]["pid"] == proc.pid
        assert s["progress"]["eta_s"] > 0 and 0 < s["progress"]["s_per_step"] < 30
        assert open(os.path.join(dump, "run.lock")).read() == lock_before  # not taken, not touched
        assert "state       running: lock held by host" in cli(dump).stdout
        assert proc.poll() is None  # status did not disturb it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = status.summarize(status.load_run(dump))
    assert s["state"]["state"] == "stopped" and s["state"]["how"].startswith("killed at step"), s["state"]


def _lines(dump):
    path = os.path.join(dump, "metrics.jsonl")
    return open(path).read().splitlines() if os.path.exists(path) else []


@pytest.mark.e2e
def test_preempted_and_requeued_slurm_run(slurm_cluster, shared_corpus, tmp_path, monkeypatch):
    """A stool job signalled with USR2 (as before a time limit): checkpoint, requeue, PENDING with a reason."""
    cfg = tiny_config(str(tmp_path / "c.yaml"), shared_corpus, steps=200, **{"checkpoint.dump.every": 20})
    dump = tmp_path / "dump"
    env = slurm_cluster.client_env()
    env["PYTHONPATH"], env["OMP_NUM_THREADS"] = REPO, "1"
    res = subprocess.run([sys.executable, "-m", "lingua.stool", "script=apps.main.train", f"config={cfg}",
                          f"partition={slurm_cluster.partition}", "ngpu=0", "ntasks_per_node=2", "ncpu=1",
                          "--", f"dump_dir={dump}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, output(res)
    job = re.search(r"submitted job (\d+)", res.stdout)[1]
    try:
        deadline = time.time() + 180
        while len(_lines(str(dump))) < 5:
            assert time.time() < deadline, slurm_cluster.job_info(job)
            time.sleep(0.2)
        slurm_cluster.run("scancel", "--signal=USR2", job)
        while not (slurm_cluster.job_info(job).get("JobState") == "PENDING"
                   and int(slurm_cluster.job_info(job).get("Restarts", "0")) >= 1):
            assert time.time() < deadline, slurm_cluster.job_info(job)
            time.sleep(0.5)
        res = subprocess.run([sys.executable, "-m", "lingua.status", str(dump), "--json"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, output(res)
        s = json.loads(res.stdout)
        preempted_at = s["launches"][-1]["last_step"]
        assert s["state"]["state"] == "stopped", s["state"]
        how = s["state"]["how"]
        assert "stop requested (SIGUSR2)" in how and f"requeued (SLURM job {job} restart 1)" in how, how
        assert f"SLURM job {job} is PENDING (Reason=" in s["state"]["how"], s["state"]
        assert s["state"]["resumable_from"] == preempted_at  # the stop checkpoint
        assert s["launches"][-1]["end"] == "requeued" and s["launches"][-1]["slurm_job"] == job
        sl = s["slurm"]
        assert sl["jobs"] == [job] and sl["latest"] == job and sl["requeues"] == 1
        assert sl["states"][job]["state"] == "PENDING" and sl["states"][job]["reason"], sl
        assert str(dump / "logs" / f"slurm-{job}.out") in sl["log_files"]
        assert str(dump / "logs" / job / f"{job}.0.stdout") in sl["log_files"]

        # request_fits asks sinfo about the same partition
        monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        p = slurm_cluster.partition
        assert slurm.request_fits(p, nodes=1, ntasks_per_node=2, cpus_per_task=1) is None
        warning = slurm.request_fits(p, nodes=1, ntasks_per_node=1, cpus_per_task=64)
        assert f"no node of partition {p} has 64 CPUs (largest: {slurm_cluster.cpus})" in warning
        assert "PENDING (Reason=PartitionConfig)" in warning
        assert "PartitionNodeLimit" in slurm.request_fits(p, nodes=2)
        assert "GPUs" in slurm.request_fits(p, gpus_per_node=1, ntasks_per_node=1)
        assert "memory" in slurm.request_fits(p, mem="1T")
        assert "no node" in slurm.request_fits("no_such_partition")
    finally:
        slurm_cluster.run("scancel", job, check=False)


# ------------------------------------------------------------------------------------------------ no processes


def test_request_fits_is_silent_without_sinfo(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.request_fits("any", nodes=100, cpus_per_task=1000) is None
    assert slurm.query_jobs(["1"]) == ({}, "squeue is not available here: job states unknown")


TRAIN_LOG = """\
I 23:59:50      0.2s r0 train: run start: 2 processes (slurm), rank 0 on host n1 pid 10, SLURM job 77 restart 0
I 23:59:58      8.2s r0 train: step 10/100 loss 3.0000 grad 1.000 lr 1.00e-03 wps 100
I 00:00:04     14.0s r0 lingua.checkpoint: saved checkpoint step 12 in 0.10s (sync) -> /x/checkpoints
I 00:00:05     15.0s r0 train: stopping on SIGUSR2: checkpoint at step 12 done, exiting
I 00:00:05     15.1s r0 lingua.slurm: requeued SLURM job 77 (restart 1 of at most 20)
I 00:10:00      0.1s r0 train: run start: 2 processes (slurm), rank 0 on host n2 pid 20, SLURM job 77 restart 1
I 00:10:01      1.0s r0 lingua.checkpoint: resumed from /x/checkpoints/0000000012 at step 12
E 00:10:02      2.0s r0 train: eval of step 12 FAILED, training continues: EvalError: no validation source
Traceback (most recent call last):
  File "eval.py", line 1, in run
EvalError: no validation source
E 00:10:09      9.0s r0 lingua.distributed: crashed
Traceback (most recent call last):
  File "train.py", line 1, in <module>
RuntimeError: CUDA error: an illegal memory access was encountered
I 00:20:00      0.1s r0 train: run start: 1 processes (single), rank 0 on host n3 pid 30
E 00:20:01      1.0s r0 lingua.distributed: CheckpointError: checkpoints exist in /x but none is valid
I 00:30:00      0.1s r0 train: run start: 2 processes (torchrun), rank 0 on host n4 pid 40, started {started}
I 00:30:01      1.0s r0 lingua.checkpoint: resumed from /x/checkpoints/0000000012 at step 12
I 00:30:02      1.5s r0 train: step 100/100 loss 2.0000 grad 1.000 lr 1.00e-04 wps 100
E 00:30:03      2.0s r0 train: training reached step 100 but its final checkpoint was NOT saved (see the errors above)
I 00:40:00      0.1s r0 train: run start: 2 processes (torchrun), rank 0 on host n4 pid 50
I 00:40:02      2.0s r0 train: run already complete: step 100 >= steps=100; nothing to do
"""


def test_train_log_launches_ends_and_dates(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(TRAIN_LOG.format(started="2030-01-02T00:30:00+00:00"))
    launches, notes = status.parse_log(str(log))
    assert [(la.end, la.resumed_from, la.last_step) for la in launches] == [
        ("requeued", None, 12), ("crashed", 12, 12), ("failed", None, None), ("not saved", 12, 100),
        ("already complete", None, 100)]
    first, crashed, failed = launches[:3]
    assert (first.slurm_job, first.slurm_restart, first.host, first.pid, first.processes) == ("77", 0, "n1", 10, 2)
    assert first.detail == "stop requested (SIGUSR2) at step 12, checkpoint saved, requeued (SLURM job 77 restart 1)"
    assert crashed.last_error == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert failed.last_error == "CheckpointError: checkpoints exist in /x but none is valid"
    assert notes["eval_failed"] == {12: "EvalError: no validation source"}
    assert status.launch_end(crashed) == f"crashed at step 12: {crashed.last_error}"
    # Dates: the last line was written at the log's mtime; earlier launches go back from there (across midnight).
    end = time.mktime((2030, 1, 2, 0, 40, 2, 0, 0, -1))
    os.utime(log, (end, end))
    status.date_launches(launches, [], end)
    assert launches[3].started_at == 1893544200.0  # from its "started <ISO>" (what the trainer could log)
    assert launches[4].started_at == pytest.approx(end - 1.9)
    assert launches[0].started_at == time.mktime((2030, 1, 1, 23, 59, 50, 0, 0, -1))  # the day before
    assert launches[1].started_at == time.mktime((2030, 1, 2, 0, 10, 0, 0, 0, -1))


def _fake_run(root: str, steps: int = 12, n_records: int = 12, ckpt_steps=(), ckpt_bytes: int = 1000,
              keep: int = 0, every: int = 4, ckpt_root: str = None) -> str:
    """A dump dir written by hand: config.yaml, metrics.jsonl, train.log and checkpoints with real files."""
    os.makedirs(root, exist_ok=True)
    ckpt_root = ckpt_root or os.path.join(root, "checkpoints")
    with open(os.path.join(root, "config.yaml"), "w") as f:
        json.dump({"name": "fake", "steps": steps, "logging": {"freq": 1}, "checkpoint": {
            "path": ckpt_root, "dump": {"every": every, "keep": keep}, "eval": {"every": -1, "keep": 0}}}, f)
    t0 = time.time() - n_records - 10
    with open(os.path.join(root, "metrics.jsonl"), "w") as m, open(os.path.join(root, "train.log"), "w") as log:
        log.write("I 10:00:00      0.1s r0 train: run start: 2 processes (torchrun), rank 0 on host h pid 1\n")
        for s in range(1, n_records + 1):
            m.write(json.dumps({"created_at": t0 + s, "global_step": s, "loss/out": 5 - s / n_records,
                                "optim/lr": 1e-3, "speed/wps": 500.0, "speed/step_time_s": 1.0,
                                "data/tokens_seen": 1000 * s}) + "\n")
            log.write(f"I 10:00:00 {s + 0.1:8.1f}s r0 train: step {s}/{steps} loss 1.0 grad 1.0 lr 1e-3 wps 500\n")
    for s in ckpt_steps:
        folder = os.path.join(ckpt_root, f"{s:010d}")
        os.makedirs(folder)
        with open(os.path.join(folder, "__0_0.distcp"), "wb") as f:
            f.write(b"\0" * ckpt_bytes)
        with open(os.path.join(folder, "COMMIT.json"), "w") as f:
            json.dump({"step": s, "kinds": ["dump"], "dp_world_size": 1, "created": t0 + s,
                       "files": {"__0_0.distcp": {"size": ckpt_bytes}}}, f)
    return root


def test_a_large_run_is_summarised_fast(tmp_path):
    dump = _fake_run(str(tmp_path / "big"), steps=10000, n_records=5000, ckpt_steps=range(100, 4001, 100))
    os.makedirs(os.path.join(dump, "checkpoints", "0000004100.tmp"))
    t = time.perf_counter()
    s = status.summarize(status.load_run(dump))
    text = status.format_text(s)
    in_process = time.perf_counter() - t
    t = time.perf_counter()
    res = cli(dump)
    command = time.perf_counter() - t
    print(f"5000 metrics lines, 40 checkpoints: summarised in {in_process:.3f}s; `python -m lingua.status` "
          f"{command:.3f}s")
    assert res.returncode == 0, output(res)
    assert len(s["checkpoints"]["committed"]) == 40 and s["checkpoints"]["others"][0]["status"] == "staging"
    assert s["progress"]["step"] == 5000 and s["progress"]["s_per_step"] == pytest.approx(1.0)
    assert s["progress"]["tokens_per_s"] == pytest.approx(1000.0) and s["progress"]["eta_s"] == pytest.approx(5000)
    assert "0000004100.tmp  staging" in text
    assert in_process < 10  # generous: a regression to quadratic work, not a benchmark


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert status.main([str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    assert status.main([str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'empty'} is empty: no run has written to it yet"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    assert status.main([str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'other'} is not a lingua dump dir") and "\n" not in err

    dump = _fake_run(str(tmp_path / "torn"))
    lines = open(os.path.join(dump, "metrics.jsonl")).read().splitlines(keepends=True)
    lines[4] = '{"global_step": 5, "loss/o\n'
    with open(os.path.join(dump, "metrics.jsonl"), "w") as f:
        f.writelines(lines + ['{"global_step": 13, "lo'])  # and a torn last line, as after a kill
    assert status.main([dump]) == 0
    out = capsys.readouterr().out
    assert "WARNING     metrics.jsonl: line 5 is not a valid metrics record (skipped)" in out
    assert "WARNING     metrics.jsonl: its last line is incomplete" in out
    assert "step 12/12" in out


def test_plot_without_matplotlib_says_so_in_one_line(tmp_path):
    dump = _fake_run(str(tmp_path / "run"))
    code = ("import sys; sys.modules['matplotlib'] = None; from lingua.status import main; "
            f"sys.exit(main([{dump!r}, '--plot', {str(tmp_path / 'p.png')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == "error: --plot needs matplotlib: pip install matplotlib (the 'plot' extra)"
    assert not (tmp_path / "p.png").exists()


def test_evals_evaluated_pending_and_failed(tmp_path):
    dump = _fake_run(str(tmp_path / "run"), ckpt_steps=(4, 8))
    with open(os.path.join(dump, "metrics.eval.jsonl"), "w") as f:
        f.write(json.dumps({"global_step": 4, "created_at": 1.0, "eval_dir": "e", "val/shk/loss": 3.5}) + "\n")
    for step, files in ((4, {"results.json": "{}"}), (8, {"launched.json": json.dumps({"job_id": None})})):
        os.makedirs(os.path.join(dump, "evals", f"{step:010d}"))
        for name, text in files.items():
            with open(os.path.join(dump, "evals", f"{step:010d}", name), "w") as f:
                f.write(text)
    with open(os.path.join(dump, "train.log"), "a") as f:
        f.write("E 10:00:30     30.0s r0 train: eval of step 12 FAILED, training continues: EvalError: bad task\n")
    ev = status.summarize(status.load_run(dump))["evals"]
    assert ev["evaluated_steps"] == [4] and ev["latest"] == {"val/shk/loss": 3.5}
    assert [e["step"] for e in ev["open"]] == [8]
    assert ev["failed"] == [{"step": 12, "error": "EvalError: bad task"}]
    data = status.plot_data([status.load_run(dump)])[0]
    assert data["evals"] == [4] and data["eval"] == {"val/shk/loss": ([4], [3.5])}


# ------------------------------------------------------------------------------------------------ the forecast


def test_forecast_models_retention(tmp_path):
    root = str(tmp_path / "ck")
    _fake_run(str(tmp_path / "run"), ckpt_steps=(4,), ckpt_bytes=1000, ckpt_root=root)
    args = {"dump": {"every": 4, "keep": 0}, "eval": {"every": -1}, "space_margin": 1.0}
    # keep all: steps 8 and 12 need 2000 bytes more
    fits = status.disk_forecast(root, args, steps=12, current_step=4, free_bytes=2000)
    assert (fits.saves_left, fits.fits_now, fits.first_failing_step, fits.warning) == (2, 2, None, None)
    short = status.disk_forecast(root, args, steps=12, current_step=4, free_bytes=1999, steps_per_s=2.0)
    assert (short.first_failing_step, short.free_then, short.eta_s) == (12, 999, 4.0)
    assert short.warning.startswith(f"disk: the checkpoint of step 12 will not fit in {root} (in ~4.0s")
    # keep 1: retention deletes the old one before each save (early, when short), so 1000 bytes are enough
    args["dump"]["keep"] = 1
    assert status.disk_forecast(root, args, steps=100, current_step=4, free_bytes=1000).warning is None
    assert status.disk_forecast(root, args, steps=100, current_step=4, free_bytes=999).first_failing_step == 8
    args["dump"]["keep"] = 2  # two on disk, and the older one goes early to make room for each new one
    assert status.disk_forecast(root, args, steps=100, current_step=4, free_bytes=1000).saves_fit == 24
    # a pinned checkpoint is never deleted
    os.makedirs(os.path.join(root, "0000000004", "pins"))
    open(os.path.join(root, "0000000004", "pins", "eval-x"), "w").close()
    assert status.disk_forecast(root, args, steps=100, current_step=4, free_bytes=1000).first_failing_step == 12


def test_forecast_warns_on_a_small_disk(small_disk):
    small_disk = small_disk("800k")
    """A run at step 4 on an 800 kB filesystem with one 300 kB checkpoint, saving every 4 steps to step 16:
    keeping all of them, the save of step 12 will not fit; keeping 2, retention makes room."""
    dump = _fake_run(os.path.join(small_disk, "run"), steps=16, n_records=4, ckpt_steps=(4,), ckpt_bytes=300_000)
    s = status.summarize(status.load_run(dump))
    disk = s["disk"]
    assert disk["saves_left"] == 3 and disk["bytes_per_checkpoint"] == 300_000
    assert disk["first_failing_step"] == 12 and disk["eta_s"] == pytest.approx(8.0)  # 1 step/s in metrics.jsonl
    text = status.format_text(s)
    assert "WARNING     disk: the checkpoint of step 12 will not fit" in text, text
    assert "3 saves left to step 16 (dump every 4 keep all): only 1 fit" in text
    keep2 = {"dump": {"every": 4, "keep": 2}}
    assert status.disk_forecast(os.path.join(dump, "checkpoints"), keep2, 16, 4).warning is None
    assert s["disk"]["saves_fit"] == 1
