"""What an adversarial user does to a run, one test per hole (issue 10): an invalid newest checkpoint and retention,
two runs on one dump dir, a config edited before the rerun, a flipped bit, an edited data file, a sticky load_step,
Ctrl-C, a dead launcher, garbled checkpoint files, a bad init_ckpt_path, a full disk at the end, the staging
folder's fsync, crafted pickles, shell injection through stool. Real processes, signals and files."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from lingua.checkpoint import CheckpointArgs, CheckpointManager, SaveEvery
from lingua.files import write_json
from tests.helpers import (
    REPO,
    ckpt_path,
    clean_env,
    committed_steps,
    copy_run,
    losses,
    metrics,
    output,
    run_train,
    start_background,
    wait_for_step,
    worker_pids,
)


class _OneRank:
    class env:  # noqa: N801
        rank, world_size = 0, 1

    dp_rank, dp_world_size, cpu_group, tp_rank = 0, 1, None, 0


def _flip_byte(path, offset=None):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


# 1 ----------------------------------------------------------------------------------------------- retention


def test_retention_counts_and_protects_only_valid_checkpoints(tmp_path):
    """The newest checkpoint is invalid (a byte appended to a file): it is neither counted nor protected as
    "the newest"; the valid one the run resumed from stays, whatever `keep` says."""
    root = str(tmp_path / "ckpts")
    for step in (4, 8, 12):
        path = os.path.join(root, f"{step:010d}")
        os.makedirs(path)
        with open(os.path.join(path, "params.json"), "w") as f:
            f.write("{}")
        write_json(os.path.join(path, "COMMIT.json"), {"step": step, "kinds": ["dump"], "dp_world_size": 1,
                                                        "files": {"params.json": {"size": 2}}})
    with open(os.path.join(root, f"{12:010d}", "params.json"), "a") as f:
        f.write(" ")  # one byte more than recorded: invalid
    manager = CheckpointManager(CheckpointArgs(path=root, dump=SaveEvery(every=4, keep=1)), str(tmp_path),
                                _OneRank(), {})
    manager.apply_retention(upcoming_kinds=["dump"], now=True)  # the low-space path, before a save
    manager.close()
    assert sorted(int(n) for n in os.listdir(root)) == [8, 12]  # 8 (newest valid) kept, 4 deleted, 12 not judged


# 2 ------------------------------------------------------------------------------------------ the dump-dir lock


@pytest.mark.e2e
def test_second_run_on_a_live_dump_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, cfg):
    dump = str(tmp_path / "run")
    first = start_background(cfg, dump, ["steps=1000"], env={"LINGUA_FAULTS": "step=sleep(0.2)"})
    try:
        wait_for_step(dump, 2, first)
        second = run_train(cfg, dump, nproc=2)
        assert second.returncode != 0
        line = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")][0]
        assert "is in use by a live run" in line and f"pid {worker_pids(first)[0]}" in line
        os.kill(worker_pids(first)[0], signal.SIGTERM)  # then stop the first run: it saves and exits
        out = first.communicate(timeout=120)[0]
        assert first.returncode == 0, out[-3000:]
    finally:
        first.kill()
    stopped = max(committed_steps(dump))
    assert [r["global_step"] for r in metrics(dump)] == list(range(1, stopped + 1))  # the first run lost nothing
    assert not os.path.exists(os.path.join(dump, "run.lock"))  # released at the end
    # A lock left by a dead process on this host is taken over, with a line saying so.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_json(os.path.join(dump, "run.lock"), {"host": os.uname().nodename, "pid": dead.pid, "started": 1.0,
                                                "token": "x"})
    again = run_train(cfg, dump, nproc=2, args=[f"steps={stopped + 2}"])
    assert again.returncode == 0, output(again)[-3000:]
    assert "taking over the lock" in output(again) and f"its process {dead.pid} on this host is gone" in output(again)


@pytest.mark.parametrize("garbage", ['{"host": "h', "[1]", '"text"'])
def test_a_garbled_lock_file_is_moved_aside_and_the_lock_taken(tmp_path, garbage):
    from lingua.lock import LOCK_FILE, DumpDirLock

    (tmp_path / LOCK_FILE).write_text(garbage)  # torn, or valid JSON that is not a lock record
    lock = DumpDirLock(str(tmp_path)).acquire()
    try:
        moved = [p for p in tmp_path.iterdir() if p.name.startswith(f"{LOCK_FILE}.garbled.")]
        assert len(moved) == 1 and moved[0].read_text() == garbage
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.record["token"]
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# 3 ---------------------------------------------------------------------------------------- config change


@pytest.mark.e2e
def test_config_changes_on_resume(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    shrunk = run_train(cfg, dump, nproc=2, args=["model.n_layers=1", "steps=16"])
    assert shrunk.returncode != 0 and "model.n_layers: 2 -> 1" in shrunk.stderr
    assert "[rank0]: Traceback" not in shrunk.stderr and committed_steps(dump) == [4, 8, 12]
    tuned = run_train(cfg, dump, nproc=2,
                      args=["optim.lr=0.001", "optim.weight_decay=0.0", "optim.fused=false", "steps=16"])
    assert tuned.returncode == 0, output(tuned)[-3000:]
    text = output(tuned)
    assert "optim.lr: 0.003 -> 0.001 (takes effect from the resume step)" in text
    assert "optim.fused: True -> False" in text
    assert "optim.weight_decay: 0.1 -> 0.0" in text and "steps: 12 -> 16" in text
    from lingua.optim import OptimArgs, lr_factor

    new = OptimArgs(lr=0.001, warmup=3, scheduler="cosine")
    lr13 = [r["optim/lr"] for r in metrics(dump) if r["global_step"] == 13][0]
    assert lr13 == pytest.approx(0.001 * lr_factor(13, new, 16))  # the new peak lr and schedule from step 13
    import yaml

    assert yaml.safe_load(open(os.path.join(dump, "config.yaml")))["optim"]["lr"] == 0.001  # what the run now uses


# 4 -------------------------------------------------------------------------------------------- bit flip


@pytest.mark.e2e
def test_same_size_shard_corruption_is_caught_by_default(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    _flip_byte(os.path.join(ckpt_path(dump, 12), "__1_0.distcp"))
    proc = run_train(cfg, dump, nproc=2, args=["steps=14"])  # default settings
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "__1_0.distcp fails its checksum" in output(proc)
    assert f"resuming from {ckpt_path(dump, 8)}" in output(proc)
    assert [r["global_step"] for r in metrics(dump)][-6:] == [9, 10, 11, 12, 13, 14]


# 5 -------------------------------------------------------------------------------- edited data files


@pytest.mark.e2e
def test_data_file_edited_in_place_is_refused_on_resume(tmp_path, cfg, shared_corpus):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(shared_corpus, data)
    dump = str(tmp_path / "run")
    first = run_train(cfg, dump, nproc=2, args=[f"data.root_dir={data}"], env={"LINGUA_FAULTS": "step@10=kill"})
    assert first.returncode != 0 and committed_steps(dump) == [4, 8]
    path = os.path.join(data, "shk", "shk.chunk.00.jsonl")
    with open(path, "r+b") as f:  # same size, in the part the run has read
        f.seek(10)
        f.write(b"X")
    second = run_train(cfg, dump, nproc=2, args=[f"data.root_dir={data}"])
    assert second.returncode != 0
    assert "shk.chunk.00.jsonl' changed since the run read it" in second.stderr
    assert "checkpoint.reset_data_state=true" in second.stderr and "[rank0]: Traceback" not in second.stderr


# 6 -------------------------------------------------------------------------------------------- load_step


@pytest.mark.e2e
def test_load_step_applies_once(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    args = ["checkpoint.load_step=4", "steps=16"]
    first = run_train(cfg, dump, nproc=2, args=args, env={"LINGUA_FAULTS": "step@10:0=signal(SIGUSR2)"})
    assert first.returncode == 0, output(first)[-3000:]
    assert f"resuming from {ckpt_path(dump, 4)}" in output(first) and "moved the newer checkpoint 12" in output(first)
    assert committed_steps(dump) == [4, 8, 10]  # 8 of the new branch; 12 of the old one moved aside
    assert any(n.startswith("0000000012.abandoned-") for n in os.listdir(os.path.join(dump, "checkpoints")))
    second = run_train(cfg, dump, nproc=2, args=args)  # the same command again (a requeue of base_config.yaml)
    assert second.returncode == 0, output(second)[-3000:]
    assert "was used by an earlier start of this run" in output(second)
    assert f"resuming from {ckpt_path(dump, 10)}" in output(second)
    assert [r["global_step"] for r in metrics(dump)] == list(range(1, 17))


# 7 --------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.e2e
def test_ctrl_c_saves_and_exits_then_rerun_is_exact(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    proc = start_background(cfg, dump, env={"LINGUA_FAULTS": "step=sleep(0.3)"}, new_session=True)
    wait_for_step(dump, 5, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    out = proc.communicate(timeout=120)[0]
    assert "KeyboardInterrupt" not in out
    stopped = max(committed_steps(dump))
    assert 5 <= stopped < 12 and f"stopping on SIGINT: checkpoint at step {stopped} done" in out
    rerun = run_train(cfg, dump, nproc=2)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert losses(dump) == losses(reference["plain"])


# 8 ---------------------------------------------------------------------------------------- dead launcher


@pytest.mark.e2e
def test_workers_stop_when_their_launcher_dies(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    proc = start_background(cfg, dump, env={"LINGUA_FAULTS": "step=sleep(0.3)"})
    wait_for_step(dump, 4, proc)
    workers = [psutil.Process(p) for p in worker_pids(proc).values()]
    os.kill(proc.pid, signal.SIGUSR2)  # torchrun has no handler for it: the default action kills it
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "workers outlived their launcher"
    stopped = max(committed_steps(dump))
    out = proc.stdout.read()  # the workers' output, to the end (they wrote into torchrun's pipe)
    assert stopped < 12 and "received the death of the launcher" in out, out[-3000:]
    rerun = run_train(cfg, dump, nproc=2)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert losses(dump) == losses(reference["plain"])


# 9 ------------------------------------------------------------------------------------- garbled files


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["train_state_00001.json", ".metadata", "params.json"])
def test_same_size_garbage_in_a_checkpoint_file_falls_back(tmp_path, cfg, reference, name):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    path = os.path.join(ckpt_path(dump, 12), name)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\x80" * size)
    proc = run_train(cfg, dump, nproc=2, args=["steps=14", "checkpoint.verify=false"])  # not even checksums
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "skipping checkpoint step 12" in output(proc) and name in output(proc)
    assert f"resuming from {ckpt_path(dump, 8)}" in output(proc) and "Traceback" not in output(proc)


# 10 ---------------------------------------------------------------------------------------- init_ckpt_path


@pytest.mark.e2e
def test_bad_init_ckpt_path_is_one_line_before_any_process_group(tmp_path, cfg, reference, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "COMMIT.json").write_text("{nope")
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path, "is not a checkpoint folder"),
             (garbage, "commit record COMMIT.json is unreadable"), (os.path.join(reference["plain"], "checkpoints"),
                                                                    "is not a checkpoint folder")]
    from apps.main.train import main

    # The trainer's own entry point in-process: the checks run before any process group exists.
    cases.append((f"{ckpt_path(reference['plain'], 12)} model.dim=64", "model.dim: 32 in the checkpoint, 64 here"))
    for path, message in cases:
        path, *extra = str(path).split(" ")
        code = main([f"config={cfg}", f"dump_dir={tmp_path / 'run'}", f"checkpoint.init_ckpt_path={path}", *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert "checkpoint.init_ckpt_path" in lines[0] and message in lines[0], lines
    assert not os.path.exists(tmp_path / "run")
    ok = run_train(cfg, str(tmp_path / "run"), nproc=0,
                   args=[f"checkpoint.init_ckpt_path={ckpt_path(reference['plain'], 12)}", "steps=2"])
    assert ok.returncode == 0, output(ok)[-2000:]


# 11 ------------------------------------------------------------------------------------------- disk full


@pytest.mark.e2e
def test_disk_full_at_the_final_save_says_so_and_leaves_nothing(tmp_path, cfg, small_disk):
    root = small_disk("900k")  # the run's own dump dir: its first checkpoint fits, not a second one
    dump = os.path.join(root, "run")
    proc = run_train(cfg, dump, nproc=2, args=["steps=8", "checkpoint.dump.every=4"],
                     env={"LINGUA_FAULTS": "save.space_check=pass"})  # no pre-save check: a real ENOSPC
    text = output(proc)
    assert proc.returncode == 1
    assert "final checkpoint was NOT saved" in text and "training complete" not in text
    assert "--- Logging error ---" not in text
    leftovers = [n for n in os.listdir(os.path.join(dump, "checkpoints")) if not n.isdigit()]
    assert leftovers == [] and committed_steps(dump) == [4]


# 12 ----------------------------------------------------------------------------------------------- fsync


SAVE_ONCE = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from lingua.checkpoint import CheckpointArgs, CheckpointManager, TrainState
from lingua.distributed import DistributedArgs, setup_torch_distributed
from lingua.optim import OptimArgs, build_optimizer
from lingua.transformer import LMTransformerArgs, build_model
events = []
real_fsync, real_replace, real_rename, real_open = os.fsync, os.replace, os.rename, os.open
def open_(path, flags, *a, **k):
    if flags & os.O_DIRECT:
        events.append(("open O_DIRECT", str(path)))
    return real_open(path, flags, *a, **k)
os.open = open_
def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{{fd}}")))
    real_fsync(fd)
def renamer(real):
    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        real(a, b)
    return rename
os.fsync, os.replace, os.rename = fsync, renamer(real_replace), renamer(real_rename)
state = setup_torch_distributed(DistributedArgs())
model = build_model(LMTransformerArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16), state,
                    DistributedArgs(), init=True)
opt, sched = build_optimizer(model, OptimArgs(), 10)
ts = TrainState(sched, data={{}})
ts.step = 3
manager = CheckpointManager(CheckpointArgs(path={root!r}, sync_direct_io={direct!r}), {root!r}, state, {{}})
manager.prepare()
assert manager.save(model, opt, ts, ["dump"])
print(repr(events))
dist.destroy_process_group()
"""


