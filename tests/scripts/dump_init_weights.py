"""Build the debug-sized model under the current launch (any world size) and save its full initial weights."""

import sys

import torch
import torch.distributed as dist

from lingua.distributed import DistributedArgs, setup_torch_distributed
from lingua.transformer import LMTransformerArgs, build_model

out, fsdp_type = sys.argv[1], sys.argv[2]
args = DistributedArgs(fsdp_type=fsdp_type)
state = setup_torch_distributed(args)
margs = LMTransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, seed=3)
model = build_model(margs, state, args, init=True)
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
tokens = torch.arange(64).reshape(2, 32) % 300
with torch.no_grad():
    full["__logits__"] = model(tokens).detach()
if state.is_master:
    torch.save(full, out)
dist.destroy_process_group()
