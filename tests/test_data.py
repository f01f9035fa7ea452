"""The data pipeline: exact resume through every stage and the whole chain (sync and async), rank
disjointness, mixture frequencies, packing, tokenizers end to end, the loader process, bad input."""

import json
import os
import random
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
)
from lingua.tokenizer import TokenizerArgs

from tests.helpers import REPO, load_script  # noqa: F401
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
    """Three sources: a (3 files), b (1 file, shared by ranks), c (5 tiny files: many passes)."""
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


def stream(args, state, n):
    out = []
    with build_dataloader(args, state) as it:
        for batch, st_ in it:
            out.append((batch, st_))
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
    if isinstance(x, tuple):
        return all(same(a, b) for a, b in zip(x, y)) and len(x) == len(y)
    return x == y


SOURCE_SETS = [{"a": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0, "c": 3.0}, {"c": 1.0}, {}]


# ----------------------------------------------------------------------------------------------------------
# exact resume


@settings(max_examples=30, **SETTINGS)
@given(
    sources=st.sampled_from(SOURCE_SETS),
    world=st.integers(1, 6),
    rank_frac=st.floats(0, 0.999),
    n_views=st.integers(1, 3),
    batch_size=st.integers(1, 3),
    prefetch=st.integers(1, 4),
    seq_len=st.integers(1, 40),
    bos_eos=st.sampled_from([(True, True), (False, False), (True, False)]),
    cut=st.integers(0, 30),
    more=st.integers(1, 10),
)
def test_resume_whole_chain_sync(corpus, sources, world, rank_frac, n_views, batch_size, prefetch, seq_len, bos_eos, cut, more):
    root, _ = corpus
    rank = int(rank_frac * world)
    args = DataArgs(root_dir=root, sources=sources, batch_size=batch_size, seq_len=seq_len, n_views=n_views,
                    prefetch_size=prefetch, add_bos=bos_eos[0], add_eos=bos_eos[1], load_async=False, seed=7)
    init = init_dataloader_state(args, rank, world)
    full = stream(args, rt(init), cut + more)
    for batch, _ in full:
        assert batch.shape == (batch_size, seq_len, n_views) and batch.dtype == np.int64
        if n_views > 1:
            assert np.array_equal(batch[:, 1:, 0], batch[:, :-1, 1])  # targets = inputs shifted by one
    resumed = stream(args, rt(full[cut - 1][1]) if cut else rt(init), more)
    for (b1, s1), (b2, s2) in zip(full[cut:], resumed):
        assert np.array_equal(b1, b2)
        assert rt(s1) == rt(s2)


def test_resume_across_wraparound(corpus):
    """Deep enough that every file of c is read several times; resume at each of many cut points."""
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"c": 1.0, "a": 0.5}, batch_size=2, seq_len=32, prefetch_size=3, load_async=False)
    init = init_dataloader_state(args, 1, 2)
    full = stream(args, init, 60)
    assert full[-1][1]["passes"]["c"] >= 3
    assert data_metrics(full[-1][1])["data/pass/c"] >= 3
    for cut in range(1, 59, 7):
        resumed = stream(args, rt(full[cut - 1][1]), 60 - cut)
        assert all(np.array_equal(b1, b2) for (b1, _), (b2, _) in zip(full[cut:], resumed))


STAGES = ["reader", "documents", "tokens", "sequences"]


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
    name = sorted(p.layout)[0]
    start = {
        "reader": lambda s: p.read_source(name, s),
        "documents": p.documents_with_source,
        "tokens": p.tokens,
        "sequences": p.sequences,
    }[stage]
    first = {"reader": init["pack"]["doc"]["readers"][name], "sequences": init["pack"]}.get(stage, init["pack"]["doc"])
    full = take(start(rt(first)), cut + more)
    resumed = take(start(rt(full[cut - 1][1])) if cut else start(rt(first)), more)
    assert len(resumed) == more
    for (o1, s1), (o2, s2) in zip(full[cut:], resumed):
        assert same(o1, o2)
        assert rt(s1) == rt(s2)


# ----------------------------------------------------------------------------------------------------------
# ranks, mixture, packing