def _save_once(root: str, direct: bool = True) -> list:
    """A sync save of a tiny model in a new process: its fsyncs, renames and O_DIRECT opens, in order."""
    proc = subprocess.run([sys.executable, "-c", SAVE_ONCE.format(repo=str(REPO), root=root, direct=direct)],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of tuples of strings)


@pytest.mark.parametrize("direct", [True, False])
def test_sync_save_writes_its_shard_with_o_direct_unless_switched_off(tmp_path, direct):
    """checkpoint.sync_direct_io (default on): the shard of a sync save past the page cache, still fsynced."""
    root = str(tmp_path / "ck")
    events = _save_once(root, direct)
    shard = os.path.join(root, "0000000003.tmp", "__0_0.distcp")
    assert [e[1] for e in events if e[0] == "open O_DIRECT"] == ([shard] if direct else [])
    assert ("fsync", shard) in events


def test_staging_folder_is_fsynced_before_its_rename(tmp_path):
    root = str(tmp_path / "ck")
    events = _save_once(root)
    staging, final = os.path.join(root, "0000000003.tmp"), os.path.join(root, "0000000003")
    publish = events.index(("rename", staging, final))
    before = events[:publish]
    assert ("fsync", staging) in before, "the staging folder was not fsynced before it was renamed"
    for name in os.listdir(final):  # every file of the checkpoint was fsynced before the rename: under its own
        path = os.path.join(staging, name)  # name, or under the temp name it was renamed from (atomic_write)
        temps = [e[1] for e in before if e[0] == "rename" and e[2] == path]
        assert any(("fsync", p) in before for p in [path, *temps]), name
    assert ("fsync", root) in events[publish:]  # and the parent after


