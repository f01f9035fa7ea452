"""Tokenizers: `bytes` (built in), `sp` (a local sentencepiece model) and `tiktoken` (a local BPE rank file).

Every tokenizer exposes `n_words` (vocabulary size, specials included), `bos_id`, `eos_id`, `encode(text,
add_bos, add_eos) -> list[int]` and `decode(ids) -> str`. `encode_array` is the fast path the data pipeline
uses (a numpy int64 array). Model files are read from local disk only: nothing is ever downloaded.
"""

import base64
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from lingua.args import Choice, ConfigError

__all__ = [
    "TokenizerArgs",
    "Tokenizer",
    "BytesTokenizer",
    "SentencePieceTokenizer",
    "TikTokenTokenizer",
    "build_tokenizer",
    "check_tokenizer_args",
    "TOKENIZER_NAMES",
]

class TokenizerName(Choice):
    bytes = "bytes"
    sp = "sp"
    tiktoken = "tiktoken"


TOKENIZER_NAMES = tuple(n.value for n in TokenizerName)


@dataclass
class TokenizerArgs:
    name: TokenizerName = TokenizerName.bytes  # bytes (built in, 258 ids) | sp (sentencepiece) | tiktoken (BPE ranks)
    path: Optional[str] = None  # local model file for sp (.model) or tiktoken (.tiktoken rank file); unused for bytes


class Tokenizer:
    """Base class. Subclasses set `n_words`, `bos_id`, `eos_id` and implement `_encode` / `decode`."""

    n_words: int
    bos_id: int
    eos_id: int

    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = self._encode(text)
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Same ids as `encode`, as a numpy int64 array (what the data pipeline packs)."""
        return np.asarray(self.encode(text, add_bos, add_eos), dtype=np.int64)

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then bos = 256 and eos = 257. Lossless for any valid text."""

    def __init__(self):
        self.n_words = 258
        self.bos_id = 256
        self.eos_id = 257

    def _encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        out = np.empty(len(raw) + int(add_bos) + int(add_eos), dtype=np.int64)
        start = 1 if add_bos else 0
        out[start : start + len(raw)] = raw
        if add_bos:
            out[0] = self.bos_id
        if add_eos:
            out[-1] = self.eos_id
        return out

    def decode(self, ids: List[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (train one with `python setup/train_tokenizer.py`). The model must define
    bos and eos pieces (sentencepiece's defaults do)."""

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("data.tokenizer.name=sp needs the sentencepiece package: "
                              "pip install sentencepiece") from None
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            msg = f"data.tokenizer.path '{path}' is not a readable sentencepiece model: {e}"
            raise ConfigError(msg.replace("\n", " ")) from None
        self.n_words = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(
                f"data.tokenizer.path '{path}': the sentencepiece model has no bos/eos piece "
                f"(bos_id={self.bos_id}, eos_id={self.eos_id}); train it with bos_id/eos_id >= 0"
            )

    def _encode(self, text: str) -> List[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: List[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


# The pre-tokenisation pattern of cl100k / Llama 3 (contractions, letters, 1-3 digits, punctuation, spaces).
TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
BOS_PIECE = "<|begin_of_text|>"
EOS_PIECE = "<|end_of_text|>"
# tiktoken's Rust core can overflow its stack on huge runs without a split point: encode in pieces.
_TIKTOKEN_MAX_CHARS = 400_000


def load_tiktoken_ranks(path: str) -> dict:
    """Parse a tiktoken rank file (`<base64 token> <rank>` per line) from local disk."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception:
                raise ConfigError(f"data.tokenizer.path '{path}' line {lineno} "
                                  "is not '<base64 token> <rank>'") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ConfigError(
            f"data.tokenizer.path '{path}' lacks {len(missing)} of the 256 single-byte tokens "
            f"(e.g. byte {missing[0]}); a byte-level BPE rank file needs all of them"
        )
    if len(set(ranks.values())) != len(ranks):
        raise ConfigError(f"data.tokenizer.path '{path}' has duplicate ranks")
    return ranks


class TikTokenTokenizer(Tokenizer):
    """A byte-level BPE from a local tiktoken rank file; bos/eos are appended after the highest rank."""

    def __init__(self, path: str):
        try:
            import tiktoken
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("data.tokenizer.name=tiktoken needs the tiktoken package: pip install tiktoken") from None
        self.path = path
        ranks = load_tiktoken_ranks(path)
        n_base = max(ranks.values()) + 1
        self.bos_id = n_base
        self.eos_id = n_base + 1
        self.n_words = n_base + 2
        self.enc = tiktoken.Encoding(
            name=f"lingua:{os.path.basename(path)}",
            pat_str=TIKTOKEN_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={BOS_PIECE: self.bos_id, EOS_PIECE: self.eos_id},
        )

    def _encode(self, text: str) -> List[int]:
        # disallowed_special=(): text that spells "<|end_of_text|>" is ordinary text, never a special id.
        if len(text) <= _TIKTOKEN_MAX_CHARS:
            return self.enc.encode(text, allowed_special=set(), disallowed_special=())
        ids: List[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_CHARS):
            ids.extend(self.enc.encode(text[i : i + _TIKTOKEN_MAX_CHARS], allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: List[int]) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) < self.bos_id])


def check_tokenizer_args(args: TokenizerArgs, key: str = "data.tokenizer") -> None:
    """Fast checks (no model loading): a known name, and an existing file where one is needed."""
    if args.name not in TOKENIZER_NAMES:
        raise ConfigError(f"{key}.name '{args.name}' is unknown; choose one of {', '.join(TOKENIZER_NAMES)}")
    if args.name in ("sp", "tiktoken"):
        if not args.path:
            raise ConfigError(f"{key}.path must name a local model file for {key}.name={args.name}")
        if not os.path.isfile(args.path):
            raise ConfigError(f"{key}.path '{args.path}' does not exist ({key}.name={args.name})")


def build_tokenizer(args: TokenizerArgs) -> Tokenizer:
    """Build the tokenizer `args` names; ConfigError for an unknown name or a missing / unreadable file."""
    check_tokenizer_args(args)
    if args.name == "bytes":
        return BytesTokenizer()
    if args.name == "sp":
        return SentencePieceTokenizer(args.path)
    return TikTokenTokenizer(args.path)
