"""The data pipeline: exact resume through every stage and the whole chain (sync and async), a global stream that
does not depend on the data-parallel layout (and states resharded onto another layout), stream disjointness,
mixture frequencies, packing, the trace, tokenizers end to end, the loader process, edited files, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lingua.args import ConfigError
from lingua.data import (
    DataArgs,
    DataError,
    DataPipeline,
    build_dataloader,
    check_data_args,
    data_metrics,
    find_validation_files,
    init_dataloader_state,
    read_jsonl_documents,
    reshard_data_state,
)
from lingua.tokenizer import BytesTokenizer, TokenizerArgs
from tests.helpers import REPO, load_script

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WORDS = ["the", "data", "stream", "résumé", "naïve", "😀", "exact", "x", "", "lorem", "ipsum", "\n", "tab\t"]


def write_source(root, name, files, field="text"):
    """files: list (per file) of list of texts; None writes a blank line. Returns the list of paths."""
    os.makedirs(os.path.join(root, name), exist_ok=True)
    paths = []
    for i, texts in enumerate(files):
        path = os.path.join(root, name, f"{name}.chunk.{i:02d}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for j, t in enumerate(texts):
                if t is None:
                    f.write("\n")
                else:
                    key = field if j % 3 else ("content" if field == "text" else field)
                    f.write(json.dumps({key: t, "id": j}, ensure_ascii=j % 2 == 0) + "\n")
        paths.append(path)
    return paths


def make_texts(rnd, tag, n, max_words=12):
    out = []
    for j in range(n):
        if j % 7 == 3:
            out.append(None)  # blank line: skipped
        elif j % 11 == 5:
            out.append("")  # an empty document: bos/eos only
        else:
            out.append(f"{tag}:{j} " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(0, max_words))))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three sources: a (3 files), b (1 file, shared by streams), c (5 tiny files: many passes)."""
    root = str(tmp_path_factory.mktemp("corpus"))
    rnd = random.Random(1234)
    texts = {
        "a": [make_texts(rnd, f"a{i}", 14 + i) for i in range(3)],
        "b": [make_texts(rnd, "b0", 40, max_words=30)],
        "c": [make_texts(rnd, f"c{i}", 9) for i in range(5)],
    }
    for name, files in texts.items():
        write_source(root, name, files)
    return root, texts


def stream(args, state, n, acc=1):
    """The first n micro-batches from `state`: [(tokens, state or None, pieces)]."""
    out = []
    with build_dataloader(args, state, grad_acc_steps=acc) as it:
        for mb in it:
            out.append(tuple(mb))
            if len(out) == n:
                break
    return out


def rt(state):
    """What a checkpoint does to a state: JSON out and back."""
    return json.loads(json.dumps(state))


def take(gen, n):
    out = []
    for x in gen:
        out.append(x)
        if len(out) == n:
            break
    gen.close()
    return out


