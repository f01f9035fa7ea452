"""Load a DCP checkpoint into the model + optimizer under the current world size; save the full states."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from apps.main.train import load_train_config
from lingua.checkpoint import load_model_optim
from lingua.distributed import setup_torch_distributed
from lingua.optim import build_optimizer
from lingua.tokenizer import build_tokenizer
from lingua.transformer import build_model

ckpt_dir, out = sys.argv[1], sys.argv[2]
args = load_train_config(sys.argv[3:])
state = setup_torch_distributed(args.distributed)
args.model.vocab_size = build_tokenizer(args.data.tokenizer).n_words
model = build_model(args.model, state, args.distributed)
optimizer, _ = build_optimizer(model, args.optim, args.steps)
load_model_optim(ckpt_dir, model, optimizer)
model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if state.is_master:
    torch.save({"model": model_sd, "optim": optim_sd}, out)
dist.destroy_process_group()
