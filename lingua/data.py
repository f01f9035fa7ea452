"""The data pipeline: a chain of stateful iterators, each yielding `(output, state)` (DESIGN.md section 4).

    jsonl readers (file, byte offset, line, stride, pass)      one per source, over this rank's files
 -> source mixture (weights, RNG position)                      picks the source of each document
 -> tokenizer                                                   stateless: a document -> token ids
 -> packer (document position + token offset)                   fixed-length sequences, views overlap
 -> shuffle block (RNG block number, index in the block)        prefetch_size batches, permuted
 -> batch                                                       np.int64 [batch_size, seq_len, n_views]

`state` is a plain JSON-serialisable dict; passed back to `build_dataloader` it resumes the stream right
after the batch it came with, bit for bit. Resume is cheap: readers seek to byte offsets and at most one
shuffle block (`prefetch_size * batch_size` sequences) is re-read, however deep into the data the run is.

Every RNG is counter based: the numbers of block `b` come from `np.random.default_rng([seed, dp_rank, stage,
b])`, so an RNG state is just `(block, index)`.

The state belongs to one data-parallel rank (it records `dp_rank` and `dp_world_size`); docs/data.md explains
what to do when the number of data-parallel ranks changes.
"""

import bisect
import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import pickle
import queue as queue_mod
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from lingua.args import ConfigError
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer, check_tokenizer_args

logger = logging.getLogger(__name__)

__all__ = [
    "DataArgs",
    "DataError",
    "check_data_args",
    "init_dataloader_state",
    "build_dataloader",
    "data_metrics",
    "DataPipeline",
    "read_jsonl_documents",
    "find_validation_files",
    "CHUNK_GLOB",
    "VAL_GLOB",
]

STATE_VERSION = 1
CHUNK_GLOB = "*.chunk.*.jsonl"  # training files of a source (Lingua's layout)
VAL_GLOB = "*.val.jsonl"  # held-out files of a source (written by setup/prepare_data.py)
RNG_BLOCK = 1024  # numbers per block of the counter-based mixture RNG
_TAG_MIX = 1  # RNG stream ids: [seed, dp_rank, tag, block]
_TAG_SHUFFLE = 2
RESET_OPTION = "checkpoint.reset_data_state=true"  # the trainer's switch that restarts the data stream
_TEST_FAIL_ENV = "LINGUA_DATA_TEST_FAIL_AFTER"  # test hook: the loader process raises after N batches


class DataError(RuntimeError):
    """The data stream cannot continue: bad input, a state that does not match the data, a dead loader."""


@dataclass
class DataArgs:
    root_dir: Optional[str] = None  # folder with one sub-folder per source holding *.chunk.*.jsonl files
    sources: Dict[str, float] = field(default_factory=dict)  # {source: weight > 0}; empty = every source folder, weight 1
    batch_size: int = 2  # sequences per batch per data-parallel rank
    seq_len: int = 256  # tokens per sequence
    n_views: int = 2  # shifted views per sequence (2 = inputs, targets); each sequence holds seq_len + n_views - 1 tokens
    seed: int = 42  # seeds the source mixture and the shuffle (streams differ per dp rank)
    add_bos: bool = True  # prepend the tokenizer's bos id to every document
    add_eos: bool = True  # append the tokenizer's eos id to every document
    load_async: bool = True  # produce batches in a background process (spawned; see docs/data.md)
    prefetch_size: int = 64  # batches per shuffle block: sequences are permuted within prefetch_size * batch_size
    async_queue_size: int = 8  # bound of the queue between the loader process and the trainer, in batches
    skip_bad_lines: bool = False  # skip (and count in data/skipped_lines) malformed lines instead of failing
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)  # how documents become token ids


# ----------------------------------------------------------------------------------------------------------
# Files, layout, validation


def _chunk_files(root_dir: str, source: str) -> List[str]:
    """The source's chunk files, relative to root_dir, in a fixed (sorted) order."""
    folder = os.path.join(root_dir, source)
    paths = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), CHUNK_GLOB)) if os.path.isfile(p))
    return [os.path.relpath(p, root_dir) for p in paths]


