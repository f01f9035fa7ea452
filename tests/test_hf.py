"""Hugging Face interop (lingua/hf.py, the "hf" kind of lingua/pretrained.py): export to a transformers Llama
folder, import one as training init, eval / generate from one, tokenizers, and bad input.

Models are tiny and built from configs (no hub, no network). The e2e tests share one trained run and one set of
step-0 checkpoints written by lingua's own CheckpointManager in a subprocess (the real format, no training).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lingua import hf
from lingua.args import ConfigError
from lingua.checkpoint import CheckpointError, full_model_state
from lingua.pretrained import check_init_source, find_model, load_weights
from lingua.tokenizer import BytesTokenizer, TokenizerArgs, build_tokenizer
from lingua.transformer import LMTransformer, LMTransformerArgs
from tests.helpers import REPO, SHAKESPEARE, clean_env, load_script, losses, make_corpus, output, run_train, tiny_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

TEXTS = ["", "Hello, world!", "ROMEO: O, she doth teach the torches to burn bright!", "naïve café, Grüße, 東京 🌍🚀",
         "  two  spaces\tand\ttabs\n\nnew lines  ", "1234567 3.14 x=42;", "<|end_of_text|> <s> </s> <0x41>", " x"]
PROMPTS = ["ROMEO:", "To be, or not", "First Citizen:\nBefore"]
# full_model_state reads a checkpoint without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def assert_same_logits(ours, theirs, vocab: int, what: str, atol: float = 1e-4) -> None:
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    diff = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    print(f"{what}: max |logit difference| {diff:.2e}")
    assert diff < atol, f"{what}: logits differ by {diff}"


def lingua_model(ckpt: str) -> LMTransformer:
    """The project's model with a checkpoint's weights (plain module, no process group)."""
    model = LMTransformer(find_model(ckpt).model_args)
    model.load_state_dict(full_model_state(ckpt))
    return model.eval()


def hf_folder(path, **config) -> str:
    """A randomly initialised LlamaForCausalLM saved with save_pretrained (safetensors)."""
    base = dict(vocab_size=258, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=256,
                eos_token_id=257, initializer_range=0.25)
    base.update(config)
    max_shard_size = base.pop("max_shard_size", "5GB")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**base)).save_pretrained(str(path), max_shard_size=max_shard_size)
    return str(path)


# ------------------------------------------------------------------------------------------- unit tests


def test_rotary_permutation_gives_hf_numerics():
    """lingua's interleaved-pair RoPE equals HF's half rotation once q/k rows are permuted; without it, not."""
    margs = LMTransformerArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, multiple_of=16, max_seqlen=64,
                              vocab_size=300, rope_theta=5e5, norm_eps=1e-6, ffn_dim_multiplier=1.3, seed=1)
    ours = LMTransformer(margs)
    ours.init_weights()
    cfg = hf.hf_config(margs, torch.float32, 1, 2, {})
    cfg.pop("lingua")
    theirs = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    state = hf.to_hf_state(ours.state_dict(), margs)
    theirs.load_state_dict(state)
    assert_same_logits(ours.eval(), theirs, 300, "in-process GQA model")
    back = hf.from_hf_state(state, margs)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    # the permutation matters: plain renaming gives other logits
    plain = {theirs_name: ours.state_dict()[ours_name] for ours_name, theirs_name, _ in hf.weight_names(margs)}
    theirs.load_state_dict(plain)
    ids = torch.randint(0, 300, (1, 32))
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("dim,hidden", [(32, 96), (32, 64), (48, 128), (4096, 11008), (4096, 14336), (64, 171)])
def test_intermediate_size_maps_to_lingua_options(dim, hidden):
    from lingua.transformer import ffn_hidden_dim

    multiple_of, mult = hf._ffn_options(dim, hidden, {})
    assert ffn_hidden_dim(dim, multiple_of, mult) == hidden


def test_bytes_tokenizer_folder(tmp_path):
    """tokenizer.json for the bytes tokenizer: ids = UTF-8 bytes, bos 256 first (as generate adds it), eos 257;
    text that spells a special token stays bytes, as in lingua."""
    hf.write_tokenizer(TokenizerArgs(name="bytes"), str(tmp_path))
    theirs, ours = AutoTokenizer.from_pretrained(str(tmp_path)), BytesTokenizer()
    assert (theirs.bos_token_id, theirs.eos_token_id) == (256, 257)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, False, False)
        assert theirs(text)["input_ids"] == ours.encode(text, True, False)
        assert theirs.decode(ours.encode(text), skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A sentencepiece BPE, a sentencepiece unigram and a tiktoken rank file trained here on Shakespeare."""
    tt = load_script("train_tokenizer")
    with open(SHAKESPEARE) as f:
        paras = [p for p in f.read().split("\n\n") if p.strip()][:1500]
    d = tmp_path_factory.mktemp("tok")
    return {
        "sp": tt.train_sentencepiece(iter(paras), str(d / "sp.model"), vocab_size=500, threads=1),
        "unigram": tt.train_sentencepiece(iter(paras), str(d / "uni.model"), vocab_size=500, model_type="unigram",
                                          threads=1),
        "tiktoken": tt.write_tiktoken_ranks(tt.train_bpe_ranks(iter(paras[:300]), 300), str(d / "t.tiktoken")),
    }


