"""Checkpoints: save (sync or async), atomic commit, consistent resolve, load, retention, and a CLI.

Layout under `checkpoint.path` (default <dump_dir>/checkpoints):
    0000001000/              a committed checkpoint: DCP shards + .metadata, params.json,
                             train_state_<dp_rank>.json, COMMIT.json (written last)
    0000002000.tmp/          a save in progress (staging); removed at the next start if the run died
    0000000500.deleting/     retention in progress; removed at the next start

Protocol. All ranks agree to save at a step. Every rank writes its DCP shards and its train state into
the staging folder and records the size (and crc32) of the files it wrote. The records are gathered;
rank 0 writes COMMIT.json last, fsyncs, renames the folder to its final name and fsyncs the parent.
A reader only ever considers folders with a final name and a valid COMMIT.json whose files are all present
with their recorded sizes, so a crash at any instant of a save leaves the previous checkpoint in charge.

Resolve. Rank 0 lists candidates newest first; each is proposed to every rank, each rank validates it
(its own view of the filesystem), and an all-reduce decides: all ranks load the same step, or all fall back
to the next older one together.

CLI: python -m lingua.checkpoint {list,verify,consolidate} PATH
"""

import base64
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from lingua.args import ConfigError

logger = logging.getLogger(__name__)

COMMIT_FILE = "COMMIT.json"
PARAMS_FILE = "params.json"
STEP_RE = re.compile(r"^\d{10}$")
FORMAT_VERSION = 1


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
    checksums: bool = True  # record a crc32 of every file at save time (read back by the writing rank)
    verify: bool = False  # on resume, check the recorded checksums too (sizes are always checked)
    load_step: int = -1  # resume from exactly this step (fails loudly if missing or invalid); -1 = latest
    init_ckpt_path: Optional[str] = None  # when there is nothing to resume: load model weights from here
    start_over: bool = False  # if checkpoints exist but none is valid, start from scratch instead of stopping
    reset_data_state: bool = False  # resume model/optimizer but restart the data stream (layout changed)
    space_margin: float = 1.1  # a save needs free space >= this x the expected checkpoint size

    def validate(self):
        if self.space_margin < 1.0:
            raise ConfigError("checkpoint.space_margin must be >= 1.0")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------------------------- files


def step_dir_name(step: int) -> str:
    return f"{step:010d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_crc32(path: str, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


class _NoRecordCrc32:
    """torch.save (which DCP calls for every tensor) also writes a crc32 of each record; nothing ever checks those
    (torch.load does not), and computing them costs about as much as the write on a fast disk. A checkpoint's
    integrity record is lingua's own crc32 of every file (checkpoint.checksums), so they are off while a save
    writes; torch's setting is restored afterwards."""

    def __enter__(self):
        from torch.serialization import get_crc32_options, set_crc32_options

        self.before = get_crc32_options()
        set_crc32_options(False)
        return self

    def __exit__(self, *exc):
        from torch.serialization import set_crc32_options

        set_crc32_options(self.before)


