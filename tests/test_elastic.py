"""Elastic resume (issue 11) with real torchrun runs: the number of data-parallel ranks changes between restarts
(2 -> 1 -> 3, and 4 (HSDP 2 x 2) -> 2 -> 4) with the global batch held by data.global_batch_size; every step
consumes exactly the sequences of the uninterrupted run (compared through data.trace), the losses continue the
uninterrupted curve within float tolerance, the async loader and a two-source mixture included."""

import collections
import json
import os

import pytest

from lingua.data import read_trace
from tests.helpers import committed_steps, losses, make_corpus, output, run_train, tiny_config

pytestmark = pytest.mark.e2e  # real torchrun processes

TOLERANCE = 1e-4  # relative: only the reduction order of the gradients changes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data")), sources=("one", "two"), files_per_source=3)


def _config(tmp_path, corpus, global_batch):
    return tiny_config(str(tmp_path / "c.yaml"), corpus, sources=("one", "two"), **{
        "data.global_batch_size": global_batch, "data.trace": True, "data.load_async": True,
        "checkpoint.dump.every": 2, "data.prefetch_size": 3})


def _steps(dump) -> dict:
    """step -> sorted list of the sequences (their pieces) every rank consumed at that step."""
    out = collections.defaultdict(list)
    for line in read_trace(dump):
        out[line["step"]].extend(json.dumps(seq) for seq in line["sequences"])
    return {step: sorted(seqs) for step, seqs in out.items()}


def _chain(cfg, dump, legs):
    """Run the legs [(nproc, extra args, kill after step or None)] one after the other on one dump dir."""
    for nproc, extra, kill in legs:
        env = {"LINGUA_FAULTS": f"step@{kill}=kill"} if kill else None
        proc = run_train(cfg, dump, nproc=nproc, args=extra, env=env)
        assert (proc.returncode != 0) == bool(kill), output(proc)[-4000:]
    return proc


def _compare(reference, dump):
    ref, got = _steps(reference), _steps(dump)
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    for step in ref:
        assert got[step] == ref[step], f"step {step} consumed other sequences"
    ref_loss, got_loss = losses(reference), losses(dump)
    assert list(got_loss) == list(range(1, 13))
    worst = max(abs(got_loss[s] - ref_loss[s]) / abs(ref_loss[s]) for s in ref_loss)
    print(f"max relative loss difference to the uninterrupted run: {worst:.2e}")
    assert worst < TOLERANCE


def test_two_one_three_ranks(tmp_path, corpus):
    cfg = _config(tmp_path, corpus, 12)
    reference = str(tmp_path / "reference")
    _chain(cfg, reference, [(2, [], None)])
    dump = str(tmp_path / "run")
    last = _chain(cfg, dump, [(2, [], 5), (0, [], 7), (3, [], None)])  # 2 ranks (acc 3), 1 (acc 6), 3 (acc 2)
    assert "resumed from" in output(last) and committed_steps(dump)[-1] == 12
    _compare(reference, dump)
    # A changed global batch cannot continue the stream: refused, naming the way out.
    changed = run_train(cfg, dump, nproc=2, args=["data.global_batch_size=8", "steps=14"])
    assert changed.returncode != 0
    assert "global batch is 12 sequences, this run's is 8" in changed.stderr
    assert "checkpoint.reset_data_state=true" in changed.stderr


def test_hsdp_four_to_two_to_four_ranks(tmp_path, corpus):
    cfg = _config(tmp_path, corpus, 8)
    reference = str(tmp_path / "reference")
    _chain(cfg, reference, [(2, [], None)])
    dump = str(tmp_path / "run")
    hsdp = ["distributed.dp_replicate=2", "distributed.dp_shard=2"]
    _chain(cfg, dump, [(4, hsdp, 3), (2, [], 7), (4, [], None)])
    _compare(reference, dump)
    assert os.path.exists(os.path.join(dump, "data_trace", "rank_00003.jsonl"))