def find_validation_files(root_dir: str, source: str) -> List[str]:
    """Absolute paths of the held-out files `<root_dir>/<source>/*.val.jsonl` (see setup/prepare_data.py)."""
    folder = os.path.join(root_dir, source)
    return sorted(p for p in glob.glob(os.path.join(glob.escape(folder), VAL_GLOB)) if os.path.isfile(p))


def _resolve_sources(args: DataArgs) -> Dict[str, float]:
    if args.sources:
        return {str(k): v for k, v in args.sources.items()}
    found = {}
    for name in sorted(os.listdir(args.root_dir)):
        if name.startswith("."):  # e.g. a folder that setup/prepare_data.py is still writing
            continue
        if os.path.isdir(os.path.join(args.root_dir, name)) and _chunk_files(args.root_dir, name):
            found[name] = 1.0
    if not found:
        raise ConfigError(
            f"data.root_dir '{args.root_dir}' has no source folder holding {CHUNK_GLOB} files "
            "(layout: <root_dir>/<source>/<source>.chunk.00.jsonl; build one with setup/prepare_data.py)"
        )
    return found


def check_data_args(args: DataArgs) -> None:
    """Fast validation before any process group exists; ConfigError with a one-line message naming the key."""
    for key in ("batch_size", "seq_len", "n_views", "prefetch_size", "async_queue_size"):
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key} must be an integer >= 1, got {value!r}")
    if isinstance(args.seed, bool) or not isinstance(args.seed, int):
        raise ConfigError(f"data.seed must be an integer, got {args.seed!r}")
    if not args.root_dir:
        raise ConfigError("data.root_dir is not set (e.g. data.root_dir=data/default; build it with python setup/build_default_corpus.py)")
    if not os.path.isdir(args.root_dir):
        raise ConfigError(
            f"data.root_dir '{args.root_dir}' does not exist or is not a folder "
            "(build the default corpus with: python setup/build_default_corpus.py)"
        )
    sources = _resolve_sources(args)
    for name, weight in sources.items():
        key = f"data.sources.{name}"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{key}: weight must be a finite number > 0, got {weight!r} (remove the source to disable it)")
        folder = os.path.join(args.root_dir, name)
        if not os.path.isdir(folder):
            raise ConfigError(f"{key}: source folder '{folder}' does not exist")
        files = _chunk_files(args.root_dir, name)
        if not files:
            raise ConfigError(f"{key}: source folder '{folder}' has no {CHUNK_GLOB} files")
        for rel in files:
            if os.path.getsize(os.path.join(args.root_dir, rel)) == 0:
                raise ConfigError(f"{key}: chunk file '{os.path.join(args.root_dir, rel)}' is empty")
    check_tokenizer_args(args.tokenizer, "data.tokenizer")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _fingerprint(args: DataArgs, sources: Dict[str, float], tokenizer: Tokenizer) -> dict:
    """Everything that decides the stream; a state only resumes under the same fingerprint."""
    tok = {"name": args.tokenizer.name, "n_words": tokenizer.n_words}
    if args.tokenizer.path:
        tok["sha256"] = _file_digest(args.tokenizer.path)
    return {
        "seed": int(args.seed),
        "seq_len": int(args.seq_len),
        "n_views": int(args.n_views),
        "batch_size": int(args.batch_size),
        "prefetch_size": int(args.prefetch_size),
        "add_bos": bool(args.add_bos),
        "add_eos": bool(args.add_eos),
        "sources": {k: float(v) for k, v in sorted(sources.items())},
        "tokenizer": tok,
    }


def _rank_layout(root_dir: str, sources: Dict[str, float], dp_rank: int, dp_world_size: int) -> dict:
    """Which files (and which lines of them) this rank reads, per source.

    n files >= W ranks: rank r owns files r, r + W, r + 2W, ... and reads every line of them.
    n files <  W ranks: rank r reads file r % n, sharing it with the other ranks r' = r (mod n); the k ranks
    of a file interleave its lines: the j-th of them (j = r // n) reads lines j, j + k, j + 2k, ...
    Either way no line is read by two ranks in one pass, and every line is read by one rank.
    """
    layout = {}
    for name in sorted(sources):
        files = _chunk_files(root_dir, name)
        n = len(files)
        if n == 0:
            raise DataError(f"source '{name}': no {CHUNK_GLOB} files under '{os.path.join(root_dir, name)}'")
        if n >= dp_world_size:
            mine, stride, offset = files[dp_rank::dp_world_size], 1, 0
        else:
            f = dp_rank % n
            mine, stride, offset = [files[f]], len(range(f, dp_world_size, n)), dp_rank // n
        sizes = [os.path.getsize(os.path.join(root_dir, rel)) for rel in mine]
        layout[name] = {"files": mine, "sizes": sizes, "stride": stride, "offset": offset}
    return layout


