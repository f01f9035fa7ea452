"""The model: shapes, gradients, grouped-query attention, and init that does not depend on the world size."""

import subprocess
import sys

import pytest
import torch

from lingua.transformer import LMTransformer, LMTransformerArgs, apply_rope, rope_tables
from tests.helpers import REPO, clean_env, free_port


def tiny(**kw):
    base = dict(dim=32, n_layers=2, n_heads=4, multiple_of=16, vocab_size=50, max_seqlen=16)
    base.update(kw)
    model = LMTransformer(LMTransformerArgs(**base))
    model.init_weights()
    return model


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_forward_backward_shapes(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 50, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 50)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_causality():
    """Changing a later token never changes the logits of earlier positions."""
    model = tiny()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10] = (b[0, 10] + 1) % 50
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.equal(la[0, 10:], lb[0, 10:])


def test_rope_is_a_rotation():
    x = torch.randn(2, 8, 4, 16)
    out = apply_rope(x, rope_tables(16, 8, 10000.0))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_same_seed_same_weights_different_seed_different():
    a, b = tiny(seed=1), tiny(seed=1)
    c = tiny(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def _dump(tmp_path, nproc, fsdp_type="full_shard"):
    out = str(tmp_path / f"w{nproc}_{fsdp_type}.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "tests/scripts/dump_init_weights.py", out, fsdp_type]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.e2e
def test_init_is_independent_of_world_size_and_sharding(tmp_path):
    one = _dump(tmp_path, 1)
    two = _dump(tmp_path, 2)
    two_replicated = _dump(tmp_path, 2, "no_shard")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
        assert torch.equal(one[key], two_replicated[key]), key