def same(x, y):
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def step_rows(args, states, n_steps, acc):
    """Per step, the sorted rows (view 0 + the rest of the last view) of every rank's micro-batches."""
    per_step = [[] for _ in range(n_steps)]
    for state in states:
        for i, (tokens, _, _) in enumerate(stream(args, state, n_steps * acc, acc)):
            rows = np.concatenate([tokens[:, :, 0], tokens[:, -1:, 1:].reshape(len(tokens), -1)], 1)
            per_step[i // acc].extend(tuple(r) for r in rows)
    return [sorted(rows) for rows in per_step]


SOURCE_SETS = [{"a": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0, "c": 3.0}, {"c": 1.0}, {}]


# ----------------------------------------------------------------------------------------------------------
# exact resume


@settings(max_examples=30, **SETTINGS)
@given(
    sources=st.sampled_from(SOURCE_SETS),
    world=st.integers(1, 3),
    rank_frac=st.floats(0, 0.999),
    n_views=st.integers(1, 3),
    batch_size=st.integers(1, 2),
    acc=st.integers(1, 2),  # the global batch (= logical streams) stays <= 12: source c has 9-line files
    prefetch=st.integers(1, 4),
    seq_len=st.integers(1, 40),
    bos_eos=st.sampled_from([(True, True), (False, False), (True, False)]),
    cut=st.integers(0, 12),
    more=st.integers(1, 6),
)
def test_resume_whole_chain_sync(corpus, sources, world, rank_frac, n_views, batch_size, acc, prefetch, seq_len,
                                 bos_eos, cut, more):
    root, _ = corpus
    rank = int(rank_frac * world)
    args = DataArgs(root_dir=root, sources=sources, batch_size=batch_size, seq_len=seq_len, n_views=n_views,
                    prefetch_size=prefetch, add_bos=bos_eos[0], add_eos=bos_eos[1], load_async=False, seed=7)
    init = init_dataloader_state(args, rank, world, acc)
    full = stream(args, rt(init), (cut + more) * acc, acc)
    for i, (tokens, state, pieces) in enumerate(full):
        assert tokens.shape == (batch_size, seq_len, n_views) and tokens.dtype == np.int64
        assert (state is not None) == (i % acc == acc - 1) and pieces is None  # a state on each step's last one
        if n_views > 1:
            assert np.array_equal(tokens[:, 1:, 0], tokens[:, :-1, 1])  # targets = inputs shifted by one
    resumed = stream(args, rt(full[cut * acc - 1][1]) if cut else rt(init), more * acc, acc)
    for (b1, s1, _), (b2, s2, _) in zip(full[cut * acc:], resumed):
        assert np.array_equal(b1, b2)
        assert rt(s1) == rt(s2)


def test_resume_across_wraparound(corpus):
    """Deep enough that every file of c is read several times; resume at each of many cut points."""
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"c": 1.0, "a": 0.5}, batch_size=2, seq_len=32, prefetch_size=3,
                    load_async=False)
    init = init_dataloader_state(args, 1, 2)
    full = stream(args, init, 60)
    assert data_metrics(full[-1][1])["data/pass/c"] >= 3
    for cut in range(1, 59, 7):
        resumed = stream(args, rt(full[cut - 1][1]), 60 - cut)
        assert all(np.array_equal(b1, b2) for (b1, _, _), (b2, _, _) in zip(full[cut:], resumed))


STAGES = ["reader", "documents", "sequences"]


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=20, **SETTINGS)
@given(sources=st.sampled_from(SOURCE_SETS[:4]), world=st.integers(1, 5), rank_frac=st.floats(0, 0.999),
       seq_len=st.integers(1, 30), n_views=st.integers(1, 3), cut=st.integers(0, 120), more=st.integers(1, 40))
def test_resume_each_stage(corpus, stage, sources, world, rank_frac, seq_len, n_views, cut, more):
    root, _ = corpus
    rank = int(rank_frac * world)
    args = DataArgs(root_dir=root, sources=sources, seq_len=seq_len, n_views=n_views, load_async=False)
    init = init_dataloader_state(args, rank, world)
    p = DataPipeline(args, init)
    sid = min(p.streams)
    s = p.streams[sid]
    name = p.sources[0]
    pack = init["streams"][str(sid)]
    start, first = {
        "reader": (lambda st_: s.read_source(name, st_), pack["readers"][name]),
        "documents": (s.documents, {"rng": pack["rng"], "readers": pack["readers"]}),
        "sequences": (s.sequences, pack),
    }[stage]
    full = take(start(rt(first)), cut + more)
    resumed = take(start(rt(full[cut - 1][-1])) if cut else start(rt(first)), more)
    assert len(resumed) == more
    for o1, o2 in zip(full[cut:], resumed):
        assert same(o1[:-1], o2[:-1])
        assert rt(o1[-1]) == rt(o2[-1])


# ----------------------------------------------------------------------------------------------------------
# one global stream, whatever the layout


LAYOUTS_12 = [(1, 4, 3), (2, 2, 3), (3, 4, 1), (4, 3, 1), (6, 1, 2), (12, 1, 1)]  # (ranks, batch_size, acc): G = 12


