r"""Evaluate a checkpoint: validation loss / perplexity / bits-per-byte per held-out source, optional
lm-evaluation-harness tasks, and a few generation samples. Resumable: rerun the same command.

    python -m apps.main.eval config=configs/eval.yaml ckpt_dir=<run>/checkpoints/0000001000 \
        dump_dir=<run>/evals/0000001000
    torchrun --nproc-per-node 2 -m apps.main.eval config=...        (or srun: ranks from SLURM variables)

The checkpoint is read directly (DCP, resharded onto any number of processes; the model is built from its
saved config) or from a consolidated file (`python -m lingua.checkpoint consolidate`). Results go to
`<dump_dir>/results.json`, one line per (step, eval dir) in the training run's `metrics.eval.jsonl`, and to
wandb when `wandb` is set. Every part (one validation source, one harness task, the samples) is recorded in
`<dump_dir>/parts/` as soon as it is done; a rerun skips recorded parts. docs/eval.md has the details.

From training (apps/main/train.py, `checkpoint.eval.every` + an `eval:` section): `maybe_run_eval` runs this
inline on the training ranks, or, with `async_eval_gpus` set, submits it as a SLURM job through lingua.stool
with its own `<dump_dir>/evals/<step>/submit.slurm`.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingua import faults
from lingua.args import Choice, ConfigError, config_to_dict, parse_args
from lingua.checkpoint import CheckpointError, pin, rng_state, set_rng_state, step_dir_name, unpin
from lingua.data import DataError, find_validation_files, read_jsonl_documents
from lingua.distributed import (
    DistributedArgs,
    all_agree,
    broadcast_object,
    gather_objects,
    get_launch_env,
    run_main,
    setup_torch_distributed,
)
from lingua.files import write_json, write_jsonl
from lingua.generation import GenerationArgs, generate
from lingua.logger import init_logger
from lingua.metrics import WandbArgs, append_eval_record, init_wandb
from lingua.pretrained import ModelSource, find_model, load_model
from lingua.tokenizer import TokenizerArgs, build_tokenizer

logger = logging.getLogger("eval")

METRICS_FILE = "metrics.eval.jsonl"
RESULTS_FILE = "results.json"
PARTS_DIR = "parts"
SAMPLES_FILE = "samples.jsonl"


class Launcher(Choice):
    sbatch = "sbatch"
    bash = "bash"


class EvalError(RuntimeError):
    """The eval cannot run or finish; the message names the problem."""


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class ValidationArgs:
    root_dir: Optional[str] = None  # held-out data <root_dir>/<source>/*.val.jsonl; default: the run's data.root_dir
    sources: List[str] = field(default_factory=list)  # sources to evaluate; empty = the run's sources with val files
    max_steps: Optional[int] = None  # at most this many batches per source (None = the whole held-out set)
    batch_size: Optional[int] = None  # sequences per batch; default: the run's data.batch_size
    seq_len: Optional[int] = None  # tokens per sequence; default: the run's data.seq_len


@dataclass
class HarnessArgs:
    tasks: List[str] = field(default_factory=list)  # lm-evaluation-harness task names (pip install lingua[eval])
    include_path: Optional[str] = None  # folder of extra task YAMLs (e.g. local tasks that need no hub)
    include_defaults: bool = True  # also index lm-eval's built-in tasks (takes ~10 s; false for local tasks only)
    num_fewshot: Optional[int] = None  # few-shot examples (None: each task's default)
    limit: Optional[float] = None  # examples per task (< 1: a fraction); for quick checks only
    batch_size: int = 8  # sequences per forward pass
    max_length: Optional[int] = None  # context length; default: the model's max_seqlen
    bootstrap_iters: int = 0  # stderr bootstrap iterations (0 = no stderr, fast)
    seed: int = 1234  # seeds lm-eval's few-shot sampling and global RNGs


@dataclass
class EvalSlurmArgs:
    """How `async_eval_gpus` eval jobs are submitted (lingua.stool options; GPUs per node = async_eval_gpus)."""

    partition: str = ""  # SLURM partition; empty = the partition of the training job (SLURM_JOB_PARTITION)
    nodes: int = 1  # nodes of the eval job
    ntasks_per_node: Optional[int] = None  # tasks per node (GPU mode: one per GPU; CPU mode default 1)
    ncpu: int = 8  # CPUs per task
    mem: str = ""  # memory per node (--mem); empty = cluster default
    time: str = ""  # time limit; empty = partition default
    account: str = ""  # --account
    qos: str = ""  # --qos
    constraint: str = ""  # --constraint
    launcher: Launcher = Launcher.sbatch  # sbatch (submit and return) | bash (run here, blocking: for debugging)
    code_dir: str = ""  # run from this code snapshot; empty = the training job's snapshot, else the working tree


@dataclass
class EvalArgs:
    name: str = "eval"  # name of the eval (logs, wandb)
    dump_dir: str = ""  # where this eval writes results.json, parts/, samples.jsonl, logs (required)
    ckpt_dir: str = ""  # a committed checkpoint, consolidated folder / .pth, or a Hugging Face Llama folder (required)
    run_dir: Optional[str] = None  # run whose metrics.eval.jsonl gets a line; default: from the checkpoint path
    global_step: Optional[int] = None  # step to record; default: the checkpoint's step
    validation: Optional[ValidationArgs] = field(default_factory=ValidationArgs)  # null = no validation
    harness: Optional[HarnessArgs] = None  # lm-evaluation-harness tasks; null = none
    generator: GenerationArgs = field(default_factory=GenerationArgs)  # samples and harness generate_until
    samples: List[str] = field(default_factory=lambda: ["The "])  # prompts for samples.jsonl; empty = none
    distributed: DistributedArgs = field(default_factory=DistributedArgs)  # FSDP settings of the eval model
    slurm: EvalSlurmArgs = field(default_factory=EvalSlurmArgs)  # async evals launched by the trainer
    wandb: Optional[WandbArgs] = None  # log the results to wandb (its own run, id in <run_dir>/wandb_eval_run_id)

    def validate(self):
        self.distributed.validate()
        self.generator.validate("generator")
        v = self.validation
        if v is not None:
            for key in ("max_steps", "batch_size", "seq_len"):
                value = getattr(v, key)
                if value is not None and value < 1:
                    raise ConfigError(f"validation.{key} must be >= 1 (or unset), got {value}")
        if self.harness is not None and self.harness.batch_size < 1:
            raise ConfigError(f"harness.batch_size must be >= 1, got {self.harness.batch_size}")


CONFIG_CLASS = EvalArgs


# -------------------------------------------------------------------------------------------------- the plan


@dataclass
class EvalPlan:
    """Everything checked before any process group exists."""

    source: Optional[ModelSource]  # the checkpoint; None inline from training (the model is already in memory)
    params: dict  # the training config the checkpoint was saved with
    step: int
    run_dir: Optional[str]
    val_sources: Dict[str, List[str]]  # source -> val files
    val_spec: dict  # what decides the validation numbers (a recorded part is reused only under the same spec)
    tasks: List[str]
    tokenizer_args: TokenizerArgs


def _val_root(args: EvalArgs, params: dict) -> Optional[str]:
    explicit = args.validation.root_dir if args.validation is not None else None
    return explicit or (params.get("data") or {}).get("root_dir")


def resolve_validation(args: EvalArgs, params: dict) -> Dict[str, List[str]]:
    """source -> its held-out files; ConfigError naming a missing source / folder / file."""
    v = args.validation
    if v is None:
        return {}
    root = _val_root(args, params)
    if not root:
        raise ConfigError("validation.root_dir is not set and the checkpoint's params.json has no data.root_dir")
    if not os.path.isdir(root):
        raise ConfigError(f"validation.root_dir '{root}' does not exist or is not a folder")
    if v.sources:
        out = {}
        for name in v.sources:
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                raise ConfigError(f"validation source '{name}': folder '{folder}' does not exist (validation.sources)")
            files = find_validation_files(root, name)
            if not files:
                raise ConfigError(
                    f"validation source '{name}': no *.val.jsonl file in '{folder}' (setup/prepare_data.py writes "
                    f"<source>.val.jsonl; validation.sources)"
                )
            out[name] = files
        return out
    trained = list(((params.get("data") or {}).get("sources") or {}).keys())
    names = trained or sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    out = {}
    for name in names:
        files = find_validation_files(root, name)
        if files:
            out[name] = files
        elif trained:
            logger.warning(f"validation: source '{name}' has no *.val.jsonl under {root}; skipped")
    if not out:
        raise ConfigError(
            f"validation: no held-out files (<source>/*.val.jsonl) under validation.root_dir '{root}' for "
            f"{', '.join(names) or 'any source'}; set validation.sources, or validation: null to skip validation"
        )
    return out


_TASK_MANAGERS: dict = {}


def task_manager(h: HarnessArgs):
    """lm-eval's TaskManager for these options (cached: indexing the built-in tasks takes seconds)."""
    key = (h.include_path, h.include_defaults)
    if key not in _TASK_MANAGERS:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ConfigError(
                f"harness.tasks needs lm-evaluation-harness: pip install 'lm-eval' (or the eval extra) ({e})"
            ) from None
        if h.include_path and not os.path.isdir(h.include_path):
            raise ConfigError(f"harness.include_path '{h.include_path}' is not a folder")
        _TASK_MANAGERS[key] = TaskManager(include_path=h.include_path, include_defaults=h.include_defaults)
    return _TASK_MANAGERS[key]


