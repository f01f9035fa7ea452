"""Optional torch.profiler traces of a few training steps (CPU and CUDA activities), for Chrome/Perfetto."""

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProfilerArgs:
    run: bool = False  # profile `steps` steps after `wait` steps; traces go to <dump_dir>/profiling/
    wait: int = 10  # steps to skip before profiling (let the run warm up)
    steps: int = 3  # steps to record
    memory: bool = False  # also record tensor memory (slower)


@contextlib.contextmanager
def maybe_profile(args: ProfilerArgs, dump_dir: str, rank: int, start_step: int):
    """Yields a callable to call after every step (a no-op when profiling is off)."""
    if not args.run:
        yield lambda: None
        return
    folder = os.path.join(dump_dir, "profiling")
    os.makedirs(folder, exist_ok=True)

    def save(prof):
        path = os.path.join(folder, f"trace_step{start_step + args.wait + 1 + args.steps}_rank{rank}.json")
        prof.export_chrome_trace(path)
        logger.info(f"profiler trace written to {path}")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=args.wait, warmup=1, active=args.steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save,
                                profile_memory=args.memory, record_shapes=args.memory, with_stack=False) as prof:
        yield prof.step