def test_byte_level_table_is_tokenizers_own():
    from tokenizers import pre_tokenizers

    chars = hf._byte_chars()
    assert len(set(chars)) == 256 and set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ"


@pytest.mark.parametrize("name", ["sp", "tiktoken"])
def test_sp_and_tiktoken_tokenizer_folders(name, tokenizer_files, tmp_path):
    hf.write_tokenizer(TokenizerArgs(name=name, path=tokenizer_files[name]), str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = build_tokenizer(TokenizerArgs(name, tokenizer_files[name]))
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    with open(SHAKESPEARE) as f:
        held_out = f.read().split("\n\n")[2000:2030]  # text the tokenizers were not trained on
    for text in TEXTS + held_out:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, False, False), text
        assert theirs(text)["input_ids"] == ours.encode(text, True, False)
        assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == ours.decode(ours.encode(text))


def test_unigram_sentencepiece_refused(tokenizer_files, tmp_path):
    with pytest.raises(ConfigError, match="model type 1 .*cannot reproduce it exactly"):
        hf.write_tokenizer(TokenizerArgs(name="sp", path=tokenizer_files["unigram"]), str(tmp_path))
    assert not os.listdir(tmp_path)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_folders_one_clear_line(tmp_path):
    good = hf_folder(tmp_path / "good")

    def load(path):
        source = find_model(path)
        load_weights(source, LMTransformer(source.model_args))

    load(good)  # the reference: loads

    (tmp_path / "gpt2").mkdir()
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "vocab_size": 258}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(CheckpointError) as e:
        find_model(str(tmp_path / "gpt2"))
    assert "is not a Llama model" in _one_line(e) and "gpt2" in _one_line(e)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        find_model(str(tmp_path / "empty"))
    assert "config.json" in _one_line(e)

    (tmp_path / "hostile").mkdir()
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    cfg.update(rms_norm_eps="tiny", num_key_value_heads=-2)
    (tmp_path / "hostile" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        find_model(str(tmp_path / "hostile"))
    assert "missing or invalid num_key_value_heads, rms_norm_eps" in _one_line(e)

    (tmp_path / "scaled").mkdir()  # a rope variant lingua does not have
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no rope type 'linear'"):
        find_model(str(tmp_path / "scaled"))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load(str(no_weights))
    assert "no model.safetensors" in _one_line(e) and str(no_weights) in _one_line(e)

    (no_weights / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never unpickled
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\); lingua reads safetensors"):
        load(str(no_weights))

    # config.json says one thing, the safetensors another
    wrong = tmp_path / "wrong_shape"
    hf_folder(wrong, intermediate_size=128)
    (wrong / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load(str(wrong))
    assert "mlp.down_proj.weight has shape [32, 128], config.json gives [32, 96]" in _one_line(e)

    garbled = tmp_path / "garbled"
    hf_folder(garbled)
    (garbled / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as e:
        load(str(garbled))
    assert "not a readable safetensors file" in _one_line(e)

    sharded = hf_folder(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(n for n in os.listdir(sharded) if n.startswith("model-"))
    assert len(shards) > 2 and os.path.exists(os.path.join(sharded, hf.INDEX_FILE))
    load(sharded)
    os.remove(os.path.join(sharded, shards[1]))
    with pytest.raises(CheckpointError) as e:
        load(sharded)
    assert f"shard {shards[1]} listed in model.safetensors.index.json is missing" in _one_line(e)

    # a hostile index cannot point outside the folder
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "../good/model.safetensors"
    (tmp_path / "sharded" / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a .safetensors file of the folder"):
        load(sharded)


def test_init_source_checks_architecture(tmp_path):
    folder = hf_folder(tmp_path / "m", tie_word_embeddings=True, rope_theta=50000.0)
    overrides = hf.model_overrides(folder)
    assert overrides["model.weight_tying"] is True and overrides["model.rope_theta"] == 50000.0
    margs = LMTransformerArgs(**{k.split(".", 1)[1]: v for k, v in overrides.items()})
    assert check_init_source(folder, margs).kind == "hf"
    margs.vocab_size = -1  # resolved from the tokenizer later: not compared here...
    check_init_source(folder, margs)
    margs.vocab_size = 300  # ...but loading into a model of another vocabulary says so
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight has shape \[258, 32\], the model \[300, 32\]"):
        load_weights(find_model(folder), LMTransformer(margs))
    bad = LMTransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=256, vocab_size=300,
                            rope_theta=50000.0, norm_eps=1e-5, max_seqlen=64)
    with pytest.raises(ConfigError) as e:
        check_init_source(folder, bad)
    msg = _one_line(e)
    assert "holds another architecture" in msg and folder in msg
    for part in ("model.dim: 32 in the folder (hidden_size), 64 here", "model.n_kv_heads: 2", "model.vocab_size",
                 "model.weight_tying"):
        assert part in msg, msg
    with pytest.raises(ConfigError, match="checkpoint.init_ckpt_path: .*is not a checkpoint folder"):
        check_init_source(str(tmp_path), bad)


def test_model_args_cli(tmp_path, capsys):
    folder = hf_folder(tmp_path / "m", intermediate_size=64)
    assert hf.main(["model-args", folder]) == 0
    printed = capsys.readouterr().out.split()
    assert "model.dim=32" in printed and "model.n_kv_heads=2" in printed and "model.weight_tying=false" in printed
    from lingua.args import load_config

    margs = load_config(LMTransformerArgs, None, [p.split(".", 1)[1] for p in printed])
    assert not hf.architecture_mismatches(find_model(folder).params["model"], margs)
    assert hf.main(["model-args", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no config.json (not a Hugging Face model folder)"


def test_foreign_folder_tokenizer(tmp_path, tokenizer_files):
    """A foreign folder's tokenizer.json cannot be rebuilt by lingua (said in one line when a tokenizer is needed);
    a sentencepiece tokenizer.model (Llama 1/2 style) is used as it is."""
    folder = hf_folder(tmp_path / "m")
    source = find_model(folder)
    assert source.step is None
    with pytest.raises(CheckpointError) as e:
        source.tokenizer_args
    assert "cannot rebuild its tokenizer" in _one_line(e) and folder in _one_line(e)
    shutil.copyfile(tokenizer_files["sp"], os.path.join(folder, "tokenizer.model"))
    assert find_model(folder).tokenizer_args == TokenizerArgs("sp", os.path.join(folder, "tokenizer.model"))


def test_export_cli_bad_input(tmp_path, capsys):
    from lingua.checkpoint import main

    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist"),
        ([str(tmp_path), str(tmp_path / "out")], "no commit record"),
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    cases.append(([str(tmp_path), str(tmp_path / "busy")], "already exists and is not an empty folder"))
    for argv, expected in cases:
        assert main(["export-hf", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("20KB") == 20_000 and hf.parse_size(123) == 123
    with pytest.raises(ConfigError, match="not a size"):
        hf.parse_size("lots")


# ------------------------------------------------------------------------------------ real checkpoints (e2e)


def write_checkpoints(specs: dict) -> None:
    """Subprocess body: for each {dump_dir: {"model": {...}, "tokenizer": {...}}}, a step-0 checkpoint of the model
    initialised from its seed, saved by lingua's CheckpointManager (one process, gloo): the real format."""
    import dataclasses

    from lingua.checkpoint import CheckpointArgs, CheckpointManager, TrainState
    from lingua.distributed import DistributedArgs, destroy, setup_torch_distributed
    from lingua.optim import OptimArgs, build_optimizer
    from lingua.transformer import build_model

    dargs = DistributedArgs()
    dist_state = setup_torch_distributed(dargs)
    try:
        for dump, spec in specs.items():
            tok = build_tokenizer(TokenizerArgs(**spec["tokenizer"]))
            margs = LMTransformerArgs(vocab_size=tok.n_words, **spec["model"])
            model = build_model(margs, dist_state, dargs, init=True)
            _, scheduler = build_optimizer(model, OptimArgs(), 10)
            params = {"model": dataclasses.asdict(margs), "data": {"tokenizer": spec["tokenizer"]}}
            manager = CheckpointManager(CheckpointArgs(), dump, dist_state, json.loads(json.dumps(params)))
            manager.prepare()
            assert manager.save(model, None, TrainState(scheduler), ["dump"])
            manager.close()
    finally:
        destroy()


VARIANTS = {
    # tied embeddings, grouped-query attention, ffn_dim_multiplier, non-default rope_theta and norm_eps
    "tied_gqa": dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=16,
                     weight_tying=True, rope_theta=500000.0, norm_eps=1e-6, max_seqlen=64, seed=3),
    # untied, multi-head attention, no multiplier, defaults
    "untied_mha": dict(dim=32, n_layers=2, n_heads=4, multiple_of=32, max_seqlen=64, seed=4),
}
TOKENIZED = {"sp": dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, max_seqlen=64),
             "tiktoken": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=32, max_seqlen=64,
                              weight_tying=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_files):
    root = tmp_path_factory.mktemp("ckpts")
    specs, paths = {}, {}
    for name, model in {**VARIANTS, **TOKENIZED}.items():
        tok = {"name": name, "path": tokenizer_files[name]} if name in TOKENIZED else {"name": "bytes", "path": None}
        specs[str(root / name)] = {"model": model, "tokenizer": tok}
        paths[name] = str(root / name / "checkpoints" / "0000000000")
    code = "import json, sys; from tests.test_hf import write_checkpoints; write_checkpoints(json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(specs)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, output(proc)[-3000:]
    return paths


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(VARIANTS) + list(TOKENIZED))
def test_export_variants_match_hf_and_round_trip(name, checkpoints, tokenizer_files, tmp_path):
    ckpt, out = checkpoints[name], str(tmp_path / "hf")
    sharded = name == "untied_mha"
    hf.export(ckpt, out, max_shard_size=30_000 if sharded else hf.DEFAULT_MAX_SHARD_SIZE)
    files = sorted(os.listdir(out))
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temporary folder left
    if sharded:
        assert hf.INDEX_FILE in files and sum(n.startswith("model-") for n in files) > 2, files
    else:
        assert "model.safetensors" in files and hf.INDEX_FILE not in files
    ours = lingua_model(ckpt)
    margs = ours.args
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.config.tie_word_embeddings == margs.weight_tying
    assert theirs.config.rms_norm_eps == margs.norm_eps
    assert theirs.config.rope_parameters["rope_theta"] == margs.rope_theta
    assert_same_logits(ours, theirs, margs.vocab_size, f"export {name}")
    # import: bitwise the checkpoint's weights, in a model built from the folder's config alone
    source = find_model(out)
    assert source.kind == "hf" and source.step == 0
    back = LMTransformer(source.model_args)
    load_weights(source, back)
    reference = full_model_state(ckpt)
    assert set(back.state_dict()) == set(reference)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in reference.items())
    # the folder's tokenizer: lingua rebuilds its own from the copied file, HF encodes the same ids
    tok_args = source.tokenizer_args
    assert tok_args.name == (name if name in TOKENIZED else "bytes")
    ours_tok, theirs_tok = build_tokenizer(tok_args), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert theirs_tok(text)["input_ids"] == ours_tok.encode(text, True, False)
    if name == "tied_gqa":  # bf16: the same tensors rounded once
        out16 = str(tmp_path / "hf16")
        hf.export(ckpt, out16, dtype="bf16")
        assert json.loads(open(os.path.join(out16, "config.json")).read())["dtype"] == "bfloat16"
        weights16 = hf.read_hf_weights(out16, source.model_args)
        assert all(torch.equal(weights16[k], v.to(torch.bfloat16).float()) for k, v in reference.items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 8 steps with 2 processes (bytes tokenizer), and a held-out file for eval."""
    root = tmp_path_factory.mktemp("trained")
    corpus = make_corpus(str(root / "data"))
    with open(SHAKESPEARE) as f:
        held_out = [p.strip() for p in f.read().split("\n\n") if p.strip()][2000:2040]
    with open(os.path.join(corpus, "shk", "shk.val.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in held_out)
    cfg = tiny_config(str(root / "c.yaml"), corpus, steps=8, **{"model.max_seqlen": 64, "checkpoint.dump.every": 8})
    dump = str(root / "run")
    proc = run_train(cfg, dump, nproc=2)
    assert proc.returncode == 0, output(proc)[-3000:]
    return {"cfg": cfg, "corpus": corpus, "ckpt": os.path.join(dump, "checkpoints", "0000000008"), "root": root}


def _cli(module: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env=clean_env({"HF_HUB_OFFLINE": "1"}), timeout=timeout)


@pytest.fixture(scope="module")
def exported(trained):
    out = str(trained["root"] / "hf")
    proc = _cli("lingua.checkpoint", "export-hf", trained["ckpt"], out)
    assert proc.returncode == 0 and proc.stdout.strip() == out, output(proc)
    return out


@pytest.mark.e2e
def test_trained_export_logits_generation_and_tokenizer(trained, exported, tmp_path):
    ours, theirs = lingua_model(trained["ckpt"]), AutoModelForCausalLM.from_pretrained(exported).eval()
    assert_same_logits(ours, theirs, 258, "trained checkpoint")
    tok = BytesTokenizer()
    theirs_tok = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS + PROMPTS:
        assert theirs_tok(text)["input_ids"] == tok.encode(text, True, False)

    # greedy decoding, 40 tokens from 3 prompts: transformers' generate == apps.main.generate at temperature 0, on
    # the checkpoint and on the exported folder
    hf_texts, hf_ids = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([theirs_tok(prompt)["input_ids"]])
        with torch.no_grad():
            gen = theirs.generate(ids, do_sample=False, max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                                  pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        assert len(gen) == 40
        hf_ids.append(gen)
        hf_texts.append(tok.decode(gen))
    from lingua.generation import GenerationArgs, generate_tokens

    ours_ids = generate_tokens(ours, [tok.encode(p, True, False) for p in PROMPTS],
                               GenerationArgs(temperature=0.0, max_gen_len=40, stop_at_eos=False))
    assert ours_ids == hf_ids
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    for ckpt in (trained["ckpt"], exported):
        out = tmp_path / f"gen_{os.path.basename(ckpt)}.jsonl"
        proc = _cli("apps.main.generate", f"ckpt={ckpt}", f"prompts_file={prompts_file}", f"output={out}",
                    "generator.temperature=0", "generator.max_gen_len=40", "generator.stop_at_eos=false")
        assert proc.returncode == 0, output(proc)[-3000:]
        cli_texts = [json.loads(line)["generation"] for line in out.read_text().splitlines()]
        assert cli_texts == hf_texts, (ckpt, cli_texts, hf_texts)


@pytest.mark.e2e
def test_eval_of_exported_folder_equals_checkpoint(trained, exported, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(json.dumps({"validation": {"max_steps": 2, "batch_size": 2, "seq_len": 32},
                               "samples": ["ROMEO:"], "generator": {"max_gen_len": 8, "temperature": 0.0}}))
    results = {}
    for name, ckpt in (("dcp", trained["ckpt"]), ("hf", exported)):
        proc = _cli("apps.main.eval", f"config={cfg}", f"ckpt_dir={ckpt}", f"dump_dir={tmp_path / name}")
        assert proc.returncode == 0, output(proc)[-3000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert results["hf"]["global_step"] == 8  # recorded by the export
    assert any(k.startswith("val/") for k in results["hf"]["metrics"])
    assert results["hf"]["metrics"] == results["dcp"]["metrics"]


@pytest.mark.e2e
def test_import_first_step_loss_equals_hf(tmp_path):
    """checkpoint.init_ckpt_path=<HF folder>: the trainer's first loss is the one transformers computes on the
    same batch (single process, so the batch is the data loader's first)."""
    from apps.main.train import TrainArgs
    from lingua.args import parse_args
    from lingua.data import build_dataloader, init_dataloader_state

    folder = hf_folder(tmp_path / "llama", tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-6)
    overrides = [f"{k}={hf._cli_value(v)}" for k, v in hf.model_overrides(folder).items()]
    corpus = make_corpus(str(tmp_path / "data"))
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus, steps=1)
    dump = str(tmp_path / "run")
    proc = run_train(cfg, dump, nproc=0, args=[f"checkpoint.init_ckpt_path={folder}", *overrides])
    assert proc.returncode == 0, output(proc)[-3000:]
    loss = losses(dump)[1]

    args = parse_args(TrainArgs, [f"config={cfg}", f"dump_dir={dump}", *overrides])
    state = init_dataloader_state(args.data, 0, 1, 1)
    with build_dataloader(args.data, state, dp_rank=0, dp_world_size=1, grad_acc_steps=1) as batches:
        tokens = torch.from_numpy(next(batches).tokens)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    logits = _logits(model, tokens[..., 0])
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[..., 1].flatten()).item()
    print(f"import: first-step loss {loss:.6f} (trainer) vs {expected:.6f} (transformers)")
    assert abs(expected - torch.log(torch.tensor(258.0)).item()) > 0.05  # not a uniform model
    assert abs(loss - expected) < 1e-4

    # a mismatching run stops before any process group, naming the options
    proc = run_train(cfg, str(tmp_path / "bad"), nproc=0,
                     args=[f"checkpoint.init_ckpt_path={folder}", "model.dim=64", "model.n_heads=4"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, output(proc)[-3000:]
    assert "config error: checkpoint.init_ckpt_path" in proc.stderr and "model.dim: 32 in the folder" in proc.stderr


@pytest.mark.e2e
def test_generate_refuses_foreign_tokenizer_in_one_line(tmp_path):
    folder = hf_folder(tmp_path / "llama")
    proc = _cli("apps.main.generate", f"ckpt={folder}", "prompt=Hello")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, output(proc)[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot rebuild its tokenizer" in lines[0], proc.stderr
    proc = _cli("lingua.checkpoint", "export-hf", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'missing'} does not exist"
