"""Checkpoints with real torchrun processes: exact resume after kills, crashes during saves, corruption,
disagreement between ranks, preemption signals, resharding, retention, disk full, the CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lingua.checkpoint import CheckpointArgs, CheckpointManager, SaveEvery, pin
from lingua.files import write_json
from tests.helpers import (
    REPO,
    ckpt_path,
    clean_env,
    committed_steps,
    copy_run,
    free_port,
    losses,
    metrics,
    output,
    run_train,
    start_background,
    wait_for_step,
    worker_pids,
)

pytestmark = pytest.mark.e2e  # real torchrun / SLURM / benchmark processes


def full_state(ckpt_dir, out, cfg, nproc, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "tests/scripts/load_full_state.py", ckpt_dir, out, f"config={cfg}", "dump_dir=/tmp/unused",
           *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def assert_states_equal(a, b):
    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{prefix}.{k}")
        else:
            yield prefix, obj

    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


def saved_state(ckpt_dir) -> dict:
    """Every tensor of a checkpoint (model and optimizer), read in-process: two runs of the same world size saved
    the same state iff these are equal."""
    from lingua.checkpoint import full_tensors

    return {section: full_tensors(ckpt_dir, section) for section in ("model", "optim")}


def kill_then_rerun(cfg, dump, rules, extra=()):
    first = run_train(cfg, dump, nproc=2, args=extra, env={"LINGUA_FAULTS": rules})
    assert first.returncode != 0, "the fault should have killed the run"
    second = run_train(cfg, dump, nproc=2, args=extra)
    assert second.returncode == 0, output(second)[-4000:]
    return first, second


# ------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize(
    "name, extra, rules, resumed_from",
    [
        ("plain", [], "step@10:1=kill", 8),
        # The async save of step 8 is held back (not committed) when rank 1 dies at step 10: resume from 4.
        ("plain", ["checkpoint.async_save=true"], "step@10:1=kill;save.async_write@8=sleep(30)", 4),
        # A native crash (abort) instead of SIGKILL: the rank's Python stack is on stderr before it dies.
        ("acc", ["grad_acc_steps=2"], "step@10:1=signal(SIGABRT)", 8),
    ],
    ids=["sync", "async-in-flight", "grad-acc-abort"],
)
def test_one_rank_killed_then_rerun_is_bitwise_exact(tmp_path, cfg, reference, name, extra, rules, resumed_from):
    dump = str(tmp_path / "run")
    first, second = kill_then_rerun(cfg, dump, rules, extra)
    if "SIGABRT" in rules:
        assert "Fatal Python error: Aborted" in first.stderr, first.stderr[-3000:]
        dump_text = first.stderr[first.stderr.index("Fatal Python error: Aborted"):]
        assert re.search(r'File ".*apps/main/train\.py", line \d+ in train', dump_text), dump_text[:3000]
    assert f"resuming from {ckpt_path(dump, resumed_from)}" in output(second)
    if "checkpoint.async_save=true" in extra:  # the rerun saves in the background too, and commits
        assert "async checkpoint step 12 committed: training blocked" in output(second)
    ref = losses(reference[name])
    got = losses(dump)
    assert list(got) == list(range(1, 13))  # no gap, no duplicate
    assert got == ref  # every step, bit for bit (9-12 recomputed after the resume)
    assert_states_equal(saved_state(ckpt_path(reference[name], 12)), saved_state(ckpt_path(dump, 12)))


# ------------------------------------------------------------------------------- crash during save


@pytest.mark.parametrize("point", ["save.after_train_state@8:1", "save.after_shards@8:0", "save.before_commit@8:1"])
def test_crash_during_save_resumes_from_previous(tmp_path, cfg, reference, point):
    dump = str(tmp_path / "run")
    first = run_train(cfg, dump, nproc=2, env={"LINGUA_FAULTS": f"{point}=kill"})
    assert first.returncode != 0
    committed = committed_steps(dump)
    if point == "save.before_commit@8:1":
        # Every rank had written and reported its files; rank 0 may still commit step 8 (complete) before
        # torchrun stops it. Either way the newest committed checkpoint is complete.
        assert committed in ([4], [4, 8])
    else:
        assert committed == [4]  # step 8 never became visible
    second = run_train(cfg, dump, nproc=2)
    assert second.returncode == 0, output(second)[-4000:]
    assert f"resuming from {ckpt_path(dump, max(committed))}" in output(second)
    if committed == [4]:
        assert "removing stale checkpoint folder" in output(second)
    assert not [n for n in os.listdir(os.path.join(dump, "checkpoints")) if n.endswith(".tmp")]
    assert losses(dump) == losses(reference["plain"])


def test_crash_right_after_commit_keeps_the_new_checkpoint(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    first = run_train(cfg, dump, nproc=2, env={"LINGUA_FAULTS": "save.after_commit@8:0=kill"})
    assert first.returncode != 0
    assert committed_steps(dump) == [4, 8]
    second = run_train(cfg, dump, nproc=2)
    assert f"resuming from {ckpt_path(dump, 8)}" in output(second)
    assert losses(dump) == losses(reference["plain"])


# ------------------------------------------------------------------------- corruption, disagreement


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, cfg, reference, damage):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    shard = os.path.join(ckpt_path(dump, 12), "__1_0.distcp")
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    else:
        os.remove(shard)
    proc = run_train(cfg, dump, nproc=2, args=["steps=16"])
    assert proc.returncode == 0, output(proc)[-4000:]
    text = output(proc)
    assert "skipping checkpoint step 12" in text and "__1_0.distcp" in text
    assert f"resuming from {ckpt_path(dump, 8)}" in text


def test_bit_flip_caught_by_checksum_when_verify_is_on(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    shard = os.path.join(ckpt_path(dump, 12), "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = run_train(cfg, dump, nproc=2, args=["steps=16", "checkpoint.verify=true"])
    assert proc.returncode == 0, output(proc)[-4000:]
    assert "__0_0.distcp fails its checksum" in output(proc)
    assert f"resuming from {ckpt_path(dump, 8)}" in output(proc)


def test_rank_that_cannot_see_newest_checkpoint_makes_all_fall_back(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    proc = run_train(cfg, dump, nproc=2, env={"LINGUA_FAULTS": "resolve.candidate@12:1=hide"})
    assert proc.returncode == 0, output(proc)[-4000:]
    assert "rank 1:" in output(proc) and f"resuming from {ckpt_path(dump, 8)}" in output(proc)
    # Both ranks continued from step 8: the logged steps 9..12 were recomputed and equal the reference.
    assert losses(dump) == losses(reference["plain"])


# -------------------------------------------------------------------------------------- preemption


def test_signal_to_one_rank_saves_same_step_and_rerun_is_exact(tmp_path, cfg, reference):
    """SIGTERM (scancel, a preemption) to one rank, twice. (SIGUSR2 takes the same path: tests/test_slurm_e2e.py,
    the drill's `preempt` fault.)"""
    signum = signal.SIGTERM
    dump = str(tmp_path / "run")
    proc = start_background(cfg, dump, env={"LINGUA_FAULTS": "step=sleep(0.3)"})
    wait_for_step(dump, 5, proc)
    workers = worker_pids(proc)
    os.kill(workers[1], signum)
    time.sleep(0.05)
    os.kill(workers[1], signum)  # a second signal during the save changes nothing
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-4000:]
    stopped = max(committed_steps(dump))
    assert 5 <= stopped < 12, committed_steps(dump)
    assert f"checkpoint at step {stopped} done" in out
    assert max(losses(dump)) == stopped
    rerun = run_train(cfg, dump, nproc=2)
    assert rerun.returncode == 0, output(rerun)[-4000:]
    assert losses(dump) == losses(reference["plain"])


