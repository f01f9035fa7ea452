"""Small SLURM helpers used inside a job (no SLURM install needed to import this module).

- `first_hostname(nodelist)`: the first host of a compressed node list such as `node[01-03,07],gpu5`.
- `port_from_job_id(job_id)`: a rendezvous port every task of a job derives identically.
- `in_slurm_job()`: whether this process runs inside a SLURM allocation (batch step or srun).
- `job_free_env()`: the environment for launching a separate job, without this job's launch variables.
- `query_jobs(job_ids)`: state and pending reason of jobs (`squeue`, then `sacct`), for `lingua.status`.
- `job_running(job_id)`: whether a job is still alive (`squeue`), for the dump-dir lock's stale-holder check.
- `request_fits(partition, ...)`: whether a partition has nodes big enough for a request (`sinfo`), for stool.
- `requeue_current_job(max_requeues)`: `scontrol requeue $SLURM_JOB_ID`, bounded by SLURM_RESTART_COUNT so a
  run that keeps crashing does not requeue itself forever, and only while the job is still RUNNING: a job the
  user cancelled (`scancel` sends SIGTERM first), or one killed at its time limit, shows as COMPLETING and is
  not brought back. The time-limit path is the USR2 warning (`--signal=USR2@N`), which arrives while RUNNING.

Note: `scontrol requeue` terminates the job's running tasks at once (SIGTERM, then SIGKILL after the cluster's
KillWait), so call it last, once the checkpoint is committed and the logs are flushed.
"""

import logging
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "expand_hostlist",
    "first_hostname",
    "port_from_job_id",
    "in_slurm_job",
    "restart_count",
    "job_state",
    "job_running",
    "query_jobs",
    "request_fits",
    "requeue_current_job",
    "job_free_env",
]

PORT_BASE = 20000
PORT_SPAN = 20000  # ports in [20000, 40000): above the well-known range, below the usual ephemeral range


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(spec: str, whole: str) -> List[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] keeping zero padding."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in SLURM node list {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        width = len(lo)
        a, b = int(lo), int(hi)
        if b < a:
            raise ValueError(f"bad range {item!r} in SLURM node list {whole!r}")
        out.extend(str(n).zfill(width) for n in range(a, b + 1))
    return out


