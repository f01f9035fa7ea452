"""The data pipeline: one global stream of training sequences, shared out over any number of data-parallel ranks,
whose full state is a small JSON dict (docs/data.md).

The global stream. An optimizer step consumes G sequences, the global batch (batch_size x grad_acc_steps x
data-parallel ranks, or data.global_batch_size). They come from N logical streams (data.streams, default N = G),
k = G / N from each. Every logical stream is a chain of stateful iterators over its own share of the data:

    jsonl readers (file, byte offset, line, crc32)   one per source, over the stream's files (or lines of a file)
 -> source mixture (RNG block, index)                picks the source of each document
 -> tokenizer                                        stateless: a document -> token ids
 -> packer (document position + token offset)        fixed-length sequences, views overlap
 -> shuffle block                                    prefetch_size steps' worth of the stream's sequences, permuted

and step t takes the sequences [t k, (t+1) k) of every stream's shuffled order. Rank r of W owns the streams
[r N/W, (r+1) N/W) and cuts its G/W sequences of the step into grad_acc_steps micro-batches of batch_size. The
order of sequences is thus a function of the seed, the data, N and G (and the other data options) only, not of
the number of ranks or of how the global batch is split into per-rank batches and accumulation steps. Needs:
W divides N, N divides G.

The state. At a step boundary every stream is at the same place (block b, step i within it), so a rank's state is
`{block, step, streams: {stream: packer position at the start of block b}}` plus a fingerprint of the settings and
files. Passed back to `build_dataloader` it resumes right after that step, bit for bit; `reshard_data_state`
deals the streams of any layout's states out to another layout. Resume is cheap: readers seek to byte offsets and
at most one shuffle block (prefetch_size steps) is re-read. Every RNG is counter based: the numbers of block b of
stream s come from `np.random.default_rng([seed, s, stage, b])`.

Integrity. The fingerprint holds every chunk file's size; each reader carries the crc32 of its current file up to
its position, and of every file it has read completely. On resume the bytes already read are checked against them,
so a file edited in place (even keeping its size) is a DataError naming it, never a silently different stream:
the current file's prefix at once, the other files when the next pass reads them again. Moving identical data to
another root_dir resumes.
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
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from lingua import faults
from lingua.args import ConfigError
from lingua.files import crc32
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer, check_tokenizer_args

logger = logging.getLogger(__name__)

__all__ = [
    "DataArgs",
    "DataError",
    "MicroBatch",
    "check_data_args",
    "global_batch",
    "init_dataloader_state",
    "build_dataloader",
    "reshard_data_state",
    "data_metrics",
    "DataTrace",
    "read_trace",
    "DataPipeline",
    "read_jsonl_documents",
    "find_validation_files",
    "CHUNK_GLOB",
    "VAL_GLOB",
]

STATE_VERSION = 2  # 2: logical streams (1: one stream per data-parallel rank)
CHUNK_GLOB = "*.chunk.*.jsonl"  # training files of a source (Lingua's layout)
VAL_GLOB = "*.val.jsonl"  # held-out files of a source (written by setup/prepare_data.py)
RNG_BLOCK = 1024  # numbers per block of the counter-based mixture RNG
_TAG_MIX = 1  # RNG stream ids: [seed, stream, tag, block]
_TAG_SHUFFLE = 2
RESET_OPTION = "checkpoint.reset_data_state=true"  # the trainer's switch that restarts the data stream
TRACE_DIR = "data_trace"


class DataError(RuntimeError):
    """The data stream cannot continue: bad input, a state that does not match the data, a dead loader."""


@dataclass
class DataArgs:
    root_dir: Optional[str] = None  # folder with one sub-folder per source holding *.chunk.*.jsonl files
    sources: Dict[str, float] = field(default_factory=dict)  # {source: weight > 0}; empty = every source, weight 1
    batch_size: int = 2  # sequences per micro-batch per data-parallel rank
    seq_len: int = 256  # tokens per sequence
    n_views: int = 2  # shifted views per sequence (2 = inputs, targets); a sequence holds seq_len + n_views - 1 tokens
    seed: int = 42  # seeds the source mixture and the shuffle (each logical stream draws its own numbers)
    add_bos: bool = True  # prepend the tokenizer's bos id to every document
    add_eos: bool = True  # append the tokenizer's eos id to every document
    load_async: bool = True  # produce batches in a background process (spawned; see docs/data.md)
    prefetch_size: int = 64  # optimizer steps per shuffle block: a stream's sequences are permuted within a block
    async_queue_size: int = 8  # bound of the queue between the loader process and the trainer, in micro-batches
    skip_bad_lines: bool = False  # skip (and count in data/skipped_lines) malformed lines instead of failing
    global_batch_size: Optional[int] = None  # sequences per step over all ranks; set: grad_acc_steps is derived
    streams: int = 0  # logical streams (0: one per sequence of the global batch); must divide the global batch
    trace: bool = False  # append what every micro-batch holds to <dump_dir>/data_trace/rank_<dp_rank>.jsonl
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)  # how documents become token ids


class MicroBatch(NamedTuple):
    tokens: np.ndarray  # int64 [batch_size, seq_len, n_views]: view 0 = inputs, view 1 = targets, ...
    state: Optional[dict]  # the stream's state after this micro-batch's step; None but on a step's last one
    pieces: Optional[list]  # with data.trace: per sequence, its pieces [source, file, line, first, end]


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
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise ConfigError(f"data.global_batch_size must be >= 1 (or unset), got {args.global_batch_size}")
    if args.streams < 0:
        raise ConfigError(f"data.streams must be >= 0 (0: one per sequence of the global batch), got {args.streams}")
    if not args.root_dir:
        raise ConfigError("data.root_dir is not set (e.g. data.root_dir=data/default; "
                          "build it with python setup/build_default_corpus.py)")
    if not os.path.isdir(args.root_dir):
        raise ConfigError(
            f"data.root_dir '{args.root_dir}' does not exist or is not a folder "
            "(build the default corpus with: python setup/build_default_corpus.py)"
        )
    sources = _resolve_sources(args)
    for name, weight in sources.items():
        key = f"data.sources.{name}"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{key}: weight must be a finite number > 0, got {weight!r} "
                              "(remove the source to disable it)")
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


def global_batch(args: DataArgs, dp_world_size: int, grad_acc_steps: int = 1) -> Tuple[int, int]:
    """(global batch G, logical streams N) for this layout; DataError naming the options when they do not fit."""
    G = int(args.batch_size) * int(grad_acc_steps) * int(dp_world_size)
    if args.global_batch_size is not None and args.global_batch_size != G:
        raise DataError(f"data.global_batch_size={args.global_batch_size} but data.batch_size ({args.batch_size}) x "
                        f"grad_acc_steps ({grad_acc_steps}) x data-parallel ranks ({dp_world_size}) = {G}")
    N = int(args.streams) or G
    if G % N or N % dp_world_size:
        raise DataError(f"data.streams={N} must divide the global batch ({G}) and be a multiple of the data-parallel "
                        f"ranks ({dp_world_size})")
    return G, N


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _fingerprint(args: DataArgs, sources: Dict[str, float], tokenizer: Tokenizer, G: int, N: int) -> dict:
    """Everything that decides the stream; a state only resumes under the same fingerprint."""
    tok = {"name": str(args.tokenizer.name), "n_words": tokenizer.n_words}
    if args.tokenizer.path:
        tok["sha256"] = _file_digest(args.tokenizer.path)
    files = {}
    for name in sorted(sources):
        for rel in _chunk_files(args.root_dir, name):
            files[rel] = os.path.getsize(os.path.join(args.root_dir, rel))
    return {
        "seed": int(args.seed),
        "seq_len": int(args.seq_len),
        "n_views": int(args.n_views),
        "global_batch": G,
        "streams": N,
        "prefetch_size": int(args.prefetch_size),
        "add_bos": bool(args.add_bos),
        "add_eos": bool(args.add_eos),
        "sources": {k: float(v) for k, v in sorted(sources.items())},
        "tokenizer": tok,
        "files": files,
    }


def _stream_layout(files_of: Dict[str, List[str]], stream: int, n_streams: int) -> dict:
    """Which files (and which lines of them) a logical stream reads, per source.

    n files >= N streams: stream s owns files s, s + N, s + 2N, ... and reads every line of them.
    n files <  N streams: stream s reads file s % n, sharing it with the other streams s' = s (mod n); the k
    streams of a file interleave its lines: the j-th of them (j = s // n) reads lines j, j + k, j + 2k, ...
    Either way no line is read by two streams in one pass, and every line is read by one stream.
    """
    layout = {}
    for name, files in files_of.items():
        n = len(files)
        if n >= n_streams:
            layout[name] = {"files": files[stream::n_streams], "stride": 1, "offset": 0}
        else:
            f = stream % n
            layout[name] = {"files": [files[f]], "stride": len(range(f, n_streams, n)), "offset": stream // n}
    return layout


def _fresh_reader_state() -> dict:
    # file: index in the stream's file list; pos: byte offset of the next line; line: its 0-based number; pass:
    # completed passes over the stream's files; docs: documents read from this file in this pass; skipped: bad
    # lines skipped so far; crc: crc32 of the current file's bytes before pos; crcs: {file index: crc32 of the
    # whole file} for the files read completely.
    return {"file": 0, "pos": 0, "line": 0, "pass": 0, "docs": 0, "skipped": 0, "crc": 0, "crcs": {}}


def init_dataloader_state(args: DataArgs, dp_rank: int, dp_world_size: int, grad_acc_steps: int = 1) -> dict:
    """JSON-serialisable state of a fresh stream, for one data-parallel rank of a layout."""
    if not (isinstance(dp_world_size, int) and dp_world_size >= 1 and isinstance(dp_rank, int)
            and 0 <= dp_rank < dp_world_size):
        raise ValueError(f"bad data-parallel position: dp_rank={dp_rank!r}, dp_world_size={dp_world_size!r}")
    check_data_args(args)
    G, N = global_batch(args, dp_world_size, grad_acc_steps)
    sources = _resolve_sources(args)
    fresh = {"rng": [0, 0], "readers": {name: _fresh_reader_state() for name in sorted(sources)}, "tok": 0}
    m = N // dp_world_size
    return {
        "version": STATE_VERSION,
        "dp_rank": dp_rank,
        "dp_world_size": dp_world_size,
        "fingerprint": _fingerprint(args, sources, build_tokenizer(args.tokenizer), G, N),
        "block": 0,  # shuffle block number (the same for every stream)
        "step": 0,  # steps taken within the block
        "streams": {str(s): json.loads(json.dumps(fresh)) for s in range(dp_rank * m, (dp_rank + 1) * m)},
    }


def reshard_data_state(states: List[dict], dp_rank: int, dp_world_size: int) -> dict:
    """This rank's state in a new data-parallel layout, from the states of every rank of the old one (the streams
    are dealt out again: the global stream continues exactly). DataError if they cannot be combined."""
    for st in states:
        _check_state(st)
    first = states[0]
    streams: Dict[str, dict] = {}
    for st in states:
        if (st["fingerprint"], st["block"], st["step"]) != (first["fingerprint"], first["block"], first["step"]):
            raise DataError("the data states of the checkpoint's ranks disagree (different settings or positions); "
                            f"set {RESET_OPTION} to restart the data stream")
        streams.update(st["streams"])
    N = int(first["fingerprint"]["streams"])
    if sorted(map(int, streams)) != list(range(N)):
        raise DataError(f"the checkpoint's data states hold {len(streams)} of the {N} logical streams; "
                        f"set {RESET_OPTION} to restart the data stream")
    if N % dp_world_size:
        raise DataError(
            f"the data stream has {N} logical streams (data.streams), which {dp_world_size} data-parallel ranks cannot "
            f"share evenly; use a number of ranks that divides {N}, or set {RESET_OPTION} to restart the stream"
        )
    m = N // dp_world_size
    return {**first, "dp_rank": dp_rank, "dp_world_size": dp_world_size,
            "streams": {str(s): streams[str(s)] for s in range(dp_rank * m, (dp_rank + 1) * m)}}


def data_metrics(state: Optional[dict]) -> Dict[str, float]:
    """Scalars worth logging from a step's state (this rank's streams): bad lines skipped, passes per source."""
    if not state:
        return {}
    readers = [st["readers"] for st in state["streams"].values()]
    out = {"data/skipped_lines": float(sum(int(r["skipped"]) for rs in readers for r in rs.values()))}
    for name in sorted(readers[0]) if readers else ():
        out[f"data/pass/{name}"] = float(min(int(rs[name]["pass"]) for rs in readers))
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


class _Stream:
    """One logical stream: readers -> mixture -> tokens -> packer -> shuffle blocks. Each stage is a generator of
    (output, ..., state); a stage started from a state yields exactly what the uninterrupted stage yielded after it."""

    def __init__(self, pipe: "DataPipeline", sid: int):
        self.pipe = pipe
        self.sid = sid
        self.layout = _stream_layout(pipe.files_of, sid, pipe.n_streams)

    # -- stage 1: one source's reader ----------------------------------------------------------------
    def read_source(self, name: str, rstate: dict) -> Iterator[Tuple[str, tuple, dict]]:
        """(text, (source, file, line), state after it) for this stream's documents of a source, forever."""
        src = self.layout[name]
        files, stride, offset = src["files"], int(src["stride"]), int(src["offset"])
        file_idx, pos, line = int(rstate["file"]), int(rstate["pos"]), int(rstate["line"])
        n_pass, docs, skipped = int(rstate["pass"]), int(rstate["docs"]), int(rstate["skipped"])
        crc, crcs = int(rstate["crc"]), dict(rstate["crcs"])
        pipe = self.pipe
        while True:
            rel = files[file_idx]
            path = pipe.check_file(rel)
            with open(path, "rb") as f:
                if pos:
                    if pipe.prefix_crc(path, pos) != crc:
                        raise DataError(f"chunk file '{path}' changed since the run read it (its first {pos} bytes "
                                        f"differ); restore it, or set {RESET_OPTION} to restart the data stream")
                    f.seek(pos)
                for raw in f:
                    lineno = line
                    pos += len(raw)
                    line += 1
                    crc = crc32(raw, crc)
                    if lineno % stride != offset:
                        continue
                    try:
                        text = _parse_line(raw)
                    except _BadLine as e:
                        if not pipe.skip_bad_lines:
                            raise DataError(
                                f"{path}:{lineno + 1}: {e}; fix or remove the line, or set data.skip_bad_lines=true "
                                "to skip and count such lines"
                            ) from None
                        skipped += 1
                        pipe.warn_skipped(path, lineno + 1, e)
                        continue
                    if text is None:
                        continue
                    docs += 1
                    yield text, (name, rel, lineno + 1), {"file": file_idx, "pos": pos, "line": line, "pass": n_pass,
                                                          "docs": docs, "skipped": skipped, "crc": crc, "crcs": crcs}
            if docs == 0:
                what = "is empty" if line == 0 else (
                    f"has no document for data stream {self.sid} ({line} lines; this stream reads every {stride}th "
                    f"line from line {offset + 1}: give the source more documents per file, or use fewer logical "
                    "streams, data.streams)" if stride > 1 else f"has no document ({line} lines)"
                )
                raise DataError(f"chunk file '{path}' {what}")
            if crcs.get(str(file_idx), crc) != crc:
                raise DataError(f"chunk file '{path}' changed since an earlier pass read it (its content differs); "
                                f"restore it, or set {RESET_OPTION} to restart the data stream")
            crcs = {**crcs, str(file_idx): crc}  # a new dict: the states handed out before keep theirs
            file_idx, pos, line, docs, crc = file_idx + 1, 0, 0, 0, 0
            if file_idx == len(files):
                file_idx, n_pass = 0, n_pass + 1

    # -- stage 2: source mixture ---------------------------------------------------------------------
    def _mix_block(self, block: int) -> List[float]:
        return np.random.default_rng([self.pipe.seed, self.sid, _TAG_MIX, block]).random(RNG_BLOCK).tolist()

    def documents(self, mstate: dict) -> Iterator[Tuple[str, tuple, dict]]:
        """(text, doc id, state) with the source of each document drawn by weight. State: {"rng", "readers"}."""
        pipe = self.pipe
        readers = {name: self.read_source(name, mstate["readers"][name]) for name in pipe.sources}
        current = dict(mstate["readers"])
        block, idx = (int(x) for x in mstate["rng"])
        numbers = self._mix_block(block)
        last = len(pipe.sources) - 1
        try:
            while True:
                u = numbers[idx]
                idx += 1
                if idx == RNG_BLOCK:
                    block, idx = block + 1, 0
                    numbers = self._mix_block(block)
                name = pipe.sources[min(bisect.bisect_right(pipe.cum, u), last)]
                text, doc, current[name] = next(readers[name])
                yield text, doc, {"rng": [block, idx], "readers": dict(current)}
        finally:
            for r in readers.values():
                r.close()

    # -- stages 3 and 4: tokens, packing -------------------------------------------------------------
    def sequences(self, pstate: dict) -> Iterator[Tuple[np.ndarray, Optional[list], dict]]:
        """Sequences of seq_len + n_views - 1 tokens, with their pieces (data.trace) and the state after each.
        Consecutive sequences overlap by n_views - 1 tokens, so view 0 of the sequences is the token stream
        exactly once. State: the mixture state before the document holding the next sequence's first token
        ("rng", "readers") and that token's index in the document ("tok")."""
        pipe = self.pipe
        tok, bos, eos, trace = pipe.tokenizer, pipe.add_bos, pipe.add_eos, pipe.trace
        L, S = pipe.seq_len, pipe.seq_len + pipe.n_views - 1
        prev = {"rng": pstate["rng"], "readers": pstate["readers"]}
        skip = int(pstate["tok"])
        docs = self.documents(prev)
        pieces: deque = deque()  # [tokens, state before their document, index of tokens[0] in it, doc id]
        avail = 0
        try:
            while True:
                while avail < S:
                    text, doc, after = next(docs)
                    toks = tok.encode_array(text, bos, eos)
                    start = 0
                    if skip:
                        if skip >= len(toks):
                            raise DataError(
                                f"the data state points at token {skip} of a document of {len(toks)} tokens: the data "
                                f"or the tokenizer changed; set {RESET_OPTION} to restart the data stream"
                            )
                        toks, start, skip = toks[skip:], skip, 0
                    if len(toks):
                        pieces.append([toks, prev, start, doc])
                        avail += len(toks)
                    prev = after
                out = np.empty(S, dtype=np.int64)
                where = [] if trace else None
                filled = 0
                for toks, _, start, doc in pieces:
                    take = min(len(toks), S - filled)
                    out[filled : filled + take] = toks[:take]
                    if trace:
                        where.append([doc[0], doc[1], doc[2], start, start + take])
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
                state = {**pieces[0][1], "tok": pieces[0][2]} if pieces else {**prev, "tok": 0}
                yield out, where, state
        finally:
            docs.close()

    # -- stage 5: shuffle blocks ---------------------------------------------------------------------
    def permutation(self, block: int) -> np.ndarray:
        return np.random.default_rng([self.pipe.seed, self.sid, _TAG_SHUFFLE, block]).permutation(
            self.pipe.block_size)

    def blocks(self, pstate: dict) -> Iterator[Tuple[np.ndarray, list, dict]]:
        """Blocks of block_size sequences (unshuffled), their pieces, and the state at the next block's start."""
        pipe = self.pipe
        seqs_it = self.sequences(pstate)
        try:
            while True:
                seqs = np.empty((pipe.block_size, pipe.seq_len + pipe.n_views - 1), dtype=np.int64)
                pieces = []
                for j in range(pipe.block_size):
                    seqs[j], where, frontier = next(seqs_it)
                    pieces.append(where)
                yield seqs, pieces, frontier
        finally:
            seqs_it.close()


