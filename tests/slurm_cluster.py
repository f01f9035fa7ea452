"""A real single-node SLURM cluster on localhost, for tests and developers (no mocks).

It installs the Debian packages `slurm-wlm` and `munge` when they are missing (through
`setup/install_slurm.sh`), writes a `slurm.conf` into its own folder with free non-default ports, starts
its own `munged` (own key and socket), `slurmctld` and `slurmd` in the foreground as children, waits until
`sinfo` shows the node idle, and stops them by their own pids. Nothing outside that folder is configured,
so it does not interfere with another cluster on the same machine.

Developers:
    python tests/slurm_cluster.py start [--dir /tmp/lingua-slurm]   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py status|stop [--dir ...]

pytest: the session fixture `slurm_cluster` (tests/conftest.py) uses `SlurmCluster`. When the environment
variable LINGUA_SLURM_DIR names a folder where `start` was run, the fixture reuses that cluster.
"""

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "setup" / "install_slurm.sh"
PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ClusterUnavailable(RuntimeError):
    """The daemons cannot be started here (not root, packages missing and not installable, ...)."""


def _which(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ensure_packages(install: bool = True) -> None:
    """Install slurm-wlm and munge with apt-get when missing (root only)."""
    missing = [d for d in DAEMONS if _which(d) is None] + [c for c in ("sbatch", "sinfo") if _which(c) is None]
    if not missing:
        return
    if not install:
        raise ClusterUnavailable(f"SLURM/munge programs missing: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"SLURM/munge programs missing ({', '.join(missing)}) and not root, cannot apt-get install slurm-wlm munge"
        )
    res = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ClusterUnavailable(f"installing slurm-wlm/munge failed (exit {res.returncode}): {res.stderr[-2000:]}")
    still = [d for d in DAEMONS if _which(d) is None]
    if still:
        raise ClusterUnavailable(f"after installing slurm-wlm and munge, still missing: {', '.join(still)}")


class SlurmCluster:
    """One-node cluster living in `root`. `env` holds the variables SLURM clients need (SLURM_CONF)."""

    def __init__(self, root: Optional[str] = None, partition: str = PARTITION, cpus: Optional[int] = None):
        self._temp_root = root is None  # a folder made here is removed again by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="lingua-slurm-")).resolve()
        self.partition = partition
        self.cpus = cpus or max(os.cpu_count() or 1, 2)
        self.conf_path = self.root / "slurm.conf"
        # munged's socket and slurmstepd's sockets (in SlurmdSpoolDir) are AF_UNIX paths, limited to ~108 bytes:
        # under a long root they live in a short folder of their own.
        self.sock_dir = self.root
        if len(str(self.root)) > 50:
            self.sock_dir = Path("/tmp") / ("lingua-slurm-" + hashlib.sha1(str(self.root).encode()).hexdigest()[:10])
        self.munge_dir = self.sock_dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.owned = True  # False when attached to a cluster started by someone else (we do not stop it)

    # ---- what clients need -------------------------------------------------------------------------
    @property
    def env(self) -> Dict[str, str]:
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """`base` (default os.environ) + SLURM_CONF, without SLURM job variables leaking from an outer job."""
        env = dict(os.environ if base is None else base)
        for k in list(env):
            if k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SRUN_"):
                del env[k]
        env.update(self.env)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.client_env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): {res.stderr.strip()}")
        return res

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        r = self.root
        for d in ("state", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for d in (self.sock_dir / "spool", self.munge_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        (r / "plugstack.conf").write_text("")
        conf = f"""# single-node test cluster written by tests/slurm_cluster.py
ClusterName=lingua-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={self.sock_dir}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
MessageTimeout=20
SlurmctldTimeout=300
SlurmdTimeout=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _spawn(self, name: str, args: List[str]) -> int:
        log = open(self.root / "log" / f"{name}.out", "ab")
        env = self.client_env()
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.close()
        (self.root / f"{name}.daemon.pid").write_text(str(proc.pid))
        return proc.pid

    def _log_tail(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                continue
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def start(self, timeout: float = 90.0) -> "SlurmCluster":
        ensure_packages()
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmd/slurmctld with SlurmUser=root needs root")
        self._write_conf()
        key = self.munge_dir / "munge.key"
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        os.chmod(self.munge_dir, 0o700)
        try:
            self._spawn("munged", [
                _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.root}/log/munged.log",
                f"--seed-file={self.munge_dir}/munged.seed", "--num-threads=2",
            ])
            self._wait(lambda: self.munge_socket.exists(), 20, "munged to create its socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf_path)])
            self.wait_node_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name in DAEMONS:
                pid = self._daemon_pid(name)
                if pid is not None and not _pid_alive(pid):
                    raise ClusterUnavailable(f"{name} exited while waiting for {what}:\n{self._log_tail()}")
            if cond():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}:\n{self._log_tail()}")

    def _node_idle(self) -> bool:
        try:
            res = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and any(
            line.split()[1].rstrip("*~#") == "idle" for line in res.stdout.splitlines() if len(line.split()) == 2
        )

    def _daemon_pid(self, name: str) -> Optional[int]:
        f = self.root / f"{name}.daemon.pid"
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pids = [self._daemon_pid(n) for n in DAEMONS]
        return all(p is not None and _pid_alive(p) for p in pids)

    def cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """Cancel every job of this cluster and wait until the queue is empty (so no task outlives slurmd)."""
        try:
            self.run("scancel", f"--partition={self.partition}", check=False, timeout=20)
            deadline = time.time() + timeout
            while time.time() < deadline:
                res = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                if res.returncode != 0 or not res.stdout.strip():
                    return
                time.sleep(1)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd, slurmctld, munged by their own pids (TERM, then KILL)."""
        if self.is_running():
            self.cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._daemon_pid(name)
            if pid is None or not _pid_alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _pid_alive(pid):
                self._reap(pid)
                time.sleep(0.2)
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap(pid)
        if self.owned and not self.is_running():
            if self.sock_dir != self.root:
                shutil.rmtree(self.sock_dir, ignore_errors=True)
            if self._temp_root:
                shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    # ---- helpers for tests -------------------------------------------------------------------------
    def job_info(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job -o <id>` as a dict (JobState, RestartCnt, ...); {} if unknown."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        info: Dict[str, str] = {}
        if res.returncode != 0:
            return info
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_node_idle(self, timeout: float = 60) -> None:
        """Until the node runs nothing: a job just requeued is still being torn down on it for a few seconds."""
        self._wait(self._node_idle, timeout, "the node to be idle in sinfo")

    def wait_job(self, job_id: str,
                 states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                 timeout: float = 300, poll: float = 1.0) -> Dict[str, str]:
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s; last: {info.get('JobState')} {info}")


def attach(root: str) -> SlurmCluster:
    """A handle on a cluster started earlier with `python tests/slurm_cluster.py start --dir root`."""
    c = SlurmCluster(root=root)
    c.owned = False
    if not c.conf_path.exists():
        raise ClusterUnavailable(f"no slurm.conf in {root}")
    for line in c.conf_path.read_text().splitlines():
        if line.startswith("PartitionName="):
            c.partition = line.split()[0].split("=", 1)[1]
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Start/stop a single-node SLURM cluster on localhost for development.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lingua-slurm"), help="cluster folder")
    a = p.parse_args(argv)
    c = SlurmCluster(root=a.dir)
    if a.action == "start":
        if c.is_running():
            print(f"already running in {c.root}")
        else:
            c.root.mkdir(parents=True, exist_ok=True)
            try:
                c.start()
            except ClusterUnavailable as e:
                print(f"cannot start the SLURM cluster: {e}", file=sys.stderr)
                return 1
        print(f"export SLURM_CONF={c.conf_path}")
        print(f"# partition: {c.partition}; tests reuse it with: export LINGUA_SLURM_DIR={c.root}")
        return 0
    if a.action == "stop":
        c.stop()
        print(f"stopped the cluster in {c.root}")
        return 0
    print(("running" if c.is_running() else "not running") + f" ({c.root})")
    return 0 if c.is_running() else 1


if __name__ == "__main__":
    sys.exit(main())