def _expand_one(pattern: str, whole: str) -> List[str]:
    """Expand one host pattern with any number of bracket groups: 'r[1-2]n[3,5]' -> 4 names."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [head + mid + rest for mid in _expand_range_set(m.group(1), whole) for rest in _expand_one(tail, whole)]


def expand_hostlist(nodelist: str) -> List[str]:
    """Expand a SLURM compressed host list ('node[01-03,07],gpu5') into host names, in order."""
    nodelist = (nodelist or "").strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    hosts = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_one(part, nodelist))
    return hosts


def _scontrol_hostnames(nodelist: str) -> Optional[str]:
    res = _run(["scontrol", "show", "hostnames", nodelist], timeout=30)
    lines = res.stdout.split() if res is not None and res.returncode == 0 else []
    return lines[0] if lines else None


def first_hostname(nodelist: str) -> str:
    """First host of a SLURM node list, parsed locally; `scontrol show hostnames` only if parsing fails."""
    try:
        return expand_hostlist(nodelist)[0]
    except ValueError as err:
        host = _scontrol_hostnames(nodelist)
        if host is None:
            raise ValueError(f"cannot find the first host of SLURM node list {nodelist!r}: {err}") from None
        return host


def port_from_job_id(job_id: str) -> int:
    """A port in [20000, 40000) that every task of job `job_id` computes identically."""
    digits = re.sub(r"\D", "", str(job_id))  # tolerate array ids like '123_4'
    if not digits:
        raise ValueError(f"cannot derive a port from SLURM job id {job_id!r}")
    return PORT_BASE + int(digits) % PORT_SPAN


def in_slurm_job() -> bool:
    """True inside a SLURM allocation (sbatch script or srun task)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def restart_count() -> int:
    """How many times SLURM has restarted (requeued) this job; 0 on its first run."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _run(cmd: List[str], timeout: float) -> Optional[subprocess.CompletedProcess]:
    """Run a SLURM client command; None when it is not installed or does not answer in time."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def job_state(job_id: str) -> Optional[str]:
    """JobState of `job_id` as `scontrol show job` reports it (RUNNING, COMPLETING, ...), None if unknown."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    m = re.search(r"\bJobState=(\S+)", res.stdout) if res is not None and res.returncode == 0 else None
    return m.group(1) if m else None


def job_running(job_id: str) -> Optional[bool]:
    """Whether `squeue` lists the job as alive (running, configuring, completing, suspended or stopped); False
    when SLURM no longer knows it (long finished); None when squeue cannot say."""
    res = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], timeout=30)
    if res is None:
        return None
    if res.returncode != 0:  # an unknown (long finished) job id is an error for squeue
        return False if "Invalid job id" in res.stderr else None
    return res.stdout.strip() in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED")


def query_jobs(job_ids: List[str], timeout: float = 10.0) -> Tuple[Dict[str, dict], Optional[str]]:
    """({job id: {"state", "reason"}}, note) for the jobs SLURM still knows: `squeue` answers for recent jobs in
    any state (the controller forgets them MinJobAge after they end), `sacct` for older ones. The note says, in one
    line, what could not be asked (no squeue, no accounting storage, ...), else None."""
    ids = [str(j) for j in dict.fromkeys(job_ids) if j]
    states: Dict[str, dict] = {}
    if not ids:
        return states, None
    res = _run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T|%r"], timeout)
    if res is None:
        return states, "squeue is not available here: job states unknown"
    if res.returncode != 0 and "Invalid job id" not in res.stderr:
        return states, f"squeue failed: {(res.stderr.strip().splitlines() or ['no output'])[-1]}"
    for line in res.stdout.splitlines() if res.returncode == 0 else []:  # exit 1: none of the ids is known
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job.strip()] = {"state": state.strip(), "reason": reason.strip()}
    missing = [j for j in ids if j not in states]
    if not missing:
        return states, None
    res = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State"], timeout)
    if res is None or res.returncode != 0:
        why = "not installed" if res is None else ((res.stderr or res.stdout).strip().splitlines() or ["failed"])[-1]
        return states, f"job(s) {', '.join(missing)}: final state unknown (sacct: {why})"
    for line in res.stdout.splitlines():
        job, _, state = line.partition("|")
        if job.strip() in missing:
            states[job.strip()] = {"state": state.split()[0] if state.strip() else "", "reason": ""}
    return states, None


def _mem_mb(mem: str) -> Optional[int]:
    """sbatch --mem ('64G', '500M', '16000' in MB) in MB; None for unset or 0 (all of a node's memory)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(mem or ""), re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024 * 1024}[m[2].upper()]
    return int(float(m[1]) * scale) or None


def request_fits(partition: str, nodes: int = 1, ntasks_per_node: int = 1, cpus_per_task: int = 1,
                 gpus_per_node: int = 0, mem: str = "", timeout: float = 10.0) -> Optional[str]:
    """A warning line if `partition` has fewer than `nodes` nodes with ntasks_per_node x cpus_per_task CPUs,
    gpus_per_node GPUs and `mem` memory each (from `sinfo`'s node list): such a job can never start (sbatch refuses
    it, or it stays PENDING with Reason=PartitionConfig / PartitionNodeLimit). None if it fits, and None when sinfo
    cannot tell (not installed, no answer)."""
    res = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G"], timeout)
    if res is None or res.returncode != 0:
        return None
    hosts = {}
    for line in res.stdout.splitlines():
        name, cpus, mem_mb, gres = (line.split("|") + ["", "", ""])[:4]
        try:
            gpus = sum(int(g) for g in re.findall(r"\bgpu(?::[^:,(]+)?:(\d+)", gres))
            hosts[name.strip()] = (int(cpus), int(float(mem_mb)), gpus)
        except ValueError:
            continue
    if not hosts:
        return f"sinfo lists no node in partition {partition!r}: is it spelled right?"
    need = (ntasks_per_node * cpus_per_task, _mem_mb(mem), gpus_per_node)
    fit = [h for h in hosts.values() if h[0] >= need[0] and (need[1] is None or h[1] >= need[1]) and h[2] >= need[2]]
    if len(fit) >= nodes:
        return None
    cpus = f"CPUs for {ntasks_per_node} tasks x {cpus_per_task} CPUs" if ntasks_per_node > 1 else "CPUs"
    for i, what in ((0, cpus), (2, "GPUs"), (1, "MB of memory")):
        largest = max(h[i] for h in hosts.values())
        if need[i] and largest < need[i]:
            return (f"no node of partition {partition} has {need[i]} {what} (largest: {largest}): the job would stay "
                    f"PENDING (Reason=PartitionConfig) or be refused")
    return (f"partition {partition} has {len(fit)} node(s) with {need[0]} CPUs, {need[2]} GPUs"
            + (f", {need[1]} MB" if need[1] else "") + f" each, {nodes} requested: the job would stay PENDING "
            "(Reason=PartitionNodeLimit) or be refused")


def requeue_current_job(max_requeues: int) -> bool:
    """Requeue this SLURM job (`scontrol requeue $SLURM_JOB_ID`) unless it was already requeued
    `max_requeues` times. Call from rank 0 after the preemption checkpoint is committed.
    Returns True if the requeue command succeeded; logs the reason and returns False otherwise."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.warning("not requeueing: not inside a SLURM job (SLURM_JOB_ID is unset)")
        return False
    # For array jobs scontrol wants <array_job_id>_<task_id>.
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array_job}_{array_task}" if array_job and array_task else job_id
    restarts = restart_count()
    if restarts >= max_requeues:
        logger.warning(
            "not requeueing SLURM job %s: it was already restarted %d time(s) (SLURM_RESTART_COUNT) and the limit "
            "is %d; resubmit with `sbatch <dump_dir>/submit.slurm` to continue from the last checkpoint",
            target, restarts, max_requeues,
        )
        return False
    if shutil.which("scontrol") is None:
        logger.error("cannot requeue SLURM job %s: scontrol is not on PATH", target)
        return False
    state = job_state(target)
    if state is not None and state != "RUNNING":
        logger.warning(
            "not requeueing SLURM job %s: it is %s, not RUNNING (cancelled by the user, killed at its time limit, or "
            "preempted: SLURM requeues preempted jobs itself when PreemptMode=REQUEUE); resume with "
            "`sbatch <dump_dir>/submit.slurm`", target, state,
        )
        return False
    try:
        res = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        logger.error("scontrol requeue %s failed: %s", target, e)
        return False
    if res.returncode != 0:
        logger.error("scontrol requeue %s failed (exit %d): %s", target, res.returncode,
                     (res.stderr or res.stdout).strip())
        return False
    logger.info("requeued SLURM job %s (restart %d of at most %d)", target, restarts + 1, max_requeues)
    return True


# Variables through which a launcher tells a process that it is one task of a job (torchrun's, SLURM's).
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
               "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_", "SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def job_free_env(base: Optional[dict] = None) -> dict:
    """A copy of the environment for launching a separate job (an sbatch submission, a child torchrun): without
    the variables of the job this process belongs to, which would make the child think it is one of our ranks,
    and without fault-injection rules. SLURM_CONF (which cluster) stays."""
    from lingua.faults import ENV as FAULTS_ENV

    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key in LAUNCH_VARS or key == FAULTS_ENV or (key.startswith(LAUNCH_PREFIXES) and key != "SLURM_CONF"):
            del env[key]
    return env
