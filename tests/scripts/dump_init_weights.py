"""Build the debug-sized model under the current launch (any world size) and save its full initial weights."""

import sys

import torch
import torch.distributed as dist

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.distributed import DistributedArgs, parallelize_model, setup_torch_distributed

out, fsdp_type = sys.argv[1], sys.argv[2]
args = DistributedArgs(fsdp_type=fsdp_type)
state = setup_torch_distributed(args)
margs = LMTransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, seed=3)
with torch.device("meta"):
    model = LMTransformer(margs)
model = parallelize_model(model, state.mesh, args)
model.to_empty(device=state.device)
model.init_weights()
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
tokens = torch.arange(64).reshape(2, 32) % 300
with torch.no_grad():
    full["__logits__"] = model(tokens).detach()
if state.is_master:
    torch.save(full, out)
dist.destroy_process_group()
