"""lingua.optim.clip_grad_norm against torch.nn.utils.clip_grad_norm_ on the same FSDP gradients, under the
current launch, for the mesh given as `dp_replicate dp_shard`: prints "clip ok" when norms and clipped gradients
agree (up to rounding) for a clipping and a non-clipping max_norm."""

import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lingua.distributed import DistributedArgs, setup_torch_distributed
from lingua.optim import clip_grad_norm
from lingua.transformer import LMTransformerArgs, build_model

args = DistributedArgs(dp_replicate=int(sys.argv[1]), dp_shard=int(sys.argv[2]))
state = setup_torch_distributed(args)
margs = LMTransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, seed=3)
model = build_model(margs, state, args, init=True)
params = list(model.parameters())
tokens = (torch.arange(66).reshape(2, 33) * (dist.get_rank() + 2)) % 300  # each rank its own batch
model(tokens[:, :-1], tokens[:, 1:]).backward()
grads = [p.grad.to_local().clone() for p in params]
for max_norm in (1e-3, math.inf):
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True).full_tensor()
    clipped = [p.grad.to_local().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad.to_local().copy_(g)
    norm = clip_grad_norm(params, max_norm)
    assert not isinstance(norm, DTensor), "torch's path was taken: the layout was not recognised"
    torch.testing.assert_close(norm, expected)
    assert max_norm == math.inf or norm > 10 * max_norm  # it clipped
    for p, c in zip(params, clipped):
        torch.testing.assert_close(p.grad.to_local(), c)
    for p, g in zip(params, grads):
        p.grad.to_local().copy_(g)
print("clip ok", flush=True)
dist.destroy_process_group()
