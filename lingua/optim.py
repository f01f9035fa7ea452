"""AdamW, gradient clipping and learning-rate schedules (warmup, then cosine / linear / constant decay)."""

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from lingua.args import Choice, ConfigError


class Scheduler(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimArgs:
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    epsilon: float = 1e-8  # AdamW epsilon
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    clip: float = 1.0  # max gradient norm (<= 0 disables clipping)
    scheduler: Scheduler = Scheduler.cosine  # cosine | linear | constant
    warmup: int = 2000  # linear warmup steps
    lr_min_ratio: float = 0.1  # final lr as a fraction of lr (cosine, linear)
    decay_fraction: float = 1.0  # fraction of the post-warmup steps over which lr decays (rest stays at min)
    # torch's fused AdamW kernel (CPU and CUDA): one pass over each parameter and its moments instead of the ~7
    # of the foreach implementation: the optimizer step ~4x faster on CPU, and its first call in a process (DTensor
    # works out the sharding of each op once) ~3x faster.
    fused: bool = True  # fused AdamW kernel; false: the foreach implementation

    def validate(self):
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if self.warmup < 0:
            raise ConfigError("optim.warmup must be >= 0")


def lr_factor(step: int, args: OptimArgs, total_steps: int) -> float:
    """Multiplier of args.lr at `step` (0-based count of optimizer steps taken)."""
    if args.warmup > 0 and step < args.warmup:
        return (step + 1) / args.warmup
    if args.scheduler == "constant":
        return 1.0
    decay_steps = max(1, int((total_steps - args.warmup) * args.decay_fraction))
    progress = min(1.0, (step - args.warmup) / decay_steps)
    if args.scheduler == "linear":
        return 1.0 - (1.0 - args.lr_min_ratio) * progress
    cos = 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr_min_ratio + (1.0 - args.lr_min_ratio) * cos


def build_optimizer(model: torch.nn.Module, args: OptimArgs, total_steps: int):
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        weight_decay=args.weight_decay,
        eps=args.epsilon,
        fused=args.fused,
        foreach=not args.fused,
    )
    scheduler = LambdaLR(optimizer, partial(lr_factor, args=args, total_steps=total_steps))
    return optimizer, scheduler


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` so that their total L2 norm is at most `max_norm`; returns the norm before
    clipping (on every rank the same). torch.nn.utils.clip_grad_norm_'s result up to rounding, but for FSDP's
    sharded gradients computed on each rank's local shards with one all-reduce: torch's goes through DTensor,
    whose dispatch costs ~2 ms a step of the debug model and ~0.1 s in the first step of a process (sharding
    propagation). Gradients of any other layout go to torch's."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    layouts = {(g.device_mesh, g.placements) if isinstance(g, DTensor) else None for g in grads}
    mesh, placements = next(iter(layouts)) if len(layouts) == 1 and None not in layouts else (None, ())
    sharded = [i for i, p in enumerate(placements) if p.is_shard()]
    if mesh is None or len(sharded) > 1 or not all(p.is_shard() or p.is_replicate() for p in placements):
        return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True)
    local = [g.to_local() for g in grads]
    total = torch.nn.utils.get_total_norm(local, foreach=True).square()
    if sharded:  # replicas hold the same shards: sum over the shards of one replica only
        torch.distributed.all_reduce(total, group=mesh.get_group(sharded[0]))
    total = total.sqrt()
    if max_norm < float("inf"):
        torch._foreach_mul_(local, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def apply_hyperparameters(optimizer, scheduler, args: OptimArgs) -> None:
    """Make `args` the optimizer's hyperparameters from now on, after a checkpoint's optimizer and scheduler
    state (which carry the values of the run that saved them) were loaded: betas, eps, weight decay, the
    implementation (fused or foreach), the peak lr of the schedule, and the current lr under the (possibly changed)
    schedule."""
    scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["betas"] = (args.beta1, args.beta2)
        group["eps"] = args.epsilon
        group["weight_decay"] = args.weight_decay
        group["initial_lr"] = args.lr
        group["fused"], group["foreach"] = args.fused, not args.fused
        for p in group["params"]:  # the fused kernel keeps its step counts on the parameter's device
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device if args.fused else "cpu")
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = args.lr * lam(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
