"""Hugging Face interop: export a checkpoint as a transformers Llama folder, and read such a folder back.

    python -m lingua.checkpoint export-hf <run>/checkpoints/0000001000 <out_dir> [--dtype bf16|fp32]
    python -m lingua.hf model-args <hf_dir>     # the model.* options that match a Llama folder
    ... checkpoint.init_ckpt_path=<hf_dir>      # start training from it (lingua.pretrained reads the folder)

The model is numerically a `LlamaForCausalLM`. The only real difference is the rotary layout: lingua rotates
the pairs (x[2i], x[2i+1]) of each head, Hugging Face rotates (x[i], x[i + head_dim/2]). So the rows of wq and
wk are permuted per head on export (and back on import); every other tensor is only renamed (docs/hf.md has
the table). An export records the lingua-only options (model.multiple_of, the tokenizer, the step, ...) under
the "lingua" key of config.json, so that eval / generate / training rebuild exactly the same model.

A Hugging Face folder is user data: only config.json (JSON) and safetensors are read, never a pickle (.bin).
Exports are written to a hidden temporary folder that is renamed to its final name at the end.
"""

import json
import logging
import math
import os
import shutil
import sys
import warnings

import torch

from lingua.args import ConfigError
from lingua.checkpoint_format import CheckpointError, read_json_object
from lingua.files import fsync_dir, fsync_file, write_json
from lingua.tokenizer import BOS_PIECE, EOS_PIECE, TIKTOKEN_PATTERN, TokenizerArgs, build_tokenizer
from lingua.transformer import LMTransformerArgs, ffn_hidden_dim

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LINGUA_KEY = "lingua"  # config.json: what lingua needs beyond the Llama config (transformers ignores it)
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file, as transformers' default "5GB"
UNAVAILABLE_TOKENIZER = "unavailable: lingua cannot rebuild this Hugging Face folder's tokenizer"
SP_FILE = "tokenizer.model"  # a sentencepiece model: lingua uses it as it is (exported, or Llama 1/2 style)
TIKTOKEN_FILE = "tokenizer.tiktoken"  # an exported tiktoken rank file


def _need(module: str):
    """Import an optional dependency (the `hf` extra), or a one-line ConfigError saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ConfigError(f"Hugging Face interop needs the {package} package: pip install {package} "
                          "(or the hf extra: pip install -e '.[hf]')") from None


# ------------------------------------------------------------------------------------------------ weights


def _to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows of each head from interleaved pairs (2i, 2i+1) to halves (i, i + head_dim/2)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def _from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of _to_hf_rows."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def weight_names(margs: LMTransformerArgs) -> list:
    """[(lingua name, HF name, heads whose q/k rows are permuted or None)], in the order tensors are written."""
    n_heads, _, n_kv_heads = margs.heads
    names = [("tok_embeddings.weight", "model.embed_tokens.weight", None)]
    for i in range(margs.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names += [
            (ours + "attention.wq.weight", theirs + "self_attn.q_proj.weight", n_heads),
            (ours + "attention.wk.weight", theirs + "self_attn.k_proj.weight", n_kv_heads),
            (ours + "attention.wv.weight", theirs + "self_attn.v_proj.weight", None),
            (ours + "attention.wo.weight", theirs + "self_attn.o_proj.weight", None),
            (ours + "feed_forward.w1.weight", theirs + "mlp.gate_proj.weight", None),
            (ours + "feed_forward.w3.weight", theirs + "mlp.up_proj.weight", None),
            (ours + "feed_forward.w2.weight", theirs + "mlp.down_proj.weight", None),
            (ours + "attention_norm.weight", theirs + "input_layernorm.weight", None),
            (ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight", None),
        ]
    names.append(("norm.weight", "model.norm.weight", None))
    if not margs.weight_tying:  # a tied model stores the matrix once, as transformers does
        names.append(("output.weight", "lm_head.weight", None))
    return names


def expected_shapes(margs: LMTransformerArgs) -> dict:
    """HF name -> the shape the model's options give it."""
    n_heads, head_dim, n_kv_heads = margs.heads
    dim, vocab = margs.dim, margs.vocab_size
    hidden = ffn_hidden_dim(dim, margs.multiple_of, margs.ffn_dim_multiplier)
    per_layer = {
        "self_attn.q_proj.weight": (n_heads * head_dim, dim),
        "self_attn.k_proj.weight": (n_kv_heads * head_dim, dim),
        "self_attn.v_proj.weight": (n_kv_heads * head_dim, dim),
        "self_attn.o_proj.weight": (dim, n_heads * head_dim),
        "mlp.gate_proj.weight": (hidden, dim),
        "mlp.up_proj.weight": (hidden, dim),
        "mlp.down_proj.weight": (dim, hidden),
        "input_layernorm.weight": (dim,),
        "post_attention_layernorm.weight": (dim,),
    }
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(margs.n_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def to_hf_state(model_sd: dict, margs: LMTransformerArgs) -> dict:
    """lingua's full state dict -> HF tensors (renamed; q/k rows permuted)."""
    clean = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for k, v in model_sd.items()}
    shapes = expected_shapes(margs)
    out = {}
    for ours, theirs, heads in weight_names(margs):
        if ours not in clean:
            raise CheckpointError(f"the checkpoint has no tensor {ours}")
        w = clean[ours]
        if tuple(w.shape) != shapes[theirs]:
            raise CheckpointError(f"the checkpoint's {ours} has shape {list(w.shape)}, its config gives "
                                  f"{list(shapes[theirs])}")
        out[theirs] = _to_hf_rows(w, heads) if heads else w.contiguous()
    return out


