"""Train a Llama-style LM with FSDP2. Rerun the same command after any failure: it resumes exactly.

    python -m apps.main.train config=configs/debug.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 -m apps.main.train config=configs/debug.yaml
    srun python -m apps.main.train config=...          (ranks from SLURM variables)

`train()` is the recipe: set up (Trainer.__init__), then one call per concern for every step: the batch and
forward/backward, the optimizer step, the metrics, the checkpoint (and preemption), the eval.
"""

import contextlib
import datetime
import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from apps.main.eval import EvalArgs, maybe_run_eval
from lingua import faults
from lingua.args import MISSING, ConfigError, config_to_dict, dump_config, parse_args
from lingua.checkpoint import CheckpointArgs, CheckpointError, CheckpointManager, TrainState, config_diff, read_params
from lingua.data import (
    DataArgs,
    DataError,
    DataTrace,
    build_dataloader,
    check_data_args,
    data_metrics,
    init_dataloader_state,
)
from lingua.distributed import (
    DistributedArgs,
    any_rank,
    check_mesh_shape,
    describe_launch,
    get_launch_env,
    run_main,
    setup_torch_distributed,
)
from lingua.lock import LockError, hold_dump_dir
from lingua.logger import add_log_file, init_logger
from lingua.metrics import LoggingArgs, MetricLogger, gpu_peak_flops
from lingua.optim import OptimArgs, apply_hyperparameters, build_optimizer, clip_grad_norm
from lingua.preemption import PreemptionHandler
from lingua.pretrained import check_init_source, find_model, load_weights
from lingua.profiling import ProfilerArgs, maybe_profile
from lingua.status import disk_forecast
from lingua.tokenizer import build_tokenizer
from lingua.transformer import LMTransformerArgs, build_model, flops_per_token, num_params

logger = logging.getLogger("train")


@dataclass
class TrainArgs:
    name: str = "lingua"  # run name (wandb, logs)
    dump_dir: str = MISSING  # everything the run writes: config, logs, metrics, checkpoints
    seed: int = 42  # seed of python / numpy / torch RNGs (the model init has model.seed)
    steps: int = 1000  # optimizer steps to train for
    grad_acc_steps: int = 1  # micro-batches accumulated per optimizer step
    gc_collect_freq: int = 1000  # run Python's GC every this many steps (automatic GC is off: it stalls ranks)
    max_requeues: int = 20  # under SLURM: stop requeuing on preemption after this many restarts
    data: DataArgs = field(default_factory=DataArgs)  # data pipeline
    optim: OptimArgs = field(default_factory=OptimArgs)  # optimizer and LR schedule
    model: LMTransformerArgs = field(default_factory=LMTransformerArgs)  # architecture
    distributed: DistributedArgs = field(default_factory=DistributedArgs)  # parallelism, backend, precision
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)  # saving and resuming
    logging: LoggingArgs = field(default_factory=LoggingArgs)  # console / metrics.jsonl / wandb
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)  # torch.profiler traces of a few steps
    eval: Optional[EvalArgs] = None  # what to evaluate at checkpoint.eval.every steps (docs/eval.md); null = no evals
    async_eval_gpus: Optional[int] = None  # unset: evals inline on training ranks; N: SLURM jobs, N GPUs/node (0 = CPU)

    def validate(self):
        """Checks that need no process group (run before any is created)."""
        for section in (self.optim, self.model, self.distributed, self.checkpoint):
            section.validate()
        if self.steps < 0:
            raise ConfigError("steps must be >= 0")
        if self.grad_acc_steps < 1:
            raise ConfigError("grad_acc_steps must be >= 1")
        if self.logging.freq < 1:
            raise ConfigError("logging.freq must be >= 1")
        if self.eval is not None:
            self.eval.validate()
        if self.async_eval_gpus is not None and self.async_eval_gpus < 0:
            raise ConfigError("async_eval_gpus must be >= 0 (0: a CPU eval job)")
        if self.data.n_views < 2:
            raise ConfigError("data.n_views must be >= 2 for training (inputs and targets)")
        if self.data.seq_len > self.model.max_seqlen:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seqlen ({self.model.max_seqlen})")


