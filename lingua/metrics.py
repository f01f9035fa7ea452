"""metrics.jsonl (one JSON object per logged step, never a duplicated step), wandb, MFU."""

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class WandbArgs:
    project: str = "lingua"  # wandb project
    entity: Optional[str] = None  # wandb team / user
    mode: str = "offline"  # online | offline | disabled (offline needs no network; `wandb sync` uploads later)
    tags: list = field(default_factory=list)  # run tags
    group: Optional[str] = None  # run group
    dir: Optional[str] = None  # where wandb writes its files; default <dump_dir>


@dataclass
class LoggingArgs:
    freq: int = 10  # log every this many steps
    wandb: Optional[WandbArgs] = None  # set (e.g. logging.wandb.mode=offline) to log to Weights & Biases


def read_jsonl_steps(path: str) -> list:
    """Records of a metrics file, skipping a torn last line (the writer was killed mid-line)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricLogger:
    """Appends to metrics.jsonl. On resume it truncates records of steps after the resumed step, so a
    rerun never duplicates or contradicts a step, and drops a torn last line."""

    def __init__(self, path: str, resume_step: int, wandb_args: Optional[WandbArgs] = None, run_config=None,
                 run_name: str = "lingua", dump_dir: str = "."):
        self.path = path
        self._rewrite_up_to(resume_step)
        self.file = open(path, "a")
        self.wandb = None
        if wandb_args is not None and wandb_args.mode != "disabled":
            self.wandb = init_wandb(wandb_args, run_config, run_name, dump_dir)

    def _rewrite_up_to(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_jsonl_steps(self.path) if r.get("global_step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, metrics: dict) -> None:
        metrics = {"created_at": time.time(), **metrics}
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "global_step"}, step=metrics["global_step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def init_wandb(args: WandbArgs, run_config, run_name: str, dump_dir: str, id_file: str = "wandb_run_id"):
    """Start, or resume after a restart, the wandb run whose id is stored in <dump_dir>/<id_file>."""
    import wandb

    id_path = os.path.join(dump_dir, id_file)
    if os.path.exists(id_path):
        run_id = open(id_path).read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id)
    run = wandb.init(
        project=args.project, entity=args.entity, mode=args.mode, tags=list(args.tags), group=args.group,
        dir=args.dir or dump_dir, id=run_id, resume="allow", name=run_name, config=run_config,
    )
    logger.info(f"wandb run {run.id} ({args.mode}) in {args.dir or dump_dir}")
    return run


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of known GPUs, for an MFU estimate; None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10", 125e12), ("L4", 121e12), ("V100", 125e12)):
        if key in name:
            return flops
    return None