def from_hf_state(hf_sd: dict, margs: LMTransformerArgs) -> dict:
    """HF tensors -> lingua's full state dict (a tied model gets output.weight = tok_embeddings.weight)."""
    out = {}
    for ours, theirs, heads in weight_names(margs):
        out[ours] = _from_hf_rows(hf_sd[theirs], heads) if heads else hf_sd[theirs]
    if margs.weight_tying:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ------------------------------------------------------------------------------------------- reading a folder


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_hf_config(folder: str) -> dict:
    """config.json of a Llama folder whose model lingua's transformer reproduces; CheckpointError otherwise."""
    path = os.path.join(folder, CONFIG_FILE)
    cfg = read_json_object(path, path, missing=f"{folder}: no {CONFIG_FILE} (not a Hugging Face model folder)")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise CheckpointError(f"{folder} is not a Llama model (model_type {cfg.get('model_type')!r}, architectures "
                              f"{archs}); lingua reads LlamaForCausalLM folders only")
    ints = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    bad = [k for k in ints if not _positive_int(cfg.get(k))]
    bad += [k for k in ("num_key_value_heads", "head_dim", "max_position_embeddings")
            if cfg.get(k) is not None and not _positive_int(cfg[k])]
    bad += [k for k in ("rms_norm_eps", "rope_theta") if k in cfg and not _positive_number(cfg[k])]
    if bad:
        raise CheckpointError(f"{path}: missing or invalid {', '.join(bad)}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 / 4
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if isinstance(rope, dict) and "rope_theta" in rope and not _positive_number(rope["rope_theta"]):
        raise CheckpointError(f"{path}: invalid rope_parameters.rope_theta")
    unsupported = [
        f"rope type {rope_type!r}" if rope_type not in (None, "default") else "",
        f"hidden_act {cfg.get('hidden_act')!r}" if cfg.get("hidden_act", "silu") != "silu" else "",
        "attention_bias" if cfg.get("attention_bias") else "",
        "mlp_bias" if cfg.get("mlp_bias") else "",
    ]
    unsupported = [u for u in unsupported if u]
    if unsupported:
        raise CheckpointError(f"{folder}: lingua's transformer has no {', '.join(unsupported)} (a plain Llama only)")
    return cfg


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _lingua_section(cfg: dict, key: str) -> dict:
    """config.json["lingua"][key] when an export wrote it (a dict), else {}."""
    extra = cfg.get(LINGUA_KEY)
    section = extra.get(key) if isinstance(extra, dict) else None
    return section if isinstance(section, dict) else {}


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def _ffn_options(dim: int, hidden: int, saved: dict) -> tuple:
    """(multiple_of, ffn_dim_multiplier) giving the SwiGLU width `hidden` through ffn_hidden_dim: the exported
    options when they still give it, else the plainest ones that do."""
    candidates = [(saved.get("multiple_of"), saved.get("ffn_dim_multiplier"))]
    candidates += [(m, None) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)]
    base = int(2 * (4 * dim) / 3)
    # always works: a multiplier scaling the base width to at most `hidden`, rounded up to hidden itself
    candidates.append((hidden, None if base <= hidden else hidden / base))
    for multiple_of, mult in candidates:
        if _positive_int(multiple_of) and (mult is None or _positive_number(mult)) \
                and ffn_hidden_dim(dim, multiple_of, mult) == hidden:
            return multiple_of, mult
    raise CheckpointError(f"intermediate_size {hidden} cannot be expressed with model.multiple_of")  # unreachable