@settings(max_examples=6, **SETTINGS)
@given(sources=st.sampled_from(SOURCE_SETS[1:3]), streams=st.sampled_from([0, 12]), prefetch=st.integers(1, 3))
def test_the_stream_is_a_function_of_the_global_batch_only(corpus, sources, streams, prefetch):
    """Every layout of the same 12-sequence global batch consumes the same sequences at every step."""
    root, _ = corpus
    reference = None
    for world, bs, acc in LAYOUTS_12:
        args = DataArgs(root_dir=root, sources=sources, batch_size=bs, seq_len=9, prefetch_size=prefetch,
                        load_async=False, streams=streams)
        states = [init_dataloader_state(args, r, world, acc) for r in range(world)]
        got = step_rows(args, states, 5, acc)
        assert all(len(rows) == 12 for rows in got)
        if reference is None:
            reference = got
        assert got == reference, (world, bs, acc)


@pytest.mark.parametrize("before, after", [((2, 2, 3), (1, 4, 3)), ((1, 4, 3), (3, 4, 1)), ((2, 2, 3), (4, 3, 1)),
                                           ((4, 3, 1), (2, 6, 1))])
def test_states_reshard_onto_another_layout(corpus, before, after):
    """Stop after 4 steps on one layout, deal the states out to another, continue: steps 5-10 consume exactly
    the sequences the uninterrupted run does (cut in the middle of a shuffle block)."""
    root, _ = corpus
    W, bs, acc = before
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, batch_size=bs, seq_len=11, prefetch_size=3,
                    load_async=False)
    init = [init_dataloader_state(args, r, W, acc) for r in range(W)]
    reference = step_rows(args, init, 10, acc)
    saved = [rt(stream(args, st_, 4 * acc, acc)[-1][1]) for st_ in init]
    W2, bs2, acc2 = after
    args2 = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, batch_size=bs2, seq_len=11, prefetch_size=3,
                     load_async=False)
    moved = [reshard_data_state(saved, r, W2) for r in range(W2)]
    assert step_rows(args2, moved, 6, acc2) == reference[4:]
    with pytest.raises(DataError, match="cannot share evenly"):
        reshard_data_state(saved, 0, 5)
    with pytest.raises(DataError, match="global batch is 12 sequences, this run's is"):
        stream(args2, moved[0], 1, acc2 + 1)
    if W > 1:
        with pytest.raises(DataError, match=f"hold {12 // W} of the 12 logical streams"):
            reshard_data_state(saved[:1], 0, 1)


def test_global_batch_and_streams_checks(corpus):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0}, batch_size=2, seq_len=8, load_async=False, global_batch_size=8)
    with pytest.raises(DataError, match="data.global_batch_size=8 but"):
        init_dataloader_state(args, 0, 2, 1)
    init_dataloader_state(args, 0, 2, 2)
    with pytest.raises(DataError, match="must divide the global batch"):
        init_dataloader_state(DataArgs(root_dir=root, sources={"a": 1.0}, batch_size=2, streams=3), 0, 1)
    state = init_dataloader_state(DataArgs(root_dir=root, sources={"a": 1.0}, batch_size=2, seq_len=8), 0, 2)
    other = DataArgs(root_dir=root, sources={"a": 1.0}, batch_size=3, seq_len=8, load_async=False)
    with pytest.raises(DataError, match="global batch is 4 sequences, this run's is 6"):
        stream(other, state, 1)


@settings(max_examples=25, **SETTINGS)
@given(n_files=st.integers(1, 5), n_streams=st.integers(1, 8))
def test_streams_read_disjoint_lines_covering_the_source(tmp_path_factory, n_files, n_streams):
    root = str(tmp_path_factory.mktemp("streams"))
    files = [[f"f{i}:l{j}" for j in range(8 + i)] for i in range(n_files)]
    write_source(root, "s", files)
    args = DataArgs(root_dir=root, sources={"s": 1.0}, batch_size=1, load_async=False)
    init = init_dataloader_state(args, 0, 1, n_streams)
    p = DataPipeline(args, init, n_streams)
    seen = []
    for sid, s in p.streams.items():
        mine = []
        for text, _, state in s.read_source("s", init["streams"][str(sid)]["readers"]["s"]):
            if state["pass"] > 0:
                break
            mine.append(text)
        assert mine, f"stream {sid} reads nothing"
        seen.append(mine)
    flat = [t for mine in seen for t in mine]
    assert len(flat) == len(set(flat)), "two streams read the same line in one pass"
    assert sorted(flat) == sorted(t for f in files for t in f), "a line is read by no stream"