CONFIG_CLASS = TrainArgs


def load_train_config(argv=None) -> TrainArgs:
    """Parse and validate everything that can be checked before distributed start-up."""
    args = parse_args(TrainArgs, argv)
    check_config(args)
    return args


def check_config(args: TrainArgs, world_size: Optional[int] = None) -> None:
    """The checks that need no process group (data, mesh for `world_size` processes, default this launch's,
    initial weights); derives grad_acc_steps from data.global_batch_size."""
    check_data_args(args.data)
    replicate, shard, _ = check_mesh_shape(args.distributed, world_size or get_launch_env().world_size)
    derive_grad_acc_steps(args, replicate * shard)
    if args.checkpoint.init_ckpt_path:
        check_init_source(args.checkpoint.init_ckpt_path, args.model)


# What a changed option does on resume. The model's shapes and the tokenizer's ids cannot change under a
# checkpoint; optimizer hyperparameters take effect from the resume step; data options follow the data-state rules
# (lingua.data refuses what would change the stream, naming checkpoint.reset_data_state); the rest is noted.
FIXED_ON_RESUME = ("model.", "data.tokenizer.")
FREE_MODEL_KEYS = ("model.seed", "model.init_base_std", "model.init_std_factor", "model.attn_impl", "model.max_seqlen")


def check_config_change(saved: dict, current: dict, ckpt: CheckpointManager) -> bool:
    """Log every option that differs from the checkpoint's run; ConfigError naming the ones that cannot change.
    Returns whether optimizer options changed (they are applied after the optimizer state is loaded)."""
    diff = config_diff(saved, current)
    fixed = [k for k in diff if k.startswith(FIXED_ON_RESUME) and not k.startswith(FREE_MODEL_KEYS)]
    if fixed:
        raise ConfigError(
            "the checkpoint was saved with other model/tokenizer options, which cannot change on resume: "
            + "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in fixed)
            + f" (restore them, or start a new run; {ckpt.root} is left as it is)"
        )
    for key, (old, new) in diff.items():
        note = " (takes effect from the resume step)" if key.startswith("optim.") else ""
        logger.warning(f"config changed since the checkpoint: {key}: {old!r} -> {new!r}{note}")
    return any(k.startswith("optim.") for k in diff)


def derive_grad_acc_steps(args: TrainArgs, dp_world_size: int) -> None:
    """With data.global_batch_size set, grad_acc_steps follows from it (the global batch, and so the data stream,
    stays the same whatever the number of ranks); otherwise the global batch follows from grad_acc_steps."""
    G = args.data.global_batch_size
    if G is None:
        return
    per_step = args.data.batch_size * dp_world_size
    if G % per_step:
        raise ConfigError(f"data.global_batch_size={G} is not a multiple of data.batch_size ({args.data.batch_size}) x "
                          f"data-parallel ranks ({dp_world_size})")
    args.grad_acc_steps = G // per_step


def due_checkpoint_kinds(args: TrainArgs, step: int) -> list:
    kinds = []
    if args.checkpoint.dump.every > 0 and step % args.checkpoint.dump.every == 0:
        kinds.append("dump")
    if args.checkpoint.eval.every > 0 and step % args.checkpoint.eval.every == 0:
        kinds.append("eval")
    return kinds


