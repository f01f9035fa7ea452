"""Shared helpers of the benchmarks: machine description, corpus and config preparation, torchrun launches,
robust statistics, and the result table.

Every figure the benchmarks report is a ratio against a baseline measured in the same run (interleaved
where possible, repeated, median), so that a noisy, shared machine still gives comparable numbers.
"""

import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from lingua.distributed import free_port
from lingua.files import atomic_write, write_jsonl

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_CONFIG = os.path.join(REPO_ROOT, "configs", "debug.yaml")
SHAKESPEARE = os.path.join(REPO_ROOT, "tests", "assets", "tinyshakespeare.txt")


@dataclass
class BenchContext:
    """What every benchmark gets from the runner."""

    work_dir: str  # scratch space (checkpoints, dumps, configs); removed by the runner unless --keep
    quick: bool = False  # tiny sizes and one repeat: for the smoke test, not for figures
    repeats: int = 3  # interleaved repeats of each measurement (the median is reported)
    nproc: int = 2  # processes of the distributed benchmarks
    threads: int = 1  # intra-op threads per process (OMP_NUM_THREADS), as torchrun sets by default
    device: str = "cpu"  # cpu | cuda: cuda runs the train and ckpt parts on GPUs (bf16, NCCL, one GPU a process)
    results: Dict[str, dict] = field(default_factory=dict)  # results of the parts already run (scaling reuses train)
    log: bool = True  # progress lines on stderr

    def say(self, msg: str) -> None:
        if self.log:
            print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "mem_gib": mem_gb,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------- statistics


def median(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: List[float]) -> Optional[list]:
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def per_repeat(res: dict, key: str) -> Optional[list]:
    """The per-repeat ratios res[key] is the median of, where the part recorded them (under "per_repeat")."""
    return (res.get("per_repeat") or {}).get(key)


def ratios(num: List[float], den: List[float]) -> List[float]:
    """num[i] / den[i] for each interleaved repeat: what a median ratio and its range are taken over."""
    return [a / b for a, b in zip(num, den) if a is not None and b]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------------------------------ data, config


def _write_text_corpus(text_path: str, root: str, source: str) -> None:
    """<root>/<source>/<source>.chunk.00.jsonl with one {"text": paragraph} per line."""
    folder = os.path.join(root, source)
    os.makedirs(folder, exist_ok=True)
    with open(text_path, encoding="utf-8") as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    write_jsonl(os.path.join(folder, f"{source}.chunk.00.jsonl"), [{"text": d} for d in docs])


def ensure_corpus(work_dir: str) -> tuple:
    """(root_dir, sources) of a training corpus: the default corpus (data/default) when it was built, else one
    made in the work dir from tests/assets/tinyshakespeare.txt, else the default corpus built into the work dir
    (setup/build_default_corpus.py). Throughput does not depend on the text, only on the shapes."""
    with open(DEBUG_CONFIG) as f:
        debug = yaml.safe_load(f)
    root = debug["data"]["root_dir"]
    root = root if os.path.isabs(root) else os.path.join(REPO_ROOT, root)
    sources = dict(debug["data"]["sources"])
    if all(os.path.isdir(os.path.join(root, s)) for s in sources):
        return root, sources
    root = os.path.join(work_dir, "data")
    if os.path.exists(SHAKESPEARE):
        if not os.path.exists(os.path.join(root, "shakespeare", "shakespeare.chunk.00.jsonl")):
            _write_text_corpus(SHAKESPEARE, root, "shakespeare")
        return root, {"shakespeare": 1.0}
    if not os.path.isdir(os.path.join(root, "stdlib")):
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "setup", "build_default_corpus.py"), "--out", root,
                        "--quiet"], check=True, cwd=REPO_ROOT)
    return root, {"stdlib": 1.0}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "sources":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_config(ctx: BenchContext, name: str, overrides: Optional[dict] = None) -> str:
    """A YAML config: configs/debug.yaml on the bench corpus, with `overrides` merged in (data.sources replaced,
    since it is a dict that a CLI dotlist would merge into, not replace). Returns its path."""
    with open(DEBUG_CONFIG) as f:
        cfg = yaml.safe_load(f)
    root, sources = ensure_corpus(ctx.work_dir)
    cfg["data"]["root_dir"] = root
    cfg["data"]["sources"] = sources
    cfg = _merge(cfg, overrides or {})
    path = os.path.join(ctx.work_dir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------------------------------------- launching


def bench_env(threads: int) -> dict:
    from lingua.slurm import job_free_env

    env = job_free_env()
    env["OMP_NUM_THREADS"] = str(threads)
    # LINGUA_BENCH_SRC=<another checkout> runs the launched processes on that tree (A/B of a change).
    src = os.environ.get("LINGUA_BENCH_SRC", REPO_ROOT)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def torchrun_cmd(nproc: int, module: str, args: List[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args]


def run_logged(cmd: List[str], log_path: str, env: dict, timeout: float) -> float:
    """Run `cmd` in its own session with output to `log_path`; raise with the log's tail if it fails. On a
    timeout the whole session (torchrun and its workers) is killed. Returns the start time."""
    import signal

    start = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=os.environ.get("LINGUA_BENCH_SRC", REPO_ROOT),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            raise RuntimeError(f"killed (timeout {timeout:.0f}s or interrupted): {' '.join(cmd)} "
                               f"(log: {log_path})") from e
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n--- {log_path} (tail)\n{tail(log_path)}")
    return start


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def clean_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------- worker helpers


def part_main(argv: Optional[List[str]], part: str, description: str, worker, add_args=None) -> int:
    """`python -m apps.bench.<module>`: with --worker, one torchrun worker of the part (the part launches it so;
    the arguments every worker takes, and those `add_args(parser)` adds); without, the runner on this part alone
    (the other arguments go to the runner)."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" not in argv:
        from apps.bench.run import main as run_main

        return run_main(["--only", part] + argv)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--worker", action="store_true", help="(internal) run as a torchrun worker")
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--repeats", type=int, default=3)
    if add_args:
        add_args(p)
    return worker(p.parse_args(argv))


class Rendezvous:
    """Fresh process-group rendezvous for each phase of a torchrun worker.

    Re-initialising the default process group on the same store reuses its keys (group names restart at 0
    after destroy_process_group), and a rank can then read a peer's stale address and hang. So every phase gets
    a store of its own: rank 0 picks a free port and publishes it through torchrun's agent store; the phase's
    init_process_group (env://) then creates a new TCPStore there."""

    def __init__(self):
        import datetime

        import torch.distributed as dist

        self.rank = int(os.environ["RANK"])
        self.agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=300))
        self.count = 0

    def next(self) -> None:
        """Point env:// at a new store; call on every rank before each init_process_group."""
        import signal

        key = f"lingua_bench/port/{self.count}"
        self.count += 1
        if self.rank == 0:
            self.agent.set(key, str(free_port()))
        os.environ["MASTER_PORT"] = self.agent.get(key).decode()
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        # The trainer's preemption handler stays installed after train() returns: give SIGTERM back.
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)


