"""Tokenizers: bytes, sentencepiece (trained here), tiktoken (a rank file made here); their errors."""

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua.args import ConfigError
from lingua.tokenizer import BytesTokenizer, TokenizerArgs, build_tokenizer
from tests.helpers import SHAKESPEARE, load_script


def training_texts():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:200_000].split("\n\n")


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "tok.model")
    load_script("train_tokenizer").train_sentencepiece(training_texts(), path, vocab_size=500, threads=1)
    return path


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    tt = load_script("train_tokenizer")
    path = str(tmp_path_factory.mktemp("tt") / "tok.tiktoken")
    return tt.write_tiktoken_ranks(tt.train_bpe_ranks(training_texts()[:300], 320), path)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=50, deadline=None)
@given(text=TEXT, bos=st.booleans(), eos=st.booleans())
def test_bytes_roundtrip_and_specials(text, bos, eos):
    tok = BytesTokenizer()
    ids = tok.encode(text, bos, eos)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert ids == [256] * bos + list(text.encode("utf-8")) + [257] * eos
    assert tok.decode(ids) == text
    arr = tok.encode_array(text, bos, eos)
    assert arr.dtype == np.int64 and arr.tolist() == ids


def test_sentencepiece_trained_here(sp_path):
    tok = build_tokenizer(TokenizerArgs("sp", sp_path))
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (500, 1, 2)
    for text in ["To be, or not to be: that is the question.", "  two  spaces\nand a newline\t",
                 "naïve café 😀 ≥ ∑", ""]:
        ids = tok.encode(text, True, True)
        assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 500 for i in ids)
        assert tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
        assert tok.encode_array(text, False, True).tolist() == ids[1:]
    assert len(tok.encode("the king and the queen", False, False)) < len("the king and the queen")


@settings(max_examples=25, deadline=None)
@given(text=TEXT)
def test_sentencepiece_lossless(sp_path, text):
    tok = build_tokenizer(TokenizerArgs("sp", sp_path))
    assert tok.decode(tok.encode(text, True, True)) == text


def test_tiktoken_rank_file(tiktoken_path):
    tok = build_tokenizer(TokenizerArgs("tiktoken", tiktoken_path))
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (322, 320, 321)
    text = "the king <|end_of_text|> 😀 and 12345"
    ids = tok.encode(text, True, True)
    assert ids[0] == 320 and ids[-1] == 321 and ids.count(321) == 1  # special-looking text stays text
    assert tok.decode(ids) == text
    assert len(tok.encode("the the the the", False, False)) < len("the the the the")


def test_tiktoken_handmade_ranks(tmp_path):
    path = tmp_path / "hand.tiktoken"
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abab"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = build_tokenizer(TokenizerArgs("tiktoken", str(path)))
    assert tok.encode("ababab", False, False) == [257, 256]
    assert tok.n_words == 260


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer.name 'word' is unknown"):
        build_tokenizer(TokenizerArgs("word"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_tokenizer(TokenizerArgs("sp", str(tmp_path / "none.model")))
    with pytest.raises(ConfigError, match="must name a local model file"):
        build_tokenizer(TokenizerArgs("sp"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01junk")
    with pytest.raises(ConfigError, match="not a readable sentencepiece model"):
        build_tokenizer(TokenizerArgs("sp", str(junk)))
    partial = tmp_path / "partial.tiktoken"
    partial.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(100)))
    with pytest.raises(ConfigError, match="lacks 156 of the 256 single-byte tokens"):
        build_tokenizer(TokenizerArgs("tiktoken", str(partial)))
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("not base64 at all\n")
    with pytest.raises(ConfigError, match="line 1 is not"):
        build_tokenizer(TokenizerArgs("tiktoken", str(garbage)))