# 13 ---------------------------------------------------------------------------------------------- pickles


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _forge(path, data: bytes) -> None:
    """Replace a checkpoint file and fix its size in the commit record, as an attacker would."""
    with open(path, "wb") as f:
        f.write(data)
    commit_path = os.path.join(os.path.dirname(path), "COMMIT.json")
    commit = json.load(open(commit_path))
    commit["files"][os.path.basename(path)] = {"size": len(data)}
    json.dump(commit, open(commit_path, "w"))


@pytest.mark.e2e
def test_crafted_pickles_in_a_checkpoint_run_nothing(tmp_path, cfg, reference):
    import base64
    import pickle

    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    marker = tmp_path / "pwned"
    # (a) a format-1 style pickled RNG record in the train state: never unpickled
    for rank in (0, 1):
        path = os.path.join(ckpt_path(dump, 8), f"train_state_{rank:05d}.json")
        sd = json.load(open(path))
        sd["rng"] = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
        _forge(path, json.dumps(sd).encode())
    # (b) a crafted DCP .metadata in the newest checkpoint: refused by the restricted unpickler, fall back
    _forge(os.path.join(ckpt_path(dump, 12), ".metadata"), pickle.dumps(_Payload(marker)))
    for cmd in (["verify", ckpt_path(dump, 12)], ["list", dump], ["consolidate", ckpt_path(dump, 12)]):
        res = subprocess.run([sys.executable, "-m", "lingua.checkpoint", *cmd], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=120)
        assert "refusing to load posix.system" in res.stdout + res.stderr, (cmd, res.stdout, res.stderr)
    proc = run_train(cfg, dump, nproc=2, args=["steps=14", "checkpoint.verify=false"])
    assert proc.returncode == 0, output(proc)[-3000:]
    text = output(proc)
    assert "refusing to load posix.system" in text and f"resuming from {ckpt_path(dump, 8)}" in text
    assert "RNG states are an old pickled record: not restored" in text
    assert not marker.exists(), "a crafted checkpoint ran code"


