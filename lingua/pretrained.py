"""A trained model for inference, from any checkpoint: eval, generate and the export command load models here.

    source = find_model(path)                       # what `path` holds; no process group needed
    model = load_model(source, dist_state, dist_args) # the sharded model with its weights, in eval mode

`path` is a committed DCP checkpoint folder (read by any number of processes, resharded), a consolidated
folder / file (`python -m lingua.checkpoint consolidate`), or a Hugging Face Llama folder (config.json +
safetensors, e.g. from `python -m lingua.checkpoint export-hf`; lingua/hf.py reads it).
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from lingua import hf
from lingua.args import ConfigError
from lingua.checkpoint import (
    CheckpointError,
    is_checkpoint,
    load_model_optim,
    read_params,
    run_dir_of,
    step_of,
    validate_checkpoint,
)
from lingua.tokenizer import TokenizerArgs
from lingua.transformer import LMTransformer, LMTransformerArgs, build_model

logger = logging.getLogger(__name__)

CONSOLIDATED_FILE = "consolidated.pth"


@dataclass
class ModelSource:
    """What a checkpoint path holds."""

    path: str  # absolute path of the checkpoint folder (or consolidated file)
    kind: str  # dcp | consolidated | hf
    params: dict  # the training config it was saved with (at least a 'model' section)
    step: Optional[int]  # the training step, when known
    weights: Optional[str] = None  # the consolidated file

    @property
    def model_args(self) -> LMTransformerArgs:
        return model_args_from_params(self.params)

    @property
    def tokenizer_args(self) -> TokenizerArgs:
        args = TokenizerArgs(**((self.params.get("data") or {}).get("tokenizer") or {}))
        if self.kind == "hf" and args.name == hf.UNAVAILABLE_TOKENIZER:
            raise CheckpointError(hf.tokenizer_problem(self.path))
        return args

    @property
    def run_dir(self) -> Optional[str]:
        """The training run's dump dir: from the checkpoint's place, else the config's dump_dir if it exists."""
        run = run_dir_of(self.path)
        if run:
            return run
        run = self.params.get("dump_dir")
        return run if run and os.path.isdir(run) else None


def find_model(path: str) -> ModelSource:
    """Check `path` and read its config; ConfigError / CheckpointError naming the problem."""
    if not path:
        raise ConfigError("no checkpoint given (a committed checkpoint folder such as <run>/checkpoints/0000001000)")
    full = os.path.abspath(path)
    if os.path.isfile(full):
        folder = os.path.dirname(full)
        return ModelSource(full, "consolidated", read_params(folder), step_of(folder), weights=full)
    if not os.path.isdir(full):
        raise CheckpointError(f"checkpoint {path} does not exist")
    consolidated = os.path.join(full, CONSOLIDATED_FILE)
    if os.path.exists(consolidated) and not is_checkpoint(full):
        return ModelSource(full, "consolidated", read_params(full), step_of(full), weights=consolidated)
    if hf.is_hf_folder(full) and not is_checkpoint(full):
        params, step = hf.hf_params(full)  # a Llama folder lingua can build, or CheckpointError saying why not
        return ModelSource(full, "hf", params, step)
    if not is_checkpoint(full):
        raise CheckpointError(f"{path} is not a checkpoint folder (no commit record, DCP metadata, "
                              f"{CONSOLIDATED_FILE} or Hugging Face {hf.CONFIG_FILE})")
    record = validate_checkpoint(full, dp_rank=None)  # no commit record, a missing or truncated file, garbled files
    return ModelSource(full, "dcp", read_params(full), int(record["step"]))


def model_args_from_params(params: dict) -> LMTransformerArgs:
    known = {f.name for f in dataclasses.fields(LMTransformerArgs)}
    values = {k: v for k, v in params["model"].items() if k in known}
    unknown = sorted(set(params["model"]) - known)
    if unknown:
        logger.warning(f"model options unknown to this code, ignored: {', '.join(unknown)}")
    margs = LMTransformerArgs(**values)
    if margs.vocab_size <= 0:
        raise CheckpointError("the checkpoint's config has no resolved model.vocab_size")
    return margs


def load_weights(source: ModelSource, model, group=None) -> None:
    """Fill a built (sharded) model's parameters from the source, whatever its kind and the world size (`group`:
    the gloo group whose ranks agree that a checkpoint loaded)."""
    if source.kind == "dcp":
        load_model_optim(source.path, model, group=group)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if source.kind == "hf":
        state = hf.read_hf_weights(source.path, source.model_args)  # fp32, renamed, q/k rows permuted back
        _check_shapes(source, state, model)
    else:
        state = torch.load(source.weights, map_location="cpu", weights_only=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _check_shapes(source: ModelSource, state: dict, model) -> None:
    """CheckpointError naming the first tensor whose shape differs from the model's (e.g. another vocab size)."""
    for name, param in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if name in state and tuple(state[name].shape) != tuple(param.shape):  # a DTensor reports its full shape
            raise CheckpointError(f"{source.path}: {name} has shape {list(state[name].shape)}, the model "
                                  f"{list(param.shape)} (check model.* against python -m lingua.hf model-args)")


def load_model(source: ModelSource, dist_state, dist_args) -> LMTransformer:
    """Build the FSDP model from the source's config and load its weights; in eval mode."""
    model = build_model(source.model_args, dist_state, dist_args)  # buffers only: every parameter is loaded
    load_weights(source, model, dist_state.cpu_group)
    model.eval()
    logger.info(f"loaded {source.kind} checkpoint {source.weights or source.path} (step {source.step})")
    return model


# Model options that do not change the weights' shapes or meaning: an initial checkpoint may differ in them.
_FREE_MODEL_KEYS = {"seed", "init_base_std", "init_std_factor", "attn_impl", "max_seqlen"}


def check_init_source(path: str, margs: LMTransformerArgs) -> ModelSource:
    """Validate `checkpoint.init_ckpt_path` before any process group exists: it is a checkpoint of a model with the
    run's architecture. ConfigError naming the path and the first mismatching options otherwise."""
    try:
        source = find_model(path)
    except CheckpointError as e:
        raise ConfigError(f"checkpoint.init_ckpt_path: {e}") from None
    if source.kind == "hf":  # compare what shapes the weights (a Llama config has no model.multiple_of)
        diff = hf.architecture_mismatches(source.params["model"], margs)
        if diff:
            raise ConfigError(f"checkpoint.init_ckpt_path {path} (a Hugging Face Llama) holds another architecture: "
                              + "; ".join(diff[:5]) + f" (python -m lingua.hf model-args {path} prints its options)")
        return source
    saved, wanted = source.params["model"], dataclasses.asdict(margs)
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {wanted[k]!r} here" for k in sorted(wanted)
            if k not in _FREE_MODEL_KEYS and k in saved and saved.get(k) != wanted[k]
            and not (k == "vocab_size" and wanted[k] < 0)]
    if diff:
        raise ConfigError(f"checkpoint.init_ckpt_path {path} holds another architecture: " + "; ".join(diff[:5]))
    return source