def _save_planner():
    """DCP's default planner, with plan caching: from the second save of the same state layout on, ranks skip
    gathering their plans on the coordinator (torch compares each plan with the cached one and recomputes it when
    the layout changed). About 0.1 s of every save of the 57M-parameter benchmark model on CPU."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    return DefaultSavePlanner(enable_plan_caching=True)


def describe_files(folder: str, names: list, checksums: bool) -> dict:
    """{name: {size, crc32?}} for files this rank wrote (fsynced first: the record must not lie)."""
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        entry = {"size": os.path.getsize(path)}
        if checksums:
            entry["crc32"] = file_crc32(path)
        out[name] = entry
    return out


def fault_point(name: str, step: Optional[int] = None) -> None:
    """Test-only fault injection: LINGUA_FAULT=<point>[@<step>][:<rank>] kills this process (SIGKILL) when it
    reaches that point (of the save of that step) on that rank."""
    spec = os.environ.get("LINGUA_FAULT")
    if not spec:
        return
    where, _, rank = spec.partition(":")
    point, _, at_step = where.partition("@")
    if point != name or (at_step and step is not None and int(at_step) != step):
        return
    if rank and int(rank) != int(os.environ.get("RANK", "0")):
        return
    logger.error(f"LINGUA_FAULT: killing rank {os.environ.get('RANK', '0')} at '{name}'")
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def read_commit(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, COMMIT_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: no commit record ({COMMIT_FILE}); the save did not finish")
    try:
        with open(path) as f:
            record = json.load(f)
        record["step"], record["files"]  # noqa: B018 (must be present)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir}: commit record {COMMIT_FILE} is unreadable ({e})") from None
    return record


def validate_checkpoint(ckpt_dir: str, verify_checksums: bool = False, shard=(0, 1)) -> dict:
    """The commit record of `ckpt_dir` if every recorded file is present with its size (and checksum);
    otherwise CheckpointError naming the file. `shard=(i, n)`: checksum only every n-th file from the i-th."""
    hidden = os.environ.get("LINGUA_TEST_HIDE_CKPT")  # test-only: "<rank>:<step>" hides a step from a rank
    if hidden:
        rank, _, step = hidden.partition(":")
        if int(rank) == int(os.environ.get("RANK", "0")) and os.path.basename(ckpt_dir) == step_dir_name(int(step)):
            raise CheckpointError(f"{ckpt_dir}: not visible to this rank (LINGUA_TEST_HIDE_CKPT)")
    record = read_commit(ckpt_dir)
    if step_dir_name(int(record["step"])) != os.path.basename(os.path.normpath(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir}: commit record is for step {record['step']}")
    names = sorted(record["files"])
    for i, name in enumerate(names):
        info = record["files"][name]
        path = os.path.join(ckpt_dir, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{ckpt_dir}: missing file {name}")
        size = os.path.getsize(path)
        if size != info["size"]:
            raise CheckpointError(f"{ckpt_dir}: file {name} has {size} bytes, {info['size']} recorded (truncated?)")
        if verify_checksums and i % shard[1] == shard[0] and "crc32" in info and file_crc32(path) != info["crc32"]:
            raise CheckpointError(f"{ckpt_dir}: file {name} fails its checksum (corrupt)")
    return record


def list_checkpoints(root: str) -> list:
    """Final-named step folders under root, newest first: [(step, path)]."""
    if not os.path.isdir(root):
        return []
    steps = [int(n) for n in os.listdir(root) if STEP_RE.match(n) and os.path.isdir(os.path.join(root, n))]
    return [(s, os.path.join(root, step_dir_name(s))) for s in sorted(steps, reverse=True)]


def clean_stale(root: str) -> None:
    """Remove staging and half-deleted folders left by a run that died (rank 0, before anything else)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.endswith(".tmp") or name.endswith(".deleting"):
            logger.warning(f"removing stale checkpoint folder {os.path.join(root, name)}")
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def delete_checkpoint(path: str) -> None:
    """Rename first (atomic: the step disappears for readers at once), then remove."""
    doomed = path.rstrip("/") + ".deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def dir_size(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total


# ----------------------------------------------------------------------------------------- train state


def get_rng_state() -> str:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return base64.b64encode(pickle.dumps(state)).decode()


def set_rng_state(encoded: str) -> None:
    state = pickle.loads(base64.b64decode(encoded))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- pinning


def pin(ckpt_dir: str, tag: str) -> None:
    """Protect a checkpoint from retention (e.g. while an eval job still needs it)."""
    os.makedirs(os.path.join(ckpt_dir, "pins"), exist_ok=True)
    open(os.path.join(ckpt_dir, "pins", tag), "w").close()


def unpin(ckpt_dir: str, tag: str) -> None:
    try:
        os.remove(os.path.join(ckpt_dir, "pins", tag))
    except FileNotFoundError:
        pass