def test_non_tensor_values_of_a_shard_are_loaded_without_unpickling(tmp_path):
    """DCP stores non-tensor values (the optimizer's hyperparameters) as torch.save'd bytes; lingua reads them with
    weights_only=True, so a crafted one is an error, not code execution."""
    import torch.distributed.checkpoint as dcp

    from lingua.checkpoint import CheckpointError, dcp_load

    marker = tmp_path / "pwned"
    dcp.save({"x": _Payload(marker)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    with pytest.raises(CheckpointError, match="unsupported GLOBAL posix.system"):
        dcp_load({"x": None}, str(tmp_path / "ck"), no_dist=True)
    assert not marker.exists()


# 14 ------------------------------------------------------------------------------------- stool injection


def test_stool_quotes_everything_that_reaches_submit_slurm(tmp_path, monkeypatch):
    from lingua.stool import StoolArgs, StoolError, launch_job

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dump_dir": f"{tmp_path}/a\ntouch {marker}", "model": {"n_heads": 8}}))
    args = StoolArgs(script="apps.main.train", config=str(cfg), launcher="bash", ngpu=0, ncpu=1, partition="p")
    with pytest.raises(StoolError, match="control characters"):
        launch_job(args, [])
    assert os.listdir(tmp_path) == ["c.yaml"]  # nothing created
    from lingua.stool import render_submit_script

    evil = str(tmp_path / f"b $(touch {marker}) `touch {marker}` 'q")
    text = render_submit_script(args, evil, str(tmp_path), None)
    script = tmp_path / "submit.slurm"
    script.write_text(text.replace('"$PYTHON"', "true"))  # run the shell lines, not the trainer
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=clean_env())
    assert not marker.exists(), text
    assert f'#SBATCH --output="{evil}/logs/slurm-%j.out"' in text
    assert res.returncode == 0, res.stderr
    with pytest.raises(StoolError, match="double quote"):
        render_submit_script(args, str(tmp_path / 'c"d'), str(tmp_path), None)
