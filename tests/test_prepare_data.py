"""setup/prepare_data.py (external shuffle, validation split), build_default_corpus.py, train_tokenizer.py."""

import collections
import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lingua.data import DataArgs, build_dataloader, check_data_args, find_validation_files, init_dataloader_state
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from tests.helpers import REPO, SHAKESPEARE, load_script

prepare_data = load_script("prepare_data")


def read_docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def written(out, source):
    chunks = sorted(glob.glob(os.path.join(out, source, f"{source}.chunk.*.jsonl")))
    train = [d for c in chunks for d in read_docs(c)]
    val = read_docs(os.path.join(out, source, f"{source}.val.jsonl"))
    return chunks, train, val


def tree_digest(folder):
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture()
def inputs(tmp_path):
    """jsonl (text and content fields, extra keys, a gz file), plain text, and parquet inputs."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    expected = []
    with open(folder / "a.jsonl", "w") as f:
        for i in range(300):
            key = "text" if i % 4 else "content"
            text = f"jsonl doc {i} " + "word " * (i % 37) + ("😀" if i % 5 == 0 else "")
            f.write(json.dumps({key: text, "id": i}) + "\n")
            expected.append(text)
        f.write("\n")  # a blank line is not a document
        f.write(json.dumps({"text": "   "}) + "\n")  # an empty document: dropped and counted
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"gz doc {i}"}) + "\n")
            expected.append(f"gz doc {i}")
    paragraphs = [f"paragraph {i}\nsecond line of {i}" for i in range(120)]
    (folder / "sub" / "c.txt").write_text("\n\n".join(paragraphs) + "\n\n\n")
    expected += paragraphs
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [f"parquet row {i} with text" for i in range(80)]
        pq.write_table(pa.table({"text": rows, "n": list(range(80))}), str(folder / "d.parquet"), row_group_size=16)
        expected += rows
    except ImportError:  # pragma: no cover - pyarrow is optional
        pass
    return str(folder), expected


def test_external_shuffle_every_document_exactly_once(inputs, tmp_path):
    folder, expected = inputs
    out = str(tmp_path / "out")
    argv = [folder, "--out", out, "--source", "mix", "--memory-mb", "0.004", "--n-chunks", "5",
            "--val-fraction", "0.05", "--quiet"]
    summary = prepare_data.main(argv)
    assert summary["buckets"] > 3, "the tiny memory budget must force several buckets"
    chunks, train, val = written(out, "mix")
    texts = [d.get("text", d.get("content")) for d in train + val]
    assert collections.Counter(texts) == collections.Counter(expected)  # exactly once, train + val
    assert summary["documents"] == len(expected) and summary["empty_documents"] == 1
    assert len(val) == summary["val_documents"] == round(0.05 * len(expected))
    assert [os.path.basename(c) for c in chunks] == [f"mix.chunk.{i:02d}.jsonl" for i in range(5)]
    sizes = [len(read_docs(c)) for c in chunks]
    assert max(sizes) - min(sizes) <= 1  # dealt round-robin
    assert any(d.get("id") == 7 for d in train + val), "jsonl records keep their other fields"
    order = [t for t in texts[: len(train)]]
    assert order != sorted(order, key=expected.index), "not shuffled"
    summary_file = json.load(open(os.path.join(out, "mix", "prepare_summary.json")))
    assert summary_file["documents"] == len(expected)
    # deterministic: the same inputs and seed give the same files; another seed another order
    digest = tree_digest(os.path.join(out, "mix"))
    prepare_data.main(argv + ["--overwrite"])
    assert tree_digest(os.path.join(out, "mix")) == digest
    prepare_data.main(argv + ["--overwrite", "--seed", "1"])
    assert tree_digest(os.path.join(out, "mix")) != digest
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left behind"
    # and the loader reads it
    args = DataArgs(root_dir=out, seq_len=32, batch_size=2, load_async=False)
    check_data_args(args)
    with build_dataloader(args, init_dataloader_state(args, 1, 2)) as it:
        batch = next(it).tokens
    assert batch.shape == (2, 32, 2)
    assert find_validation_files(out, "mix") == [os.path.join(out, "mix", "mix.val.jsonl")]


def test_oversized_bucket_is_split_again(tmp_path):
    docs = [f"document number {i} " + "x" * (i % 50) for i in range(2000)]
    out = str(tmp_path / "out")
    # a wrong (tiny) size estimate makes one bucket far larger than the budget: it must be split again
    s = prepare_data.prepare_documents(iter(docs), out, "s", n_chunks=3, val_fraction=0.01, memory_bytes=20_000,
                                       estimated_bytes=1, progress=False)
    assert s["buckets"] > 5
    _, train, val = written(out, "s")
    assert sorted(d["text"] for d in train + val) == sorted(docs)
    assert len(val) == 20


def test_text_units_and_bad_input(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\nstill two\n\n\nthree")
    out = str(tmp_path / "o")
    prepare_data.main([str(tmp_path / "t.txt"), "--out", out, "--source", "p", "--val-fraction", "0", "--quiet"])
    assert sorted(d["text"] for d in written(out, "p")[1]) == ["one", "three", "two\nstill two"]
    prepare_data.main([str(tmp_path / "t.txt"), "--out", out, "--source", "f", "--text-unit", "file", "--quiet"])
    assert [d["text"] for d in written(out, "f")[1]] == ["one\n\ntwo\nstill two\n\n\nthree"]
    with pytest.raises(prepare_data.PrepareError, match="exists; use --overwrite"):
        prepare_data.main([str(tmp_path / "t.txt"), "--out", out, "--source", "f", "--quiet"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n{"other": 1}\n{"text": "fine too"}\n')
    with pytest.raises(prepare_data.PrepareError, match=rf"{bad}:2: malformed JSON"):
        prepare_data.main([str(bad), "--out", out, "--source", "b", "--quiet"])
    assert not os.path.exists(os.path.join(out, "b")) and not [p for p in os.listdir(out) if p.startswith(".")]
    s = prepare_data.main([str(bad), "--out", out, "--source", "b",
                           "--skip-bad-lines", "--val-fraction", "0", "--quiet"])
    assert s["bad_lines"] == 2 and sorted(d["text"] for d in written(out, "b")[1]) == ["fine", "fine too"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(prepare_data.PrepareError, match="not valid UTF-8"):
        prepare_data.main([str(latin), "--out", out, "--source", "l", "--quiet"])
    with pytest.raises(prepare_data.PrepareError, match="does not exist"):
        prepare_data.main([str(tmp_path / "missing"), "--out", out, "--source", "m", "--quiet"])
    # the command line: a one-line error and a non-zero exit code
    r = subprocess.run([sys.executable, os.path.join(REPO, "setup", "prepare_data.py"), str(bad),
                        "--out", out, "--source", "c"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{bad}:2: malformed JSON" in r.stderr


def test_real_text_and_sentencepiece_tokenizer(tmp_path):
    out = str(tmp_path / "data")
    r = subprocess.run([sys.executable, os.path.join(REPO, "setup", "prepare_data.py"), SHAKESPEARE, "--out", out,
                        "--source", "shakespeare", "--memory-mb", "0.3"], capture_output=True, text=True, check=True)
    assert "prepared source 'shakespeare'" in r.stderr and "validation" in r.stderr
    model = str(tmp_path / "sp.model")
    subprocess.run([sys.executable, os.path.join(REPO, "setup", "train_tokenizer.py"), "--data", out, "--out", model,
                    "--vocab-size", "600", "--max-bytes", "300000"], check=True, capture_output=True)
    args = DataArgs(root_dir=out, seq_len=64, batch_size=2, load_async=False, tokenizer=TokenizerArgs("sp", model))
    check_data_args(args)
    tok = build_tokenizer(args.tokenizer)
    with build_dataloader(args, init_dataloader_state(args, 0, 1)) as it:
        batch = next(it).tokens
    assert tok.n_words == 600 and batch.max() < 600
    assert "the" in tok.decode(batch[0, :, 0].tolist()).lower()


def test_build_default_corpus(tmp_path):
    bdc = load_script("build_default_corpus")
    out = str(tmp_path / "default")
    small = ["--out", out, "--max-files", "40", "--quiet"]
    s = bdc.main(small)
    assert s["documents"] > 50 and s["chunks"] == 8 and s["val_documents"] >= 1
    digest = tree_digest(os.path.join(out, "stdlib"))
    bdc.main(small + ["--overwrite"])
    assert tree_digest(os.path.join(out, "stdlib")) == digest  # deterministic
    assert bdc.main(small)["existing"]  # kept, not rebuilt
    args = DataArgs(root_dir=out, sources={"stdlib": 1.0}, seq_len=128, batch_size=2, load_async=False)
    check_data_args(args)
    with build_dataloader(args, init_dataloader_state(args, 1, 2)) as it:
        text = bytes(next(it)[0][0, :, 0].clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
    assert len(text) > 50


def test_build_default_corpus_full_command(tmp_path):
    """The command a fresh machine runs: the whole standard library, a few MB, in seconds."""
    out = str(tmp_path / "default")
    r = subprocess.run([sys.executable, os.path.join(REPO, "setup", "build_default_corpus.py"), "--out", out],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.load(open(os.path.join(out, "stdlib", "prepare_summary.json")))
    assert s["documents"] > 1000 and s["bytes"] > 1_000_000 and s["chunks"] == 8