def matmul_peak_flops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n torch.mm in this process: fp32 on the CPU (its intra-op thread count), bf16 on a
    GPU (what the trainer's mixed precision multiplies in)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def release_freed_memory() -> None:
    """Give the memory this process freed back to the OS (glibc's malloc_trim), so that what is allocated next is
    touched for the first time, as in a new process: the trainer's processes keep freed memory for reuse
    (distributed.keep_host_memory), which would flatter a second load in the same process."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work before reading a clock (nothing on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def drop_page_cache(paths: List[str]) -> bool:
    """Evict these files' pages from the page cache (POSIX_FADV_DONTNEED after fsync), so that the next read
    comes from the device for the raw baseline and the real load alike. False where the OS cannot do it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# ---------------------------------------------------------------------------------------------- table


@dataclass
class Row:
    part: str
    metric: str
    value: Optional[float]
    unit: str = ""
    baseline: Optional[float] = None  # the same-run reference the ratio is taken against
    baseline_name: str = ""
    ratio: Optional[float] = None
    target: str = ""  # e.g. ">= 0.97"
    ok: Optional[bool] = None
    runs: Optional[list] = None  # the per-repeat ratios `ratio` is the median of (the table shows their range)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check(value: Optional[float], target: str) -> Optional[bool]:
    if value is None or not target:
        return None
    op, _, num = target.partition(" ")
    num = float(num)
    return value >= num if op == ">=" else value <= num


def fmt(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "%":
        return f"{100 * x:.1f}%"
    ax = abs(x)
    if ax >= 1e12:
        s = f"{x / 1e12:.2f}T"
    elif ax >= 1e9:
        s = f"{x / 1e9:.2f}G"
    elif ax >= 1e6:
        s = f"{x / 1e6:.2f}M"
    elif ax >= 1e4:
        s = f"{x / 1e3:.1f}k"
    elif ax >= 100:
        s = f"{x:.0f}"
    elif ax >= 1:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3f}"
    return f"{s} {unit}".strip()


def format_table(rows: List[dict]) -> str:
    """A markdown table (also readable as plain text)."""
    header = ["part", "metric", "value", "baseline (same run)", "ratio", "range (n)", "target"]
    lines = []
    for r in rows:
        base = f"{fmt(r['baseline'], r['unit'])} ({r['baseline_name']})" if r.get("baseline_name") else ""
        verdict = "" if r.get("ok") is None else (" ok" if r["ok"] else " MISSED")
        lo_hi = spread(r.get("runs") or [])
        span = f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f} ({len(r['runs'])})" if lo_hi and len(r["runs"]) > 1 else ""
        lines.append([r["part"], r["metric"], fmt(r["value"], r["unit"]), base,
                      "-" if r.get("ratio") is None else f"{r['ratio']:.3f}", span,
                      (r.get("target") or "") + verdict])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for line in lines:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
    return "\n".join(out)