def model_options(cfg: dict, folder: str) -> dict:
    """The lingua model options (LMTransformerArgs fields) of a checked Llama config."""
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // n_heads
    if n_heads * head_dim != dim:
        raise CheckpointError(f"{folder}: hidden_size {dim} != num_attention_heads {n_heads} x head_dim {head_dim}; "
                              "lingua's attention needs them equal")
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads or head_dim % 2:
        raise CheckpointError(f"{folder}: num_attention_heads {n_heads}, num_key_value_heads {n_kv_heads}, head_dim "
                              f"{head_dim}: heads must be a multiple of kv heads and head_dim even")
    multiple_of, mult = _ffn_options(dim, cfg["intermediate_size"], _lingua_section(cfg, "model"))
    return dict(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads,
        multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg), max_seqlen=int(cfg.get("max_position_embeddings") or 2048),
        vocab_size=cfg["vocab_size"], weight_tying=bool(cfg.get("tie_word_embeddings", False)),
    )


def _tokenizer_of(cfg: dict, folder: str) -> dict:
    """lingua tokenizer options for the folder: the exported ones, else a sentencepiece tokenizer.model, else a
    name that build_tokenizer refuses (with the reason; ModelSource says it in full)."""
    saved = _lingua_section(cfg, "data").get("tokenizer")
    if isinstance(saved, dict) and saved.get("name") == "bytes":
        return {"name": "bytes", "path": None}
    if isinstance(saved, dict) and saved.get("name") in ("sp", "tiktoken"):
        name = os.path.basename(str(saved.get("path")))  # a file inside the folder, nowhere else
        return {"name": saved["name"], "path": os.path.join(folder, name)}
    if os.path.isfile(os.path.join(folder, SP_FILE)):
        return {"name": "sp", "path": os.path.join(folder, SP_FILE)}
    return {"name": UNAVAILABLE_TOKENIZER, "path": None}


def tokenizer_problem(folder: str) -> str:
    return (f"{folder} was not exported by lingua and has no sentencepiece {SP_FILE}: lingua cannot rebuild its "
            "tokenizer (tokenizer.json), so it cannot encode text for this model; use it with transformers, or "
            "export a lingua checkpoint (python -m lingua.checkpoint export-hf)")


def hf_params(folder: str) -> tuple:
    """(params, step) of a Llama folder: a lingua-style config {"model": ..., "data": {"tokenizer": ...}} built
    from config.json, and the training step an export recorded (None for a foreign folder)."""
    cfg = read_hf_config(folder)
    data = {k: v for k, v in _lingua_section(cfg, "data").items() if k != "tokenizer"}
    data["tokenizer"] = _tokenizer_of(cfg, folder)
    step = cfg[LINGUA_KEY].get("step") if isinstance(cfg.get(LINGUA_KEY), dict) else None
    step = step if _positive_int(step) or (isinstance(step, int) and step == 0) else None
    return {"model": model_options(cfg, folder), "data": data}, step


