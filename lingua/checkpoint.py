"""Checkpoints: save (sync or async), atomic commit, consistent resolve, verified load, retention, and a CLI.
This module alone knows the checkpoint format (folder and file names, the commit record, the train state files),
with the two it owns: lingua/checkpoint_format.py (its torch-free part) and lingua/checkpoint_storage.py (the
shard files: how DCP's model and optimizer state is written and read).

Layout under `checkpoint.path` (default <dump_dir>/checkpoints):
    0000001000/              a committed checkpoint: DCP shards (__<rank>_0.distcp) + .metadata, params.json (the
                             run's config), train_state_<dp_rank>.json, COMMIT.json (written last)
    0000002000.tmp/          a save in progress (staging); removed at the next start if the run died
    0000000500.deleting/     retention in progress; removed at the next start
    0000003000.abandoned-<time>/  a newer checkpoint moved aside by checkpoint.load_step (kept for the user)

Save. All ranks agree to save at a step. Every rank writes its DCP shards and its train state into the staging
folder, fsyncs them and records their sizes (and crc32). The records are gathered; rank 0 writes COMMIT.json last,
fsyncs the staging folder, renames it to its final name and fsyncs the parent. A reader only ever considers
folders with a final name and a valid COMMIT.json whose files are all present with their recorded sizes, so a
crash at any instant of a save leaves the previous checkpoint in charge.

Resolve and load. Rank 0 lists candidates newest first; every rank validates each one (sizes, and that the
commit record, params.json, its train state and the DCP metadata parse); an all-gather decides: all ranks use
the same step, or all fall back to the next older one together. The crc32 of every file is then checked (split
over the ranks) in a background thread while the model is built; a mismatch anywhere falls back the same way.

Trust. A checkpoint is user data: nothing in it can run code. DCP's .metadata (a pickle) is read by an unpickler
that only builds DCP's metadata classes; tensors are raw bytes; the non-tensor values of a shard are read with
torch.load(weights_only=True); the train state is JSON, RNG states included.

CLI: python -m lingua.checkpoint {list,verify,consolidate,export-hf} PATH (export-hf: lingua/hf.py)
"""

import base64
import io
import logging
import os
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from lingua import faults
from lingua.args import ConfigError
from lingua.checkpoint_format import (  # noqa: F401 (the format, re-exported: lingua.checkpoint is its owner)
    ABANDONED_MARK,
    COMMIT_FILE,
    DELETING_SUFFIX,
    FORMAT_VERSION,
    LOAD_STEP_FILE,
    METADATA_FILE,
    PARAMS_FILE,
    STAGING_SUFFIX,
    STEP_RE,
    CheckpointError,
    check_files,
    file_crc32,
    folder_state,
    is_checkpoint,
    is_pinned,
    list_checkpoints,
    pin,
    read_commit,
    read_params,
    read_train_state,
    run_dir_of,
    step_dir_name,
    step_of,
    train_state_file,
    unpin,
    written_by,
)
from lingua.checkpoint_storage import ShardWriter, Stager, dcp_load, read_metadata, save_planner  # noqa: F401 (re-exported)
from lingua.distributed import all_agree, broadcast_object, gather_objects
from lingua.files import dir_size, fsync_dir, read_json, write_json

logger = logging.getLogger(__name__)

@dataclass
class SaveEvery:
    every: int = 1000  # save every this many steps (<= 0: never)
    keep: int = 0  # keep the newest `keep` checkpoints of this kind (<= 0: keep all)


