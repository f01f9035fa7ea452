"""The training path end to end, with real processes: torchrun, a single process, srun-style, two 'nodes'."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env, free_port, losses, make_corpus, metrics, output, run_train, tiny_config

pytestmark = pytest.mark.e2e  # real torchrun / SLURM / benchmark processes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus):
    """2-process torchrun, 12 steps: shared by several tests."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_config(str(tmp / "c.yaml"), corpus)
    proc = run_train(cfg, str(tmp / "dump"), nproc=2)
    assert proc.returncode == 0, output(proc)[-4000:]
    return cfg, str(tmp / "dump")


def test_torchrun_two_processes_trains_and_logs(reference_run):
    _, dump = reference_run
    records = metrics(dump)
    assert [r["global_step"] for r in records] == list(range(1, 13))
    for r in records:
        for key in ("loss/out", "optim/lr", "optim/grad_norm", "speed/wps"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
    first = sum(r["loss/out"] for r in records[:3]) / 3
    last = sum(r["loss/out"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)  # byte-level loss starts near ln(258) = 5.55
    assert os.path.exists(os.path.join(dump, "config.yaml"))
    assert "step 12/12" in open(os.path.join(dump, "train.log")).read()


def test_same_seed_gives_identical_losses(tmp_path, reference_run):
    cfg, dump = reference_run
    # (with glibc's default malloc this time: where freed memory goes must not change a single number)
    proc = run_train(cfg, str(tmp_path / "again"), nproc=2, args=["distributed.keep_host_memory=false"])
    assert proc.returncode == 0, output(proc)[-3000:]
    assert losses(str(tmp_path / "again")) == losses(dump)


KEEP_HOST_MEMORY_CHILD = """
import resource, sys, torch
from lingua.distributed import keep_host_memory
torch.set_num_threads(1)  # the fills in this thread too (no worker threads with heaps of their own)
if sys.argv[1] == "keep":
    assert keep_host_memory()
for i in range(10):
    if i == 4:  # after the heap's warm-up (which round grows it last depends on timing)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(5 << 20) for _ in range(3)]  # 3 x 20 MiB, freed together, as a step frees its buffers
    del blocks
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) // 6)
"""


def _faults_per_round(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", KEEP_HOST_MEMORY_CHILD, mode], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_keep_host_memory_stops_refaulting_what_each_step_frees():
    """distributed.keep_host_memory (on by default): buffers freed and allocated again are not handed back to the
    OS and page-faulted in again. glibc's default trims the freed top of its heap (~10,000 faults a round here) in
    most runs, not all (where small allocations land varies): the pattern must show it at least once."""
    keep = [_faults_per_round("keep") for _ in range(3)]
    assert max(keep) < 1_000, keep  # page faults per round (60 MiB = 15,360 pages)
    default = next((f for f in (_faults_per_round("default") for _ in range(8)) if f > 5_000), None)
    assert default is not None, "the pattern never re-faulted with glibc's default: it tests nothing on this machine"


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_changed_optimizer_implementation_takes_effect_on_resume(saved_fused):
    """A checkpoint's param groups carry the implementation of the run that saved it; apply_hyperparameters
    (what the trainer calls when optim options changed) makes the configured one the one that runs."""
    import torch

    from lingua.optim import OptimArgs, apply_hyperparameters, build_optimizer

    def model_and_optimizer(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        return model, *build_optimizer(model, OptimArgs(fused=fused, warmup=0), total_steps=10)

    def step(model, opt, sched):
        model(torch.ones(2, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    old = model_and_optimizer(saved_fused)
    for _ in range(2):
        step(*old)
    new = model_and_optimizer(not saved_fused)
    new[0].load_state_dict(old[0].state_dict())
    new[1].load_state_dict(old[1].state_dict())
    new[2].load_state_dict(old[2].state_dict())
    assert bool(new[1].param_groups[0]["fused"]) == saved_fused  # the checkpoint's, until applied
    apply_hyperparameters(new[1], new[2], OptimArgs(fused=not saved_fused, warmup=0))
    group = new[1].param_groups[0]
    assert group["fused"] == (not saved_fused) and group["foreach"] == saved_fused
    step(*old)
    step(*new)  # runs with the other kernel, from the same state, to the same weights (up to rounding)
    for a, b in zip(old[0].parameters(), new[0].parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.e2e
@pytest.mark.parametrize("mesh", ["1 2", "2 1"])  # FSDP over 2 ranks; 2 replicas (HSDP, a shard group of 1)
def test_clip_grad_norm_on_local_shards_matches_torch(mesh):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "tests/scripts/compare_clip.py", *mesh.split()]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "clip ok" in proc.stdout, proc.stderr[-3000:]


def test_gradient_accumulation_matches_bigger_batch(tmp_path, corpus):
    """2 micro-batches of b == one batch of 2b (same data: one rank, so the stream is the same)."""
    base = dict(steps=6, **{"checkpoint.dump.every": -1, "data.prefetch_size": 1})
    cfg_acc = tiny_config(str(tmp_path / "acc.yaml"), corpus, grad_acc_steps=2, **{"data.batch_size": 2}, **base)
    cfg_big = tiny_config(str(tmp_path / "big.yaml"), corpus, grad_acc_steps=1, **{"data.batch_size": 4}, **base)
    for cfg, name in ((cfg_acc, "acc"), (cfg_big, "big")):
        proc = run_train(cfg, str(tmp_path / name), nproc=1)
        assert proc.returncode == 0, output(proc)[-3000:]
    acc, big = losses(str(tmp_path / "acc")), losses(str(tmp_path / "big"))
    assert acc.keys() == big.keys()
    for step in acc:
        assert acc[step] == pytest.approx(big[step], rel=1e-4, abs=1e-5), step


def test_single_process_launch(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus, steps=4)
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=0)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "launcher single" in output(proc)
    assert [r["global_step"] for r in metrics(str(tmp_path / "dump"))] == [1, 2, 3, 4]


def test_srun_style_launch_from_slurm_variables(tmp_path, corpus, reference_run):
    """Two plain processes that only have SLURM's variables (as srun sets them) form one job."""
    cfg, ref_dump = reference_run
    dump = str(tmp_path / "dump")
    job_id = str(900000 + free_port())
    procs = []
    for rank in range(2):
        env = clean_env({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                         "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost"})
        procs.append(subprocess.Popen([sys.executable, "-m", "apps.main.train", f"config={cfg}", f"dump_dir={dump}"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "launcher slurm" in outs[0]
    assert losses(dump) == losses(ref_dump)  # same job as the torchrun one


def test_two_nodes_on_one_machine(tmp_path, corpus, reference_run):
    """torchrun --nnodes 2 with a localhost rendezvous, one process per 'node'."""
    cfg, ref_dump = reference_run
    dump = str(tmp_path / "dump")
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-nodes", "-m", "apps.main.train", f"config={cfg}", f"dump_dir={dump}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert losses(dump) == losses(ref_dump)


def _assert_no_progress(dump):
    """Nothing a later run could mistake for progress: no checkpoint, no metrics."""
    ckpts = os.path.join(dump, "checkpoints")
    assert not os.path.isdir(ckpts) or not os.listdir(ckpts)
    path = os.path.join(dump, "metrics.jsonl")
    assert not os.path.exists(path) or open(path).read() == ""


def _one_line_error(proc, needle):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if needle in ln]
    assert lines, proc.stderr[-3000:]


def test_missing_data_dir(tmp_path):
    cfg = tiny_config(str(tmp_path / "c.yaml"), str(tmp_path / "nope"))
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=0)
    _one_line_error(proc, "nope")
    _assert_no_progress(str(tmp_path / "dump"))


def test_empty_source_folder(tmp_path):
    os.makedirs(tmp_path / "data" / "shk")
    cfg = tiny_config(str(tmp_path / "c.yaml"), str(tmp_path / "data"))
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=0)
    _one_line_error(proc, "shk")
    _assert_no_progress(str(tmp_path / "dump"))


def test_malformed_json_line_names_file_and_line(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "shk")
    lines = [json.dumps({"text": "hello world " * 20}), '{"text": "broken'] + [json.dumps({"text": "more"})] * 3
    (root / "shk" / "shk.chunk.00.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(str(tmp_path / "c.yaml"), str(root))
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=0)
    _one_line_error(proc, "shk.chunk.00.jsonl")
    assert ":2" in proc.stderr or "line 2" in proc.stderr, proc.stderr[-2000:]
    _assert_no_progress(str(tmp_path / "dump"))


def test_missing_tokenizer_file(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus, **{"data.tokenizer": {"name": "sp", "path": "/no/tok.model"}})
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=0)
    _one_line_error(proc, "/no/tok.model")
    _assert_no_progress(str(tmp_path / "dump"))


def test_world_size_not_divisible_by_mesh(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    proc = run_train(cfg, str(tmp_path / "dump"), nproc=2, args=["distributed.dp_replicate=4"])
    _one_line_error(proc, "distributed.dp_replicate")
    _assert_no_progress(str(tmp_path / "dump"))


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["distributed.fsdp_type=no_shard"]),
        (2, ["distributed.activation_checkpointing=true"]),
        (2, ["distributed.dp_replicate=2"]),  # HSDP layout with shard groups of 1
    ],
    ids=["no_shard", "activation_checkpointing", "hsdp"],
)
def test_parallelism_variants_match_full_shard(tmp_path, reference_run, nproc, extra):
    """Other layouts of the same 2 data-parallel ranks compute the same losses (up to reduction order)."""
    cfg, ref_dump = reference_run
    dump = str(tmp_path / "dump")
    proc = run_train(cfg, dump, nproc=nproc, args=extra)
    assert proc.returncode == 0, output(proc)[-3000:]
    ref, got = losses(ref_dump), losses(dump)
    assert ref.keys() == got.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step


def test_bf16_mixed_precision_trains(tmp_path, reference_run):
    cfg, ref_dump = reference_run
    dump = str(tmp_path / "dump")
    proc = run_train(cfg, dump, nproc=2, args=["distributed.model_dtype=bf16"])
    assert proc.returncode == 0, output(proc)[-3000:]
    ref, got = losses(ref_dump), losses(dump)
    assert got[12] < got[1] - 0.5
    assert all(abs(got[s] - ref[s]) < 0.1 for s in ref)  # bf16 compute tracks fp32 closely on this tiny run


def test_profiler_writes_a_trace(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus, steps=6)
    dump = str(tmp_path / "dump")
    proc = run_train(cfg, dump, nproc=0, args=["profiling.run=true", "profiling.wait=2", "profiling.steps=2"])
    assert proc.returncode == 0, output(proc)[-3000:]
    traces = os.listdir(os.path.join(dump, "profiling"))
    assert traces == ["trace_step5_rank0.json"]
    trace = json.load(open(os.path.join(dump, "profiling", traces[0])))
    assert any("aten::mm" in e.get("name", "") or "aten::addmm" in e.get("name", "") for e in trace["traceEvents"])