def _fresh_reader_state() -> dict:
    # file_idx: index in the rank's file list; pos: byte offset of the next line; line: its 0-based number;
    # pass: completed passes over the rank's files; docs: documents read from this file in this pass;
    # skipped: bad lines skipped so far (skip_bad_lines=true).
    return {"file_idx": 0, "pos": 0, "line": 0, "pass": 0, "docs": 0, "skipped": 0}


def init_dataloader_state(args: DataArgs, dp_rank: int, dp_world_size: int) -> dict:
    """JSON-serialisable state of a fresh stream for one data-parallel rank."""
    if not (isinstance(dp_world_size, int) and dp_world_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_world_size):
        raise ValueError(f"bad data-parallel position: dp_rank={dp_rank!r}, dp_world_size={dp_world_size!r}")
    check_data_args(args)
    sources = _resolve_sources(args)
    tokenizer = build_tokenizer(args.tokenizer)
    layout = _rank_layout(args.root_dir, sources, dp_rank, dp_world_size)
    mix = {"rng": [0, 0], "readers": {name: _fresh_reader_state() for name in layout}}
    return {
        "version": STATE_VERSION,
        "dp_rank": dp_rank,
        "dp_world_size": dp_world_size,
        "fingerprint": _fingerprint(args, sources, tokenizer),
        "layout": layout,
        "block": 0,  # shuffle block number
        "idx": 0,  # next sequence in the block
        "pack": {"doc": mix, "tok": 0},  # packer position at the start of the block
        "skipped_lines": 0,  # bad lines skipped so far (reading position, informational)
        "passes": {name: 0 for name in layout},  # completed passes per source (informational)
    }


def data_metrics(state: dict) -> Dict[str, float]:
    """Scalars worth logging from a batch's state."""
    if not state:
        return {}
    out = {"data/skipped_lines": float(state.get("skipped_lines", 0))}
    for name, p in (state.get("passes") or {}).items():
        out[f"data/pass/{name}"] = float(p)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading documents


class _BadLine(Exception):
    pass


def _parse_line(raw: bytes) -> Optional[str]:
    """The document of one jsonl line; None for a blank line; _BadLine with the reason otherwise."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"invalid UTF-8 (byte {e.start} of the line)") from None
    if not s.strip():
        return None
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise _BadLine(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if text is None:
        text = obj.get("content")
    if text is None:
        raise _BadLine("no 'text' or 'content' field")
    if not isinstance(text, str):
        raise _BadLine(f"the 'text'/'content' field is a {type(text).__name__}, not a string")
    if "\\u" in s or "\\U" in s:  # only a JSON escape can smuggle in an unpaired surrogate
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadLine("the text holds an unpaired surrogate escape (e.g. \\ud800): not valid Unicode") from None
    return text


def read_jsonl_documents(path: str, skip_bad_lines: bool = False) -> Iterator[str]:
    """Every document of one jsonl file in order (e.g. a *.val.jsonl file), with the loader's checks."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = _parse_line(raw)
            except _BadLine as e:
                if skip_bad_lines:
                    continue
                raise DataError(f"{path}:{lineno}: {e}") from None
            if text is not None:
                yield text


