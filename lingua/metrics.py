"""metrics.jsonl (one JSON object per logged step, never a duplicated step), wandb, MFU."""

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from lingua.args import Choice
from lingua.files import atomic_write, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbArgs:
    project: str = "lingua"  # wandb project
    entity: Optional[str] = None  # wandb team / user
    mode: WandbMode = WandbMode.offline  # online | offline | disabled (offline: no network; `wandb sync` uploads later)
    tags: list = field(default_factory=list)  # run tags
    group: Optional[str] = None  # run group
    dir: Optional[str] = None  # where wandb writes its files; default <dump_dir>


@dataclass
class LoggingArgs:
    freq: int = 10  # log every this many steps
    wandb: Optional[WandbArgs] = None  # set (e.g. logging.wandb.mode=offline) to log to Weights & Biases


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
        if os.path.exists(self.path):
            write_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("global_step", 0) <= step])

    def log(self, metrics: dict) -> None:
        metrics = {"created_at": time.time(), **metrics}
        if self.file is not None:
            try:
                self.file.write(json.dumps(metrics) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk must not stop training (the checkpoints say what is saved)
                logger.error(f"cannot write {self.path} any more ({e.strerror}); metrics go to the log only")
                self.file = None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "global_step"}, step=metrics["global_step"])

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
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
        atomic_write(id_path, run_id)
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
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10", 125e12), ("L4", 121e12),
                       ("V100", 125e12)):
        if key in name:
            return flops
    return None


def append_eval_record(path: str, record: dict) -> bool:
    """Add `record` to a run's metrics.eval.jsonl unless a line with the same (global_step, eval_dir) is there
    (then it is replaced if different). Under a file lock (several eval jobs may finish at once); torn lines are
    dropped. Returns True if the file changed."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                for raw in f:
                    try:
                        lines.append(json.loads(raw))
                    except ValueError:
                        continue  # a line torn by a kill
        key = (record["global_step"], record.get("eval_dir"))
        same = [i for i, r in enumerate(lines) if (r.get("global_step"), r.get("eval_dir")) == key]
        strip = lambda r: {k: v for k, v in r.items() if k != "created_at"}  # noqa: E731
        if same and strip(lines[same[0]]) == strip(record) and len(same) == 1:
            return False
        if same:
            lines = [r for i, r in enumerate(lines) if i not in same[1:]]
            lines[same[0]] = record
        else:
            lines.append(record)
        write_jsonl(path, lines)
        return True