def test_mixture_frequencies_follow_weights(corpus):
    root, _ = corpus
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    args = DataArgs(root_dir=root, sources=weights, batch_size=2, load_async=False, seed=3)
    init = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, init)
    n = 4000
    names = []
    for sid, s in p.streams.items():
        pack = init["streams"][str(sid)]
        names.append([doc[0] for _, doc, _ in take(s.documents({"rng": pack["rng"], "readers": pack["readers"]}), n)])
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(names[0].count(name) / n - w / total) < 0.03, (name, names[0].count(name) / n)
    # the other stream draws a different sequence with the same frequencies
    assert names[1] != names[0] and abs(names[1].count("c") / n - 5 / 8) < 0.03


@settings(max_examples=25, **SETTINGS)
@given(seq_len=st.integers(1, 50), n_views=st.integers(1, 4),
       bos_eos=st.sampled_from([(True, True), (False, False), (False, True)]),
       batch_size=st.integers(1, 3), prefetch=st.integers(1, 3))
def test_packing_conserves_every_token(corpus, seq_len, n_views, bos_eos, batch_size, prefetch):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, seq_len=seq_len, n_views=n_views,
                    batch_size=batch_size, prefetch_size=prefetch, add_bos=bos_eos[0], add_eos=bos_eos[1],
                    load_async=False, streams=1)
    init = init_dataloader_state(args, 0, 1)
    s = DataPipeline(args, init).streams[0]
    pack = init["streams"]["0"]
    n_seq = 2 * batch_size * prefetch * 3
    seqs = [q for q, _, _ in take(s.sequences(pack), n_seq)]
    docs = take(s.documents({"rng": pack["rng"], "readers": pack["readers"]}), 400)
    stream_ = b"".join(
        (b"\x01" if bos_eos[0] else b"") + t.encode() + (b"\x02" if bos_eos[1] else b"") for t, _, _ in docs
    )
    view0 = np.concatenate([q[:seq_len] for q in seqs])
    got = bytes(int(t) if t < 256 else {256: 1, 257: 2}[int(t)] for t in view0)
    assert stream_.startswith(got), "view 0 of consecutive sequences is not the token stream"
    for q, nxt in zip(seqs, seqs[1:]):
        assert np.array_equal(q[seq_len:], nxt[: n_views - 1])  # views overlap by n_views - 1 tokens
    # the shuffle permutes whole sequences within each block: nothing lost, nothing repeated
    batches = [b for b, _, _ in stream(args, init, 3 * prefetch)]
    rows = [tuple(r) for b in batches for r in np.concatenate([b[:, :, 0], b[:, -1:, 1:].reshape(len(b), -1)], 1)]
    assert sorted(rows) == sorted(tuple(q) for q in seqs[: len(rows)])


def test_trace_pieces_rebuild_every_sequence(corpus):
    """Each sequence's pieces (source, file, line, [first, end)) are exactly the tokens it holds."""
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, batch_size=2, seq_len=13, n_views=2,
                    prefetch_size=2, load_async=False, trace=True)
    tok = BytesTokenizer()
    lines = {}
    for rel in {os.path.relpath(p, root) for p in __import__("glob").glob(os.path.join(root, "*", "*.jsonl"))}:
        with open(os.path.join(root, rel), "rb") as f:
            lines[rel] = f.read().splitlines()
    out = stream(args, init_dataloader_state(args, 0, 1, 2), 10, 2)
    for tokens, _, pieces in out:
        assert len(pieces) == len(tokens)
        for row, seq in zip(tokens, pieces):
            rebuilt = []
            for source, rel, line, first, end in seq:
                assert rel.startswith(source + os.sep)
                obj = json.loads(lines[rel][line - 1])
                rebuilt.extend(tok.encode(obj.get("text", obj.get("content")))[first:end])
            full = np.concatenate([row[:, 0], row[-1:, 1]])
            assert rebuilt == full.tolist()