def test_rerun_of_finished_run_is_a_noop(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    before = open(os.path.join(dump, "metrics.jsonl")).read()
    proc = run_train(cfg, dump, nproc=2)
    assert proc.returncode == 0
    assert "run already complete" in output(proc)
    assert open(os.path.join(dump, "metrics.jsonl")).read() == before
    assert committed_steps(dump) == committed_steps(reference["plain"])


def test_dead_rank_makes_the_other_exit_in_bounded_time(tmp_path, cfg):
    """Without torchrun to clean up (srun-style processes), a rank that dies must not hang the others."""
    dump = str(tmp_path / "run")
    job = str(800000 + free_port())
    procs = []
    start = time.time()
    for rank in range(2):
        env = clean_env({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                         "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "localhost", "LINGUA_FAULTS": "step@5:1=kill"})
        procs.append(subprocess.Popen([sys.executable, "-m", "apps.main.train", f"config={cfg}", f"dump_dir={dump}",
                                       "distributed.timeout_s=20", "steps=100000"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        p.communicate(timeout=180)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0
    assert time.time() - start < 150


# -------------------------------------------------------------------------------------- resharding


@pytest.mark.parametrize("nproc", [1, 3])
def test_resharding_model_and_optimizer(tmp_path, cfg, reference, nproc):
    ckpt = ckpt_path(reference["plain"], 12)
    saved = full_state(ckpt, str(tmp_path / "two.pt"), cfg, 2)
    loaded = full_state(ckpt, str(tmp_path / "n.pt"), cfg, nproc)
    assert_states_equal(saved, loaded)


def test_resume_with_another_global_batch_needs_data_reset(tmp_path, cfg, reference):
    """One rank instead of two with the same per-rank batch: the global batch (and so the stream) would change."""
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    proc = run_train(cfg, dump, nproc=1, args=["steps=14"])
    assert proc.returncode != 0
    assert "data.global_batch_size=4" in proc.stderr and "checkpoint.reset_data_state=true" in proc.stderr
    assert committed_steps(dump) == committed_steps(reference["plain"])  # nothing deleted
    proc = run_train(cfg, dump, nproc=3, args=["steps=14", "checkpoint.reset_data_state=true"])
    assert proc.returncode == 0, output(proc)[-4000:]
    assert "data stream restarts" in output(proc)
    records = metrics(dump)
    assert [r["global_step"] for r in records] == list(range(1, 15))
    assert records[12]["loss/out"] < records[0]["loss/out"] - 0.5  # weights were resumed, not re-initialised


# -------------------------------------------------------------------------------------- retention


class _FakeDist:
    class env:  # noqa: N801
        rank, world_size = 0, 1

    dp_rank, dp_world_size, cpu_group = 0, 1, None
    device = torch.device("cpu")


def _fake_checkpoint(root, step, kinds):
    path = os.path.join(root, f"{step:010d}")
    os.makedirs(path)
    write_json(os.path.join(path, "COMMIT.json"), {"step": step, "kinds": kinds, "dp_world_size": 1, "files": {}})
    return path


def test_retention_keeps_exactly_what_keep_says(tmp_path):
    root = str(tmp_path / "ckpts")
    args = CheckpointArgs(path=root, dump=SaveEvery(every=2, keep=2), eval=SaveEvery(every=3, keep=1))
    manager = CheckpointManager(args, str(tmp_path), _FakeDist(), {})
    for step in (2, 3, 4, 6, 8, 9, 10):
        kinds = (["dump"] if step % 2 == 0 else []) + (["eval"] if step % 3 == 0 else [])
        _fake_checkpoint(root, step, kinds)
    pin(os.path.join(root, f"{2:010d}"), "eval-job")
    manager.apply_retention()
    manager.close()  # deletions run in the background
    # dump keep 2 -> 8, 10; eval keep 1 -> 9; 2 is pinned.
    assert sorted(int(n) for n in os.listdir(root)) == [2, 8, 9, 10]


def test_retention_never_deletes_newest_committed(tmp_path):
    root = str(tmp_path / "ckpts")
    args = CheckpointArgs(path=root, dump=SaveEvery(every=2, keep=1), eval=SaveEvery(every=3, keep=1))
    manager = CheckpointManager(args, str(tmp_path), _FakeDist(), {})
    _fake_checkpoint(root, 3, ["eval"])
    _fake_checkpoint(root, 4, ["dump"])
    _fake_checkpoint(root, 5, ["preempt"])
    manager.apply_retention()
    manager.close()
    assert sorted(int(n) for n in os.listdir(root)) == [3, 4, 5]


def test_async_stager_copies_into_buffers_kept_between_saves(tmp_path):
    """One stager for the run: each save's copy lands in the buffers of the last one (no allocation), is a copy
    (training may change the state once staged), and a tensor whose shape changed gets a new buffer."""
    manager = CheckpointManager(CheckpointArgs(path=str(tmp_path / "ckpts")), str(tmp_path), _FakeDist(), {})
    stager = manager._async_stager()
    assert manager._async_stager() is stager
    state = {"m": {"w": torch.arange(4.0), "b": torch.ones(2, 3)[:, 1:]}, "o": {"lr": [0.1], "cls": int}}
    first = stager.stage(state).result()
    state["m"]["w"] += 1
    assert first["m"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and first["m"]["b"].tolist() == [[1.0, 1.0]] * 2
    assert first["o"] == {"lr": [0.1], "cls": int} and first["o"]["lr"] is not state["o"]["lr"]
    second = stager.stage(state).result()
    assert second["m"]["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert second["m"]["w"].data_ptr() == first["m"]["w"].data_ptr() != state["m"]["w"].data_ptr()
    state["m"]["w"] = torch.zeros(5)
    third = stager.stage(state).result()
    assert third["m"]["w"].tolist() == [0.0] * 5 and third["m"]["b"].data_ptr() == first["m"]["b"].data_ptr()
    manager.close()


def test_retention_in_a_real_run(tmp_path, cfg):
    dump = str(tmp_path / "run")
    proc = run_train(cfg, dump, nproc=2, args=["checkpoint.dump.every=2", "checkpoint.dump.keep=2",
                                               "checkpoint.eval.every=3", "checkpoint.eval.keep=1"])
    assert proc.returncode == 0, output(proc)[-4000:]
    assert committed_steps(dump) == [10, 12]


# ------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lingua.checkpoint", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_list_verify_consolidate(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    listing = _cli("list", dump)
    assert listing.returncode == 0
    rows = [ln.split() for ln in listing.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["4", "8", "12"] and all(r[1] == "committed" and r[3] == "2" for r in rows)
    assert all(" ".join(r[5:10]) == "2 x 1 = 4" for r in rows)  # batch_size x grad_acc_steps = global batch
    ok = _cli("verify", ckpt_path(dump, 12))
    assert ok.returncode == 0 and ok.stdout.startswith("OK: step 12")
    cons = _cli("consolidate", ckpt_path(dump, 12), "--out", str(tmp_path / "cons"))
    assert cons.returncode == 0, cons.stderr
    consolidated = torch.load(str(tmp_path / "cons" / "consolidated.pth"))
    params = json.load(open(tmp_path / "cons" / "params.json"))
    from lingua.transformer import LMTransformer, LMTransformerArgs

    model = LMTransformer(LMTransformerArgs(**params["model"]))
    model.load_state_dict(consolidated)
    reference_state = full_state(ckpt_path(dump, 12), str(tmp_path / "full.pt"), cfg, 2)["model"]
    other = LMTransformer(LMTransformerArgs(**params["model"]))
    other.load_state_dict(reference_state)
    tokens = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))
    bf16 = _cli("consolidate", ckpt_path(dump, 12), "--out", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert bf16.returncode == 0
    assert all(v.dtype == torch.bfloat16 for v in torch.load(str(tmp_path / "bf16" / "consolidated.pth")).values())
    with open(os.path.join(ckpt_path(dump, 12), "__0_0.distcp"), "r+b") as f:
        f.truncate(100)
    bad = _cli("verify", ckpt_path(dump, 12))
    assert bad.returncode == 1 and "__0_0.distcp" in bad.stdout
    os.makedirs(os.path.join(dump, "checkpoints", "0000000016.tmp"))
    os.makedirs(os.path.join(dump, "checkpoints", "0000000008.abandoned-20260101-000000"))
    listing = _cli("list", dump).stdout
    assert "INVALID" in listing and " staging " in listing and " abandoned " in listing


# ------------------------------------------------------------------------------------------ bad input


def test_checkpoint_path_not_writable(tmp_path, cfg):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_train(cfg, str(tmp_path / "run"), nproc=2, args=[f"checkpoint.path={blocker}/ckpts"])
    assert proc.returncode != 0
    assert "is not writable" in proc.stderr


def test_load_step_absent(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    proc = run_train(cfg, dump, nproc=2, args=["checkpoint.load_step=6", "steps=16"])
    assert proc.returncode != 0
    assert "checkpoint.load_step=6: no such checkpoint" in proc.stderr and "have: 12, 8, 4" in proc.stderr
    proc = run_train(cfg, dump, nproc=2, args=["checkpoint.load_step=8", "steps=16"])
    assert proc.returncode == 0 and f"resuming from {ckpt_path(dump, 8)}" in output(proc)


def test_checkpoint_from_a_different_model_shape(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    proc = run_train(cfg, dump, nproc=2, args=["model.dim=64", "steps=16"])
    assert proc.returncode != 0
    assert "model.dim: 32 -> 64" in proc.stderr and "cannot change on resume" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert committed_steps(dump) == [4, 8, 12]


def test_unreadable_commit_records_stop_the_run_and_delete_nothing(tmp_path, cfg, reference):
    dump = str(tmp_path / "run")
    copy_run(reference["plain"], dump)
    for step in (4, 8, 12):
        with open(os.path.join(ckpt_path(dump, step), "COMMIT.json"), "w") as f:
            f.write("{not json")
    proc = run_train(cfg, dump, nproc=2, args=["steps=16"])
    assert proc.returncode != 0
    err = proc.stderr
    assert "none is valid" in err and all(f"step {s}:" in err for s in (4, 8, 12)) and "checkpoint.start_over" in err
    assert sorted(os.listdir(os.path.join(dump, "checkpoints"))) == [f"{s:010d}" for s in (4, 8, 12)]
    proc = run_train(cfg, dump, nproc=2, args=["steps=16", "checkpoint.start_over=true"])
    assert proc.returncode == 0 and "starting over" in output(proc)


# ------------------------------------------------------------------------------------------ disk full


def test_save_that_does_not_fit_is_not_started(tmp_path, cfg, small_disk):
    root = small_disk("1200k")  # one checkpoint (~0.55 MB) fits, two do not
    dump = str(tmp_path / "run")
    proc = run_train(cfg, dump, nproc=2, args=[f"checkpoint.path={root}/ck", "steps=8"])
    text = output(proc)
    assert "NOT SAVING" in text
    assert proc.returncode == 1  # the final save could not be made: said so, non-zero
    steps = sorted(int(n) for n in os.listdir(f"{root}/ck") if n.isdigit())
    assert steps == [4]
    assert not [n for n in os.listdir(f"{root}/ck") if not n.isdigit()]


def test_retention_frees_space_before_a_save(tmp_path, cfg, small_disk):
    """keep=2 on a disk with room for two checkpoints: the oldest goes before the third is written."""
    root = small_disk("2000k")
    dump = str(tmp_path / "run")
    proc = run_train(cfg, dump, nproc=2, args=[f"checkpoint.path={root}/ck", "steps=12", "checkpoint.dump.keep=2"])
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "NOT SAVING" not in output(proc)
    assert sorted(int(n) for n in os.listdir(f"{root}/ck") if n.isdigit()) == [8, 12]


def test_enospc_in_the_middle_of_a_write_leaves_nothing_loadable(tmp_path, cfg, small_disk):
    root = small_disk("300k")  # smaller than one checkpoint; the space check is bypassed to hit a real ENOSPC
    dump = str(tmp_path / "run")
    proc = run_train(cfg, dump, nproc=2, args=[f"checkpoint.path={root}/ck", "steps=4"],
                     env={"LINGUA_FAULTS": "save.space_check=pass"})
    assert proc.returncode == 1
    assert "checkpoint save FAILED" in output(proc)
    assert os.listdir(f"{root}/ck") == []  # staging removed, nothing committed