def model_overrides(folder: str) -> dict:
    """{"model.dim": ..., ...}: the training options whose model is the folder's (to paste on a command line)."""
    options, _ = hf_params(os.path.abspath(folder))
    keys = ("dim", "n_layers", "n_heads", "head_dim", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
            "rope_theta", "vocab_size", "weight_tying", "max_seqlen")
    return {f"model.{k}": options["model"][k] for k in keys}


def architecture_mismatches(options: dict, margs: LMTransformerArgs) -> list:
    """What differs between a folder's model options and a run's model, as 'model.key: X in the folder, Y here'
    (max_seqlen, the seed and init options do not change the weights' meaning)."""
    n_heads, head_dim, n_kv_heads = margs.heads
    ours = {"dim": margs.dim, "n_layers": margs.n_layers, "n_heads": n_heads, "head_dim": head_dim,
            "n_kv_heads": n_kv_heads, "norm_eps": margs.norm_eps, "rope_theta": margs.rope_theta,
            "vocab_size": margs.vocab_size, "weight_tying": margs.weight_tying}
    names = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "head_dim": "head_dim", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta", "vocab_size": "vocab_size", "weight_tying": "tie_word_embeddings"}
    diff = [f"model.{k}: {options[k]!r} in the folder ({names[k]}), {v!r} here" for k, v in ours.items()
            if options[k] != v and not (k == "vocab_size" and v < 0)]
    theirs = ffn_hidden_dim(options["dim"], options["multiple_of"], options["ffn_dim_multiplier"])
    mine = ffn_hidden_dim(margs.dim, margs.multiple_of, margs.ffn_dim_multiplier)
    if theirs != mine:
        diff.append(f"intermediate size (model.multiple_of / model.ffn_dim_multiplier): {theirs} in the folder, "
                    f"{mine} here")
    return diff


