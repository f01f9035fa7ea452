"""Train a Llama-style LM with FSDP2. Rerun the same command after any failure: it resumes exactly.

    python -m apps.main.train config=configs/debug.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 -m apps.main.train config=configs/debug.yaml
    srun python -m apps.main.train config=...          (ranks from SLURM variables)
"""

import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from apps.main.eval import EvalArgs, maybe_run_eval
from apps.main.transformer import LMTransformer, LMTransformerArgs, flops_per_token, num_params
from lingua.args import MISSING, ConfigError, config_to_dict, dump_config, parse_args
from lingua.checkpoint import (
    CheckpointArgs,
    CheckpointError,
    CheckpointManager,
    fault_point,
    get_rng_state,
    load_model_optim,
    set_rng_state,
)
from lingua.data import DataArgs, DataError, build_dataloader, check_data_args, data_metrics, init_dataloader_state
from lingua.distributed import (
    DistributedArgs,
    any_rank,
    check_mesh_shape,
    get_launch_env,
    parallelize_model,
    run_then_destroy,
    setup_torch_distributed,
)
from lingua.logger import init_logger
from lingua.metrics import LoggingArgs, MetricLogger, gpu_peak_flops
from lingua.optim import OptimArgs, build_optimizer
from lingua.preemption import PreemptionHandler
from lingua.profiling import ProfilerArgs, maybe_profile
from lingua.tokenizer import build_tokenizer

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
    async_eval_gpus: Optional[int] = None  # unset: evals run inline on the training ranks; N: as SLURM jobs, N GPUs/node (0 = CPU)

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
    check_data_args(args.data)
    check_mesh_shape(args.distributed, get_launch_env().world_size)
    return args


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    acc_step: int = 0  # micro-batches into the current accumulation cycle (always 0 at a save)
    data_state: Optional[dict] = None  # data-loader state after the last consumed batch


def build_model(args: TrainArgs, dist_state, init: bool = True) -> LMTransformer:
    """The sharded model; init=False when every parameter is loaded next (resume): only buffers are built."""
    with torch.device("meta"):
        model = LMTransformer(args.model)
    model = parallelize_model(model, dist_state.mesh, args.distributed)
    model.to_empty(device=dist_state.device)
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    return model


def restore(args: TrainArgs, ckpt_dir: str, model, optimizer, scheduler, dist_state) -> TrainState:
    """Load model + optimizer (resharding if needed) and this rank's train state."""
    load_model_optim(ckpt_dir, model, optimizer)
    with open(os.path.join(ckpt_dir, "COMMIT.json")) as f:
        saved_dp = json.load(f)["dp_world_size"]
    # Same layout: this rank's own state. Changed layout: step and scheduler (identical on every rank) from
    # rank 0's file; the data state is then reset below or refused.
    own_rank = dist_state.dp_rank if saved_dp == dist_state.dp_world_size else 0
    with open(os.path.join(ckpt_dir, f"train_state_{own_rank:05d}.json")) as f:
        saved = json.load(f)
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(step=saved["step"], acc_step=saved["acc_step"], data_state=saved["data"])
    if saved_dp != dist_state.dp_world_size:
        if not args.checkpoint.reset_data_state:
            raise CheckpointError(
                f"{ckpt_dir} was saved with {saved_dp} data-parallel ranks, this run has {dist_state.dp_world_size}: "
                "the data-loader state cannot be mapped onto the new layout. Model and optimizer can be resumed "
                "with checkpoint.reset_data_state=true, which restarts the data stream from its beginning."
            )
        logger.warning(
            f"data-parallel layout changed ({saved_dp} -> {dist_state.dp_world_size}) and "
            "checkpoint.reset_data_state=true: the data stream restarts from the beginning"
        )
        state.data_state = None
    elif args.checkpoint.reset_data_state:
        logger.warning("checkpoint.reset_data_state=true: the data stream restarts from the beginning")
        state.data_state = None
    else:
        set_rng_state(saved["rng"])
    logger.info(f"resumed from {ckpt_dir} at step {state.step}")
    return state