class DataPipeline:
    """The synchronous chain for one rank. Each stage is a generator of `(output, state)`; a stage started
    from a state yields exactly what the uninterrupted stage yielded after that state."""

    def __init__(self, args: DataArgs, state: dict):
        _check_state(state)
        self.args = args
        self.root_dir = args.root_dir
        self.rank = int(state["dp_rank"])
        self.world = int(state["dp_world_size"])
        self.layout = state["layout"]
        self.sources = list(self.layout)  # sorted at init
        fp = state["fingerprint"]
        weights = [float(fp["sources"][name]) for name in self.sources]
        total = sum(weights)
        self.cum = list(np.cumsum(weights) / total)
        self.cum[-1] = 1.0
        self.tokenizer = build_tokenizer(args.tokenizer)
        now = _fingerprint(args, _resolve_sources(args), self.tokenizer)
        if now != fp:
            diff = sorted(k for k in set(now) | set(fp) if now.get(k) != fp.get(k))
            details = "; ".join(f"{k}: {fp.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise DataError(
                f"the data state was saved with different data settings ({details}); it cannot resume this "
                f"stream exactly. Restore the old settings, or set {RESET_OPTION} to restart the data stream"
            )
        self.seed = int(args.seed) % (1 << 63)
        self.seq_len = int(args.seq_len)
        self.n_views = int(args.n_views)
        self.batch_size = int(args.batch_size)
        self.block_size = self.batch_size * int(args.prefetch_size)
        self.skip_bad_lines = bool(args.skip_bad_lines)
        self._skip_warnings = 0
        for name in self.sources:
            src = self.layout[name]
            for rel, size in zip(src["files"], src["sizes"]):
                self._check_file(rel, size)

    # -- files ---------------------------------------------------------------------------------------
    def _check_file(self, rel: str, size: int) -> str:
        path = os.path.join(self.root_dir, rel)
        try:
            now = os.path.getsize(path)
        except OSError:
            raise DataError(
                f"chunk file '{path}' of the data state is missing; restore it, or set {RESET_OPTION} "
                "to restart the data stream"
            ) from None
        if now != size:
            raise DataError(
                f"chunk file '{path}' changed since the data state was made ({size} -> {now} bytes); restore it, "
                f"or set {RESET_OPTION} to restart the data stream"
            )
        return path

    # -- stage 1: one source's reader ------------------------------------------------------------------
    def read_source(self, name: str, rstate: dict) -> Iterator[Tuple[str, dict]]:
        """Documents of one source for this rank, forever; the state after each is a fresh dict."""
        src = self.layout[name]
        files, sizes, stride, offset = src["files"], src["sizes"], int(src["stride"]), int(src["offset"])
        file_idx, pos, line = int(rstate["file_idx"]), int(rstate["pos"]), int(rstate["line"])
        n_pass, docs, skipped = int(rstate["pass"]), int(rstate["docs"]), int(rstate["skipped"])
        while True:
            path = self._check_file(files[file_idx], sizes[file_idx])
            with open(path, "rb") as f:
                if pos:
                    f.seek(pos)
                for raw in f:
                    lineno = line
                    pos += len(raw)
                    line += 1
                    if lineno % stride != offset:
                        continue
                    try:
                        text = _parse_line(raw)
                    except _BadLine as e:
                        if not self.skip_bad_lines:
                            raise DataError(
                                f"{path}:{lineno + 1}: {e}; fix or remove the line, or set data.skip_bad_lines=true "
                                "to skip and count such lines"
                            ) from None
                        skipped += 1
                        if self._skip_warnings < 10:
                            self._skip_warnings += 1
                            logger.warning("skipping bad line %s:%d: %s", path, lineno + 1, e)
                        continue
                    if text is None:
                        continue
                    docs += 1
                    yield text, {"file_idx": file_idx, "pos": pos, "line": line, "pass": n_pass, "docs": docs, "skipped": skipped}
            if docs == 0:
                what = "is empty" if line == 0 else (
                    f"has no document for dp rank {self.rank} ({line} lines; this rank reads every "
                    f"{stride}th line from line {offset + 1})" if stride > 1 else f"has no document ({line} lines)"
                )
                raise DataError(f"chunk file '{path}' {what}")
            file_idx, pos, line, docs = file_idx + 1, 0, 0, 0
            if file_idx == len(files):
                file_idx, n_pass = 0, n_pass + 1

    # -- stage 2: source mixture ---------------------------------------------------------------------
    def _mix_block(self, block: int) -> List[float]:
        return np.random.default_rng([self.seed, self.rank, _TAG_MIX, block]).random(RNG_BLOCK).tolist()

    def documents(self, mstate: dict) -> Iterator[Tuple[str, dict]]:
        """(text, state) with the source of each document drawn by weight. State: {"rng", "readers"}."""
        readers = {name: self.read_source(name, mstate["readers"][name]) for name in self.sources}
        current = dict(mstate["readers"])
        block, idx = (int(x) for x in mstate["rng"])
        numbers = self._mix_block(block)
        last = len(self.sources) - 1
        try:
            while True:
                u = numbers[idx]
                idx += 1
                if idx == RNG_BLOCK:
                    block, idx = block + 1, 0
                    numbers = self._mix_block(block)
                k = min(bisect.bisect_right(self.cum, u), last)
                name = self.sources[k]
                text, current[name] = next(readers[name])
                yield text, {"rng": [block, idx], "readers": dict(current)}
        finally:
            for r in readers.values():
                r.close()

    def documents_with_source(self, mstate: dict) -> Iterator[Tuple[Tuple[str, str], dict]]:
        """Like `documents`, with the source name: ((source, text), state). For tests and tools."""
        prev = mstate["readers"]
        for text, st in self.documents(mstate):
            name = next(n for n in self.sources if st["readers"][n] is not prev[n])
            prev = st["readers"]
            yield (name, text), st

    # -- stage 3: tokens -----------------------------------------------------------------------------
    def tokens(self, mstate: dict) -> Iterator[Tuple[np.ndarray, dict]]:
        tok, bos, eos = self.tokenizer, bool(self.args.add_bos), bool(self.args.add_eos)
        for text, st in self.documents(mstate):
            yield tok.encode_array(text, bos, eos), st

    # -- stage 4: packing ------------------------------------------------------------------------------
    def sequences(self, pstate: dict) -> Iterator[Tuple[np.ndarray, dict]]:
        """Sequences of seq_len + n_views - 1 tokens; consecutive sequences overlap by n_views - 1 tokens, so
        view 0 of the sequences is the token stream exactly once. State: {"doc": mixture state before the
        document holding the next sequence's first token, "tok": that token's index in the document}."""
        L, S = self.seq_len, self.seq_len + self.n_views - 1
        prev = pstate["doc"]
        skip = int(pstate["tok"])
        docs = self.tokens(prev)
        pieces: deque = deque()  # [tokens, state before their document, index of tokens[0] in the document]
        avail = 0
        try:
            while True:
                while avail < S:
                    toks, after = next(docs)
                    start = 0
                    if skip:
                        if skip >= len(toks):
                            raise DataError(
                                f"the data state points at token {skip} of a document of {len(toks)} tokens: the data "
                                f"or the tokenizer changed; set {RESET_OPTION} to restart the data stream"
                            )
                        toks, start, skip = toks[skip:], skip, 0
                    if len(toks):
                        pieces.append([toks, prev, start])
                        avail += len(toks)
                    prev = after
                out = np.empty(S, dtype=np.int64)
                filled = 0
                for toks, _, _ in pieces:
                    take = min(len(toks), S - filled)
                    out[filled : filled + take] = toks[:take]
                    filled += take
                    if filled == S:
                        break
                n = L
                while n:
                    head = pieces[0]
                    if len(head[0]) <= n:
                        n -= len(head[0])
                        pieces.popleft()
                    else:
                        head[0] = head[0][n:]
                        head[2] += n
                        n = 0
                avail -= L
                state = {"doc": pieces[0][1], "tok": pieces[0][2]} if pieces else {"doc": prev, "tok": 0}
                yield out, state
        finally:
            docs.close()

    # -- stage 5: shuffle blocks and batches ---------------------------------------------------------
    def _permutation(self, block: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.rank, _TAG_SHUFFLE, block]).permutation(self.block_size)

    def _state(self, template: dict, block: int, idx: int, pack: dict, frontier: dict) -> dict:
        readers = frontier["doc"]["readers"]
        return {
            "version": STATE_VERSION,
            "dp_rank": self.rank,
            "dp_world_size": self.world,
            "fingerprint": template["fingerprint"],
            "layout": template["layout"],
            "block": block,
            "idx": idx,
            "pack": pack,
            "skipped_lines": sum(int(r["skipped"]) for r in readers.values()),
            "passes": {name: int(r["pass"]) for name, r in readers.items()},
        }

    def batches(self, state: dict) -> Iterator[Tuple[np.ndarray, dict]]:
        """Batches [batch_size, seq_len, n_views] (int64) with the state that resumes right after each."""
        block, idx, pack = int(state["block"]), int(state["idx"]), state["pack"]
        N, bs, L, V = self.block_size, self.batch_size, self.seq_len, self.n_views
        if idx % bs or not 0 <= idx < N:
            raise DataError(f"data state index {idx} does not fit batch_size {bs} x prefetch_size {N // bs}")
        seqs_it = self.sequences(pack)
        try:
            while True:
                seqs = np.empty((N, L + V - 1), dtype=np.int64)
                for j in range(N):
                    seqs[j], frontier = next(seqs_it)
                perm = self._permutation(block)
                while idx < N:
                    sel = seqs[perm[idx : idx + bs]]
                    batch = np.stack([sel[:, v : v + L] for v in range(V)], axis=-1)
                    idx += bs
                    if idx == N:
                        st = self._state(state, block + 1, 0, frontier, frontier)
                    else:
                        st = self._state(state, block, idx, pack, frontier)
                    yield batch, st
                block, idx, pack = block + 1, 0, frontier
        finally:
            seqs_it.close()


