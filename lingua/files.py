"""Durable file writes: the one "write a temp file, fsync, rename, fsync the folder" helper of the project; and
the project's crc32.

A reader of a path written here sees the old content or the new content, never a torn mix, even if the writer
is killed at any instant or the machine loses power (the folder entry is fsynced too).
"""

import json
import os
from typing import Iterable, Optional, Union

try:
    # zlib-ng's crc32 gives zlib's values (a checkpoint or data state checksummed with one checks with the other)
    # ~7x faster on large buffers (31 against 4 GB/s here: 0.011 against 0.088 s for a rank's 342 MB shard) and
    # ~4x on short lines; it releases the GIL as zlib's does. zlib is the fallback where the wheel is missing.
    from zlib_ng.zlib_ng import crc32  # noqa: F401 (the project imports it from here)
except ImportError:  # pragma: no cover (setup.py installs zlib-ng)
    from zlib import crc32  # noqa: F401


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str, data: Union[str, bytes], mode: int = None) -> None:
    """Replace `path` with `data` atomically and durably; `mode` sets the file's permission bits."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.part.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`; None if it is missing, unreadable or not an object (for files that may be absent
    or written by someone else: a lock, a marker)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_jsonl(path: str) -> list:
    """The records of a jsonl file, skipping torn or garbled lines (a writer killed mid-line, a damaged line):
    one bad line must not hide the records after it."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def dir_size(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(dirpath, n))
            except OSError:  # removed while we walked
                pass
    return total