def _weight_files(folder: str) -> dict:
    """HF tensor name -> safetensors file, from the index or the single file; CheckpointError naming what is
    missing. Pickled weights (.bin) are refused."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a {tensor: file} object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is unreadable ({type(e).__name__}: {e})") from None
        for name in sorted(set(weight_map.values())):
            if os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index} lists {name!r}: not a .safetensors file of the folder")
            if not os.path.isfile(os.path.join(folder, name)):
                raise CheckpointError(f"{folder}: shard {name} listed in {INDEX_FILE} is missing")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return {None: single}  # the file's own header lists its tensors
    pickles = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise CheckpointError(f"{folder} holds only pickled weights ({pickles[0]}); lingua reads safetensors only "
                              "(re-save the model with save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def read_hf_weights(folder: str, margs: LMTransformerArgs) -> dict:
    """lingua's full state dict (fp32) from a Llama folder whose config gave `margs`: every tensor present with its
    shape, nothing unexpected; CheckpointError naming the first problem."""
    safetensors = _need("safetensors")
    files = _weight_files(folder)
    shapes = expected_shapes(margs)
    if margs.weight_tying:
        shapes.pop("lm_head.weight")
    hf_sd = {}
    for path in sorted(set(files.values())):
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                present = set(f.keys())
                # the names this file holds: all of a single file, those the index puts here for shards
                names = present if None in files else {k for k, v in files.items() if v == path}
                for name in sorted(names):
                    if name.endswith("rotary_emb.inv_freq") or (margs.weight_tying and name == "lm_head.weight"):
                        continue  # a buffer some old exports saved; the tied copy of the embeddings
                    if name not in shapes:
                        raise CheckpointError(f"{path}: unexpected tensor {name} (not part of a plain Llama)")
                    if name not in present:
                        raise CheckpointError(f"{path}: tensor {name} listed in {INDEX_FILE} is not in the file")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != shapes[name]:
                        raise CheckpointError(f"{path}: {name} has shape {list(shape)}, config.json gives "
                                              f"{list(shapes[name])}")
                    hf_sd[name] = f.get_tensor(name).float()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 (a garbled file raises SafetensorError, OSError, ...)
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    missing = [n for n in shapes if n not in hf_sd]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))
    return from_hf_state(hf_sd, margs)


# ---------------------------------------------------------------------------------------------- tokenizers


def _byte_chars() -> list:
    """The printable character standing for each byte in byte-level BPE vocabularies (GPT-2's table, which
    tokenizers' ByteLevel uses): printable Latin-1 bytes stand for themselves, the others for 256, 257, ..."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _special(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False)


def _add_bos(tok, bos: str, bos_id: int) -> None:
    """Like Llama's tokenizers (and lingua's generate): encode() starts with bos; eos is left to the caller."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])


def bytes_tokenizer():
    """lingua's bytes tokenizer as a tokenizers.Tokenizer: a BPE with no merges and only the 256 byte-fallback
    tokens <0x00>..<0xFF> (ids = byte values), so every character falls back to its UTF-8 bytes; bos 256, eos 257."""
    tokenizers = _need("tokenizers")
    from tokenizers import decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.add_special_tokens([_special(BOS_PIECE), _special(EOS_PIECE)])  # ids 256, 257
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    _add_bos(tok, BOS_PIECE, 256)
    return tok, BOS_PIECE, EOS_PIECE, None


def tiktoken_tokenizer(path: str):
    """A tiktoken rank file as a byte-level BPE: the same pre-split pattern, the ranks as the vocabulary, and
    every split (a, b) of a token into two tokens as a merge ranked by the token (what tiktoken applies)."""
    tokenizers = _need("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers

    from lingua.tokenizer import load_tiktoken_ranks

    ranks = load_tiktoken_ranks(path)
    chars = _byte_chars()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], text[left], text[right]))
    merges.sort()
    model = models.BPE(vocab={text[t]: r for t, r in ranks.items()}, merges=[(a, b) for _, _, a, b in merges],
                       ignore_merges=True)  # a whole pre-split piece in the vocabulary is one token, as in tiktoken
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TIKTOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    bos_id = max(ranks.values()) + 1
    tok.add_special_tokens([_special(BOS_PIECE), _special(EOS_PIECE)])  # ids bos_id, bos_id + 1
    _add_bos(tok, BOS_PIECE, bos_id)
    return tok, BOS_PIECE, EOS_PIECE, None


def sentencepiece_tokenizer(path: str):
    """A sentencepiece BPE model as a tokenizers.Tokenizer with the same pieces and ids: whitespace becomes '▁'
    (after sentencepiece's dummy prefix), characters outside the vocabulary fall back to byte pieces. Options that
    would encode differently are refused."""
    tokenizers = _need("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ConfigError("exporting a sentencepiece tokenizer needs the protobuf package: pip install protobuf"
                          ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    refused = [
        # a unigram model's control pieces (<s>) would match text in tokenizers' Unigram: only BPE is exact
        "" if trainer.model_type == 2 else f"model type {trainer.model_type} (unigram 1, word 3, char 4)",
        "remove_extra_whitespaces" if norm.remove_extra_whitespaces else "",
        "" if norm.escape_whitespaces else "escape_whitespaces=false",
        "treat_whitespace_as_suffix" if trainer.treat_whitespace_as_suffix else "",
        "" if norm.name == "identity" or norm.precompiled_charsmap else f"normalization {norm.name!r} (no charsmap)",
    ]
    refused = [r for r in refused if r]
    if refused:
        raise ConfigError(f"sentencepiece model {path}: {', '.join(refused)}: tokenizer.json cannot reproduce it "
                          "exactly (export-hf takes BPE models with setup/train_tokenizer.py's options)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    normal, unknown, control, user_defined = 1, 2, 3, 4  # sentencepiece's piece types (5 unused, 6 byte)
    unk_id = next((i for i, p in enumerate(pieces) if p[2] == unknown), None)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    # sentencepiece merges the adjacent pair whose union is the best-scored piece: every split of a normal piece
    # into two pieces is a merge, ranked by the union's score (control and byte pieces never come from text)
    mergeable = {p for p, _, t in pieces if t in (normal, user_defined)}
    merges = []
    for i, (piece, score, t) in enumerate(pieces):
        if t != normal:
            continue
        for j in range(1, len(piece)):
            if piece[:j] in mergeable and piece[j:] in mergeable:
                merges.append((-score, i, piece[:j], piece[j:]))
    merges.sort()
    unk = pieces[unk_id][0] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], unk_token=unk, fuse_unk=True,
                       byte_fallback=trainer.byte_fallback)
    tok = tokenizers.Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(Regex(" "), "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    specials = [p for p, _, t in pieces if t in (control, unknown)]
    tok.add_special_tokens([_special(p) for p in specials])
    bos, eos = pieces[trainer.bos_id][0], pieces[trainer.eos_id][0]
    _add_bos(tok, bos, trainer.bos_id)
    return tok, bos, eos, unk


# Texts the export encodes both ways: a tokenizer.json that gives other ids than lingua's is never written.
_CHECK_TEXTS = ["", "Hello, world!", "  two  spaces\tand\ttabs\n\nnew lines  ", "ROMEO: O, she doth teach the torches",
                "naïve café, Grüße, 東京, emoji 🌍🚀", "1234567 3.14159 x=42;", "<|end_of_text|> <s> </s>", " leading"]


def write_tokenizer(tok_args: TokenizerArgs, out_dir: str) -> dict:
    """Write tokenizer.json + tokenizer_config.json (and a copy of the sp / tiktoken model file) for lingua's
    tokenizer; returns {"tokenizer": lingua's options relative to the folder, "bos_token_id", "eos_token_id"}."""
    lingua_tok = build_tokenizer(tok_args)
    record = {"name": str(tok_args.name), "path": None}
    if tok_args.name == "bytes":
        tok, bos, eos, unk = bytes_tokenizer()
    elif tok_args.name == "sp":
        tok, bos, eos, unk = sentencepiece_tokenizer(tok_args.path)
        record["path"] = SP_FILE
    else:
        tok, bos, eos, unk = tiktoken_tokenizer(tok_args.path)
        record["path"] = TIKTOKEN_FILE
    tok.encode_special_tokens = True  # as split_special_tokens below: specials in text are text
    for text in _CHECK_TEXTS:
        theirs = tok.encode(text, add_special_tokens=False).ids
        ours = lingua_tok.encode(text, add_bos=False, add_eos=False)
        if theirs != ours:
            raise CheckpointError(f"the {tok_args.name} tokenizer {tok_args.path or ''} cannot be exported exactly: "
                                  f"{text!r} encodes to {ours} in lingua, {theirs} in tokenizer.json")
    tok.encode_special_tokens = False
    if record["path"]:
        shutil.copyfile(tok_args.path, os.path.join(out_dir, record["path"]))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, whatever the model type
        "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "split_special_tokens": True,  # text that spells "<|end_of_text|>" stays text, as in lingua
        "clean_up_tokenization_spaces": False,
        "model_max_length": 10**30,  # no limit
    }
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return {"tokenizer": record, "bos_token_id": lingua_tok.bos_id, "eos_token_id": lingua_tok.eos_id}


# ------------------------------------------------------------------------------------------------- export


def hf_config(margs: LMTransformerArgs, dtype: torch.dtype, bos_id: int, eos_id: int, lingua: dict) -> dict:
    n_heads, head_dim, n_kv_heads = margs.heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": margs.dim,
        "intermediate_size": ffn_hidden_dim(margs.dim, margs.multiple_of, margs.ffn_dim_multiplier),
        "num_hidden_layers": margs.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": margs.max_seqlen,
        "rms_norm_eps": margs.norm_eps,
        "rope_theta": margs.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": margs.rope_theta},  # transformers 5
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": margs.weight_tying,
        "vocab_size": margs.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": str(dtype).replace("torch.", ""),
        "use_cache": True,
        LINGUA_KEY: lingua,
    }


def _shards(tensors: dict, max_bytes: int) -> list:
    """Consecutive groups of tensor names of at most max_bytes each (a larger tensor gets a file of its own)."""
    groups, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _write_weights(tensors: dict, folder: str, max_shard_size: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + the index beyond max_shard_size (transformers'
    layout)."""
    from safetensors.torch import save_file

    groups = _shards(tensors, max_shard_size)
    if len(groups) == 1:
        save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


def export(ckpt_dir: str, out_dir: str, dtype: str = "fp32", max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write a transformers LlamaForCausalLM folder for a committed checkpoint (read without a process group):
    config.json, generation_config.json, safetensors weights and the tokenizer. The folder appears complete or
    not at all: everything is written to a hidden sibling folder that is renamed at the end. Returns out_dir."""
    _need("safetensors")
    _need("tokenizers")
    from lingua.checkpoint import full_model_state, read_params, validate_checkpoint
    from lingua.pretrained import model_args_from_params

    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype must be fp32 or bf16, not {dtype!r}")
    target = torch.float32 if dtype == "fp32" else torch.bfloat16
    ckpt_dir, out_dir = os.path.abspath(ckpt_dir), os.path.abspath(out_dir)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"{out_dir} already exists and is not an empty folder; remove it or choose another")
    record = validate_checkpoint(ckpt_dir, checksums=True)  # never export a corrupt file
    params = read_params(ckpt_dir)
    margs = model_args_from_params(params)
    margs.validate()
    data = dict(params.get("data") or {})
    tok_args = TokenizerArgs(**(data.get("tokenizer") or {}))

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous export killed half-way
    os.makedirs(tmp)
    try:
        tok = write_tokenizer(tok_args, tmp)
        with warnings.catch_warnings():  # DCP notes that it reads without a process group: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            state = full_model_state(ckpt_dir)
        tensors = {k: v.to(target) for k, v in to_hf_state(state, margs).items()}
        _write_weights(tensors, tmp, max_shard_size)
        data["tokenizer"] = tok["tokenizer"]
        lingua = {"format_version": FORMAT_VERSION, "step": int(record["step"]), "source": ckpt_dir,
                  "model": {k: str(v) if hasattr(v, "value") else v for k, v in vars(margs).items()}, "data": data}
        write_json(os.path.join(tmp, CONFIG_FILE),
                   hf_config(margs, target, tok["bos_token_id"], tok["eos_token_id"], lingua))
        write_json(os.path.join(tmp, "generation_config.json"),
                   {"bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"]})
        for name in os.listdir(tmp):  # durable before the folder gets its final name
            fsync_file(os.path.join(tmp, name))
        fsync_dir(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above): rename needs the name free
        os.rename(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def parse_size(text) -> int:
    """'5GB', '200MB', '10KB' or a number of bytes; ConfigError otherwise."""
    value = str(text).strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if value.endswith(unit):
            value, scale = value[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = int(float(value) * scale)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} is not a size such as 5GB, 200MB or 1000000")
    return size


def export_cli(args) -> int:
    """`python -m lingua.checkpoint export-hf PATH OUT [--dtype]`: 0, or 1 with one `error: ...` line on stderr."""
    try:
        max_shard = parse_size(getattr(args, "max_shard_size", None) or DEFAULT_MAX_SHARD_SIZE)
        out = export(args.path, args.out, args.dtype or "fp32", max_shard)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lingua.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("model-args", help="print the model.* training options matching a Llama folder")
    p.add_argument("path")
    args = parser.parse_args(argv)
    try:
        overrides = model_overrides(args.path)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={_cli_value(v)}" for k, v in overrides.items()))
    return 0


def _cli_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return f"{v:.1f}"
    return repr(v) if isinstance(v, float) else str(v)


if __name__ == "__main__":
    raise SystemExit(main())
