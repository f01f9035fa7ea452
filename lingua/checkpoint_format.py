"""The checkpoint format on disk, without torch: folder and file names, the commit record, reading and checking
files, pins. lingua/checkpoint.py owns it (and re-exports it); tools that must start fast (lingua.status) read
checkpoints through this module alone.
"""

import json
import os
import re
from typing import Optional

from lingua.files import crc32

# The format: these names are known here and nowhere else.
COMMIT_FILE = "COMMIT.json"
PARAMS_FILE = "params.json"
METADATA_FILE = ".metadata"
LOAD_STEP_FILE = "load_step_used.json"  # in the checkpoint folder: the checkpoint.load_step a start resumed from
STEP_RE = re.compile(r"^\d{10}$")
FORMAT_VERSION = 3  # 3: tensors stored as raw bytes (checkpoint_storage.RAW); 2: RNG states as plain JSON (1: a pickle)
# The other folders of a checkpoint folder are named after a step folder:
STAGING_SUFFIX = ".tmp"  # <step>.tmp: a save being written; removed at the next start if the run died
DELETING_SUFFIX = ".deleting"  # <step>.deleting: retention is deleting it; likewise removed at the next start
ABANDONED_MARK = ".abandoned-"  # <step>.abandoned-<time>: moved aside by checkpoint.load_step, kept for the user


def step_dir_name(step: int) -> str:
    return f"{step:010d}"


def folder_state(name: str) -> str:
    """What a folder of the checkpoint folder is, from its name: "step" (committed or not: its commit record
    says), "staging", "deleting", "abandoned" or "other" (not ours)."""
    if STEP_RE.match(name):
        return "step"
    if name.endswith(STAGING_SUFFIX):
        return "staging"
    if name.endswith(DELETING_SUFFIX):
        return "deleting"
    return "abandoned" if ABANDONED_MARK in name else "other"


def train_state_file(dp_rank: int) -> str:
    return f"train_state_{dp_rank:05d}.json"


def written_by(name: str, rank: int, dp_rank: int) -> bool:
    """Whether rank `rank` (of data-parallel rank `dp_rank`) writes the checkpoint file `name`: its DCP shards and
    its train state; rank 0 also the shared files (.metadata, params.json, the commit record)."""
    return (name.startswith(f"__{rank}_") or name == train_state_file(dp_rank)
            or (rank == 0 and not name.startswith(("__", "train_state_"))))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


def read_json_object(path: str, label: str, missing: Optional[str] = None) -> dict:
    """The JSON object in `path`; CheckpointError "<label> is missing" (or `missing`), "... is unreadable (why)" or
    "... is not a JSON object" otherwise."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(missing or f"{label} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{label} is unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{label} is not a JSON object")
    return obj


def _read_json(ckpt_dir: str, name: str, what: str) -> dict:
    return read_json_object(os.path.join(ckpt_dir, name), f"{ckpt_dir}: {what} {name}")


def read_commit(ckpt_dir: str) -> dict:
    if not os.path.exists(os.path.join(ckpt_dir, COMMIT_FILE)):
        raise CheckpointError(f"{ckpt_dir}: no commit record ({COMMIT_FILE}); the save did not finish")
    record = _read_json(ckpt_dir, COMMIT_FILE, "commit record")
    try:
        int(record["step"]), int(record["dp_world_size"])
        if not all(isinstance(v, dict) and isinstance(v["size"], int) for v in record["files"].values()):
            raise TypeError("bad file entry")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt_dir}: commit record {COMMIT_FILE} is malformed ({e})") from None
    if record.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: format version {record['format_version']} is newer than this code's "
                              f"({FORMAT_VERSION}); update lingua to read it")
    return record


def read_params(ckpt_dir: str) -> dict:
    """The config the checkpoint's run had (params.json), with a 'model' section; CheckpointError otherwise."""
    params = _read_json(ckpt_dir, PARAMS_FILE, "config")
    if not isinstance(params.get("model"), dict):
        raise CheckpointError(f"{ckpt_dir}: {PARAMS_FILE} has no 'model' section")
    return params


def read_train_state(ckpt_dir: str, dp_rank: int) -> dict:
    sd = _read_json(ckpt_dir, train_state_file(dp_rank), "train state")
    if not isinstance(sd.get("step"), int) or not isinstance(sd.get("scheduler"), dict):
        raise CheckpointError(f"{ckpt_dir}: train state {train_state_file(dp_rank)} lacks its step or scheduler")
    return sd


def file_crc32(path: str, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return crc
            crc = crc32(buf, crc)


def check_files(ckpt_dir: str, record: dict, checksums: bool = False, share=(0, 1)) -> None:
    """Every recorded file is present with its size; with `checksums`, the crc32 of the files of this share
    (every share[1]-th file from the share[0]-th) too. CheckpointError naming the file otherwise."""
    for i, name in enumerate(sorted(record["files"])):
        info = record["files"][name]
        path = os.path.join(ckpt_dir, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CheckpointError(f"{ckpt_dir}: missing file {name}") from None
        if size != info["size"]:
            raise CheckpointError(f"{ckpt_dir}: file {name} has {size} bytes, {info['size']} recorded (truncated?)")
        if checksums and i % share[1] == share[0] and "crc32" in info and file_crc32(path) != info["crc32"]:
            raise CheckpointError(f"{ckpt_dir}: file {name} fails its checksum (corrupt)")


def list_checkpoints(root: str) -> list:
    """Final-named step folders under root, newest first: [(step, path)]."""
    if not os.path.isdir(root):
        return []
    steps = [int(n) for n in os.listdir(root) if STEP_RE.match(n) and os.path.isdir(os.path.join(root, n))]
    return [(s, os.path.join(root, step_dir_name(s))) for s in sorted(steps, reverse=True)]


def step_of(path: str) -> Optional[int]:
    """The step of a checkpoint folder (or a file or folder inside one), from its name; None if not one."""
    path = os.path.abspath(path)
    for name in (os.path.basename(path), os.path.basename(os.path.dirname(path))):
        if STEP_RE.match(name):
            return int(name)
    return None


def run_dir_of(path: str) -> Optional[str]:
    """The dump dir of the run a checkpoint belongs to: <run>/checkpoints/<step>[/...] -> <run>, else None."""
    path = os.path.abspath(path)
    for _ in range(3):
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "checkpoints" and STEP_RE.match(os.path.basename(path)):
            return os.path.dirname(parent)
        path = parent
    return None


def is_checkpoint(path: str) -> bool:
    """Whether `path` looks like a checkpoint folder of this format (committed or not)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, COMMIT_FILE))
                                   or os.path.exists(os.path.join(path, METADATA_FILE)))


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
