"""lingua.generation (KV cache, sampling, batched generation), the lm-eval wrapper's windows, and
apps.main.generate's command line. Tiny random models on CPU, no process group except in the CLI test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingua.generation import GenerationArgs, KVCache, generate, generate_tokens, sample_tokens, token_logprobs
from lingua.lm_eval_wrapper import rolling_windows
from lingua.tokenizer import BytesTokenizer
from lingua.transformer import LMTransformer, LMTransformerArgs

REPO = Path(__file__).resolve().parent.parent
ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seqlen=48, vocab_size=258, seed=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LMTransformer(LMTransformerArgs(**ARGS))
    m.init_weights()
    with torch.no_grad():  # larger weights than the init: a peaked, input-dependent next-token distribution
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.eval()


def test_kv_cache_logits_match_full_forward(model):
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        caches = [KVCache(20) for _ in model.layers]
        pieces = [model(tokens[:, :7], caches=caches, start=0)]
        for t in range(7, 20):
            pieces.append(model(tokens[:, t : t + 1], caches=caches, start=t))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=2e-4)


def test_greedy_generation_with_cache_equals_without(model):
    tok = BytesTokenizer()
    prompts = [tok.encode(p, True, False) for p in ("To be", "Now is the winter of", "A", "x" * 60)]
    with_cache = generate_tokens(model, prompts, GenerationArgs(max_gen_len=20, stop_at_eos=False, batch_size=3))
    without = generate_tokens(model, prompts,
                              GenerationArgs(max_gen_len=20, stop_at_eos=False, batch_size=3, use_cache=False))
    assert with_cache == without
    assert [len(g) for g in with_cache[:3]] == [20, 20, 20]
    assert len(set(map(tuple, with_cache))) > 1  # not a degenerate constant model
    # batching does not change a row's result
    alone = generate_tokens(model, prompts[1:2], GenerationArgs(max_gen_len=20, stop_at_eos=False))
    assert alone[0] == with_cache[1]
    # the prompt longer than max_seqlen - max_gen_len was cut from the left and still generated
    assert len(with_cache[3]) == 20


def test_sampling_controls():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits[:3]).tolist() == [0, 0, 0]  # temperature 0 = greedy
    top2 = sample_tokens(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_tokens(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(nucleus.tolist()) == {0}  # p(0) = 0.61 already covers top_p = 0.5
    wide = sample_tokens(logits, temperature=1.0, generator=g)
    assert set(wide.tolist()) == {0, 1, 2, 3, 4}
    freq0 = (wide == 0).float().mean().item()
    assert abs(freq0 - torch.softmax(logits[0], -1)[0].item()) < 0.04
    hot = sample_tokens(logits, temperature=5.0, generator=g)
    assert (hot == 0).float().mean().item() < freq0  # a higher temperature flattens the distribution
    a = sample_tokens(logits[:50], 1.0, 0.9, 3, torch.Generator().manual_seed(7))
    b = sample_tokens(logits[:50], 1.0, 0.9, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_generate_text_stops(model):
    tok = BytesTokenizer()
    args = GenerationArgs(max_gen_len=12, temperature=0.9, top_p=0.95, top_k=50, seed=5)
    first = generate(model, tok, ["Hello", "World"], args)
    assert first == generate(model, tok, ["Hello", "World"], args)  # the seed makes sampling reproducible
    free = generate(model, tok, ["Hello"], GenerationArgs(max_gen_len=12, stop_at_eos=False))[0]
    stop = free[3:5] or free[:1]
    cut = generate(model, tok, ["Hello"], GenerationArgs(max_gen_len=12, stop_at_eos=False, until=[stop]))[0]
    assert stop not in cut and free.startswith(cut)


def test_token_logprobs_and_rolling_windows(model):
    rows = [[256, 10, 20, 30, 40], [256, 7]]
    scored = token_logprobs(model, rows, batch_size=2)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([rows[0][:-1]])).float(), -1)[0]
    expected = ref[torch.arange(4), torch.tensor(rows[0][1:])].double()
    torch.testing.assert_close(scored[0][0], expected)
    assert len(scored[1][0]) == 1
    toks = list(range(23))
    windows = rolling_windows(toks, prefix=256, max_length=8)
    covered = []
    for row, n in windows:
        assert len(row) <= 9
        covered += row[len(row) - n :]
    assert covered == toks  # every token scored exactly once
    assert all(len(row) == 9 for row, _ in windows[1:])  # later windows keep a full context


@pytest.mark.e2e
def test_generate_cli(model, tmp_path):
    """A consolidated checkpoint (full state dict + params.json); one prompt, then prompts from a file."""
    ckpt = tmp_path / "0000000005" / "consolidated"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "consolidated.pth")
    (ckpt / "params.json").write_text(json.dumps({"model": ARGS, "data": {"tokenizer": {"name": "bytes"}}}))
    (tmp_path / "prompts.txt").write_text("To be\nROMEO: hi\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "out.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "apps.main.generate", f"ckpt={ckpt}", "prompt=ROMEO:",
         f"prompts_file={tmp_path / 'prompts.txt'}", "generator.max_gen_len=10", "generator.stop_at_eos=false",
         f"output={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["ROMEO:", "To be", "ROMEO: hi"]
    expected = generate(model, BytesTokenizer(), [r["prompt"] for r in records],
                        GenerationArgs(max_gen_len=10, stop_at_eos=False))
    assert [r["generation"] for r in records] == expected  # the FSDP-loaded checkpoint generates the same
    assert "ROMEO:" + records[0]["generation"] in res.stdout
    bad = subprocess.run([sys.executable, "-m", "apps.main.generate", f"ckpt={tmp_path / 'missing'}", "prompt=x"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