@settings(max_examples=25, **SETTINGS)
@given(n_files=st.integers(1, 5), world=st.integers(1, 8))
def test_ranks_read_disjoint_lines_covering_the_source(tmp_path_factory, n_files, world):
    root = str(tmp_path_factory.mktemp("ranks"))
    files = [[f"f{i}:l{j}" for j in range(8 + i)] for i in range(n_files)]
    write_source(root, "s", files)
    args = DataArgs(root_dir=root, sources={"s": 1.0}, load_async=False)
    seen = []
    for rank in range(world):
        st0 = init_dataloader_state(args, rank, world)
        p = DataPipeline(args, st0)
        mine = []
        for text, s in p.read_source("s", st0["pack"]["doc"]["readers"]["s"]):
            if s["pass"] > 0:
                break
            mine.append(text)
        assert mine, f"rank {rank} reads nothing"
        seen.append(mine)
    flat = [t for mine in seen for t in mine]
    assert len(flat) == len(set(flat)), "two ranks read the same line in one pass"
    assert sorted(flat) == sorted(t for f in files for t in f), "a line is read by no rank"


def test_mixture_frequencies_follow_weights(corpus):
    root, _ = corpus
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    args = DataArgs(root_dir=root, sources=weights, load_async=False, seed=3)
    st0 = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, st0)
    n = 4000
    names = [src for (src, _), _ in take(p.documents_with_source(st0["pack"]["doc"]), n)]
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(names.count(name) / n - w / total) < 0.03, (name, names.count(name) / n)
    # another rank draws a different sequence with the same frequencies
    st1 = init_dataloader_state(args, 1, 2)
    names1 = [src for (src, _), _ in take(DataPipeline(args, st1).documents_with_source(st1["pack"]["doc"]), n)]
    assert names1 != names and abs(names1.count("c") / n - 5 / 8) < 0.03


@settings(max_examples=25, **SETTINGS)
@given(seq_len=st.integers(1, 50), n_views=st.integers(1, 4), bos_eos=st.sampled_from([(True, True), (False, False), (False, True)]),
       batch_size=st.integers(1, 3), prefetch=st.integers(1, 3))
def test_packing_conserves_every_token(corpus, seq_len, n_views, bos_eos, batch_size, prefetch):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources={"a": 1.0, "b": 1.0}, seq_len=seq_len, n_views=n_views, batch_size=batch_size,
                    prefetch_size=prefetch, add_bos=bos_eos[0], add_eos=bos_eos[1], load_async=False)
    st0 = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, st0)
    n_seq = 2 * batch_size * prefetch * 3
    seqs = [s for s, _ in take(p.sequences(st0["pack"]), n_seq)]
    docs = take(p.documents(st0["pack"]["doc"]), 400)
    stream_ = b"".join(
        (b"\x01" if bos_eos[0] else b"") + t.encode() + (b"\x02" if bos_eos[1] else b"") for t, _ in docs
    )
    view0 = np.concatenate([s[:seq_len] for s in seqs])
    got = bytes(int(t) if t < 256 else {256: 1, 257: 2}[int(t)] for t in view0)
    assert stream_.startswith(got), "view 0 of consecutive sequences is not the token stream"
    for s, nxt in zip(seqs, seqs[1:]):
        assert np.array_equal(s[seq_len:], nxt[: n_views - 1])  # views overlap by n_views - 1 tokens
    # the shuffle permutes whole sequences within each block: nothing lost, nothing repeated
    batches = [b for b, _ in stream(args, st0, 3 * prefetch)]
    rows = [tuple(r) for b in batches for r in np.concatenate([b[:, :, 0], b[:, -1:, 1:].reshape(len(b), -1)], 1)]
    assert sorted(rows) == sorted(tuple(s) for s in seqs[: len(rows)])


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
                    load_async=False, tokenizer=TokenizerArgs("sp", sp_model))
    check_data_args(args)
    st0 = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, st0)
    assert st0["fingerprint"]["tokenizer"]["n_words"] == 400
    docs = [t for t, _ in take(p.documents(st0["pack"]["doc"]), 60)]
    tokens = np.concatenate([s[:24] for s, _ in take(p.sequences(st0["pack"]), 30)]).tolist()
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
    full = stream(args, st0, 12)
    resumed = stream(args, rt(full[4][1]), 7)
    assert all(np.array_equal(b1, b2) for (b1, _), (b2, _) in zip(full[5:], resumed))
    assert max(int(b.max()) for b, _ in full) < 400