def is_pinned(ckpt_dir: str) -> bool:
    pins = os.path.join(ckpt_dir, "pins")
    return os.path.isdir(pins) and bool(os.listdir(pins))


# ------------------------------------------------------------------------------------ state dict / load


def model_optim_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def check_shapes(ckpt_dir: str, state: dict) -> None:
    """Fail with the name of the first tensor whose shape differs from the checkpoint's (or is missing)."""
    metadata = dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    for prefix in state:
        for key, value in _flatten(state[prefix], prefix):
            if not isinstance(value, torch.Tensor):
                continue
            if key not in metadata:
                raise CheckpointError(
                    f"{ckpt_dir} has no entry '{key}': it was saved by a different model or optimizer "
                    f"(compare the model options with {os.path.join(ckpt_dir, PARAMS_FILE)})"
                )
            saved = list(getattr(metadata[key], "size", []))
            if saved and saved != list(value.shape):
                raise CheckpointError(
                    f"{ckpt_dir}: '{key}' has shape {saved} in the checkpoint but {list(value.shape)} in this model "
                    f"(compare the model options with {os.path.join(ckpt_dir, PARAMS_FILE)})"
                )


def _flatten(obj, prefix: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _init_adam_state(optimizer) -> None:
    """Create the zero moments of a fresh Adam/AdamW, exactly as its first step would, for a checkpoint to be loaded
    into. Otherwise get_state_dict creates them by running a whole optimizer step on zero gradients (most of the
    load time on CPU). Other optimizers, or one that has state already, are left to torch."""
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
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_model_optim(ckpt_dir: str, model, optimizer=None) -> None:
    """Load (and reshard, whatever the world size was) model and optionally optimizer state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_state_dict

    if optimizer is not None:
        _init_adam_state(optimizer)
        state = model_optim_state(model, optimizer)
    else:
        state = {"model": get_model_state_dict(model)}
    check_shapes(ckpt_dir, state)
    dcp.load(state, checkpoint_id=ckpt_dir)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])


# ------------------------------------------------------------------------------------------ manager


@dataclass
class _InFlight:
    step: int
    staging: str
    kinds: list
    thread: threading.Thread
    started: float
    blocked_s: float
    result: dict = field(default_factory=dict)  # filled by the thread: {"files": ...} or {"error": ...}


class CheckpointManager:
    """Owns one run's checkpoint folder. Every method is called by all ranks together (collectives)."""

    def __init__(self, args: CheckpointArgs, dump_dir: str, dist_state, config_dict: dict):
        self.args = args
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
        self._stager = None  # async saves: the DCP stager, kept so that its copy buffers are reused
        self._staging = None  # async saves: completes when the in-flight save has its copy of the state

    # ------------------------------------------------------------------ collectives (CPU / gloo)

    def _all_ok(self, ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def _gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self):
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------ start-up

    def prepare(self) -> None:
        """Check the folder is writable and remove stale staging folders (before the first resolve)."""
        error = None
        if self.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                probe = os.path.join(self.root, f".write_probe.{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
                clean_stale(self.root)
            except OSError as e:
                error = f"checkpoint folder {self.root} is not writable: {e.strerror or e}"
        error = self._broadcast(error)
        if error:
            raise CheckpointError(error)

    def resolve(self) -> Optional[str]:
        """The checkpoint folder every rank agrees to resume from, or None for a fresh start."""
        candidates = self._broadcast(list_checkpoints(self.root) if self.rank == 0 else None)
        if self.args.load_step >= 0:
            wanted = [c for c in candidates if c[0] == self.args.load_step]
            if not wanted:
                have = ", ".join(str(s) for s, _ in candidates) or "none"
                raise CheckpointError(f"checkpoint.load_step={self.args.load_step}: no such checkpoint in {self.root} (have: {have})")
            candidates = wanted
        rejected = []
        for step, path in candidates:
            reason = None
            try:  # every rank checks sizes; checksums are split over ranks
                validate_checkpoint(path, self.args.verify, (self.rank, self.world_size))
            except CheckpointError as e:
                reason = str(e)
            reasons = self._gather(reason)
            if all(r is None for r in reasons):
                logger.info(f"resuming from {path} (step {step}, checked by all {self.world_size} ranks)")
                return path
            why = "; ".join(f"rank {i}: {r}" for i, r in enumerate(reasons) if r)
            logger.warning(f"skipping checkpoint step {step}: {why}")
            rejected.append(f"step {step}: {why}")
        if self.args.load_step >= 0:
            raise CheckpointError(f"checkpoint.load_step={self.args.load_step} is not usable: {rejected[0]}")
        if rejected:
            if self.args.start_over:
                logger.warning("no valid checkpoint; starting over because checkpoint.start_over=true")
                return None
            raise CheckpointError(
                f"checkpoints exist in {self.root} but none is valid: " + " | ".join(rejected)
                + " (set checkpoint.start_over=true to start from scratch, or repair/remove them)"
            )
        return None

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
        """Rank 0: is there room for `needed` bytes? Deletes early what retention would delete anyway."""
        free = shutil.disk_usage(self.root).free
        if free >= needed or os.environ.get("LINGUA_TEST_SKIP_SPACE_CHECK"):  # test-only: force a real ENOSPC
            return True
        self.apply_retention(upcoming_kinds=kinds)
        free = shutil.disk_usage(self.root).free
        if free >= needed:
            return True
        logger.error(
            f"NOT SAVING: checkpoint needs ~{needed / 1e6:.1f} MB with margin, only {free / 1e6:.1f} MB free in "
            f"{self.root} (after retention). Training continues; free space or lower checkpoint.*.keep."
        )
        return False

    def save(self, step: int, model, optimizer, train_states: dict, kinds: list) -> bool:
        """Save `step` (sync, or start an async save). Returns False if the save was skipped or failed.

        train_states: this rank's train state (written as train_state_<dp_rank>.json; in a data-parallel
        group with several ranks per dp rank only the first writes it)."""
        self.wait()  # at most one save in flight
        if self.last_saved_step == step:
            return True
        t0 = time.time()
        state = model_optim_state(model, optimizer)
        needed = int(self.expected_bytes(state) * self.args.space_margin)
        fits = self._make_room(needed, kinds) if self.rank == 0 else True
        if not self._broadcast(fits):
            return False
        staging = os.path.join(self.root, step_dir_name(step) + ".tmp")
        if self.rank == 0 and os.path.exists(staging):
            shutil.rmtree(staging)
        self.barrier()
        os.makedirs(staging, exist_ok=True)
        own_files = []
        try:
            name = f"train_state_{self.dist.dp_rank:05d}.json"
            write_json_atomic(os.path.join(staging, name), train_states)
            own_files.append(name)
            fault_point("after_train_state", step)
            if self.rank == 0:
                write_json_atomic(os.path.join(staging, PARAMS_FILE), self.config_dict)
                own_files.append(PARAMS_FILE)
            error = None
        except OSError as e:
            error = f"rank {self.rank}: {e}"
        if not self._all_ok(error is None):
            return self._abandon(staging, error or "another rank failed to write its train state")
        if self.args.async_save:
            return self._start_async(step, staging, state, own_files, kinds, t0)
        try:
            with _NoRecordCrc32():
                dcp.save(state, checkpoint_id=staging, process_group=self.group, planner=_save_planner())
            fault_point("after_shards", step)
            files = describe_files(staging, own_files + self._dcp_files(staging), self.args.checksums)
            error = None
        except (Exception, CheckpointException) as e:  # ENOSPC, I/O errors, a peer's failure
            files, error = {}, f"rank {self.rank}: {type(e).__name__}: {e}"
        ok = self._commit(step, staging, files, error, kinds)
        if ok:
            logger.info(f"saved checkpoint step {step} in {time.time() - t0:.2f}s (sync) -> {self.root}")
        return ok

    def _dcp_files(self, staging: str) -> list:
        """The DCP files this rank wrote: its own shard files, plus .metadata on the coordinator."""
        names = [n for n in os.listdir(staging) if n.startswith(f"__{self.rank}_") and n.endswith(".distcp")]
        if self.rank == 0:
            names.append(".metadata")
        return names

    def _start_async(self, step, staging, state, own_files, kinds, t0) -> bool:
        # The copy of the state (staging) runs in the background too; the trainer calls wait_staged() before
        # the next optimizer step changes the state. One stager for the run: its buffers are reused by every
        # save (at most one in flight), so a save does not allocate (or pin) a new copy each time.
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.dist.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
        no_crc = _NoRecordCrc32().__enter__()  # until the background write is done (in finish)
        try:
            fut = dcp.async_save(state, checkpoint_id=staging, process_group=self.async_group,
                                 async_stager=self._stager, planner=_save_planner())
        except BaseException:
            no_crc.__exit__(None, None, None)
            raise
        self._staging = getattr(fut, "staging_completion", None)
        fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse in some torch versions
        blocked = time.time() - t0
        flight = _InFlight(step, staging, kinds, None, t0, blocked)

        def finish():
            try:
                delay_step, _, delay = os.environ.get("LINGUA_TEST_ASYNC_DELAY", "").partition(":")
                if delay_step and int(delay_step) == step:  # test-only: hold this step's commit back
                    time.sleep(float(delay))
                fut.result()
                fault_point("after_shards", step)
                flight.result["files"] = describe_files(
                    staging, own_files + self._dcp_files(staging), self.args.checksums
                )
            except (Exception, CheckpointException) as e:
                flight.result["error"] = f"rank {self.rank}: {type(e).__name__}: {e}"
            finally:
                no_crc.__exit__(None, None, None)

        flight.thread = threading.Thread(target=finish, name=f"ckpt-{step}", daemon=True)
        flight.thread.start()
        self.in_flight = flight
        logger.info(f"async checkpoint step {step} started; training blocked {blocked:.2f}s")
        return True

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

    def poll(self) -> None:
        """Commit the async save if every rank has finished writing (a collective: call on all ranks)."""
        if self.in_flight is not None and self._all_ok(not self.in_flight.thread.is_alive()):
            self._finish_async()

    def wait(self) -> bool:
        """Block until the in-flight async save is written and committed (before exit, before a new save).
        False if that save failed (nothing was committed)."""
        self.wait_staged()
        if self.in_flight is None:
            return True
        self.in_flight.thread.join()
        self._all_ok(True)
        return self._finish_async()

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
        records = self._gather({"files": files, "error": error})
        errors = [r["error"] for r in records if r["error"]]
        if errors:
            return self._abandon(staging, "; ".join(errors))
        fault_point("before_commit", step)
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
                    "created": time.time(),
                    "torch_version": torch.__version__,
                    "files": all_files,
                }
                write_json_atomic(os.path.join(staging, COMMIT_FILE), commit)
                final = os.path.join(self.root, step_dir_name(step))
                if os.path.exists(final):  # an older save of this step (e.g. one that was found invalid)
                    delete_checkpoint(final)
                os.replace(staging, final)
                _fsync_dir(self.root)
                fault_point("after_commit", step)
                self.apply_retention()
            except OSError as e:
                result = f"commit failed: {e}"
        result = self._broadcast(result)
        if result:
            return self._abandon(staging, result)
        self.last_saved_step = step
        return True

    def _abandon(self, staging: str, why: str) -> bool:
        logger.error(f"checkpoint save FAILED, nothing was committed ({why}); the previous checkpoint stays")
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        return False

    # ------------------------------------------------------------------ retention

    def apply_retention(self, upcoming_kinds: Optional[list] = None) -> None:
        """Rank 0: delete checkpoints no `keep` rule retains; never the newest committed one, never a pinned one.
        `upcoming_kinds` counts a save about to happen (to free space before it)."""
        committed = []
        for step, path in list_checkpoints(self.root):
            try:
                committed.append((step, path, read_commit(path).get("kinds", ["dump"])))
            except CheckpointError:
                continue  # not ours to judge here; resolve reports it
        if not committed:
            return
        keep_paths = {committed[0][1]}  # the newest committed checkpoint always stays
        for kind, rule in (("dump", self.args.dump), ("eval", self.args.eval)):
            of_kind = [c for c in committed if kind in c[2]]
            if rule.keep <= 0:
                keep_paths.update(c[1] for c in of_kind)
                continue
            slots = rule.keep - (1 if upcoming_kinds and kind in upcoming_kinds else 0)
            keep_paths.update(c[1] for c in of_kind[: max(slots, 0)])
        for step, path, _ in committed:
            if path not in keep_paths and not is_pinned(path):
                logger.info(f"retention: deleting checkpoint step {step}")
                delete_checkpoint(path)


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_list(path: str) -> None:
    root = path if os.path.basename(os.path.normpath(path)) == "checkpoints" or not os.path.isdir(
        os.path.join(path, "checkpoints")) else os.path.join(path, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    if not names:
        print(f"no checkpoints in {root}")
        return
    print(f"{'step':>10}  {'status':<12} {'size':>10}  {'world':>5}  {'dp':>3}  created")
    for name in names:
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            continue
        if STEP_RE.match(name):
            try:
                rec = validate_checkpoint(full)
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["created"]))
                status = "committed" + ("*" if is_pinned(full) else "")
                print(f"{int(name):>10}  {status:<12} {dir_size(full) / 1e6:>8.1f}MB  {rec['world_size']:>5}  "
                      f"{rec['dp_world_size']:>3}  {created}")
            except CheckpointError as e:
                print(f"{int(name):>10}  {'INVALID':<12} {dir_size(full) / 1e6:>8.1f}MB  {'-':>5}  {'-':>3}  {e}")
        else:
            print(f"{name:>10}  {'staging' if name.endswith('.tmp') else 'other':<12} {dir_size(full) / 1e6:>8.1f}MB")