# ----------------------------------------------------------------------------------------------------------
# tokenizers end to end


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    tt = load_script("train_tokenizer")
    root, _ = corpus
    path = str(tmp_path_factory.mktemp("sp") / "sp.model")
    texts = list(tt.iter_chunk_texts(root)) + [open(os.path.join(REPO, "lingua", "data.py")).read()]
    tt.train_sentencepiece(texts, path, vocab_size=400, threads=1)
    return path


def test_sentencepiece_end_to_end(corpus, sp_model):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, seq_len=24, batch_size=2, prefetch_size=2,
                    load_async=False, tokenizer=TokenizerArgs("sp", sp_model), streams=1)
    check_data_args(args)
    init = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, init)
    assert init["fingerprint"]["tokenizer"]["n_words"] == 400
    pack = init["streams"]["0"]
    s = p.streams[0]
    docs = [t for t, _, _ in take(s.documents({"rng": pack["rng"], "readers": pack["readers"]}), 60)]
    tokens = np.concatenate([q[:24] for q, _, _ in take(s.sequences(pack), 30)]).tolist()
    decoded, cur = [], None
    for t in tokens:  # split the packed stream at bos/eos and decode each document
        if t == p.tokenizer.bos_id:
            cur = []
        elif t == p.tokenizer.eos_id:
            decoded.append(p.tokenizer.decode(cur))
            cur = None
        elif cur is not None:
            cur.append(t)
    assert len(decoded) > 5 and decoded == docs[: len(decoded)]
    full = stream(args, init, 12)
    resumed = stream(args, rt(full[4][1]), 7)
    assert all(np.array_equal(b1, b2) for (b1, _, _), (b2, _, _) in zip(full[5:], resumed))
    assert max(int(b.max()) for b, _, _ in full) < 400


def test_tiktoken_end_to_end(corpus, tmp_path):
    tt = load_script("train_tokenizer")
    root, texts = corpus
    path = tt.write_tiktoken_ranks(tt.train_bpe_ranks(tt.iter_chunk_texts(root, ["a"]), 300),
                                   str(tmp_path / "t.tiktoken"))
    args = DataArgs(root_dir=root, sources={"a": 1.0}, seq_len=16, load_async=False,
                    tokenizer=TokenizerArgs("tiktoken", path))
    init = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, init)
    assert (p.tokenizer.bos_id, p.tokenizer.eos_id, p.tokenizer.n_words) == (300, 301, 302)
    pack = init["streams"]["0"]
    for text, _, _ in take(p.streams[0].documents({"rng": pack["rng"], "readers": pack["readers"]}), 20):
        toks = p.tokenizer.encode(text)
        assert toks[0] == 300 and toks[-1] == 301 and p.tokenizer.decode(toks) == text
    full = stream(args, init, 6)
    resumed = stream(args, rt(full[2][1]), 3)
    assert all(np.array_equal(b1, b2) for (b1, _, _), (b2, _, _) in zip(full[3:], resumed))


# ----------------------------------------------------------------------------------------------------------
# the loader process


@settings(max_examples=3, **SETTINGS)
@given(sources=st.sampled_from(SOURCE_SETS[1:3]), world=st.integers(1, 3), n_views=st.integers(1, 3),
       prefetch=st.integers(1, 3), queue=st.integers(1, 3), acc=st.integers(1, 2), cut=st.integers(1, 6))
def test_async_matches_sync_and_resumes(corpus, sources, world, n_views, prefetch, queue, acc, cut):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources=sources, seq_len=20, n_views=n_views, prefetch_size=prefetch,
                    async_queue_size=queue, load_async=False, trace=True)
    init = init_dataloader_state(args, world - 1, world, acc)
    sync = stream(args, init, (cut + 4) * acc, acc)
    args.load_async = True
    asyn = stream(args, init, cut * acc, acc)  # async from the start
    resumed = stream(args, rt(asyn[-1][1]), 4 * acc, acc)  # async resume from an async state
    for (b1, s1, p1), (b2, s2, p2) in zip(sync, asyn + resumed):
        assert np.array_equal(b1, b2) and rt(s1) == rt(s2) and p1 == p2


