"""Shared test helpers: a small real corpus, tiny configs, and real torchrun launches."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

from lingua.distributed import free_port
from lingua.slurm import job_free_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "tests", "assets", "tinyshakespeare.txt")  # shipped: nothing outside the repo


def load_script(name: str):
    """setup/<name>.py as a module (`import setup` would find setup.py)."""
    spec = importlib.util.spec_from_file_location(f"_lingua_setup_{name}", os.path.join(REPO, "setup", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_corpus(root: str, sources=("shk",), files_per_source: int = 2, max_docs: int = 2000) -> str:
    """Real text (tinyshakespeare paragraphs) in Lingua's layout: <root>/<source>/<source>.chunk.NN.jsonl."""
    with open(SHAKESPEARE) as f:
        paras = [p.strip() for p in f.read().split("\n\n") if p.strip()][:max_docs]
    for s_i, source in enumerate(sources):
        os.makedirs(os.path.join(root, source), exist_ok=True)
        docs = paras[s_i :: len(sources)]
        for c in range(files_per_source):
            with open(os.path.join(root, source, f"{source}.chunk.{c:02d}.jsonl"), "w") as f:
                for doc in docs[c::files_per_source]:
                    f.write(json.dumps({"text": doc}) + "\n")
    return root


def tiny_config(path: str, data_root: str, sources=("shk",), **overrides) -> str:
    """A YAML config for a tiny model that trains in seconds on CPU."""
    cfg = {
        "name": "test",
        "steps": 12,
        "seed": 7,
        "data": {
            "root_dir": data_root,
            "sources": {s: 1.0 for s in sources},
            "batch_size": 2,
            "seq_len": 32,
            "load_async": False,
            "prefetch_size": 4,
            "tokenizer": {"name": "bytes"},
        },
        "optim": {"lr": 3e-3, "warmup": 3, "scheduler": "cosine"},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "max_seqlen": 32},
        "checkpoint": {"dump": {"every": 4, "keep": 0}},
        "logging": {"freq": 1},
        "distributed": {"timeout_s": 60},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def clean_env(extra=None) -> dict:
    """The environment of a launched run: no launch variables of an enclosing job, no fault rules, this repo first."""
    env = job_free_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run_train(config: str, dump_dir: str, nproc: int = 2, args=(), env=None, timeout: int = 300,
              module: str = "apps.main.train") -> subprocess.CompletedProcess:
    """Run the trainer under torchrun (nproc > 0) or as a plain process (nproc == 0)."""
    cmd = [sys.executable]
    if nproc > 0:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    cmd += ["-m", module, f"config={config}", f"dump_dir={dump_dir}", *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def metrics(dump_dir: str) -> list:
    with open(os.path.join(dump_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(dump_dir: str) -> dict:
    return {r["global_step"]: r["loss/out"] for r in metrics(dump_dir)}


def committed_steps(dump_dir: str) -> list:
    root = os.path.join(dump_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and os.path.exists(os.path.join(root, n, "COMMIT.json")))


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def ckpt_path(dump: str, step: int) -> str:
    return os.path.join(dump, "checkpoints", f"{step:010d}")


def copy_run(src: str, dst: str) -> None:
    shutil.copytree(src, dst)


def start_background(cfg: str, dump: str, extra=(), env=None, nproc: int = 2, new_session: bool = False):
    """A 2-process torchrun of the trainer in the background (output on its stdout pipe)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "apps.main.train", f"config={cfg}", f"dump_dir={dump}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def worker_pids(torchrun: subprocess.Popen) -> dict:
    """{rank: pid} of the trainer processes under a torchrun."""
    import psutil

    workers = {}
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "apps.main.train" in " ".join(child.cmdline()):
            workers[int(rank)] = child.pid
    return workers


def wait_for_step(dump: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl has logged `step` (the run must stay alive meanwhile)."""
    deadline = time.time() + timeout
    path = os.path.join(dump, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and any(json.loads(line)["global_step"] >= step for line in open(path) if line.strip()):
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")
