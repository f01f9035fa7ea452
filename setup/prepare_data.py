#!/usr/bin/env python
"""Turn local text into Lingua's shuffled chunk layout, with a held-out validation split.

    python setup/prepare_data.py INPUT [INPUT ...] --out data/mine --source books [options]

INPUTs are files or folders (searched recursively, sorted):
  *.jsonl, *.jsonl.gz     one JSON object per line with a `text` (or `content`) field, or --text-field;
                          lines are kept verbatim (all their fields) when the text is in text/content
  *.parquet               a string column: `text`, else `content`, or --text-field (needs pyarrow)
  anything else           plain UTF-8 text (*.gz decompressed): by default one document per paragraph
                          (paragraphs are separated by blank lines); --text-unit file makes each file one document
Or --hf-dataset NAME downloads a Hugging Face dataset (needs the `datasets` package and network; streamed).

Output (what `data.root_dir` / `validation.root_dir` point at is <out>):
  <out>/<source>/<source>.chunk.00.jsonl ... .chunk.NN.jsonl   training documents, shuffled ({"text": ...})
  <out>/<source>/<source>.val.jsonl                            held-out documents (never in a chunk)
  <out>/<source>/prepare_summary.json                          counts, inputs, seed
The folder is written under a temporary name and renamed into place when complete.

The shuffle is external, so corpora larger than RAM work: documents are first scattered at random into
bucket files (sized so that one bucket fits in --memory-mb), then each bucket is read back, shuffled in
memory and dealt round-robin to the chunk files (a bucket that turns out too large is split again). The
validation split is the first documents of that shuffled order: a uniform random sample. The same inputs
and --seed give the same output, byte for byte. Empty documents are dropped and counted; a malformed input
line is an error naming file and line (or, with --skip-bad-lines, skipped and counted).
"""

import argparse
import gzip
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Iterable, Iterator, List, Optional, Union

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lingua.data import _BadLine, _parse_line  # noqa: E402  (the loader's own line checks)

TEXT_SUFFIXES_SKIPPED_IN_FOLDERS = (".pyc", ".so", ".zip", ".tar", ".png", ".jpg")
_PER_LINE_OVERHEAD = 64  # bytes of Python memory per document held in memory, beyond its text


class PrepareError(RuntimeError):
    """Bad input or arguments; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress display on stderr (redrawn in place on a terminal, a line every few s otherwise)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.start = time.monotonic()
        self.shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        line = f"[prepare {now - self.start:6.1f}s] {text}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100)[:120])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.shown = False


# ----------------------------------------------------------------------------------------------------------
# Inputs -> documents (each a JSON line, bytes, without newline)


class Stats:
    def __init__(self):
        self.bad_lines = 0
        self.empty_docs = 0
        self.input_files = 0
        self.input_bytes = 0


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _kind(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl"):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    return "text"


def list_inputs(inputs: List[str]) -> List[str]:
    """Files named or found (recursively, sorted, hidden entries skipped) under the inputs."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and not name.endswith(TEXT_SUFFIXES_SKIPPED_IN_FOLDERS):
                        files.append(os.path.join(dirpath, name))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise PrepareError(f"input '{item}' does not exist")
    if not files:
        raise PrepareError(f"no input files found in {inputs}")
    return files


def _text_record(text: str) -> bytes:
    return json.dumps({"text": text}, ensure_ascii=False).encode("utf-8")


def _iter_jsonl(path: str, text_field: Optional[str], skip_bad: bool, stats: Stats) -> Iterator[bytes]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                if text_field in (None, "text", "content"):
                    text = _parse_line(raw)
                    record = raw.strip()
                else:
                    if not raw.strip():
                        continue
                    obj = json.loads(raw.decode("utf-8"))
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise _BadLine(f"no string field '{text_field}'")
                    text.encode("utf-8")
                    record = _text_record(text)
            except (_BadLine, ValueError) as e:  # ValueError: JSON / UTF-8 errors of the custom-field path
                if skip_bad:
                    stats.bad_lines += 1
                    continue
                raise PrepareError(f"{path}:{lineno}: {e} "
                                   "(use --skip-bad-lines to skip and count such lines)") from None
            if text is None:
                continue
            if not text.strip():
                stats.empty_docs += 1
                continue
            yield record