def _gone(pid, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_async_child_killed_is_a_clear_error_and_close_joins(corpus):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0}, seq_len=16, load_async=True, async_queue_size=2)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        next(it)
        pid = it.pid
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(DataError, match=r"pid \d+\) was killed by SIGKILL"):
            for _ in range(100):  # the batches already in the pipe come first
                next(it)
        assert time.time() - t0 < 10
    assert _gone(pid)


def test_async_child_exception_is_reraised_with_cause(corpus, monkeypatch):
    root, _ = corpus
    monkeypatch.setenv("LINGUA_FAULTS", "data.batch@3=raise")
    args = DataArgs(root_dir=root, sources={"a": 1.0}, seq_len=16, load_async=True)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        got = [next(it) for _ in range(3)]
        with pytest.raises(DataError,
                           match=r"FaultInjected: LINGUA_FAULTS: injected failure at 'data.batch' \(step 3\)") as info:
            next(it)
        assert "Traceback" in str(info.value.__cause__)
        with pytest.raises(DataError):  # stays failed
            next(it)
        pid = it.pid
    assert len(got) == 3 and _gone(pid)


def test_async_bad_line_names_file_and_line(tmp_path):
    root = str(tmp_path)
    path = write_source(root, "s", [[f"doc {i}" for i in range(30)]])[0]
    with open(path, "a") as f:
        f.write('{"text": "broken\n')
    args = DataArgs(root_dir=root, seq_len=64, batch_size=1, prefetch_size=1, load_async=True)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        with pytest.raises(DataError, match=rf"{path}:31: malformed JSON"):
            for _ in range(100):
                next(it)


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from lingua.data import DataArgs, build_dataloader, init_dataloader_state
    args = DataArgs(root_dir={root!r}, sources={{"a": 1.0}}, seq_len=16, load_async=True, async_queue_size=2)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        next(it)
        print(it.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_orphan_loader_when_the_parent_is_killed(corpus, tmp_path, sig):
    root, _ = corpus
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(repo=REPO, root=root))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child) and not _gone(child, 0.2)
        parent.send_signal(sig)
        parent.wait(timeout=10)
        assert _gone(child), "the loader process outlived its parent"
    finally:
        parent.kill()
        parent.wait()


# ----------------------------------------------------------------------------------------------------------
# edited files, bad input and bad states