def test_tiktoken_end_to_end(corpus, tmp_path):
    tt = load_script("train_tokenizer")
    root, texts = corpus
    path = tt.write_tiktoken_ranks(tt.train_bpe_ranks(tt.iter_chunk_texts(root, ["a"]), 300), str(tmp_path / "t.tiktoken"))
    args = DataArgs(root_dir=root, sources={"a": 1.0}, seq_len=16, load_async=False, tokenizer=TokenizerArgs("tiktoken", path))
    st0 = init_dataloader_state(args, 0, 1)
    p = DataPipeline(args, st0)
    assert (p.tokenizer.bos_id, p.tokenizer.eos_id, p.tokenizer.n_words) == (300, 301, 302)
    for (text, _), (toks, _) in zip(take(p.documents(st0["pack"]["doc"]), 20), take(p.tokens(st0["pack"]["doc"]), 20)):
        assert toks[0] == 300 and toks[-1] == 301 and p.tokenizer.decode(toks.tolist()) == text
    full = stream(args, st0, 6)
    resumed = stream(args, rt(full[2][1]), 3)
    assert all(np.array_equal(b1, b2) for (b1, _), (b2, _) in zip(full[3:], resumed))


# ----------------------------------------------------------------------------------------------------------
# the loader process


@settings(max_examples=3, **SETTINGS)
@given(sources=st.sampled_from(SOURCE_SETS[1:3]), world=st.integers(1, 3), n_views=st.integers(1, 3),
       prefetch=st.integers(1, 3), queue=st.integers(1, 3), cut=st.integers(1, 12))
def test_async_matches_sync_and_resumes(corpus, sources, world, n_views, prefetch, queue, cut):
    root, _ = corpus
    args = DataArgs(root_dir=root, sources=sources, seq_len=20, n_views=n_views, prefetch_size=prefetch,
                    async_queue_size=queue, load_async=False)
    init = init_dataloader_state(args, world - 1, world)
    sync = stream(args, init, cut + 6)
    args.load_async = True
    asyn = stream(args, init, cut)  # async from the start
    resumed = stream(args, rt(asyn[-1][1]), 6)  # async resume from an async state
    for (b1, s1), (b2, s2) in zip(sync, asyn + resumed):
        assert np.array_equal(b1, b2) and rt(s1) == rt(s2)


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
    monkeypatch.setenv("LINGUA_DATA_TEST_FAIL_AFTER", "3")
    args = DataArgs(root_dir=root, sources={"a": 1.0}, seq_len=16, load_async=True)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        got = [next(it) for _ in range(3)]
        with pytest.raises(DataError, match="RuntimeError: injected failure after 3 batches") as info:
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
# bad input and bad states


def _one_source(tmp_path, lines, name="s"):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, name))
    path = os.path.join(root, name, f"{name}.chunk.00.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return root, path


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
    text = bytes(np.concatenate([b[0, :, 0] for b, _ in out]).astype(np.uint8)).decode()
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
    args2 = DataArgs(root_dir=root2, load_async=False, seq_len=4)
    with pytest.raises(DataError, match=rf"chunk file '{path2}' has no document"):
        stream(args2, init_dataloader_state(args2, 0, 1), 1)
    root3, path3 = _one_source(tmp_path / "short", [b'{"text": "only line"}\n'])
    args3 = DataArgs(root_dir=root3, load_async=False, seq_len=4)
    stream(args3, init_dataloader_state(args3, 0, 2), 1)  # rank 0 reads the only line
    with pytest.raises(DataError, match="has no document for dp rank 1"):
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
        (dict(tokenizer=TokenizerArgs("gpt9")), r"data.tokenizer.name 'gpt9' is unknown"),
        (dict(tokenizer=TokenizerArgs("sp", str(tmp_path / "missing.model"))), r"data.tokenizer.path .*missing.model' does not exist"),
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
    assert (init["dp_rank"], init["dp_world_size"]) == (1, 3)
    assert rt(init) == init
    _, state = stream(args, init, 3)[-1]
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
    _, state2 = stream(args2, init_dataloader_state(args2, 0, 1), 2)[-1]
    with open(os.path.join(copy, "b", "b.chunk.00.jsonl"), "a") as f:
        f.write('{"text": "appended"}\n')
    with pytest.raises(DataError, match=r"b.chunk.00.jsonl' changed since the data state was made"):
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