def _iter_text(path: str, unit: str, skip_bad: bool, stats: Stats) -> Iterator[bytes]:
    if unit == "file":
        with _open_binary(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip_bad:
                stats.bad_lines += 1
                return
            raise PrepareError(f"{path}: not valid UTF-8 (byte {e.start}); "
                               "use --skip-bad-lines to skip such files") from None
        if text.strip():
            yield _text_record(text)
        else:
            stats.empty_docs += 1
        return
    paragraph: List[str] = []
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_bad:
                    stats.bad_lines += 1
                    continue
                raise PrepareError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); "
                                   "use --skip-bad-lines to skip such lines") from None
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield _text_record("".join(paragraph).rstrip("\r\n"))
                paragraph = []
    if paragraph:
        yield _text_record("".join(paragraph).rstrip("\r\n"))


def _iter_parquet(path: str, text_field: Optional[str], skip_bad: bool, stats: Stats) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    column = text_field or ("text" if "text" in names else "content" if "content" in names else None)
    if column not in names:
        raise PrepareError(f"{path}: no column '{column or 'text'}' (columns: {', '.join(names)}); use --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                if skip_bad:
                    stats.bad_lines += 1
                    continue
                raise PrepareError(f"{path}: row {row}: column '{column}' is {type(value).__name__}, not a string")
            if not value.strip():
                stats.empty_docs += 1
                continue
            yield _text_record(value)


def iter_input_documents(files: List[str], text_unit: str = "paragraph", text_field: Optional[str] = None,
                         skip_bad_lines: bool = False, stats: Optional[Stats] = None) -> Iterator[bytes]:
    """JSON lines (bytes, no newline), one per document, from local files, in file order."""
    stats = stats or Stats()
    for path in files:
        stats.input_files += 1
        stats.input_bytes += os.path.getsize(path)
        kind = _kind(path)
        if kind == "jsonl":
            yield from _iter_jsonl(path, text_field, skip_bad_lines, stats)
        elif kind == "parquet":
            yield from _iter_parquet(path, text_field, skip_bad_lines, stats)
        else:
            yield from _iter_text(path, text_unit, skip_bad_lines, stats)


def iter_hf_documents(name: str, config: Optional[str], split: str, field: str, max_docs: Optional[int],
                      stats: Stats) -> Iterator[bytes]:
    """Stream a Hugging Face dataset (network needed; `datasets` is imported only here)."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf-dataset needs the `datasets` package: pip install datasets") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, rec in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        text = rec.get(field)
        if not isinstance(text, str):
            raise PrepareError(f"hf dataset {name}: record {i} has no string field '{field}' (use --hf-field)")
        if not text.strip():
            stats.empty_docs += 1
            continue
        yield _text_record(text)


# ----------------------------------------------------------------------------------------------------------
# External shuffle and writing


def _as_line(doc: Union[bytes, str, dict]) -> bytes:
    if isinstance(doc, bytes):
        return doc
    if isinstance(doc, str):
        return _text_record(doc)
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


class _Buckets:
    """n bucket files; each document goes to one at random."""

    def __init__(self, folder: str, n: int, rnd: random.Random, prefix: str):
        self.paths = [os.path.join(folder, f"{prefix}.{i:04d}") for i in range(n)]
        self.files = [open(p, "wb") for p in self.paths]
        self.bytes = [0] * n
        self.counts = [0] * n
        self.rnd = rnd

    def add(self, line: bytes) -> None:
        i = self.rnd.randrange(len(self.files))
        self.files[i].write(line)
        self.files[i].write(b"\n")
        self.bytes[i] += len(line) + 1
        self.counts[i] += 1

    def close(self) -> None:
        for f in self.files:
            f.close()


def prepare_documents(
    docs: Iterable[Union[bytes, str, dict]],
    out_dir: str,
    source: str,
    n_chunks: int = 8,
    val_fraction: float = 0.01,
    val_max_docs: int = 5000,
    seed: int = 0,
    memory_bytes: int = 1 << 30,
    estimated_bytes: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_summary: Optional[dict] = None,
    stats: Optional[Stats] = None,
) -> dict:
    """Shuffle `docs` (JSON-line bytes, texts or dicts) into <out_dir>/<source>/ and return the summary."""
    if not source or os.sep in source or source.startswith("."):
        raise PrepareError(f"bad source name '{source}'")
    if n_chunks < 1:
        raise PrepareError(f"--n-chunks must be >= 1, got {n_chunks}")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if memory_bytes < 1:
        raise PrepareError("--memory-mb must be > 0")
    final = os.path.join(out_dir, source)
    if os.path.exists(final) and not overwrite:
        raise PrepareError(f"'{final}' exists; use --overwrite to replace it")
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, f".{source}.partial.{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "tmp"))
    t0 = time.monotonic()
    bar = Progress(progress)
    try:
        # 1. scatter into buckets
        budget = max(1, memory_bytes // 2)
        n_buckets = 64 if estimated_bytes is None else math.ceil(estimated_bytes * 1.1 / budget)
        n_buckets = max(1, min(256, n_buckets))
        buckets = _Buckets(os.path.join(work, "tmp"), n_buckets, random.Random(f"{seed}:scatter"), "bucket")
        n_docs = n_bytes = 0
        try:
            for doc in docs:
                line = _as_line(doc)
                buckets.add(line)
                n_docs += 1
                n_bytes += len(line) + 1
                if n_docs % 1000 == 0:
                    bar.update(f"reading: {n_docs:,} documents, {n_bytes / 1e6:,.1f} MB")
        finally:
            buckets.close()
        bar.update(f"reading: {n_docs:,} documents, {n_bytes / 1e6:,.1f} MB", force=True)
        bar.done()
        n_val = min(val_max_docs, int(round(val_fraction * n_docs)))
        if val_fraction > 0 and n_val == 0 and n_docs >= 2:
            n_val = 1
        n_train = n_docs - n_val
        if n_train < 1:
            raise PrepareError(f"no training documents for source '{source}' ({n_docs} documents read)")
        n_out = min(n_chunks, n_train)
        width = max(2, len(str(n_out - 1)))
        chunk_names = [f"{source}.chunk.{i:0{width}d}.jsonl" for i in range(n_out)]
        chunks = [open(os.path.join(work, name), "wb") for name in chunk_names]
        val = open(os.path.join(work, f"{source}.val.jsonl"), "wb")
        written = {"i": 0, "loaded": 0, "bytes": 0}

        def emit(lines: List[bytes]) -> None:
            for line in lines:
                i = written["i"]
                f = val if i < n_val else chunks[(i - n_val) % n_out]
                f.write(line)
                f.write(b"\n")
                written["i"] = i + 1
                written["bytes"] += len(line) + 1
            bar.update(f"shuffling: {written['i']:,}/{n_docs:,} documents, {written['loaded']} buckets")

        def drain(path: str, nbytes: int, count: int, key: str, depth: int) -> None:
            if nbytes + _PER_LINE_OVERHEAD * count > memory_bytes and count > 1 and depth < 8:
                m = max(2, min(256, math.ceil((nbytes + _PER_LINE_OVERHEAD * count) / budget)))
                sub = _Buckets(os.path.dirname(path), m, random.Random(f"{seed}:{key}:split"),
                               os.path.basename(path) + ".s")
                try:
                    with open(path, "rb") as f:
                        for raw in f:
                            sub.add(raw.rstrip(b"\n"))
                finally:
                    sub.close()
                os.remove(path)
                for j, p in enumerate(sub.paths):
                    drain(p, sub.bytes[j], sub.counts[j], f"{key}.{j}", depth + 1)
                return
            with open(path, "rb") as f:
                lines = [raw.rstrip(b"\n") for raw in f]
            os.remove(path)
            random.Random(f"{seed}:{key}:shuffle").shuffle(lines)
            written["loaded"] += 1
            emit(lines)

        try:
            for j, p in enumerate(buckets.paths):
                drain(p, buckets.bytes[j], buckets.counts[j], str(j), 0)
        finally:
            for f in chunks + [val]:
                f.close()
        bar.update(f"shuffling: {written['i']:,}/{n_docs:,} documents, {written['loaded']} buckets", force=True)
        bar.done()
        os.rmdir(os.path.join(work, "tmp"))
        summary = {
            "source": source,
            "out_dir": out_dir,
            "documents": n_docs,
            "train_documents": n_train,
            "val_documents": n_val,
            "bytes": n_bytes,
            "chunks": n_out,
            "chunk_files": chunk_names,
            "val_file": f"{source}.val.jsonl",
            "buckets": written["loaded"],
            "memory_bytes": memory_bytes,
            "seed": seed,
        }
        if stats is not None:
            summary.update(bad_lines=stats.bad_lines, empty_documents=stats.empty_docs)
        summary.update(extra_summary or {})
        with open(os.path.join(work, "prepare_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(work, final)
        summary["seconds"] = round(time.monotonic() - t0, 3)
        return summary
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def format_summary(s: dict) -> str:
    skipped = ""
    if s.get("bad_lines") or s.get("empty_documents"):
        skipped = f"; skipped {s.get('bad_lines', 0):,} bad lines and {s.get('empty_documents', 0):,} empty documents"
    return (
        f"prepared source '{s['source']}': {s['documents']:,} documents ({s['train_documents']:,} train, "
        f"{s['val_documents']:,} validation), {s['bytes'] / 1e6:,.2f} MB, {s['chunks']} chunks, "
        f"{s['buckets']} shuffle buckets{skipped}, in {s.get('seconds', 0):.1f} s\n"
        f"  train: {os.path.join(s['out_dir'], s['source'], s['source'] + '.chunk.*.jsonl')}\n"
        f"  validation: {os.path.join(s['out_dir'], s['source'], s['val_file'])}"
    )


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("inputs", nargs="*", help="input files or folders")
    p.add_argument("--out", required=True, help="output root (data.root_dir); the source goes to <out>/<source>/")
    p.add_argument("--source", required=True, help="source name (the sub-folder and the chunk file prefix)")
    p.add_argument("--n-chunks", type=int, default=8,
                   help="number of chunk files (default 8; fewer if fewer documents)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    p.add_argument("--val-max-docs", type=int, default=5000,
                   help="at most this many validation documents (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--memory-mb", type=float, default=1024, help="memory budget of the shuffle in MB (default 1024)")
    p.add_argument("--text-unit", choices=("paragraph", "file"), default="paragraph",
                   help="plain text files: one document per paragraph (default) or per file")
    p.add_argument("--text-field", default=None,
                   help="jsonl/parquet field holding the text (default: text, else content)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed input lines instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace <out>/<source> if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--hf-dataset", default=None,
                   help="stream this Hugging Face dataset instead of local inputs (network)")
    p.add_argument("--hf-config", default=None, help="dataset configuration name")
    p.add_argument("--hf-split", default="train", help="dataset split (default train)")
    p.add_argument("--hf-field", default="text", help="record field holding the text (default text)")
    p.add_argument("--hf-max-docs", type=int, default=None, help="stop after this many records")
    a = p.parse_args(argv)
    stats = Stats()
    if a.hf_dataset:
        if a.inputs:
            p.error("give either local inputs or --hf-dataset, not both")
        docs = iter_hf_documents(a.hf_dataset, a.hf_config, a.hf_split, a.hf_field, a.hf_max_docs, stats)
        estimate = None
        extra = {"inputs": [f"hf:{a.hf_dataset}:{a.hf_config or ''}:{a.hf_split}"]}
    else:
        if not a.inputs:
            p.error("no inputs (give files or folders, or --hf-dataset)")
        files = list_inputs(a.inputs)
        docs = iter_input_documents(files, a.text_unit, a.text_field, a.skip_bad_lines, stats)
        estimate = sum(os.path.getsize(f) * (4 if f.endswith(".gz") else 1) for f in files)
        extra = {"inputs": files, "text_unit": a.text_unit}
    summary = prepare_documents(
        docs, a.out, a.source, n_chunks=a.n_chunks, val_fraction=a.val_fraction, val_max_docs=a.val_max_docs,
        seed=a.seed, memory_bytes=int(a.memory_mb * 1e6), estimated_bytes=estimate, overwrite=a.overwrite,
        progress=not a.quiet, extra_summary=extra, stats=stats,
    )
    print(format_summary(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except PrepareError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(1)