@dataclass
class CheckpointArgs:
    path: Optional[str] = None  # folder of the step folders; default <dump_dir>/checkpoints
    dump: SaveEvery = field(default_factory=SaveEvery)  # periodic checkpoints to resume from
    eval: SaveEvery = field(default_factory=lambda: SaveEvery(every=-1))  # checkpoints to evaluate
    async_save: bool = False  # write in the background while training continues (one save in flight)
    # An async save's writer thread runs at this Linux nice value: it yields the cores to training and writes with
    # the CPU that training leaves (2 busy CPU cores: steps overlapping a write 0.72 -> 0.82 of idle steps' speed).
    writer_nice: int = 10  # 0-19; 0 = training's priority (sync saves always write at it)
    # On Linux it also runs under SCHED_IDLE: only on a core no other thread wants, and a waking training or gloo
    # thread takes that core at once (at nice 10 it still competes: steps overlapping a write 0.868 -> 0.906 of
    # idle steps, median of 14 alternating runs each, better in 10 pairs, worse in 3). On cores that training
    # keeps 100% busy the write takes longer (the next save waits for it).
    writer_idle: bool = True  # false: writer_nice alone
    # An async save writes its shards with O_DIRECT, past the page cache: a buffered write copies every byte into
    # the cache and the kernel writes it back, CPU taken from training (342 MB, 2 writers: 0.06 against 0.1-0.47 s
    # of the writer's CPU). Where O_DIRECT is refused (some FUSE) it is not used.
    async_direct_io: bool = True  # false: async saves write through the page cache too
    # Sync saves too: a buffered write first needs page-cache memory for all it writes. Right after the previous
    # checkpoint was deleted that memory is at hand and the cache was the faster (0.80 against 0.92 s); in a run
    # the previous checkpoints stay and minutes pass between saves, and on a VM whose host reclaims idle guest
    # memory every page must be mapped anew: there a sync save of 685 MB (2 ranks, 20 s between saves, keep=2)
    # took 0.43 s with O_DIRECT against 0.99 s (medians of 5; the bench's ckpt part measures it). O_DIRECT also
    # keeps a checkpoint from evicting the training data from the cache.
    sync_direct_io: bool = True  # false: sync saves (periodic, final, preemption) write through the page cache
    checksums: bool = True  # record a crc32 of every file at save time
    verify: bool = True  # on resume, check every file's crc32 (split over ranks, while the model is built)
    load_step: int = -1  # resume once from exactly this step (newer ones are moved aside); -1 = the newest valid one
    init_ckpt_path: Optional[str] = None  # when there is nothing to resume: load model weights from here
    start_over: bool = False  # if checkpoints exist but none is valid, start from scratch instead of stopping
    reset_data_state: bool = False  # resume model/optimizer but restart the data stream from its beginning
    space_margin: float = 1.1  # a save needs free space >= this x the expected checkpoint size

    def validate(self):
        if self.space_margin < 1.0:
            raise ConfigError("checkpoint.space_margin must be >= 1.0")
        if not 0 <= self.writer_nice <= 19:
            raise ConfigError(f"checkpoint.writer_nice must be in 0..19 (a Linux nice value), got {self.writer_nice}")


# ------------------------------------------------------------------------------------------- reading