def _cmd_verify(path: str) -> int:
    try:
        rec = validate_checkpoint(path, verify_checksums=True)
        md = dcp.FileSystemReader(path).read_metadata()
        n = len(md.state_dict_metadata)
    except CheckpointError as e:
        print(f"INVALID: {e}")
        return 1
    except Exception as e:  # noqa: BLE001 (DCP metadata unreadable)
        print(f"INVALID: {path}: DCP metadata unreadable: {e}")
        return 1
    with_crc = sum("crc32" in f for f in rec["files"].values())
    print(f"OK: step {rec['step']}, {len(rec['files'])} files (sizes checked, {with_crc} checksums checked), "
          f"{n} entries in DCP metadata")
    return 0


def consolidate(ckpt_dir: str, out_dir: Optional[str] = None, dtype: Optional[str] = None) -> str:
    """One torch.load-able file with the full model state dict (+ params.json), without a process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    validate_checkpoint(ckpt_dir)
    out_dir = out_dir or os.path.join(ckpt_dir, "consolidated")
    os.makedirs(out_dir, exist_ok=True)
    # Allocate every model tensor at its full shape (from the DCP metadata), then let DCP fill them.
    metadata = dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    model_sd = {
        key[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    dcp.load({"model": model_sd}, storage_reader=dcp.FileSystemReader(ckpt_dir), no_dist=True)
    if dtype:
        target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        model_sd = {k: v.to(target) if v.is_floating_point() else v for k, v in model_sd.items()}
    tmp = os.path.join(out_dir, "consolidated.pth.part")
    torch.save(model_sd, tmp)
    os.replace(tmp, os.path.join(out_dir, "consolidated.pth"))
    shutil.copy(os.path.join(ckpt_dir, PARAMS_FILE), os.path.join(out_dir, PARAMS_FILE))
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
    args = parser.parse_args(argv)
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