class Trainer:
    """One run's objects; __init__ sets everything up and resumes, the methods are the steps of the recipe."""

    def __init__(self, args: TrainArgs):
        self.args = args
        env = get_launch_env()
        init_logger(env.rank)  # the console only: nothing is written into the dump dir before we hold its lock
        self.preemption = PreemptionHandler().install(watch_parent=env.launcher == "torchrun")
        self.dist = setup_torch_distributed(args.distributed)
        self.lock = hold_dump_dir(args.dump_dir, self.dist)
        self._data = contextlib.ExitStack()  # the data loader (started early in _setup)
        self._data_started: Optional[dict] = None  # the state the loader started from (fresh or saved)
        self._data_fresh = False
        try:
            self._setup()
        except BaseException:
            self.abort()
            raise

    def _setup(self) -> None:
        args = self.args
        add_log_file(os.path.join(args.dump_dir, "train.log"))
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        logger.info(f"run start: {describe_launch(self.dist.env)}, started {started}")  # lingua.status dates it
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)

        tokenizer = build_tokenizer(args.data.tokenizer)
        if args.model.vocab_size < 0:
            args.model.vocab_size = tokenizer.n_words
        elif args.model.vocab_size < tokenizer.n_words:
            raise ConfigError(f"model.vocab_size ({args.model.vocab_size}) < "
                              f"tokenizer vocabulary ({tokenizer.n_words})")
        self.config = config_to_dict(args)

        layout = {"batch_size": args.data.batch_size, "grad_acc_steps": args.grad_acc_steps,
                  "global_batch": args.data.batch_size * args.grad_acc_steps * self.dist.dp_world_size}
        self.ckpt = CheckpointManager(args.checkpoint, args.dump_dir, self.dist, self.config, layout)
        self.ckpt.prepare()
        resolved = self.ckpt.resolve()
        faults.point("startup.after_resolve")
        # The data loader starts now, from the resolved checkpoint's data state, so that its first batches are ready
        # by the time the model is built and loaded (it is restarted if the load falls back to another state).
        early = self.ckpt.train_state_dict(resolved) if resolved else {"step": 0, "data": None}
        self.start_data(early["data"] if early["step"] < args.steps else None, early["step"] < args.steps)
        # Parameters are initialised only if nothing is resumed: a resume loads every one of them.
        self.model = build_model(args.model, self.dist, args.distributed)
        self.n_params = num_params(self.model)
        logger.info(f"model: {self.n_params / 1e6:.2f}M parameters, {args.model.n_layers} layers, dim {args.model.dim}")
        self.optimizer, scheduler = build_optimizer(self.model, args.optim, args.steps)
        self.state = TrainState(scheduler)
        resume = self.ckpt.verified()
        optim_changed = resume and check_config_change(read_params(resume), self.config, self.ckpt)
        if self.ckpt.load(self.model, self.optimizer, self.state):
            if optim_changed:
                apply_hyperparameters(self.optimizer, scheduler, args.optim)
        else:
            self.model.init_weights()
            if args.checkpoint.init_ckpt_path:
                logger.info(f"initialising model weights from {args.checkpoint.init_ckpt_path} (fresh optimizer)")
                load_weights(find_model(args.checkpoint.init_ckpt_path), self.model, self.dist.cpu_group)
        if self.state.data is None and self._data_fresh:
            self.state.data = self._data_started  # the loader already runs from a fresh stream
        elif self.state.data != self._data_started:  # the load fell back to another checkpoint, or started fresh
            self.start_data(self.state.data, not self.finished)
            self.state.data = self._data_started
        faults.point("startup.after_load")

        self.metric_logger: Optional[MetricLogger] = None
        self.trace: Optional[DataTrace] = None
        self.final_saved = True
        self.tokens_per_step = args.data.batch_size * args.data.seq_len * args.grad_acc_steps * self.dist.dp_world_size
        self.flops_per_token = flops_per_token(args.model, self.n_params, args.data.seq_len)
        self.peak_flops = gpu_peak_flops(self.dist.device)
        self.window = (time.time(), 0)  # start and tokens of the current logging window
        self.steps_per_s: Optional[float] = None  # of the last logging window (for the disk forecast)

    def start_data(self, data: Optional[dict], run: bool = True) -> None:
        """(Re)start the data loader at `data` (None: a fresh stream); its micro-batches are `self.batches`."""
        self._data.close()
        self._data = contextlib.ExitStack()
        self._data_fresh = data is None
        if data is None:
            data = init_dataloader_state(self.args.data, self.dist.dp_rank, self.dist.dp_world_size,
                                         self.args.grad_acc_steps)
        self._data_started = data
        if run:
            self.batches = self._data.enter_context(build_dataloader(
                self.args.data, data, dp_rank=self.dist.dp_rank, dp_world_size=self.dist.dp_world_size,
                grad_acc_steps=self.args.grad_acc_steps))

    def abort(self) -> None:
        """After an error: stop the data loader and release the dump dir (no final save)."""
        self._data.close()
        self.lock.release()

    @property
    def finished(self) -> bool:
        return self.state.step >= self.args.steps

    def start_logging(self) -> None:
        if self.args.data.trace:
            self.trace = DataTrace(self.args.dump_dir, self.dist.dp_rank, self.dist.dp_world_size, self.state.step)
        if self.dist.is_master:
            dump_config(self.args, os.path.join(self.args.dump_dir, "config.yaml"))
            self.metric_logger = MetricLogger(
                os.path.join(self.args.dump_dir, "metrics.jsonl"), self.state.step, self.args.logging.wandb,
                self.config, self.args.name, self.args.dump_dir,
            )
            self.check_disk()

    # ------------------------------------------------------------------ the recipe's steps

    def train_step(self, batches) -> tuple:
        """One optimizer step: grad_acc_steps micro-batches forward/backward, clip, step. Returns (loss, grad_norm)."""
        args, model = self.args, self.model
        loss_sum = 0.0
        for micro in range(args.grad_acc_steps):
            batch, data_state, pieces = next(batches)
            if self.trace:
                self.trace.write(self.state.step + 1, micro, pieces)
            batch = torch.from_numpy(batch).to(self.dist.device, non_blocking=True)
            model.set_requires_gradient_sync(micro == args.grad_acc_steps - 1)
            loss = model(batch[..., 0], batch[..., 1]) / args.grad_acc_steps
            loss.backward()
            loss_sum += loss.detach()
        clip = args.optim.clip if args.optim.clip > 0 else float("inf")
        grad_norm = clip_grad_norm(list(model.parameters()), max_norm=clip)
        faults.point("train.before_optimizer_step", self.state.step + 1)
        self.ckpt.wait_staged()  # an async save must have its copy of the state before the step changes it
        self.optimizer.step()
        self.state.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.data = data_state
        return loss_sum, grad_norm

    def log(self, loss, grad_norm, step_start: float) -> None:
        """Every logging.freq steps (and the last): average loss over ranks, speed, metrics.jsonl / wandb."""
        step, args = self.state.step, self.args
        start, tokens = self.window
        tokens += self.tokens_per_step // self.dist.dp_world_size
        self.window = (start, tokens)
        if step % args.logging.freq and step != args.steps:
            return
        loss_t = torch.as_tensor(loss, dtype=torch.float32, device=self.dist.device).reshape(1)
        torch.distributed.all_reduce(loss_t)  # SUM: gloo has no AVG
        loss_t /= self.dist.env.world_size
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        now = time.time()
        metrics = {
            "global_step": step,
            "loss/out": loss_t.item(),
            "optim/lr": self.state.scheduler.get_last_lr()[0],
            "optim/grad_norm": float(grad_norm),
            "speed/wps": tokens / (now - start),
            "speed/step_time_s": now - step_start,
            "data/tokens_seen": step * self.tokens_per_step,
            **data_metrics(self.state.data),
        }
        if self.peak_flops:
            metrics["speed/mfu"] = self.flops_per_token * metrics["speed/wps"] / self.peak_flops
        if self.dist.device.type == "cuda":
            metrics["mem/max_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not math.isfinite(metrics["loss/out"]):
            logger.warning(f"non-finite loss at step {step}")
        logger.info(
            f"step {step}/{args.steps} loss {metrics['loss/out']:.4f} grad {metrics['optim/grad_norm']:.3f} "
            f"lr {metrics['optim/lr']:.2e} wps {metrics['speed/wps']:.0f}"
            + (f" mfu {metrics['speed/mfu']:.3f}" if self.peak_flops else "")
        )
        if self.metric_logger:
            self.metric_logger.log(metrics)
        self.steps_per_s = metrics["speed/wps"] * self.dist.dp_world_size / self.tokens_per_step
        self.window = (time.time(), 0)

    def checkpoint(self) -> bool:
        """Save when due, at the end, or when any rank was told to stop (decided together). True: stop now."""
        step, args = self.state.step, self.args
        self.ckpt.poll()
        kinds = due_checkpoint_kinds(args, step)
        preempted = any_rank(self.preemption.requested, self.dist.cpu_group)
        if not (kinds or preempted or self.finished):
            return False
        saved = self.ckpt.save(self.model, self.optimizer, self.state, kinds or ["dump"])
        if saved:
            self.check_disk()
        if self.finished or preempted:
            saved = self.ckpt.wait() and saved
            self.final_saved = saved
        if "eval" in kinds and args.eval is not None:  # never raises: a failing eval is logged, training goes on
            maybe_run_eval(args, step, self.ckpt, self.model, self.dist, self.metric_logger, preempted)
        if preempted:
            why = self.preemption.signal_name or "a stop request on another rank"
            if saved:
                logger.info(f"stopping on {why}: checkpoint at step {step} done, exiting")
            else:
                logger.error(f"stopping on {why}: the checkpoint at step {step} could NOT be saved, exiting")
            if self.dist.is_master and saved:
                self.preemption.requeue(args.max_requeues)
        return preempted

    def check_disk(self) -> None:
        """Rank 0, at start and after each save: warn (log, wandb alert) when the checkpoints left until `steps` will
        not fit on the checkpoint filesystem, retention included (lingua.status.disk_forecast)."""
        if not self.dist.is_master:
            return
        try:
            warning = disk_forecast(self.ckpt.root, self.args.checkpoint, self.args.steps, self.state.step,
                                    steps_per_s=self.steps_per_s).warning
        except OSError as e:  # a forecast must never stop training
            logger.warning(f"disk forecast failed: {e}")
            return
        if warning is None:
            return
        logger.warning(warning)
        wandb = getattr(self.metric_logger, "wandb", None)
        if wandb is not None:
            try:
                wandb.alert(title="checkpoints will not fit on the disk", text=warning, level="WARN",
                            wait_duration=3600)
            except Exception as e:  # noqa: BLE001 (wandb must never stop training)
                logger.warning(f"wandb alert failed: {type(e).__name__}: {e}")

    def close(self) -> int:
        ok = self.ckpt.close()
        self.final_saved = self.final_saved and ok
        if self.metric_logger:
            self.metric_logger.close()
        if self.trace:
            self.trace.close()
        self.abort()
        if self.finished and self.final_saved:
            logger.info(f"training complete at step {self.state.step}")
        elif self.finished:
            logger.error(f"training reached step {self.state.step} but its final checkpoint was NOT saved "
                         "(see the errors above); rerun the same command to redo the last steps")
        return 0 if self.final_saved else 1


def train(args: TrainArgs) -> int:
    trainer = Trainer(args)
    if trainer.finished:
        logger.info(f"run already complete: step {trainer.state.step} >= steps={args.steps}; nothing to do")
        return trainer.close()
    trainer.start_logging()
    gc.disable()
    try:
        with maybe_profile(args.profiling, args.dump_dir, trainer.dist.env.rank, trainer.state.step) as profiler_step:
            while not trainer.finished:
                step_start = time.time()
                loss, grad_norm = trainer.train_step(trainer.batches)
                profiler_step()
                if trainer.state.step % args.gc_collect_freq == 0:
                    gc.collect()
                trainer.log(loss, grad_norm, step_start)
                faults.point("step", trainer.state.step)
                if trainer.checkpoint():
                    break
    except BaseException:
        trainer.abort()
        raise
    finally:
        gc.enable()
    return trainer.close()


def main(argv=None) -> int:
    return run_main(lambda: load_train_config(argv), train, (CheckpointError, DataError, LockError))


if __name__ == "__main__":
    sys.exit(main())