def train(args: TrainArgs) -> int:
    os.makedirs(args.dump_dir, exist_ok=True)
    env = get_launch_env()
    init_logger(env.rank, os.path.join(args.dump_dir, "train.log"))
    preemption = PreemptionHandler().install()
    dist_state = setup_torch_distributed(args.distributed)
    is_master = dist_state.is_master
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    tokenizer = build_tokenizer(args.data.tokenizer)
    if args.model.vocab_size < 0:
        args.model.vocab_size = tokenizer.n_words
    elif args.model.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model.vocab_size ({args.model.vocab_size}) < tokenizer vocabulary ({tokenizer.n_words})")

    config_dict = config_to_dict(args)
    ckpt = CheckpointManager(args.checkpoint, args.dump_dir, dist_state, config_dict)
    ckpt.prepare()
    resume_dir = ckpt.resolve()
    # Resuming loads every parameter: initialising them first would be wasted (seconds on CPU).
    model = build_model(args, dist_state, init=not resume_dir)
    n_params = num_params(model)
    logger.info(f"model: {n_params / 1e6:.2f}M parameters, {args.model.n_layers} layers, dim {args.model.dim}")
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)

    if resume_dir:
        state = restore(args, resume_dir, model, optimizer, scheduler, dist_state)
    else:
        state = TrainState()
        if args.checkpoint.init_ckpt_path:
            logger.info(f"initialising model weights from {args.checkpoint.init_ckpt_path} (fresh optimizer)")
            load_model_optim(args.checkpoint.init_ckpt_path, model)
    if state.data_state is None:
        state.data_state = init_dataloader_state(args.data, dist_state.dp_rank, dist_state.dp_world_size)

    if state.step >= args.steps:
        logger.info(f"run already complete: step {state.step} >= steps={args.steps}; nothing to do")
        return 0
    if is_master:
        dump_config(args, os.path.join(args.dump_dir, "config.yaml"))
    metric_logger = None
    if is_master:
        metric_logger = MetricLogger(
            os.path.join(args.dump_dir, "metrics.jsonl"), state.step, args.logging.wandb, config_dict,
            args.name, args.dump_dir,
        )

    gc.disable()
    tokens_per_step = args.data.batch_size * args.data.seq_len * args.grad_acc_steps
    flops_token = flops_per_token(args.model, n_params, args.data.seq_len)
    peak = gpu_peak_flops(dist_state.device)
    window_start, window_tokens = time.time(), 0
    exit_code = 0
    try:
        with build_dataloader(args.data, state.data_state, dp_rank=dist_state.dp_rank,
                              dp_world_size=dist_state.dp_world_size) as batches, \
                maybe_profile(args.profiling, args.dump_dir, dist_state.env.rank, state.step) as profiler_step:
            while state.step < args.steps:
                step_start = time.time()
                loss_sum = 0.0
                for micro in range(args.grad_acc_steps):
                    batch, data_state = next(batches)
                    state.acc_step = micro + 1
                    batch = torch.from_numpy(batch).to(dist_state.device, non_blocking=True)
                    inputs, targets = batch[..., 0], batch[..., 1]
                    model.set_requires_gradient_sync(micro == args.grad_acc_steps - 1)
                    loss = model(inputs, targets) / args.grad_acc_steps
                    loss.backward()
                    loss_sum += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), max_norm=args.optim.clip if args.optim.clip > 0 else float("inf"), foreach=True
                )
                ckpt.wait_staged()  # an async save must have its copy of the state before the step changes it
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.acc_step = 0
                state.data_state = data_state
                window_tokens += tokens_per_step
                profiler_step()

                if state.step % args.gc_collect_freq == 0:
                    gc.collect()
                if state.step % args.logging.freq == 0 or state.step == args.steps:
                    loss_t = torch.as_tensor(loss_sum, dtype=torch.float32, device=dist_state.device).reshape(1)
                    dist.all_reduce(loss_t)  # SUM: gloo has no AVG
                    loss_t /= dist_state.env.world_size
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    elapsed = time.time() - window_start
                    metrics = {
                        "global_step": state.step,
                        "loss/out": loss_t.item(),
                        "optim/lr": scheduler.get_last_lr()[0],
                        "optim/grad_norm": float(grad_norm),
                        "speed/wps": window_tokens / elapsed,
                        "speed/step_time_s": time.time() - step_start,
                        "data/tokens_seen": state.step * tokens_per_step * dist_state.dp_world_size,
                        **data_metrics(state.data_state),
                    }
                    if peak:
                        metrics["speed/mfu"] = flops_token * metrics["speed/wps"] / peak
                    if dist_state.device.type == "cuda":
                        metrics["mem/max_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if not math.isfinite(metrics["loss/out"]):
                        logger.warning(f"non-finite loss at step {state.step}")
                    logger.info(
                        f"step {state.step}/{args.steps} loss {metrics['loss/out']:.4f} "
                        f"grad {metrics['optim/grad_norm']:.3f} lr {metrics['optim/lr']:.2e} "
                        f"wps {metrics['speed/wps']:.0f}" + (f" mfu {metrics['speed/mfu']:.3f}" if peak else "")
                    )
                    if metric_logger:
                        metric_logger.log(metrics)
                    window_start, window_tokens = time.time(), 0

                fault_point(f"step_{state.step}")  # test-only: LINGUA_FAULT=step_<n>[:<rank>]
                if os.environ.get("LINGUA_TEST_STEP_SLEEP"):  # test-only: slow steps so a test can signal mid-run
                    time.sleep(float(os.environ["LINGUA_TEST_STEP_SLEEP"]))
                ckpt.poll()
                kinds = due_checkpoint_kinds(args, state.step)
                # Decided together: if any rank got the signal, every rank stops at this step.
                preempted = any_rank(preemption.requested, dist_state.cpu_group)
                if kinds or preempted or state.step == args.steps:
                    saved = ckpt.save(
                        state.step, model, optimizer, train_state_dict(state, scheduler), kinds or ["dump"]
                    )
                    if state.step == args.steps or preempted:
                        saved = ckpt.wait() and saved
                    if not saved and state.step == args.steps:
                        exit_code = 1  # the run finished but its final state is not on disk: say so
                    # EVAL HOOK: when "eval" in kinds and the save succeeded, evaluate the committed checkpoint
                    # (inline, or as a SLURM job when args.async_eval_gpus is set).
                    if "eval" in kinds and args.eval is not None:  # never raises: a failing eval is logged, training goes on
                        maybe_run_eval(args, state.step, kinds, saved, ckpt, model, dist_state, metric_logger, preempted)
                if preempted:
                    logger.info(f"preempted ({preemption.signal_name or 'signal on another rank'}): "
                                f"checkpoint at step {state.step} done, exiting")
                    if is_master:
                        from lingua.slurm import in_slurm_job, requeue_current_job

                        if in_slurm_job():
                            requeue_current_job(args.max_requeues)
                    break
            ckpt.wait()
    finally:
        if metric_logger:
            metric_logger.close()
        gc.enable()
    if state.step >= args.steps:
        logger.info(f"training complete at step {state.step}")
    return exit_code


def due_checkpoint_kinds(args: TrainArgs, step: int) -> list:
    kinds = []
    if args.checkpoint.dump.every > 0 and step % args.checkpoint.dump.every == 0:
        kinds.append("dump")
    if args.checkpoint.eval.every > 0 and step % args.checkpoint.eval.every == 0:
        kinds.append("eval")
    return kinds


def train_state_dict(state: TrainState, scheduler) -> dict:
    return {
        "step": state.step,
        "acc_step": state.acc_step,
        "scheduler": scheduler.state_dict(),
        "data": state.data_state,
        "rng": get_rng_state(),
    }


def main(argv=None) -> int:
    try:
        args = load_train_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return run_then_destroy(lambda: train(args), (ConfigError, CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main())