def _check_state(state: dict) -> None:
    if not isinstance(state, dict):
        raise DataError(f"the data state must be a dict (from init_dataloader_state), got {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise DataError(
            f"data state version {state.get('version')!r} is not {STATE_VERSION}; set {RESET_OPTION} to "
            "restart the data stream"
        )
    for key in ("dp_rank", "dp_world_size", "fingerprint", "layout", "block", "idx", "pack"):
        if key not in state:
            raise DataError(f"the data state lacks '{key}'; it was not made by init_dataloader_state")


# ----------------------------------------------------------------------------------------------------------
# The loader: synchronous, or in a spawned background process


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in the loader process (shown as the cause)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return "\n\nin the data loader process:\n" + self.tb


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


_CHILD_BOOT = (
    "import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
    "from lingua.data import _loader_main; _loader_main()"
)


def _loader_main() -> None:
    """Body of the loader process (started by AsyncBatchIterator; reads its job from stdin).

    The main thread runs the synchronous pipeline into a bounded local queue; a sender thread pickles items
    into the pipe: ("batch", batch, state) or ("error", ...). The process leaves when the trainer closes our
    stdin, when the trainer dies (stdin reaches end-of-file, and our parent pid changes), or when the
    trainer closes the pipe.
    """
    import sys
    from multiprocessing.connection import Connection

    args, state, fd, queue_size, parent_pid = pickle.load(sys.stdin.buffer)
    conn = Connection(fd, readable=False)
    # The trainer owns our lifetime: Ctrl-C (the terminal signals the whole process group) and SIGTERM go to
    # the trainer, which stops us by closing our stdin; if it dies we see end-of-file there.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()

    def watch_stdin():
        try:
            sys.stdin.buffer.read()
        except Exception:
            pass
        stop.set()

    def watchdog():
        stopped_at = None
        while True:
            if os.getppid() != parent_pid:  # the trainer died: do not outlive it
                os._exit(0)
            if stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > 5.0:  # the main thread is stuck somewhere: leave anyway
                    os._exit(0)
            time.sleep(0.1)

    local: "queue_mod.Queue" = queue_mod.Queue(maxsize=queue_size)

    def sender():
        while True:
            item = local.get()
            if item is None:
                return
            try:
                conn.send(item)
            except OSError:  # BrokenPipeError: the trainer closed the loader
                stop.set()
                return

    for target in (watch_stdin, watchdog):
        threading.Thread(target=target, daemon=True).start()
    send_thread = threading.Thread(target=sender, daemon=True)
    send_thread.start()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                local.put(item, timeout=0.1)
                return True
            except queue_mod.Full:
                continue
        return False

    fail_after = os.environ.get(_TEST_FAIL_ENV)
    try:
        pipeline = DataPipeline(args, state)
        for n, (batch, st) in enumerate(pipeline.batches(state)):
            if fail_after is not None and n >= int(fail_after):
                raise RuntimeError(f"injected failure after {n} batches ({_TEST_FAIL_ENV} is set)")
            if not put(("batch", batch, st)):
                os._exit(0)
    except BaseException as e:  # report everything; the trainer raises DataError with it
        report = ("error", type(e).__name__, str(e), traceback.format_exc(), isinstance(e, (DataError, ConfigError)))
        if put(report) and put(None):
            send_thread.join(timeout=30.0)  # the report reaches the pipe before we exit
        os._exit(1)


