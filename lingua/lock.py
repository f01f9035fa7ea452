"""The dump-dir lock: one run at a time writes into a dump dir.

`<dump_dir>/run.lock` is a JSON file naming its holder (host, pid, process start time, SLURM job id and restart
count, when taken) whose modification time is the holder's heartbeat (touched every HEARTBEAT_S seconds). It is
taken atomically with a hard link of a fully written temporary file (atomic on local filesystems, NFS and
Lustre: the link either creates the name or fails with EEXIST). A lock whose holder is dead is taken over with a
log line; a live holder makes the new run stop with one line naming it. The holder is dead when:
  - it ran on this host and its process is gone (pid absent, or reused by a process started at another time);
  - it is an earlier incarnation of this same SLURM job (a requeue: SLURM ends a job's tasks before requeuing);
  - it was a SLURM job that `squeue` no longer lists as running;
  - its heartbeat is older than STALE_S (another host, nothing else to ask).
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from lingua.files import read_json
from lingua.slurm import job_running

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class LockError(RuntimeError):
    """The dump dir is held by a live run; the message names it."""


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 (no such process, no permission, no psutil)
        return None


def _me() -> dict:
    env = os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _process_start(os.getpid()),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_restart": int(env.get("SLURM_RESTART_COUNT") or 0),
        "taken_at": time.time(),
        "token": uuid.uuid4().hex,
    }


def read_lock(dump_dir: str) -> Optional[dict]:
    """The holder record and its heartbeat age in seconds ('age_s'), or None if there is no (readable) lock."""
    path = os.path.join(dump_dir, LOCK_FILE)
    holder = read_json(path)
    if holder is None:
        return None
    try:
        holder["age_s"] = max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:  # removed meanwhile
        return None
    return holder


def why_dead(holder: dict) -> Optional[str]:
    """Why the holder cannot be alive, or None if it may be."""
    me = _me()
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        started = _process_start(int(pid)) if isinstance(pid, int) else None
        if started is None:
            return f"its process {pid} on this host is gone"
        if holder.get("started") is not None and abs(started - holder["started"]) > 1.0:
            return f"pid {pid} now belongs to another process"
        return None
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and holder.get("slurm_restart", 0) < me["slurm_restart"]:
        return (f"it was restart {holder.get('slurm_restart', 0)} of this SLURM job, "
                f"now at restart {me['slurm_restart']}")
    if job and job != me["slurm_job_id"] and job_running(job) is False:
        return f"its SLURM job {job} is no longer running"
    if holder.get("age_s", 0.0) > STALE_S:
        return f"its heartbeat is {holder['age_s']:.0f}s old (stale after {STALE_S:.0f}s)"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, heartbeat {holder.get('age_s', 0):.0f}s ago"


class DumpDirLock:
    """Held by rank 0 for the run's lifetime: `acquire()` (LockError if a live run holds it), `release()`."""

    def __init__(self, dump_dir: str):
        self.dump_dir = dump_dir
        self.path = os.path.join(dump_dir, LOCK_FILE)
        self.record: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "DumpDirLock":
        os.makedirs(self.dump_dir, exist_ok=True)
        me = _me()
        tmp = os.path.join(self.dump_dir, f".{LOCK_FILE}.{me['token']}")
        with open(tmp, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            for _ in range(3):  # a stale lock is moved away (one contender wins), then the link is tried again
                try:
                    os.link(tmp, self.path)
                    os.utime(self.path)  # the first heartbeat
                    self.record = me
                    break
                except FileExistsError:
                    pass
                holder = read_lock(self.dump_dir)
                if holder is None:  # removed meanwhile, or garbled by a crash while written by hand: retry
                    if os.path.exists(self.path) and read_json(self.path) is None:
                        os.replace(self.path, self.path + f".garbled.{me['token']}")
                    continue
                reason = why_dead(holder)
                if reason is None:
                    raise LockError(
                        f"dump dir {self.dump_dir} is in use by a live run ({describe(holder)}); stop that run first, "
                        f"or delete {self.path} if you are sure it is dead"
                    )
                moved = self.path + f".stale.{me['token']}"
                try:
                    os.replace(self.path, moved)
                except FileNotFoundError:
                    continue
                if (read_json(moved) or {}).get("token") != holder.get("token"):  # another contender took it meanwhile
                    os.replace(moved, self.path)
                    continue
                os.remove(moved)
                logger.warning(f"taking over the lock of {self.dump_dir} "
                               f"from a dead run ({describe(holder)}: {reason})")
            else:
                raise LockError(f"could not take the lock {self.path} (contended); try again")
        finally:
            os.remove(tmp)
        self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.record is None:
            return
        self._stop.set()
        if (read_json(self.path) or {}).get("token") == self.record["token"]:
            try:
                os.remove(self.path)
            except OSError:
                pass
        self.record = None


def hold_dump_dir(dump_dir: str, dist_state) -> DumpDirLock:
    """Rank 0 takes the dump dir's lock before anything in it is touched; every rank raises LockError if it could
    not (a collective)."""
    from lingua.distributed import broadcast_object

    lock = DumpDirLock(dump_dir)
    error = None
    if dist_state.is_master:
        try:
            lock.acquire()
        except (LockError, OSError) as e:
            error = str(e) if isinstance(e, LockError) else f"cannot lock dump dir {dump_dir}: {e}"
    error = broadcast_object(error, dist_state.cpu_group)
    if error:
        raise LockError(error)
    return lock