def resolve_tasks(args: EvalArgs) -> List[str]:
    h = args.harness
    if h is None or not h.tasks:
        return []
    tm = task_manager(h)
    known = set(tm.all_tasks)
    for name in h.tasks:
        if name not in known:
            where = f"harness.include_path '{h.include_path}'" if h.include_path else "no harness.include_path"
            builtin = ("lm-eval's built-in tasks" if h.include_defaults
                       else "no built-in tasks (harness.include_defaults=false)")
            raise ConfigError(f"unknown harness task '{name}' (searched {builtin} and {where})")
    return list(h.tasks)


def _val_spec(args: EvalArgs, params: dict, tok: TokenizerArgs) -> dict:
    data = params.get("data") or {}
    v = args.validation or ValidationArgs()
    return {
        "root_dir": os.path.abspath(_val_root(args, params) or ""),
        "max_steps": v.max_steps,
        "batch_size": int(v.batch_size or data.get("batch_size") or 8),
        "seq_len": int(v.seq_len or data.get("seq_len") or params["model"].get("max_seqlen")),
        "add_bos": bool(data.get("add_bos", True)),
        "add_eos": bool(data.get("add_eos", True)),
        "tokenizer": {"name": tok.name, "path": tok.path},
    }


def prepare_eval(args: EvalArgs, params: Optional[dict] = None, step: Optional[int] = None) -> EvalPlan:
    """Check the checkpoint, the validation data and the harness tasks; no process group needed.
    With `params` (inline from training) the checkpoint files are not read: the model is in memory."""
    if not args.dump_dir:
        raise ConfigError("dump_dir is not set (where the eval writes its results, e.g. <run>/evals/0000001000)")
    args.validate()  # (inline evals: TrainArgs.validate does not look into the eval section)
    source = None
    if params is None:
        source = find_model(args.ckpt_dir)
        params, step = source.params, source.step
    step = args.global_step if args.global_step is not None else step
    if step is None:
        raise ConfigError(f"cannot tell the step of {args.ckpt_dir}: set global_step=<step>")
    run_dir = args.run_dir or (source.run_dir if source else None)
    tok = source.tokenizer_args if source else TokenizerArgs(**((params.get("data") or {}).get("tokenizer") or {}))
    spec = _val_spec(args, params, tok)
    max_seqlen = int(params["model"].get("max_seqlen", 0))
    if args.validation is not None and spec["seq_len"] > max_seqlen:
        raise ConfigError(f"validation.seq_len ({spec['seq_len']}) exceeds the model's max_seqlen ({max_seqlen})")
    return EvalPlan(
        source=source, params=params, step=int(step), run_dir=run_dir,
        val_sources=resolve_validation(args, params), val_spec=spec, tasks=resolve_tasks(args), tokenizer_args=tok,
    )


