#!/usr/bin/env python
r"""Train a small tokenizer on local chunk data (the layout of setup/prepare_data.py).

    python setup/train_tokenizer.py --data data/default --out data/tokenizers/stdlib_sp1000.model
    python setup/train_tokenizer.py --data data/default --kind tiktoken --vocab-size 512 \
        --out data/tokenizers/stdlib.tiktoken

--kind sp (default): a sentencepiece BPE model (byte fallback, identity normalisation, so any text encodes
and decodes back unchanged), ids: unk 0, bos 1, eos 2. Use it with data.tokenizer.name=sp data.tokenizer.path=...
--kind tiktoken: a byte-level BPE rank file (`<base64 token> <rank>` per line) made by a small, plain
Python BPE trainer (fine for vocabularies of a few hundred to a few thousand); use it with
data.tokenizer.name=tiktoken. Training reads at most --max-bytes of text, from the chunk files in order.
"""

import argparse
import base64
import collections
import glob
import io
import json
import os
import re
import sys
from typing import Iterable, Iterator, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # lingua from this checkout, installed or not (as setup/prepare_data.py)
    sys.path.insert(0, REPO_ROOT)


def iter_chunk_texts(root_dir: str, sources: Optional[List[str]] = None, max_bytes: int = 20_000_000) -> Iterator[str]:
    """Texts of <root_dir>/<source>/*.chunk.*.jsonl (all sources by default), up to max_bytes in total."""
    if sources is None:
        sources = sorted(d for d in os.listdir(root_dir) if os.path.isdir(os.path.join(root_dir, d)))
    files = []
    for s in sources:
        files += sorted(glob.glob(os.path.join(glob.escape(os.path.join(root_dir, s)), "*.chunk.*.jsonl")))
    if not files:
        raise SystemExit(f"train_tokenizer: no *.chunk.*.jsonl files under {root_dir} (sources: {sources})")
    total = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                text = obj.get("text", obj.get("content"))
                if not isinstance(text, str):
                    continue
                yield text
                total += len(text)
                if total >= max_bytes:
                    return


def train_sentencepiece(texts: Iterable[str], out_path: str, vocab_size: int = 1000, model_type: str = "bpe",
                        threads: int = 2) -> str:
    """Train a sentencepiece model on `texts` and write it to out_path (returned)."""
    import sentencepiece as spm

    def sentences():
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line[:4000]

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=threads,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    from lingua.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write(out_path, model.getvalue())
    return out_path


_WORDS = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")


def train_bpe_ranks(texts: Iterable[str], vocab_size: int = 512) -> dict:
    """A byte-level BPE: the 256 bytes, then merges of the most frequent adjacent pair within words."""
    if vocab_size < 256:
        raise ValueError("vocab_size must be >= 256 (the single bytes)")
    words = collections.Counter()
    for text in texts:
        words.update(m.encode("utf-8") for m in _WORDS.findall(text))
    ranks = {bytes([b]): b for b in range(256)}
    seqs = [[bytes([b]) for b in w] for w in words]
    freqs = list(words.values())
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for seq, n in zip(seqs, freqs):
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        ranks[merged] = len(ranks)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == a and seq[i + 1] == b:
                    seq[i : i + 2] = [merged]
                i += 1
    return ranks


def write_tiktoken_ranks(ranks: dict, out_path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return out_path


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "default"),
                   help="data root with <source>/*.chunk.*.jsonl")
    p.add_argument("--sources", nargs="*", default=None, help="sources to read (default: all)")
    p.add_argument("--out", required=True, help="output model file (.model for sp, .tiktoken for tiktoken)")
    p.add_argument("--kind", choices=("sp", "tiktoken"), default="sp", help="sentencepiece model or tiktoken rank file")
    p.add_argument("--vocab-size", type=int, default=1000, help="vocabulary size (default 1000)")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="sentencepiece model type")
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="read at most this much text (default 20 MB)")
    a = p.parse_args(argv)
    texts = iter_chunk_texts(a.data, a.sources, a.max_bytes)
    if a.kind == "sp":
        train_sentencepiece(texts, a.out, a.vocab_size, a.model_type)
    else:
        write_tiktoken_ranks(train_bpe_ranks(texts, a.vocab_size), a.out)
    print(f"wrote {a.kind} tokenizer ({a.vocab_size} tokens) to {a.out}", file=sys.stderr)
    return a.out


if __name__ == "__main__":
    main()