def validate_checkpoint(ckpt_dir: str, checksums: bool = False, share=(0, 1), dp_rank: Optional[int] = 0) -> dict:
    """The commit record of `ckpt_dir` if it is usable: every recorded file present with its size (and crc32 of
    this share), and the commit record, params.json, the train state of `dp_rank` and the DCP metadata parse.
    CheckpointError naming the problem otherwise."""
    record = read_commit(ckpt_dir)
    if step_dir_name(int(record["step"])) != os.path.basename(os.path.normpath(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir}: commit record is for step {record['step']}")
    check_files(ckpt_dir, record, checksums, share)
    read_params(ckpt_dir)
    if dp_rank is not None:
        read_train_state(ckpt_dir, dp_rank if dp_rank < int(record["dp_world_size"]) else 0)
    read_metadata(ckpt_dir)
    return record


# ------------------------------------------------------------------------------------------- writing


def describe_files(folder: str, names: list, checksums: bool, crcs: Optional[dict] = None) -> dict:
    """{name: {size, crc32?}} for files this rank wrote, all already fsynced (DCP's writer and atomic_write do
    it). The crc32 of a file written through `ShardWriter` is taken from `crcs`; others are read back."""
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        entry = {"size": os.path.getsize(path)}
        if checksums:
            entry["crc32"] = crcs[name] if crcs and name in crcs else file_crc32(path)
        out[name] = entry
    return out


def clean_stale(root: str) -> None:
    """Remove staging and half-deleted folders left by a run that died (rank 0, before anything else)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if folder_state(name) in ("staging", "deleting"):
            logger.warning(f"removing stale checkpoint folder {os.path.join(root, name)}")
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _doom(path: str) -> str:
    """Rename a checkpoint out of sight (atomic: the step disappears for readers at once); returns the new path."""
    doomed = path.rstrip("/") + DELETING_SUFFIX
    os.replace(path, doomed)
    return doomed


def delete_checkpoint(path: str) -> None:
    shutil.rmtree(_doom(path), ignore_errors=True)


def config_diff(saved: dict, current: dict) -> dict:
    """{dotted key: (saved value, current value)} for every config value that differs (a key missing on one side
    counts, with None)."""
    flat_saved, flat_now = dict(_flatten(saved, "")), dict(_flatten(current, ""))
    return {k: (flat_saved.get(k), flat_now.get(k)) for k in sorted(set(flat_saved) | set(flat_now))
            if flat_saved.get(k) != flat_now.get(k)}


# ----------------------------------------------------------------------------------------- train state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every RNG's state as plain JSON data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


class TrainState:
    """What the trainer needs beyond model and optimizer to continue exactly: the step, the LR scheduler, the data
    stream's position and the RNG states. A torch `Stateful`; saved per data-parallel rank as JSON."""

    def __init__(self, scheduler, data: Optional[dict] = None):
        self.step = 0  # optimizer steps taken
        self.scheduler = scheduler
        self.data = data  # data-loader state after the last consumed batch (lingua.data)

    def state_dict(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.data, "rng": rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.data = sd.get("data")
        rng = sd.get("rng")
        if isinstance(rng, dict):
            set_rng_state(rng)
        elif rng is not None:  # format 1: a pickle, which is never loaded
            logger.warning("the checkpoint's RNG states are an old pickled record: not restored (not trusted)")

    @staticmethod
    def reshard(states: list, dp_rank: int, dp_world_size: int, reset_data: bool) -> dict:
        """This rank's state from the states of every data-parallel rank of another layout."""
        from lingua.data import reshard_data_state

        sd = dict(states[0])
        sd["rng"] = None  # per-rank RNG streams do not map onto another layout; nothing in training draws from them
        sd["data"] = None if reset_data else reshard_data_state([s.get("data") for s in states], dp_rank, dp_world_size)
        return sd


# ------------------------------------------------------------------------------------ state dict / load


def model_optim_state(model, optimizer=None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _flatten(obj, prefix: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def check_shapes(ckpt_dir: str, state: dict) -> None:
    """Strict both ways: every tensor of `state` is in the checkpoint with the same shape, and the checkpoint has
    no tensor of these sections that `state` lacks. CheckpointError naming the first difference."""
    metadata = read_metadata(ckpt_dir).state_dict_metadata
    hint = f"(compare the model options with {os.path.join(ckpt_dir, PARAMS_FILE)})"
    wanted = {key: value for key, value in _flatten(state, "") if isinstance(value, torch.Tensor)}
    for key, value in wanted.items():
        if key not in metadata:
            raise CheckpointError(f"{ckpt_dir} has no entry '{key}': "
                                  f"it was saved by a different model or optimizer {hint}")
        saved = list(getattr(metadata[key], "size", []))
        if saved and saved != list(value.shape):
            raise CheckpointError(
                f"{ckpt_dir}: '{key}' has shape {saved} in the checkpoint but {list(value.shape)} in this model {hint}"
            )
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    extra = sorted(k for k, md in metadata.items() if isinstance(md, TensorStorageMetadata)
                   and k.split(".", 1)[0] in state and k not in wanted)
    if extra:
        raise CheckpointError(f"{ckpt_dir} has '{extra[0]}' ({len(extra)} entries in all) that this model lacks {hint}")


def _init_adam_state(optimizer) -> None:
    """Create the state of a fresh Adam/AdamW (as its first step would, the moments uninitialised) for a checkpoint
    to be loaded into. Otherwise get_state_dict creates it by running a whole optimizer step on zero gradients
    (most of the load time on CPU). Other optimizers, or one that has state already, are left to torch."""
    try:
        from torch.optim.optimizer import _get_scalar_dtype  # private: absent in some torch versions
    except ImportError:
        return
    if optimizer.state or type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        return
    for group in optimizer.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state[p]
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
                if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            )
            # Left uninitialised: the load overwrites every one (check_shapes), or clears them all on failure.
            state["exp_avg"] = torch.empty_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.empty_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.empty_like(p, memory_format=torch.preserve_format)


def load_model_optim(ckpt_dir: str, model, optimizer=None, no_dist: bool = False, group=None) -> None:
    """Load (and reshard, whatever the world size was) model and optionally optimizer state. Each rank reads the
    pieces of its own shards without DCP's collectives (a load needs no coordination; they were ~0.1 s of a 0.25 s
    load of the 57M-parameter benchmark checkpoint), then the ranks of `group` (a gloo group) agree that every one
    succeeded: CheckpointError on all of them otherwise, with the optimizer's state cleared."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is not None:
        _init_adam_state(optimizer)
    state = model_optim_state(model, optimizer)
    error = None
    try:
        check_shapes(ckpt_dir, state)
        dcp_load(state, ckpt_dir, no_dist=True)
    except CheckpointError as e:
        error = e
    if not no_dist and dist.is_initialized() and not all_agree(error is None, group):
        error = error or CheckpointError(f"{ckpt_dir}: another rank could not load its part of the checkpoint")
    if error is not None:
        if optimizer is not None:
            optimizer.state.clear()  # no uninitialised or half-loaded moments
        raise error
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])


def full_tensors(ckpt_dir: str, section: str = "model") -> dict:
    """Every full (unsharded) tensor of a section of a checkpoint ("model" or "optim"), without a process group:
    {flattened name within the section: tensor}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(ckpt_dir).state_dict_metadata
    tensors = {
        key[len(section) + 1:]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith(section + ".") and isinstance(md, TensorStorageMetadata)
    }
    dcp_load({section: tensors}, ckpt_dir, no_dist=True)
    return tensors


def full_model_state(ckpt_dir: str) -> dict:
    """The model's full tensors of a checkpoint: {parameter name: tensor}."""
    return full_tensors(ckpt_dir, "model")


# ------------------------------------------------------------------------------------------ manager


@dataclass
class _InFlight:
    step: int
    staging: str
    kinds: list
    thread: Optional[threading.Thread]
    started: float
    blocked_s: float
    result: dict = field(default_factory=dict)  # filled by the thread: {"files": ...} or {"error": ...}


class _Deleter:
    """Removes doomed checkpoint folders in a background thread: on a network filesystem deleting a large
    checkpoint takes long, and training should not wait for it. The folder was renamed to *.deleting first, so
    a crash half-way leaves nothing that looks like a checkpoint (and the next start removes the rest)."""

    def __init__(self):
        self.queue: "queue.Queue" = queue.Queue()
        self.thread: Optional[threading.Thread] = None

    def delete(self, path: str) -> None:
        self.queue.put(_doom(path))
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ckpt-retention", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            doomed = self.queue.get()
            if doomed is None:
                return
            shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None


class CheckpointManager:
    """Owns one run's checkpoint folder. Every method is called by all ranks together (collectives)."""

    def __init__(self, args: CheckpointArgs, dump_dir: str, dist_state, config_dict: dict,
                 layout: Optional[dict] = None):
        self.args = args
        self.layout = layout or {}  # recorded in the commit record (e.g. the batch layout), shown by `list`
        self.root = args.path or os.path.join(dump_dir, "checkpoints")
        self.dist = dist_state
        self.rank = dist_state.env.rank
        self.world_size = dist_state.env.world_size
        self.group = dist_state.cpu_group
        # Async saves run collectives from a background thread: they get a gloo group of their own so
        # they never interleave with the main thread's collectives.
        self.async_group = dist.new_group(backend="gloo") if args.async_save else None
        self.config_dict = config_dict
        self.in_flight: Optional[_InFlight] = None
        self.last_saved_step = -1
        self.resumed_from: Optional[int] = None
        self._stager: Optional[Stager] = None  # async saves: kept so that its copy buffers are reused
        self._staging = None  # async saves: completes when the in-flight save has its copy of the state
        self._deleter = _Deleter()
        self._candidates: list = []  # resolve: candidates not yet tried, newest first
        self._chosen: Optional[str] = None  # resolve: the candidate every rank validated
        self._verify: Optional[threading.Thread] = None  # resolve: this rank's checksum pass over the chosen one
        self._verify_error: Optional[str] = None

    # ------------------------------------------------------------------ start-up

    def prepare(self) -> None:
        """Check the folder is writable and remove stale staging folders (before the first resolve)."""
        error = None
        if self.rank == 0:
            probe = os.path.join(self.root, f".write_probe.{os.getpid()}")
            try:
                os.makedirs(self.root, exist_ok=True)
                with open(probe, "w") as f:
                    f.write("ok")
                clean_stale(self.root)
            except OSError as e:
                error = f"checkpoint folder {self.root} is not writable: {e.strerror or e}"
            finally:
                if os.path.exists(probe):
                    os.remove(probe)
        error = broadcast_object(error, self.group)
        if error:
            raise CheckpointError(error)

    def resolve(self) -> Optional[str]:
        """The checkpoint folder every rank agrees to resume from, or None for a fresh start: the newest valid one,
        or exactly checkpoint.load_step (CheckpointError if it is missing or invalid) unless an earlier start of
        this run already resumed from that step. With checkpoint.verify the checksums of the chosen one are then
        checked in the background; `verified()` and `load()` wait for them."""
        self._candidates = broadcast_object(list_checkpoints(self.root) if self.rank == 0 else None, self.group)
        load_step = self.args.load_step if self.args.load_step >= 0 else None
        if load_step is not None and self._load_step_used() == load_step:
            logger.info(f"checkpoint.load_step={load_step} was used by an earlier start of this run: resuming from "
                        "the newest checkpoint instead")
            load_step = None
        self._load_step = load_step
        if load_step is not None:
            wanted = [c for c in self._candidates if c[0] == load_step]
            if not wanted:
                have = ", ".join(str(s) for s, _ in self._candidates) or "none"
                raise CheckpointError(f"checkpoint.load_step={load_step}: no such checkpoint in {self.root} "
                                      f"(have: {have})")
            self._candidates = wanted
        self._rejected = []
        return self._next_candidate(background_checksums=True)

    def _next_candidate(self, background_checksums: bool) -> Optional[str]:
        while self._candidates:
            step, path = self._candidates.pop(0)
            reason = None
            try:  # every rank checks sizes and that what it will read parses
                if faults.point("resolve.candidate", step):
                    raise CheckpointError(f"{path}: not visible to this rank (fault injected)")
                validate_checkpoint(path, checksums=self.args.verify and not background_checksums,
                                    share=(self.rank, self.world_size), dp_rank=self.dist.dp_rank)
            except CheckpointError as e:
                reason = str(e)
            if self._agreed(reason, step):
                logger.info(f"resuming from {path} (step {step}, checked by all {self.world_size} ranks)")
                self._chosen = path
                if self.args.verify and background_checksums:
                    self._start_checksums(path)
                return path
        self._chosen = None
        if self._load_step is not None:
            raise CheckpointError(f"checkpoint.load_step={self._load_step} is not usable: {self._rejected[0]}")
        if self._rejected:
            if self.args.start_over:
                logger.warning("no valid checkpoint; starting over because checkpoint.start_over=true")
                return None
            raise CheckpointError(
                f"checkpoints exist in {self.root} but none is valid: " + " | ".join(self._rejected)
                + " (set checkpoint.start_over=true to start from scratch, or repair/remove them)"
            )
        return None

    def _agreed(self, reason: Optional[str], step: int) -> bool:
        """Gather every rank's verdict on a candidate; True if all accept it, else log and record why not."""
        reasons = gather_objects(reason, self.group)
        if all(r is None for r in reasons):
            return True
        why = "; ".join(f"rank {i}: {r}" for i, r in enumerate(reasons) if r)
        logger.warning(f"skipping checkpoint step {step}: {why}")
        self._rejected.append(f"step {step}: {why}")
        return False

    def _start_checksums(self, path: str) -> None:
        record = read_commit(path)

        def run():
            try:
                check_files(path, record, checksums=True, share=(self.rank, self.world_size))
            except CheckpointError as e:
                self._verify_error = str(e)

        self._verify_error = None
        self._verify = threading.Thread(target=run, name="ckpt-verify", daemon=True)
        self._verify.start()

    def _load_step_used(self) -> Optional[int]:
        used = None
        if self.rank == 0:
            used = (read_json(os.path.join(self.root, LOAD_STEP_FILE)) or {}).get("load_step")
        return broadcast_object(used, self.group)

    def _branch_from(self, step: int) -> None:
        """Rank 0, after resuming from checkpoint.load_step: the newer checkpoints belong to the abandoned branch of
        the run. They are moved aside (kept for the user, out of resolve's and retention's sight) and the load
        step is recorded as used, so that a rerun or a requeue continues the new branch."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for newer, path in list_checkpoints(self.root):
            if newer > step:
                aside = f"{path}{ABANDONED_MARK}{stamp}"
                os.replace(path, aside)
                logger.warning(f"checkpoint.load_step={step}: moved the newer checkpoint {newer} aside to "
                               f"{aside} (delete it when you no longer need it)")
        write_json(os.path.join(self.root, LOAD_STEP_FILE), {"load_step": step, "used_at": time.time()})

    def verified(self) -> Optional[str]:
        """The resolved checkpoint once its checksums passed on every rank (falling back to older ones, checked in
        the foreground, when they did not), or None: what `load` will load."""
        path = self._chosen
        while path is not None and self._verify is not None:
            t = time.time()
            self._verify.join()
            self._verify = None
            if self._agreed(self._verify_error, step_of(path)):
                logger.info(f"checksums of {path} verified in {time.time() - t:.2f}s after the model was built")
                return path
            path = self._next_candidate(background_checksums=False)
        return path

    def load(self, model, optimizer, train_state: TrainState) -> Optional[str]:
        """Load the resolved checkpoint into model, optimizer and train state (resharding model and optimizer to
        this world size, and the train state to this data-parallel layout). Returns its path, or None when there
        is nothing to resume (the caller initialises the weights)."""
        path = self.verified()
        if path is None:
            return None
        load_model_optim(path, model, optimizer, group=self.group)
        train_state.load_state_dict(self.train_state_dict(path))
        if self.args.reset_data_state:
            logger.warning("checkpoint.reset_data_state=true: the data stream restarts from the beginning")
        self.resumed_from = train_state.step
        self.last_saved_step = train_state.step
        if self._load_step is not None and self.rank == 0:
            self._branch_from(self._load_step)
        dist.barrier(group=self.group)
        logger.info(f"resumed from {path} at step {train_state.step}")
        return path

    def train_state_dict(self, path: str) -> dict:
        """This rank's saved train state in `path`: its own file, or, when the data-parallel layout changed, the
        states of every old rank dealt out to this layout (TrainState.reshard). JSON only: cheap, so the trainer
        reads it early to start its data loader while the model is built."""
        saved_dp = int(read_commit(path)["dp_world_size"])
        if saved_dp == self.dist.dp_world_size:
            sd = read_train_state(path, self.dist.dp_rank)
            if self.args.reset_data_state:
                sd["data"] = None
            return sd
        return TrainState.reshard([read_train_state(path, r) for r in range(saved_dp)], self.dist.dp_rank,
                                  self.dist.dp_world_size, self.args.reset_data_state)

    def committed(self, step: int) -> Optional[str]:
        """The folder of `step`'s checkpoint once it is committed (waits for an in-flight save), else None."""
        self.wait()
        return os.path.join(self.root, step_dir_name(step)) if self.last_saved_step == step else None

    # ------------------------------------------------------------------ saving

    def expected_bytes(self, state: dict) -> int:
        """Bytes a new checkpoint will take: the last one's size if any, else the tensors' bytes."""
        local = sum(
            (v.to_local() if hasattr(v, "to_local") else v).numel() * v.element_size()
            for _, v in _flatten(state, "") if isinstance(v, torch.Tensor)
        )
        t = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        if self.rank == 0:
            for _, path in list_checkpoints(self.root):
                try:
                    return sum(f["size"] for f in read_commit(path)["files"].values())
                except CheckpointError:
                    continue
        return int(t.item())

    def _make_room(self, needed: int, kinds: list) -> bool:
        """Rank 0: is there room for `needed` bytes? Deletes early (now) what retention would delete anyway."""
        free = shutil.disk_usage(self.root).free
        if free >= needed or faults.point("save.space_check"):
            return True
        self.apply_retention(upcoming_kinds=kinds, now=True)
        free = shutil.disk_usage(self.root).free
        if free >= needed:
            return True
        logger.error(
            f"NOT SAVING: checkpoint needs ~{needed / 1e6:.1f} MB with margin, only {free / 1e6:.1f} MB free in "
            f"{self.root} (after retention). Training continues; free space or lower checkpoint.*.keep."
        )
        return False

    def save(self, model, optimizer, train_state: TrainState, kinds: list) -> bool:
        """Save the state at train_state.step (sync, or start an async save). False if skipped or failed."""
        step = train_state.step
        self.wait()  # at most one save in flight
        if self.last_saved_step == step:
            return True
        t0 = time.time()
        state = model_optim_state(model, optimizer)
        needed = int(self.expected_bytes(state) * self.args.space_margin)
        fits = self._make_room(needed, kinds) if self.rank == 0 else True
        if not broadcast_object(fits, self.group):
            return False
        staging = os.path.join(self.root, step_dir_name(step) + STAGING_SUFFIX)
        if self.rank == 0 and os.path.exists(staging):
            shutil.rmtree(staging)
        dist.barrier(group=self.group)
        # This rank's JSON files, captured now (the train state of this step); an async save writes them in the
        # background with the shards (a small fsync can wait behind a large writeback on a busy disk).
        own_json = {train_state_file(self.dist.dp_rank): train_state.state_dict()} if self.dist.tp_rank == 0 else {}
        if self.rank == 0:
            own_json[PARAMS_FILE] = self.config_dict
        try:
            os.makedirs(staging, exist_ok=True)
            if not self.args.async_save:
                self._write_json(step, staging, own_json)
            error = None
        except OSError as e:
            error = f"rank {self.rank}: {e}"
        if not all_agree(error is None, self.group):  # before DCP's collectives: every rank or none goes on
            return self._abandon(staging, error or "another rank failed to write its train state")
        crcs: dict = {}
        if self.args.async_save:
            return self._start_async(step, staging, state, own_json, kinds, t0, crcs)
        try:
            writer = ShardWriter(staging, crcs, self.args.checksums, direct=self.args.sync_direct_io)
            dcp.save(state, storage_writer=writer, process_group=self.group, planner=save_planner())
            faults.point("save.after_shards", step)
            files = describe_files(staging, list(own_json) + self._dcp_files(staging), self.args.checksums, crcs)
            error = None
        except (Exception, CheckpointException) as e:  # ENOSPC, I/O errors, a peer's failure
            files, error = {}, f"rank {self.rank}: {type(e).__name__}: {e}"
        ok = self._commit(step, staging, files, error, kinds)
        if ok:
            logger.info(f"saved checkpoint step {step} in {time.time() - t0:.2f}s (sync) -> {self.root}")
        return ok

    def _write_json(self, step: int, staging: str, own_json: dict) -> None:
        for name, obj in own_json.items():
            write_json(os.path.join(staging, name), obj)
            faults.point("save.after_train_state", step)

    def _dcp_files(self, staging: str) -> list:
        """The DCP files this rank wrote: its own shard files, plus .metadata on the coordinator."""
        names = [n for n in os.listdir(staging) if n.startswith(f"__{self.rank}_") and n.endswith(".distcp")]
        if self.rank == 0:
            names.append(METADATA_FILE)
        return names

    def _start_async(self, step, staging, state, own_json, kinds, t0, crcs) -> bool:
        # The copy of the state (staging) runs in the background too; the trainer calls wait_staged() before
        # the next optimizer step changes the state. One stager for the run: its buffers are reused by every
        # save (at most one in flight), so a save does not allocate (or pin) a new copy each time.
        fut = dcp.async_save(state, storage_writer=ShardWriter(staging, crcs, self.args.checksums,
                                                               nice=self.args.writer_nice,
                                                               idle=self.args.writer_idle,
                                                               direct=self.args.async_direct_io),
                             process_group=self.async_group, async_stager=self._async_stager(),
                             planner=save_planner())
        self._staging = getattr(fut, "staging_completion", None)
        fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse in some torch versions
        blocked = time.time() - t0
        flight = _InFlight(step, staging, kinds, None, t0, blocked)

        def finish():
            try:
                faults.point("save.async_write", step)
                try:
                    self._write_json(step, staging, own_json)
                finally:
                    fut.result()  # the shards' write goes on (its collectives need every rank): wait for it
                faults.point("save.after_shards", step)
                flight.result["files"] = describe_files(
                    staging, list(own_json) + self._dcp_files(staging), self.args.checksums, crcs
                )
            except (Exception, CheckpointException) as e:
                flight.result["error"] = f"rank {self.rank}: {type(e).__name__}: {e}"

        flight.thread = threading.Thread(target=finish, name=f"ckpt-{step}", daemon=True)
        flight.thread.start()
        self.in_flight = flight
        logger.info(f"async checkpoint step {step} started; training blocked {blocked:.2f}s")
        return True

    def _async_stager(self) -> Stager:
        """The run's stager: its copy buffers are reused by every save."""
        if self._stager is None:
            self._stager = Stager(pin=self.dist.device.type == "cuda")
        return self._stager

    def wait_staged(self) -> None:
        """Call before anything changes the model or optimizer state (optimizer.step): returns once the in-flight
        async save has its own copy of the state. Cheap when there is none or the copy is done."""
        staged, self._staging = self._staging, None
        if staged is None:
            return
        t = time.time()
        try:
            staged.result()
        except BaseException:  # noqa: BLE001 (the write fails too and reports it; training goes on)
            pass
        if self.in_flight is not None:
            self.in_flight.blocked_s += time.time() - t

    def poll(self) -> bool:
        """Commit the async save if every rank has finished writing (a collective: call on all ranks). True when no
        save is in flight any more."""
        if self.in_flight is not None and all_agree(not self.in_flight.thread.is_alive(), self.group):
            self._finish_async()
        return self.in_flight is None

    def wait(self) -> bool:
        """Block until the in-flight async save is written and committed (before exit, before a new save).
        False if that save failed (nothing was committed)."""
        self.wait_staged()
        if self.in_flight is None:
            return True
        self.in_flight.thread.join()
        all_agree(True, self.group)
        return self._finish_async()

    def close(self) -> bool:
        """End of the run: wait for the in-flight save and for background deletions. False if a save failed."""
        ok = self.wait()
        self._deleter.close()
        return ok

    def _finish_async(self) -> bool:
        flight, self.in_flight = self.in_flight, None
        ok = self._commit(flight.step, flight.staging, flight.result.get("files", {}), flight.result.get("error"),
                          flight.kinds)
        if ok:
            logger.info(
                f"async checkpoint step {flight.step} committed: training blocked {flight.blocked_s:.2f}s, "
                f"write took {time.time() - flight.started:.2f}s"
            )
        return ok

    def _commit(self, step, staging, files, error, kinds) -> bool:
        """Gather every rank's file records; rank 0 writes COMMIT.json last and publishes the folder."""
        records = gather_objects({"files": files, "error": error}, self.group)
        errors = [r["error"] for r in records if r["error"]]
        if errors:
            return self._abandon(staging, "; ".join(errors))
        faults.point("save.before_commit", step)
        result = None
        if self.rank == 0:
            try:
                all_files = {}
                for r in records:
                    all_files.update(r["files"])
                commit = {
                    "format_version": FORMAT_VERSION,
                    "step": step,
                    "kinds": kinds,
                    "world_size": self.world_size,
                    "dp_world_size": self.dist.dp_world_size,
                    "layout": self.layout,
                    "created": time.time(),
                    "torch_version": torch.__version__,
                    "files": all_files,
                }
                write_json(os.path.join(staging, COMMIT_FILE), commit)
                fsync_dir(staging)  # every entry of the folder is durable before it gets its final name
                final = os.path.join(self.root, step_dir_name(step))
                if os.path.exists(final):  # an older save of this step (e.g. one that was found invalid)
                    delete_checkpoint(final)
                os.replace(staging, final)
                fsync_dir(self.root)
                faults.point("save.after_commit", step)
                self.apply_retention()
            except OSError as e:
                result = f"commit failed: {e}"
        result = broadcast_object(result, self.group)
        if result:
            return self._abandon(staging, result)
        self.last_saved_step = step
        return True

    def _abandon(self, staging: str, why: str) -> bool:
        logger.error(f"checkpoint save FAILED, nothing was committed ({why}); the previous checkpoint stays")
        dist.barrier(group=self.group)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier(group=self.group)
        return False

    # ------------------------------------------------------------------ retention

    def apply_retention(self, upcoming_kinds: Optional[list] = None, now: bool = False) -> None:
        """Rank 0: delete checkpoints no `keep` rule retains. Only checkpoints that validate are counted and kept
        by the rules (an invalid one is neither counted nor deleted: resolve reports it); the newest valid one and
        pinned ones always stay. `upcoming_kinds` counts a save about to happen (to free space before it); `now`
        deletes in the foreground (the space is needed at once), else in the background."""
        valid = []
        for step, path in list_checkpoints(self.root):
            try:
                record = read_commit(path)
                check_files(path, record)
            except CheckpointError:
                continue
            valid.append((step, path, record.get("kinds", ["dump"])))
        if not valid:
            return
        keep_paths = {valid[0][1]}  # the newest valid checkpoint always stays
        for kind, rule in (("dump", self.args.dump), ("eval", self.args.eval)):
            of_kind = [c for c in valid if kind in c[2]]
            if rule.keep <= 0:
                keep_paths.update(c[1] for c in of_kind)
                continue
            slots = rule.keep - (1 if upcoming_kinds and kind in upcoming_kinds else 0)
            keep_paths.update(c[1] for c in of_kind[: max(slots, 0)])
        for step, path, _ in valid:
            if path in keep_paths or is_pinned(path):
                continue
            logger.info(f"retention: deleting checkpoint step {step}")
            if now:
                delete_checkpoint(path)
            else:
                self._deleter.delete(path)


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_list(path: str) -> None:
    root = path if os.path.basename(os.path.normpath(path)) == "checkpoints" or not os.path.isdir(
        os.path.join(path, "checkpoints")) else os.path.join(path, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    if not names:
        print(f"no checkpoints in {root}")
        return
    print(f"{'step':>10}  {'status':<12} {'size':>10}  {'world':>5}  {'dp':>3}  {'batch x acc = global':>20}  created")
    for name in names:
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            continue
        if STEP_RE.match(name):
            try:
                rec = validate_checkpoint(full)
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["created"]))
                status = "committed" + ("*" if is_pinned(full) else "")
                lay = rec.get("layout") or {}
                batch = (f"{lay['batch_size']} x {lay['grad_acc_steps']} = {lay['global_batch']}"
                         if {"batch_size", "grad_acc_steps", "global_batch"} <= set(lay) else "-")
                print(f"{int(name):>10}  {status:<12} {dir_size(full) / 1e6:>8.1f}MB  {rec['world_size']:>5}  "
                      f"{rec['dp_world_size']:>3}  {batch:>20}  {created}")
            except CheckpointError as e:
                print(f"{int(name):>10}  {'INVALID':<12} {dir_size(full) / 1e6:>8.1f}MB  {'-':>5}  {'-':>3}  "
                      f"{'-':>20}  {e}")
        else:
            print(f"{name:>10}  {folder_state(name):<12} {dir_size(full) / 1e6:>8.1f}MB")


def _cmd_verify(path: str) -> int:
    try:
        rec = validate_checkpoint(path, checksums=True)
        n = len(read_metadata(path).state_dict_metadata)
    except CheckpointError as e:
        print(f"INVALID: {e}")
        return 1
    with_crc = sum("crc32" in f for f in rec["files"].values())
    print(f"OK: step {rec['step']}, {len(rec['files'])} files (sizes checked, {with_crc} checksums checked), "
          f"{n} entries in DCP metadata")
    return 0


def consolidate(ckpt_dir: str, out_dir: Optional[str] = None, dtype: Optional[str] = None) -> str:
    """One torch.load-able file with the full model state dict (+ params.json), without a process group."""
    from lingua.files import atomic_write

    validate_checkpoint(ckpt_dir)
    out_dir = out_dir or os.path.join(ckpt_dir, "consolidated")
    os.makedirs(out_dir, exist_ok=True)
    model_sd = full_model_state(ckpt_dir)
    if dtype:
        target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        model_sd = {k: v.to(target) if v.is_floating_point() else v for k, v in model_sd.items()}
    buf = io.BytesIO()
    torch.save(model_sd, buf)
    atomic_write(os.path.join(out_dir, "consolidated.pth"), buf.getvalue())
    write_json(os.path.join(out_dir, PARAMS_FILE), read_params(ckpt_dir))
    return os.path.join(out_dir, "consolidated.pth")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lingua.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list checkpoints of a dump dir or checkpoints folder")
    p.add_argument("path")
    p = sub.add_parser("verify", help="check sizes, checksums and DCP metadata of one checkpoint")
    p.add_argument("path")
    p = sub.add_parser("consolidate", help="write <ckpt>/consolidated/consolidated.pth (model weights)")
    p.add_argument("path")
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p = sub.add_parser("export-hf", help="write a Hugging Face transformers folder (config, safetensors, tokenizer)")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size (e.g. 5GB, 200MB)")
    args = parser.parse_args(argv)
    if args.cmd == "export-hf":
        from lingua.hf import export_cli

        return export_cli(args)
    if args.cmd == "list":
        _cmd_list(args.path)
        return 0
    if args.cmd == "verify":
        return _cmd_verify(args.path)
    try:
        print(consolidate(args.path, args.out, args.dtype))
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