# --------------------------------------------------------------------------------------------- result parts


def eval_pin_tag(eval_dir: str) -> str:
    """The pin an eval of `eval_dir` holds on its checkpoint (the trainer and the eval job compute the same)."""
    return "eval-" + hashlib.sha1(os.path.abspath(eval_dir).encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class PartStore:
    """`<dump_dir>/parts/<kind>.<name>.json`, one per finished part, written atomically by rank 0."""

    def __init__(self, dump_dir: str):
        self.dir = os.path.join(dump_dir, PARTS_DIR)

    def path(self, kind: str, name: str) -> str:
        return os.path.join(self.dir, f"{kind}.{_safe(name)}.json")

    def get(self, kind: str, name: str, spec: dict) -> Optional[dict]:
        path = self.path(kind, name)
        try:
            with open(path) as f:
                part = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning(f"unreadable result part {path} ({e}); recomputing it")
            return None
        if part.get("spec") != spec:
            logger.info(f"{path} was computed with other settings; recomputing it")
            return None
        return part

    def put(self, kind: str, name: str, spec: dict, result) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        part = {"kind": kind, "name": name, "spec": spec, "result": result, "computed_at": time.time(),
                "pid": os.getpid()}
        write_json(self.path(kind, name), part)
        return part


# ----------------------------------------------------------------------------------------------- validation


def validation_stream(files: List[str], tokenizer, add_bos: bool, add_eos: bool, max_targets: Optional[int]):
    """(tokens, n_targets, n_bytes): the documents of `files` tokenized and concatenated (as in training),
    cut so that positions 1..n_targets are scored; n_bytes = UTF-8 bytes of the scored text."""
    pieces, docs, total = [], [], 0
    for path in files:
        for text in read_jsonl_documents(path):
            ids = tokenizer.encode_array(text, add_bos, add_eos)
            if not len(ids):
                continue
            docs.append((total, total + len(ids), len(text.encode("utf-8"))))
            pieces.append(ids)
            total += len(ids)
            if max_targets is not None and total >= max_targets + 1:
                break
        if max_targets is not None and total >= max_targets + 1:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = max(len(stream) - 1, 0)
    if max_targets is not None:
        n = min(n, max_targets)
    n_bytes = 0
    for start, end, nb in docs:
        if end - 1 <= n:
            n_bytes += nb
        elif start <= n:  # the document the cut falls in: the bytes of its scored tokens
            n_bytes += len(tokenizer.decode(stream[max(start, 1) : n + 1].tolist()).encode("utf-8"))
    return stream[: n + 1], n, n_bytes


@torch.no_grad()
def eval_stream(model, stream: np.ndarray, n: int, seq_len: int, batch_size: int, dist_state) -> dict:
    """Summed cross-entropy over the n targets of `stream`. Batch k (rows k*B.. of seq_len targets each; the
    same batches whatever the world size) runs on rank k % world; ranks without a batch in a round make a
    tiny forward so FSDP's collectives stay in step. Sums are float64, added in batch order: the result is
    the same, bit for bit, with any number of processes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist_state.device
    L, B = seq_len, batch_size
    n_rows = (n + L - 1) // L
    n_batches = (n_rows + B - 1) // B
    stream_t = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    local = []
    for r in range((n_batches + world - 1) // world):
        k = r * world + rank
        if k >= n_batches:
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
            continue
        rows = range(k * B, min((k + 1) * B, n_rows))
        x = torch.zeros((len(rows), L), dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, j in enumerate(rows):
            end = min(j * L + L, n)
            x[i, : end - j * L] = stream_t[j * L : end]
            y[i, : end - j * L] = stream_t[j * L + 1 : end + 1]
        logits = model(x.to(device))
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="none")
        local.append((k, ce.double().sum().item(), int((y != -100).sum())))
    parts = sorted(p for chunk in gather_objects(local, dist_state.cpu_group) for p in chunk)
    loss_sum = 0.0
    tokens = 0
    for _, s, c in parts:
        loss_sum += s
        tokens += c
    return {"loss_sum": loss_sum, "tokens": tokens, "batches": n_batches}


def run_validation_source(model, tokenizer, files: List[str], spec: dict, dist_state) -> dict:
    L, B = spec["seq_len"], spec["batch_size"]
    max_targets = spec["max_steps"] * B * L if spec["max_steps"] else None
    stream, n, n_bytes = validation_stream(files, tokenizer, spec["add_bos"], spec["add_eos"], max_targets)
    if n == 0:
        raise EvalError(f"validation files {files} hold no tokens to score")
    out = eval_stream(model, stream, n, L, B, dist_state)
    loss = out["loss_sum"] / out["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": out["loss_sum"] / math.log(2) / n_bytes if n_bytes else None,
        "tokens": out["tokens"],
        "bytes": n_bytes,
        "batches": out["batches"],
        "loss_sum": out["loss_sum"],
    }


# --------------------------------------------------------------------------------------------------- the run


def run_eval(args: EvalArgs, plan: EvalPlan, model, tokenizer, dist_state, wandb_run=None) -> dict:
    """Every part not yet recorded, then results.json and the metrics line. Called by every rank together."""
    group = dist_state.cpu_group
    is_master = dist.get_rank() == 0
    store = PartStore(args.dump_dir)
    if is_master:
        os.makedirs(args.dump_dir, exist_ok=True)
    spec = plan.val_spec
    step_spec = {"step": plan.step}
    was_training = model.training
    model.eval()
    try:
        for source, files in plan.val_sources.items():
            done = broadcast_object(store.get("val", source, {**spec, **step_spec}) is not None if is_master else None,
                                    group)
            if done:
                logger.info(f"validation '{source}': already recorded, skipped")
                continue
            t0 = time.time()
            result = run_validation_source(model, tokenizer, files, spec, dist_state)
            result["seconds"] = time.time() - t0
            if is_master:
                store.put("val", source, {**spec, **step_spec}, result)
            logger.info(f"validation '{source}': loss {result['loss']:.4f} ppl {result['perplexity']:.3f} "
                        f"bpb {result['bits_per_byte']:.4f} ({result['tokens']} tokens, {result['seconds']:.1f}s)")
            dist.barrier(group=group)
            faults.point("eval.after_part")
        for task in plan.tasks:
            task_spec = {"task": task, "harness": dataclasses.asdict(args.harness), **step_spec}
            done = broadcast_object(store.get("task", task, task_spec) is not None if is_master else None, group)
            if done:
                logger.info(f"harness task '{task}': already recorded, skipped")
                continue
            result = run_harness_task(model, tokenizer, task, args, plan)
            if is_master:
                store.put("task", task, task_spec, result)
            dist.barrier(group=group)
            faults.point("eval.after_part")
        if args.samples:
            gen_spec = {"prompts": list(args.samples), "generator": dataclasses.asdict(args.generator), **step_spec}
            done = broadcast_object(store.get("samples", "samples", gen_spec) is not None if is_master else None, group)
            if not done:
                texts = generate(model, tokenizer, list(args.samples), args.generator)
                if is_master:
                    write_jsonl(os.path.join(args.dump_dir, SAMPLES_FILE),
                                [{"prompt": p, "generation": t} for p, t in zip(args.samples, texts)])
                    store.put("samples", "samples", gen_spec, {"file": SAMPLES_FILE, "count": len(texts)})
                dist.barrier(group=group)
    finally:
        model.train(was_training)
    results = None
    if is_master:
        results = finalize(args, plan, store, wandb_run)
    return broadcast_object(results, group)


def run_harness_task(model, tokenizer, task: str, args: EvalArgs, plan: EvalPlan) -> dict:
    """One lm-eval task on every rank (each rank handles every request: FSDP needs the same calls on all
    ranks); returns {metric: value} and the per-subtask table."""
    import lm_eval

    from lingua.lm_eval_wrapper import build_lm

    h = args.harness
    max_length = h.max_length or int(plan.params["model"]["max_seqlen"])
    lm = build_lm(model, tokenizer, args.generator, batch_size=h.batch_size, max_length=max_length)
    t0 = time.time()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=h.num_fewshot,
        limit=(int(h.limit) if h.limit is not None and h.limit >= 1 else h.limit),
        bootstrap_iters=h.bootstrap_iters, log_samples=False, task_manager=task_manager(h),
        random_seed=h.seed, numpy_random_seed=h.seed, torch_random_seed=h.seed, fewshot_random_seed=h.seed,
    )
    metrics = {}
    table = {}
    for name, values in ((out or {}).get("results") or {}).items():
        clean = {}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
                clean[key.replace(",none", "")] = float(value)
        table[name] = clean
        for key, value in clean.items():
            metrics[f"{name}/{key}"] = value
    logger.info(f"harness task '{task}': {metrics} ({time.time() - t0:.1f}s)")
    return {"metrics": metrics, "table": table, "seconds": time.time() - t0}


def collect_results(args: EvalArgs, plan: EvalPlan, store: PartStore) -> dict:
    step_spec = {"step": plan.step}
    validation, tasks = {}, {}
    for source in plan.val_sources:
        part = store.get("val", source, {**plan.val_spec, **step_spec})
        if part is None:
            raise EvalError(f"validation '{source}' has no recorded result in {store.dir}")
        validation[source] = {**part["result"], "computed_at": part["computed_at"]}
    for task in plan.tasks:
        part = store.get("task", task, {"task": task, "harness": dataclasses.asdict(args.harness), **step_spec})
        if part is None:
            raise EvalError(f"harness task '{task}' has no recorded result in {store.dir}")
        tasks[task] = {**part["result"], "computed_at": part["computed_at"]}
    return {
        "global_step": plan.step,
        "ckpt_dir": plan.source.path if plan.source else None,
        "eval_dir": os.path.abspath(args.dump_dir),
        "validation": validation,
        "tasks": tasks,
        "samples": os.path.join(os.path.abspath(args.dump_dir), SAMPLES_FILE) if args.samples else None,
    }


def flat_metrics(results: dict) -> dict:
    out = {}
    for source, r in results["validation"].items():
        for key in ("loss", "perplexity", "bits_per_byte", "tokens"):
            if r.get(key) is not None:
                out[f"val/{source}/{key}"] = r[key]
    for task in results["tasks"].values():
        out.update(task["metrics"])
    return out


def finalize(args: EvalArgs, plan: EvalPlan, store: PartStore, wandb_run=None) -> dict:
    """Rank 0: results.json, the metrics.eval.jsonl line, wandb."""
    results = collect_results(args, plan, store)
    results["metrics"] = flat_metrics(results)
    results["finished_at"] = time.time()
    write_json(os.path.join(args.dump_dir, RESULTS_FILE), results)
    if plan.run_dir:
        record = {"global_step": plan.step, "created_at": time.time(), "eval_dir": results["eval_dir"],
                  **results["metrics"]}
        changed = append_eval_record(os.path.join(plan.run_dir, METRICS_FILE), record)
        logger.info(f"results of step {plan.step} {'written to' if changed else 'already in'} "
                    f"{os.path.join(plan.run_dir, METRICS_FILE)}")
        if changed:
            _log_wandb(args, plan, results["metrics"], wandb_run)
    else:
        logger.warning("no training run dir known (set run_dir=...): results only in " + args.dump_dir)
    return results


def _log_wandb(args: EvalArgs, plan: EvalPlan, metrics: dict, wandb_run) -> None:
    try:
        if wandb_run is not None:  # inline: the trainer's run
            wandb_run.log({f"eval/{k}": v for k, v in metrics.items()}, step=plan.step)
            return
        if args.wandb is None or args.wandb.mode == "disabled" or not plan.run_dir:
            return
        run = init_wandb(args.wandb, None, args.name, plan.run_dir, id_file="wandb_eval_run_id")
        run.log({f"eval/{k}": v for k, v in metrics.items()} | {"global_step": plan.step})
        run.finish()
    except Exception as e:  # noqa: BLE001 (wandb must never fail an eval)
        logger.warning(f"wandb logging failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------- from training


def maybe_run_eval(train_args, step: int, ckpt, model, dist_state, metric_logger=None, preempted: bool = False) -> None:
    """The trainer's eval hook (every rank calls it after an eval-kind save). Never raises: a failing eval is
    logged and training continues with its state untouched (model mode, RNG states, no gradients)."""
    try:
        if preempted and train_args.async_eval_gpus is None:
            logger.warning(f"inline eval of step {step} skipped: the run is being preempted "
                           f"(run it later with python -m apps.main.eval)")
            return
        ckpt_dir = ckpt.committed(step)  # only a committed checkpoint is evaluated
        if ckpt_dir is None:
            logger.warning(f"eval of step {step} skipped: its checkpoint was not committed")
            return
        eval_args = copy.deepcopy(train_args.eval)
        eval_args.ckpt_dir, eval_args.global_step = ckpt_dir, step
        eval_args.dump_dir = os.path.join(train_args.dump_dir, "evals", step_dir_name(step))
        eval_args.run_dir = os.path.abspath(train_args.dump_dir)
        if train_args.async_eval_gpus is None:
            run_inline_eval(train_args, eval_args, step, model, dist_state, metric_logger)
        elif dist_state.is_master:
            launch_async_eval(train_args, eval_args)
    except Exception as e:  # noqa: BLE001 (an eval must never stop training)
        logger.error(f"eval of step {step} FAILED, training continues: {type(e).__name__}: {e}", exc_info=True)


def run_inline_eval(train_args, eval_args: EvalArgs, step: int, model, dist_state, metric_logger=None) -> None:
    """All training ranks evaluate the live model (no reload), then restore every RNG and the model mode."""
    rng = rng_state()
    was_training = model.training
    t0 = time.time()
    try:
        error = None
        try:
            plan = prepare_eval(eval_args, params=config_to_dict(train_args), step=step)
        except (ConfigError, CheckpointError, EvalError, DataError, OSError) as e:
            error, plan = f"{type(e).__name__}: {e}", None
        if not all_agree(error is None, dist_state.cpu_group):
            raise EvalError(error or "the eval config failed its checks on another rank")
        tokenizer = build_tokenizer(plan.tokenizer_args)
        wandb_run = getattr(metric_logger, "wandb", None)
        with torch.no_grad():
            results = run_eval(eval_args, plan, model, tokenizer, dist_state, wandb_run)
        logger.info(f"eval of step {step} done in {time.time() - t0:.1f}s: {results['metrics']}")
    finally:
        model.train(was_training)
        set_rng_state(rng)


def launch_async_eval(train_args, eval_args: EvalArgs):
    """Rank 0: pin the checkpoint and submit the eval as its own SLURM job (lingua.stool.submit_in_background;
    training does not wait). Returns the submitting thread, or None when the eval has results already."""
    from lingua.stool import submit_in_background

    eval_dir, step = eval_args.dump_dir, eval_args.global_step
    if os.path.exists(os.path.join(eval_dir, RESULTS_FILE)):
        logger.info(f"eval of step {step} already has results in {eval_dir}; not relaunched")
        return None
    if eval_args.wandb is None and train_args.logging.wandb is not None:
        eval_args.wandb = copy.deepcopy(train_args.logging.wandb)
    eval_args.name = f"{train_args.name}_eval"
    s, ngpu = eval_args.slurm, int(train_args.async_eval_gpus)
    options = {
        "launcher": s.launcher, "code_dir": s.code_dir, "nodes": s.nodes, "ngpu": ngpu,
        "ntasks_per_node": s.ntasks_per_node if s.ntasks_per_node is not None else (ngpu if ngpu > 0 else 1),
        "ncpu": s.ncpu, "mem": s.mem, "time": s.time, "partition": s.partition, "account": s.account,
        "qos": s.qos, "constraint": s.constraint, "job_name": f"{train_args.name}_eval_{step}",
    }
    tag = eval_pin_tag(eval_dir)
    pin(eval_args.ckpt_dir, tag)  # retention keeps the checkpoint until the eval job unpins it
    return submit_in_background("apps.main.eval", eval_args, eval_dir, options, what=f"eval of step {step}",
                                record={"step": step, "ckpt_dir": eval_args.ckpt_dir, "pin": tag},
                                on_failure=lambda: unpin(eval_args.ckpt_dir, tag))


# ------------------------------------------------------------------------------------------------------ CLI


def _try_pin(ckpt_dir: str, tag: str) -> bool:
    """Pin the checkpoint for the eval's duration (released when it finishes); a read-only one cannot be."""
    try:
        pin(ckpt_dir, tag)
        return True
    except OSError as e:
        logger.warning(f"cannot pin {ckpt_dir} ({e}); retention of its run may delete it during the eval")
        return False


def parse_eval_config(argv=None) -> EvalArgs:
    args = parse_args(EvalArgs, argv)
    if not args.dump_dir:
        raise ConfigError("dump_dir is not set (where the eval writes results, e.g. <run>/evals/0000001000)")
    if not args.ckpt_dir:
        raise ConfigError("ckpt_dir is not set (a committed checkpoint such as <run>/checkpoints/0000001000)")
    return args


def evaluate(args: EvalArgs) -> int:
    os.makedirs(args.dump_dir, exist_ok=True)
    init_logger(get_launch_env().rank, os.path.join(args.dump_dir, "eval.log"))
    plan = prepare_eval(args)
    dist_state = setup_torch_distributed(args.distributed)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(plan.tokenizer_args)
    model = load_model(plan.source, dist_state, args.distributed)
    tag = eval_pin_tag(args.dump_dir)
    pinned = dist_state.is_master and plan.source.kind == "dcp" and _try_pin(plan.source.path, tag)
    results = run_eval(args, plan, model, tokenizer, dist_state)
    if pinned:
        unpin(plan.source.path, tag)
    if dist_state.is_master:
        print(json.dumps(results["metrics"], indent=1))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: parse_eval_config(argv), evaluate, (CheckpointError, EvalError, DataError))


if __name__ == "__main__":
    sys.exit(main())