class AsyncBatchIterator:
    """Iterator over (batch, state) made by a background process and sent through a pipe; at most
    `async_queue_size` batches wait, ready, in the process.

    The process is a fresh interpreter (`python -c ...`, like multiprocessing's spawn, but it does not
    re-import the trainer's main module, so it never imports torch): nothing of the trainer's threads or
    CUDA state is forked. Waits use short timeouts and check the pipe and the process, so a dead loader is a
    DataError (with the cause when it raised), never a hang. `close()` stops and joins (or kills) it.
    """

    def __init__(self, args: DataArgs, state: dict):
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        self._error: Optional[BaseException] = None
        self._closed = False
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT], stdin=subprocess.PIPE, pass_fds=(write_fd,), close_fds=True
            )
        finally:
            os.close(write_fd)  # only the child writes: its death shows here as end-of-file, not a hang
        self._conn = Connection(read_fd, writable=False)
        self.pid = self.process.pid
        job = (args, state, write_fd, max(1, int(args.async_queue_size)), os.getpid())
        try:
            pickle.dump([p for p in sys.path if isinstance(p, str)], self.process.stdin)
            pickle.dump(job, self.process.stdin)
            self.process.stdin.flush()
        except OSError:
            pass  # it died already: __next__ reports how

    def __iter__(self):
        return self

    def _died(self) -> DataError:
        try:
            self.process.wait(timeout=2.0)
        except Exception:
            pass
        return DataError(
            f"the data loader process (pid {self.pid}) {_describe_exit(self.process.returncode)} without reporting an "
            "error (anything it printed is on stderr above)"
        )

    def __next__(self) -> Tuple[np.ndarray, dict]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise DataError("the data loader is closed")
        waited, next_warning = 0.0, 120.0
        while not self._conn.poll(0.2):
            waited += 0.2
            if self.process.poll() is not None and not self._conn.poll(0.2):
                self._error = self._died()
                raise self._error
            if waited >= next_warning:
                next_warning += 120.0
                logger.warning("waited %.0f s for the data loader process (pid %s)", waited, self.pid)
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):  # it died, possibly in the middle of a message
            self._error = self._died()
            raise self._error from None
        if msg[0] == "batch":
            return msg[1], msg[2]
        _, type_name, text, tb, is_data_error = msg
        message = text if is_data_error else f"the data loader process failed: {type_name}: {text}"
        self._error = DataError(message)
        self._error.__cause__ = _RemoteTraceback(tb)
        raise self._error

    def close(self) -> None:
        """Stop the process and wait for it (kill it if it does not stop by itself)."""
        if self._closed:
            return
        self._closed = True
        for f in (self.process.stdin, self._conn):  # end-of-file on its stdin: stop; a blocked send: EPIPE
            try:
                f.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=10.0)
        except Exception:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def build_dataloader(
    args: DataArgs, state: dict, *, dp_rank: Optional[int] = None, dp_world_size: Optional[int] = None
) -> Iterator[Iterator[Tuple[np.ndarray, dict]]]:
    """Yield an iterator of (batch, state): batch is np.int64 [batch_size, seq_len, n_views] (view 0 = inputs,
    view 1 = targets = inputs shifted by one token, ...); state resumes the stream right after that batch.

    Validates the state against the args and the files first (DataError / ConfigError); given `dp_rank` /
    `dp_world_size`, also that the state belongs to this rank of this layout. With args.load_async the
    batches come from a background process that leaving the context stops and joins.
    """
    _check_state(state)
    for key, want in (("dp_rank", dp_rank), ("dp_world_size", dp_world_size)):
        if want is not None and state[key] != want:
            raise DataError(
                f"the data state belongs to {key}={state[key]}, this process has {key}={want}: each data-parallel rank "
                f"must resume its own state (a changed layout needs {RESET_OPTION})"
            )
    pipeline = DataPipeline(args, state)
    if args.load_async:
        del pipeline
        it = AsyncBatchIterator(args, state)
        try:
            yield it
        finally:
            it.close()
    else:
        gen = pipeline.batches(state)
        try:
            yield gen
        finally:
            gen.close()