def _one_source(tmp_path, lines, name="s"):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, name))
    path = os.path.join(root, name, f"{name}.chunk.00.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return root, path


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(b"Y" if byte != b"Y" else b"Z")


def test_same_size_edits_are_detected_and_moved_data_resumes(tmp_path):
    """A file edited in place, keeping its size: in the part read before the state (at once), or in a part read
    in an earlier pass (when the next pass reaches it); identical data under another root resumes."""
    root, path = _one_source(tmp_path / "d", [json.dumps({"text": f"document number {i} " * 3}).encode() + b"\n"
                                              for i in range(40)])
    size = os.path.getsize(path)
    args = DataArgs(root_dir=root, batch_size=1, seq_len=16, prefetch_size=1, load_async=False)
    init = init_dataloader_state(args, 0, 1)
    full = stream(args, init, 2 * size // 16 + 20)  # more than two passes over the file
    early, late = rt(full[9][1]), rt(full[-1][1])
    assert 0 < early["streams"]["0"]["readers"]["s"]["pos"] < size - 100
    assert (late["streams"]["0"]["readers"]["s"]["pass"] >= 2
            and late["streams"]["0"]["readers"]["s"]["pos"] < size - 100)
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved)
    args_moved = DataArgs(root_dir=moved, batch_size=1, seq_len=16, prefetch_size=1, load_async=False)
    again = stream(args_moved, early, 20)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(full[10:], again))
    _flip(path, 5)  # in the part read before the state
    with pytest.raises(DataError, match=r"s.chunk.00.jsonl' changed since the run read it.*reset_data_state"):
        stream(args, early, 1)
    _flip(os.path.join(moved, "s", "s.chunk.00.jsonl"), size - 10)  # after the position, but read in earlier passes
    with pytest.raises(DataError, match="changed since an earlier pass read it"):
        stream(args_moved, late, size // 16 + 10)


BAD_LINES = [
    (b'{"text": "unterminated\n', "malformed JSON"),
    (b'{"id": 3}\n', "no 'text' or 'content' field"),
    (b'{"text": 3}\n', "not a string"),
    (b'["text"]\n', "expected a JSON object"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    (b'{"text": "half \\ud800 pair"}\n', "unpaired surrogate"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, bad, reason):
    good = [json.dumps({"text": f"good {i}"}).encode() + b"\n" for i in range(4)]
    root, path = _one_source(tmp_path, good[:2] + [bad] + good[2:])
    args = DataArgs(root_dir=root, seq_len=8, batch_size=1, prefetch_size=1, load_async=False)
    check_data_args(args)  # contents are not read up front
    with pytest.raises(DataError, match=rf"{path}:3: .*{reason}.*data.skip_bad_lines=true"):
        stream(args, init_dataloader_state(args, 0, 1), 50)
    with pytest.raises(DataError, match=rf"{path}:3: "):
        list(read_jsonl_documents(path))


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_skip_bad_lines_skips_and_counts(tmp_path, bad, reason):
    good = [json.dumps({"text": f"good {i}"}).encode() + b"\n" for i in range(4)]
    root, path = _one_source(tmp_path, good[:2] + [bad] + good[2:] + [bad])
    args = DataArgs(root_dir=root, seq_len=8, batch_size=1, prefetch_size=1, load_async=False, add_bos=False,
                    add_eos=False, skip_bad_lines=True)
    out = stream(args, init_dataloader_state(args, 0, 1), 12)  # 12 x 8 bytes: about two passes over 4 x 6 bytes
    text = bytes(np.concatenate([b[0, :, 0] for b, _, _ in out]).astype(np.uint8)).decode()
    assert text.startswith("good 0good 1good 2good 3good 0") and "\\" not in text and "caf" not in text
    metrics = data_metrics(out[-1][1])
    assert metrics["data/skipped_lines"] >= 2  # counted at the reading position (ahead of the batch)
    assert list(read_jsonl_documents(path, skip_bad_lines=True)) == [f"good {i}" for i in range(4)]


def test_empty_and_useless_files(tmp_path):
    root, path = _one_source(tmp_path, [])
    args = DataArgs(root_dir=root, load_async=False)
    with pytest.raises(ConfigError, match=rf"chunk file '{path}' is empty"):
        check_data_args(args)
    root2, path2 = _one_source(tmp_path / "blank", [b"\n", b"  \n"])
    args2 = DataArgs(root_dir=root2, load_async=False, seq_len=4, batch_size=1)
    with pytest.raises(DataError, match=rf"chunk file '{path2}' has no document"):
        stream(args2, init_dataloader_state(args2, 0, 1), 1)
    root3, path3 = _one_source(tmp_path / "short", [b'{"text": "only line"}\n'])
    args3 = DataArgs(root_dir=root3, load_async=False, seq_len=4, batch_size=1)
    stream(args3, init_dataloader_state(args3, 0, 1), 1)  # stream 0 reads the only line
    with pytest.raises(DataError, match="has no document for data stream 1"):
        stream(args3, init_dataloader_state(args3, 1, 2), 1)


def test_config_errors_name_the_key(corpus, tmp_path):
    root, _ = corpus
    ok = dict(root_dir=root, sources={"a": 1.0})
    cases = [
        (dict(root_dir=None), "data.root_dir is not set"),
        (dict(root_dir=str(tmp_path / "nope")), "data.root_dir .* does not exist"),
        (dict(sources={"a": 0.0}), r"data.sources.a: weight must be a finite number > 0"),
        (dict(sources={"a": 1.0, "b": -2.0}), r"data.sources.b: weight"),
        (dict(sources={"zzz": 1.0}), r"data.sources.zzz: source folder .* does not exist"),
        (dict(seq_len=0), r"data.seq_len must be an integer >= 1"),
        (dict(batch_size=0), r"data.batch_size"),
        (dict(n_views=0), r"data.n_views"),
        (dict(prefetch_size=0), r"data.prefetch_size"),
        (dict(global_batch_size=0), r"data.global_batch_size must be >= 1"),
        (dict(streams=-1), r"data.streams must be >= 0"),
        (dict(tokenizer=TokenizerArgs("gpt9")), r"data.tokenizer.name 'gpt9' is unknown"),
        (dict(tokenizer=TokenizerArgs("sp", str(tmp_path / "missing.model"))),
         r"data.tokenizer.path .*missing.model' does not exist"),
        (dict(tokenizer=TokenizerArgs("tiktoken")), r"data.tokenizer.path must name a local model file"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_data_args(DataArgs(**{**ok, **change}))
    os.makedirs(tmp_path / "r" / "empty_src")
    with pytest.raises(ConfigError, match=r"data.sources.empty_src: source folder .* has no \*.chunk.\*.jsonl files"):
        check_data_args(DataArgs(root_dir=str(tmp_path / "r"), sources={"empty_src": 1.0}))
    with pytest.raises(ConfigError, match="has no source folder holding"):
        check_data_args(DataArgs(root_dir=str(tmp_path / "r")))
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a readable sentencepiece model"):
        init_dataloader_state(DataArgs(**ok, tokenizer=TokenizerArgs("sp", str(bad_model))), 0, 1)


def test_state_is_json_and_checked_on_resume(corpus, tmp_path):
    root, texts = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, seq_len=8, load_async=False)
    init = init_dataloader_state(args, 1, 3)
    assert (init["dp_rank"], init["dp_world_size"]) == (1, 3) and sorted(init["streams"]) == ["2", "3"]
    assert rt(init) == init
    _, state, _ = stream(args, init, 3)[-1]
    assert rt(state) == state and state["dp_rank"] == 1 and state["dp_world_size"] == 3
    assert data_metrics(state)["data/skipped_lines"] == 0
    changed = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, seq_len=16, load_async=False)
    with pytest.raises(DataError, match=r"seq_len: 8 -> 16.*checkpoint.reset_data_state=true"):
        stream(changed, state, 1)
    with pytest.raises(DataError, match="version"):
        stream(args, {**state, "version": 99}, 1)
    # a data file that changed under the state is detected, not silently misread
    copy = str(tmp_path / "copy")
    for name in ("a", "b"):
        write_source(copy, name, texts[name])
    args2 = DataArgs(root_dir=copy, sources={"a": 1.0, "b": 1.0}, seq_len=8, load_async=False)
    _, state2, _ = stream(args2, init_dataloader_state(args2, 0, 1), 2)[-1]
    with open(os.path.join(copy, "b", "b.chunk.00.jsonl"), "a") as f:
        f.write('{"text": "appended"}\n')
    with pytest.raises(DataError, match=r"b.chunk.00.jsonl \(\d+ -> \d+ bytes\)"):
        stream(args2, state2, 1)
    with pytest.raises(ValueError):
        init_dataloader_state(args, 3, 3)
    with pytest.raises(DataError, match="belongs to dp_rank=1, this process has dp_rank=0"):
        with build_dataloader(args, state, dp_rank=0, dp_world_size=3):
            pass
    with pytest.raises(DataError, match="dp_world_size=3, this process has dp_world_size=2"):
        with build_dataloader(args, state, dp_world_size=2):
            pass
    with build_dataloader(args, state, dp_rank=1, dp_world_size=3) as it:
        next(it)


def test_validation_files_are_found(tmp_path):
    root = str(tmp_path)
    write_source(root, "s", [["x"]])
    with open(os.path.join(root, "s", "s.val.jsonl"), "w") as f:
        f.write('{"text": "held out"}\n')
    assert find_validation_files(root, "s") == [os.path.join(root, "s", "s.val.jsonl")]
    assert list(read_jsonl_documents(find_validation_files(root, "s")[0])) == ["held out"]