class DataPipeline:
    """The synchronous pipeline of one data-parallel rank: its logical streams, stepped together, cut into
    micro-batches. `micro_batches()` yields `MicroBatch(tokens, state, pieces)`."""

    def __init__(self, args: DataArgs, state: dict, grad_acc_steps: int = 1, trace: Optional[bool] = None):
        _check_state(state)
        self.args = args
        self.root_dir = args.root_dir
        self.state = state
        self.rank = int(state["dp_rank"])
        self.world = int(state["dp_world_size"])
        fp = state["fingerprint"]
        self.sources = sorted(fp["sources"])
        weights = [float(fp["sources"][name]) for name in self.sources]
        self.cum = list(np.cumsum(weights) / sum(weights))
        self.cum[-1] = 1.0
        self.tokenizer = build_tokenizer(args.tokenizer)
        G, N = int(fp["global_batch"]), int(fp["streams"])
        now = int(args.batch_size) * int(grad_acc_steps) * self.world
        if now != G:
            raise DataError(
                f"the data stream's global batch is {G} sequences, this run's is {now} (data.batch_size "
                f"{args.batch_size} x grad_acc_steps {grad_acc_steps} x {self.world} data-parallel ranks): the stream "
                f"continues only with the same global batch; set data.global_batch_size={G} (grad_acc_steps is then "
                f"derived), or set {RESET_OPTION} to start a new stream"
            )
        self.acc = int(grad_acc_steps)
        self._check_fingerprint(fp, G, N)
        self.seed = int(args.seed) % (1 << 63)
        self.seq_len = int(args.seq_len)
        self.n_views = int(args.n_views)
        self.batch_size = int(args.batch_size)
        self.n_streams = N
        self.k = G // N  # sequences per stream per step
        self.steps_per_block = int(args.prefetch_size)
        self.block_size = self.steps_per_block * self.k
        self.add_bos, self.add_eos = bool(args.add_bos), bool(args.add_eos)
        self.skip_bad_lines = bool(args.skip_bad_lines)
        self.trace = bool(args.trace if trace is None else trace)
        self.files_of = {name: _chunk_files(self.root_dir, name) for name in self.sources}
        self.sizes = fp["files"]
        self.streams = {int(s): _Stream(self, int(s)) for s in state["streams"]}
        self._skip_warnings = 0
        self._prefixes: Dict[str, Dict[int, int]] = {}  # path -> {pos: crc32 of the bytes before pos}
        self._wanted: Dict[str, set] = {}  # path -> positions whose prefix crc the resumed readers will ask for
        for sid, st in state["streams"].items():
            for name, r in st["readers"].items():
                if int(r["pos"]):
                    rel = self.streams[int(sid)].layout[name]["files"][int(r["file"])]
                    self._wanted.setdefault(os.path.join(self.root_dir, rel), set()).add(int(r["pos"]))

    def _check_fingerprint(self, fp: dict, G: int, N: int) -> None:
        sources = _resolve_sources(self.args)
        now = _fingerprint(self.args, sources, self.tokenizer, G, N)
        if now == fp:
            return
        diff = sorted(k for k in set(now) | set(fp) if k != "files" and now.get(k) != fp.get(k))
        details = [f"{k}: {fp.get(k)!r} -> {now.get(k)!r}" for k in diff]
        if now["files"] != fp["files"]:
            old, new = fp["files"], now["files"]
            changed = [f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
            details.append("chunk files " + ", ".join(
                f"{f} ({'missing' if f not in new else 'new' if f not in old else f'{old[f]} -> {new[f]} bytes'})"
                for f in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
        raise DataError(
            f"the data state was saved with other data settings or files ({'; '.join(details)}); it cannot resume this "
            f"stream exactly. Restore them, or set {RESET_OPTION} to restart the data stream"
        )

    # -- files ---------------------------------------------------------------------------------------
    def check_file(self, rel: str) -> str:
        path = os.path.join(self.root_dir, rel)
        try:
            now = os.path.getsize(path)
        except OSError:
            raise DataError(f"chunk file '{path}' of the data state is missing; restore it, or set {RESET_OPTION} "
                            "to restart the data stream") from None
        if now != self.sizes[rel]:
            raise DataError(f"chunk file '{path}' changed since the data state was made ({self.sizes[rel]} -> {now} "
                            f"bytes); restore it, or set {RESET_OPTION} to restart the data stream")
        return path

    def prefix_crc(self, path: str, pos: int) -> int:
        """crc32 of the first `pos` bytes of `path`; one sequential read per file for every position asked."""
        cache = self._prefixes.setdefault(path, {})
        if pos not in cache:
            cuts = sorted(self._wanted.pop(path, set()) | {pos})
            crc, done = 0, 0
            with open(path, "rb") as f:
                for cut in cuts:
                    while done < cut:
                        buf = f.read(min(8 << 20, cut - done))
                        if not buf:
                            break
                        crc = crc32(buf, crc)
                        done += len(buf)
                    cache[cut] = crc
        return cache[pos]

    def warn_skipped(self, path: str, line: int, why) -> None:
        if self._skip_warnings < 10:
            self._skip_warnings += 1
            logger.warning("skipping bad line %s:%d: %s", path, line, why)

    # -- steps and micro-batches ----------------------------------------------------------------------
    def steps(self) -> Iterator[Tuple[np.ndarray, list, dict]]:
        """Per optimizer step: this rank's sequences (its streams in order, k each), their pieces, and the state
        after the step."""
        block, i = int(self.state["block"]), int(self.state["step"])
        starts = {sid: self.state["streams"][str(sid)] for sid in self.streams}
        P, k = self.steps_per_block, self.k
        if not 0 <= i < P:
            raise DataError(f"data state step {i} does not fit prefetch_size {P}")
        gens = {sid: stream.blocks(starts[sid]) for sid, stream in self.streams.items()}
        try:
            while True:
                current = {sid: next(gen) for sid, gen in gens.items()}
                perms = {sid: self.streams[sid].permutation(block) for sid in self.streams}
                while i < P:
                    rows, pieces = [], []
                    for sid, (seqs, where, _) in current.items():
                        sel = perms[sid][i * k : (i + 1) * k]
                        rows.append(seqs[sel])
                        if self.trace:
                            pieces.extend(where[j] for j in sel)
                    i += 1
                    if i == P:
                        after = self._state(block + 1, 0, {sid: c[2] for sid, c in current.items()})
                    else:
                        after = self._state(block, i, starts)
                    yield np.concatenate(rows), pieces, after
                starts = {sid: c[2] for sid, c in current.items()}
                block, i = block + 1, 0
        finally:
            for gen in gens.values():
                gen.close()

    def _state(self, block: int, step: int, starts: dict) -> dict:
        return {
            "version": STATE_VERSION,
            "dp_rank": self.rank,
            "dp_world_size": self.world,
            "fingerprint": self.state["fingerprint"],
            "block": block,
            "step": step,
            "streams": {str(sid): starts[sid] for sid in sorted(starts)},
        }

    def micro_batches(self) -> Iterator[MicroBatch]:
        L, V, bs = self.seq_len, self.n_views, self.batch_size
        for rows, pieces, after in self.steps():
            views = np.stack([rows[:, v : v + L] for v in range(V)], axis=-1)
            for j in range(self.acc):
                last = j == self.acc - 1
                yield MicroBatch(views[j * bs : (j + 1) * bs], after if last else None,
                                 pieces[j * bs : (j + 1) * bs] if self.trace else None)


def _check_state(state: dict) -> None:
    if not isinstance(state, dict):
        raise DataError(f"the data state must be a dict (from init_dataloader_state), got {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise DataError(
            f"data state version {state.get('version')!r} is not {STATE_VERSION}; set {RESET_OPTION} to "
            "restart the data stream"
        )
    for key in ("dp_rank", "dp_world_size", "fingerprint", "block", "step", "streams"):
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
    into the pipe: ("batch", tokens, state, pieces) or ("error", ...). The pipe is private to the trainer and its
    loader: nothing else writes into it. The process leaves when the trainer closes our
    stdin, when the trainer dies (stdin reaches end-of-file, and our parent pid changes), or when the
    trainer closes the pipe.
    """
    import sys
    from multiprocessing.connection import Connection

    args, state, grad_acc_steps, fd, queue_size, parent_pid = pickle.load(sys.stdin.buffer)
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

    try:
        pipeline = DataPipeline(args, state, grad_acc_steps)
        for n, mb in enumerate(pipeline.micro_batches()):
            faults.point("data.batch", n)
            if not put(("batch", *mb)):
                os._exit(0)
    except BaseException as e:  # report everything; the trainer raises DataError with it
        report = ("error", type(e).__name__, str(e), traceback.format_exc(), isinstance(e, (DataError, ConfigError)))
        if put(report) and put(None):
            send_thread.join(timeout=30.0)  # the report reaches the pipe before we exit
        os._exit(1)


class AsyncBatchIterator:
    """Iterator over MicroBatch made by a background process and sent through a pipe; at most
    `async_queue_size` batches wait, ready, in the process.

    The process is a fresh interpreter (`python -c ...`, like multiprocessing's spawn, but it does not
    re-import the trainer's main module, so it never imports torch): nothing of the trainer's threads or
    CUDA state is forked. Waits use short timeouts and check the pipe and the process, so a dead loader is a
    DataError (with the cause when it raised), never a hang. `close()` stops and joins (or kills) it.
    """

    def __init__(self, args: DataArgs, state: dict, grad_acc_steps: int = 1):
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
        job = (args, state, grad_acc_steps, write_fd, max(1, int(args.async_queue_size)), os.getpid())
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

    def __next__(self) -> MicroBatch:
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
            return MicroBatch(*msg[1:])
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
def build_dataloader(args: DataArgs, state: dict, *, dp_rank: Optional[int] = None,
                     dp_world_size: Optional[int] = None, grad_acc_steps: int = 1) -> Iterator[Iterator[MicroBatch]]:
    """Yield an iterator of MicroBatch(tokens, state, pieces): tokens is np.int64 [batch_size, seq_len, n_views]
    (view 0 = inputs, view 1 = targets = inputs shifted by one token, ...); grad_acc_steps micro-batches make an
    optimizer step, and the last one carries the state that resumes the stream right after the step.

    Validates the state against the args and the files first (DataError / ConfigError); given `dp_rank` /
    `dp_world_size`, also that the state belongs to this rank of this layout. With args.load_async the
    micro-batches come from a background process that leaving the context stops and joins.
    """
    _check_state(state)
    for key, want in (("dp_rank", dp_rank), ("dp_world_size", dp_world_size)):
        if want is not None and state[key] != want:
            raise DataError(
                f"the data state belongs to {key}={state[key]}, this process has {key}={want}: a state of another "
                f"layout must go through reshard_data_state first"
            )
    pipeline = DataPipeline(args, state, grad_acc_steps)  # validates the state against settings and files
    if args.load_async:
        del pipeline
        it = AsyncBatchIterator(args, state, grad_acc_steps)
        try:
            yield it
        finally:
            it.close()
    else:
        gen = pipeline.micro_batches()
        try:
            yield gen
        finally:
            gen.close()


class DataTrace:
    """data.trace=true: every data-parallel rank appends one JSON line per micro-batch it consumes to
    <dump_dir>/data_trace/rank_<dp_rank>.jsonl: {"step", "micro", "dp_rank", "dp_world_size", "sequences": [[[source,
    file, line, first, end], ...], ...]} (a sequence's pieces: token ranges [first, end) of documents, identified
    by source, file relative to data.root_dir and 1-based line). A resumed run first drops the lines of steps after
    its resume step, so the trace of a finished run is the stream it trained on."""

    def __init__(self, dump_dir: str, dp_rank: int, dp_world_size: int, resume_step: int):
        from lingua.files import read_jsonl, write_jsonl

        folder = os.path.join(dump_dir, TRACE_DIR)
        os.makedirs(folder, exist_ok=True)
        self.rank, self.world = dp_rank, dp_world_size
        self.path = os.path.join(folder, f"rank_{dp_rank:05d}.jsonl")
        # Rank 0 also trims the files of ranks an earlier, larger layout had.
        others = sorted(glob.glob(os.path.join(folder, "rank_*.jsonl"))) if dp_rank == 0 else []
        for path in {self.path, *[p for p in others if int(p[-11:-6]) >= dp_world_size]}:
            if os.path.exists(path):
                write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step])
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a kill loses no line of a saved step

    def write(self, step: int, micro: int, pieces: list) -> None:
        self.file.write(json.dumps({"step": step, "micro": micro, "dp_rank": self.rank, "dp_world_size": self.world,
                                    "sequences": pieces}) + "\n")

    def close(self) -> None:
        self.file.close()


def read_trace(dump_dir: str) -> List[dict]:
    """Every line of a run's data trace (all ranks)."""
    from lingua.files import read_jsonl

    out = []
    for path in sorted(glob.glob(os.path.join(dump_dir, TRACE_DIR, "rank_*.jsonl"))):
        out.extend(read_jsonl(path))
    return out
