"""Recovery drill: prove, on your own config and cluster, that a long run will survive faults and resume exactly.

    python -m lingua.drill config=my_run.yaml [key=value ...] [drill.faults=8 drill.steps=40 ...] [--dry-run]
    python -m lingua.stool script=lingua.drill config=my_run.yaml nodes=1 partition=p ngpu=8 -- [key=value ...]

The drill shortens the training config (drill.steps steps, a checkpoint every drill.every) and keeps everything
else: model, data, parallelism, sync or async saving. Under <dump_dir>/drill/ (never the real run's checkpoints)
it runs an uninterrupted reference, then the same run with faults injected at seeded random points (lingua.faults:
kill -9 of one rank or of all, during start-up, in a step, in a sync save or an async write, the preemption signal,
a corrupted newest checkpoint, a change of the number of processes), rerunning the same command after each fault
as a user would, until the run finishes. It launches the runs itself: torchrun on a machine, srun inside a SLURM
allocation (so the cluster's filesystem and signals are exercised). Then it compares every step's loss and the
final weights with the reference (bitwise on CPU; after a change of the number of processes, or on GPUs, within a
stated tolerance), the data stream (data.trace), that each step was logged once, the wandb run id, stray files and
orphan processes, and writes report.md, report.json and report.png there. Exit 0 when everything matched.
"""

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from lingua import faults
from lingua.args import ConfigError, load_config
from lingua.files import atomic_write, read_jsonl, write_json

logger = logging.getLogger("drill")

STOOL_DRIVER = True  # under stool, run once in the batch step: the drill launches its own srun steps
KINDS = ("kill_rank", "kill_all", "startup", "mid_step", "sync_save", "async_write", "preempt", "corrupt", "layout")
KIND_TEXT = {
    "kill_rank": "kill -9 of one rank after a step",
    "kill_all": "kill -9 of every rank after a step",
    "startup": "kill -9 of one rank during start-up (after loading)",
    "mid_step": "kill -9 of one rank in a step (gradients done, before the optimizer step)",
    "sync_save": "kill -9 of one rank in the middle of a sync save (shards written, no commit)",
    "async_write": "kill -9 of one rank during an async checkpoint write",
    "preempt": "the preemption signal (SIGUSR2) to one rank",
    "corrupt": "kill -9 of every rank, then a byte of the newest checkpoint flipped",
    "layout": "kill -9 of every rank, then a rerun on another number of processes",
}


@dataclass
class DrillOptions:
    steps: int = 40  # steps of the drill runs (the real config's are not used)
    every: int = 0  # checkpoint every this many steps; 0 = steps // 8 (at least 2)
    keep: int = 3  # checkpoints kept by the drill runs (at least 2: a corrupted newest one falls back)
    faults: int = 8  # faults injected into the faulted run
    seed: int = 0  # seeds the choice of faults and their points
    kinds: List[str] = field(default_factory=list)  # fault kinds to draw from (empty: every kind that applies)
    nproc: int = 0  # processes per run; 0: SLURM_NTASKS in an allocation, else the GPUs, else 2
    tolerance: float = -1.0  # max relative loss/weight difference accepted; < 0: 0 on CPU (bitwise), 1e-2 on GPUs
    layout_tolerance: float = 1e-4  # the same after a change of the number of processes (reduction order changes)
    timeout_s: int = 1800  # a launch that runs longer is killed and the drill fails
    script: str = "apps.main.train"  # the training module to drill (its CONFIG_CLASS is the config)

    def validate(self, steps_needed: int = 0):
        if self.steps < 4:
            raise ConfigError("drill.steps must be >= 4")
        if self.faults < 0 or self.keep < 2:
            raise ConfigError("drill.faults must be >= 0 and drill.keep >= 2")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ConfigError(f"drill.kinds: unknown {unknown} (known: {', '.join(KINDS)})")


def config_class(script: str = "apps.main.train"):
    """The drill's config: the training script's CONFIG_CLASS plus a `drill` section. `job_dir` (where stool
    writes submit.slurm and logs) is <dump_dir>/drill, so a drill job never writes into the real run's files."""
    import importlib

    base = importlib.import_module(script).CONFIG_CLASS
    cls = dataclasses.make_dataclass(
        "DrillConfig", [("drill", DrillOptions, field(default_factory=DrillOptions))], bases=(base,),
        namespace={"job_dir": property(lambda self: os.path.join(self.dump_dir, "drill"))},
    )
    cls.__module__ = __name__
    return cls


def __getattr__(name):  # CONFIG_CLASS is built on first use (it imports the training script)
    if name == "CONFIG_CLASS":
        return config_class()
    raise AttributeError(name)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Fault:
    kind: str
    step: int  # the step it hits (for startup: the step the run had reached)
    rank: Optional[int]
    rules: str  # LINGUA_FAULTS of the faulted launch
    result: dict = field(default_factory=dict)  # what happened (filled while the drill runs)

    @property
    def text(self) -> str:
        where = "" if self.kind == "startup" else f" at step {self.step}"
        return KIND_TEXT[self.kind] + where + ("" if self.rank is None else f" (rank {self.rank})")


def applicable_kinds(cfg, nproc: int, elastic_nproc: Optional[int]) -> List[str]:
    kinds = list(cfg.drill.kinds) or list(KINDS)
    drop = {"async_write"} if not cfg.checkpoint.async_save else {"sync_save"}
    if elastic_nproc is None:
        drop.add("layout")
    if nproc < 2:
        drop.update({"kill_rank"})  # one rank: the same as kill_all
    return [k for k in kinds if k not in drop]


def plan_faults(cfg, steps: int, every: int, nproc: int, elastic_nproc: Optional[int]) -> List[Fault]:
    """Seeded: every applicable kind once (in random order, a layout change last) before any repeats, at spread,
    strictly increasing steps (save faults on save steps)."""
    rng = random.Random(cfg.drill.seed)
    kinds = applicable_kinds(cfg, nproc, elastic_nproc)
    if not kinds or cfg.drill.faults == 0:
        return []
    chosen = []
    while len(chosen) < cfg.drill.faults:
        batch = [k for k in kinds if k != "layout"]
        rng.shuffle(batch)
        chosen.extend(batch)
    chosen = chosen[: cfg.drill.faults - ("layout" in kinds)] + (["layout"] if "layout" in kinds else [])
    faults, last = [], 0
    for i, kind in enumerate(chosen):
        target = max(last + 1, round((i + 1) * steps / (len(chosen) + 1)) + rng.randint(-1, 1))
        if kind in ("sync_save", "async_write"):
            target = ((target + every - 1) // every) * every
        if kind == "corrupt":
            target = max(target, 2 * every + 1)  # two checkpoints exist: the newest can be corrupted
        if kind == "startup":
            target = last
        if target >= steps:
            break  # no room left for more faults
        rank = None if kind in ("kill_all", "corrupt", "layout") else rng.randrange(nproc)
        rule = {
            "kill_rank": f"step@{target}:{rank}=kill",
            "kill_all": f"step@{target}=kill",
            "startup": f"startup.after_load:{rank}=kill",
            "mid_step": f"train.before_optimizer_step@{target}:{rank}=kill",
            "sync_save": f"save.after_shards@{target}:{rank}=kill",
            "async_write": f"save.async_write@{target}:{rank}=kill",
            "preempt": f"step@{target}:{rank}=signal(SIGUSR2)",
            "corrupt": f"step@{target}=kill",
            "layout": f"step@{target}=kill",
        }[kind]
        faults.append(Fault(kind, target, rank, rule))
        last = target
    return faults


# -------------------------------------------------------------------------------------------- launching


def default_nproc() -> int:
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"])
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


class Launcher:
    """Starts one training run as a process tree: torchrun here, srun inside a SLURM allocation."""

    def __init__(self, script: str, logs: str):
        self.script = script
        self.logs = logs
        self.slurm = bool(os.environ.get("SLURM_JOB_ID"))

    def run(self, config: str, nproc: int, rules: str, name: str, timeout: float) -> tuple:
        """(exit code, seconds, log path, session id) of one launch, which has ended when this returns."""
        from lingua.distributed import free_port
        from lingua.slurm import job_free_env

        env = dict(os.environ) if self.slurm else job_free_env()
        env.pop(faults.ENV, None)
        if rules:
            env[faults.ENV] = rules
        env["MASTER_PORT"] = str(free_port())  # a fresh rendezvous port: the last run's may be in TIME_WAIT
        env.setdefault("OMP_NUM_THREADS", "1")
        python = [sys.executable, "-u"]
        if self.slurm:
            cmd = ["srun", f"--ntasks={nproc}", "--kill-on-bad-exit=1", *python, "-m", self.script, f"config={config}"]
        else:
            cmd = [*python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                   f"--master-port={env['MASTER_PORT']}", "-m", self.script, f"config={config}"]
        os.makedirs(self.logs, exist_ok=True)
        log = os.path.join(self.logs, f"{name}.log")
        t0 = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        return code, time.time() - t0, log, proc.pid


def orphans(marker: str, session: int) -> List[int]:
    """Processes still alive from a launch: in its session (its data loaders too), or naming its config."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == session or any(marker in part for part in p.info["cmdline"] or ()):
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


# ------------------------------------------------------------------------------------------- the drill


def drill_config(cfg, dump_dir: str, every: int) -> object:
    """The training config of a drill run: the user's, shortened, writing only under `dump_dir`."""
    from lingua.args import config_to_dict

    names = {f.name for f in dataclasses.fields(type(cfg))} - {"drill"}
    values = {k: v for k, v in config_to_dict(cfg).items() if k in names}
    values.update(dump_dir=dump_dir, steps=cfg.drill.steps, eval=None, async_eval_gpus=None)
    values["checkpoint"].update(path=None, load_step=-1, start_over=False)
    values["checkpoint"]["dump"] = {"every": every, "keep": cfg.drill.keep}
    values["checkpoint"]["eval"] = {"every": -1, "keep": 0}
    values["logging"]["freq"] = 1
    if values["logging"].get("wandb"):
        values["logging"]["wandb"].update(mode="offline", dir=None)  # never the user's online project
    values["profiling"]["run"] = False
    values["data"]["trace"] = True
    return values


class Drill:
    def __init__(self, cfg, dry_run: bool = False):
        self.cfg = cfg
        self.opts = cfg.drill
        self.root = os.path.abspath(os.path.join(cfg.dump_dir, "drill"))
        self.steps = self.opts.steps
        self.every = self.opts.every or max(2, self.steps // 8)
        self.nproc = self.opts.nproc or default_nproc()
        self.dry_run = dry_run
        self.tolerance = self.opts.tolerance if self.opts.tolerance >= 0 else (1e-2 if self._cuda() else 0.0)
        G = cfg.data.batch_size * cfg.grad_acc_steps * self.nproc
        self.global_batch = cfg.data.global_batch_size or G
        self.elastic_nproc = self._other_layout()
        self.faults = plan_faults(cfg, self.steps, self.every, self.nproc, self.elastic_nproc)
        self.launcher = Launcher(self.opts.script, os.path.join(self.root, "launches"))
        self.t0 = time.time()
        self.checks: dict = {}
        self.problems: List[str] = []
        self._previous: Optional[Fault] = None  # the fault the current launch recovers from

    def _cuda(self) -> bool:
        try:
            import torch

            return torch.cuda.is_available() and str(self.cfg.distributed.device) != "cpu"
        except ImportError:
            return False

    def _other_layout(self) -> Optional[int]:
        """A number of processes the run can move to and keep its data stream (elastic resume), or None."""
        d = self.cfg.distributed
        if d.dp_shard != -1 or d.dp_replicate != 1 or d.tp_size != 1:
            return None  # an explicit mesh: keep it
        streams = self.cfg.data.streams or self.global_batch
        for n in ([self.nproc // 2, self.nproc * 2] if self.nproc > 1 else [2]):
            if n >= 1 and streams % n == 0 and self.global_batch % (self.cfg.data.batch_size * n) == 0:
                if self._cuda() and n > default_nproc():
                    continue
                return n
        return None

    def say(self, msg: str) -> None:
        print(f"[drill {time.time() - self.t0:6.0f}s] {msg}", flush=True)

    # -------------------------------------------------------------------------------------- plan and run

    def plan_text(self) -> str:
        lines = [f"drill of {self.cfg.dump_dir} (its checkpoints are not touched): {self.steps} steps, a checkpoint "
                 f"every {self.every}, {self.nproc} processes "
                 f"({'srun in this SLURM allocation' if self.launcher.slurm else 'torchrun'}), "
                 f"{'async' if self.cfg.checkpoint.async_save else 'sync'} saves, under {self.root}",
                 f"reference run, then {len(self.faults)} faults, each followed by a rerun of the same command:"]
        for i, f in enumerate(self.faults, 1):
            lines.append(f"  {i}. {f.text}  [LINGUA_FAULTS={f.rules}]")
        if self.elastic_nproc is None:
            lines.append("  (no change of the number of processes: the mesh is explicit, or no other size keeps the "
                         "global batch)")
        agreement = "bitwise" if self.tolerance == 0 else f"within {self.tolerance:g} relative"
        layout_note = f" (within {self.opts.layout_tolerance:g} after the layout change)" if self.elastic_nproc else ""
        lines.append(f"comparison: losses and final weights {agreement}{layout_note}, "
                     "data stream, steps logged once, wandb id, stray files, orphan processes")
        lines.append(f"expected time: about {len(self.faults) + 3} launches (start-up each) and "
                     f"{2 + len(self.faults) * 0.1:.1f} x the time of {self.steps} steps")
        return "\n".join(lines)

    def write_config(self, name: str) -> str:
        path = os.path.join(self.root, f"{name}.yaml")
        values = drill_config(self.cfg, os.path.join(self.root, name), self.every)
        values["data"]["global_batch_size"] = self.global_batch
        import yaml

        atomic_write(path, yaml.safe_dump(values, sort_keys=False))
        return path

    def launch(self, config: str, nproc: int, rules: str, name: str) -> tuple:
        code, seconds, log, session = self.launcher.run(config, nproc, rules, name, self.opts.timeout_s)
        time.sleep(0.5)  # a process that is exiting with its launcher is not an orphan
        left = orphans(config, session)
        if left:
            self.problems.append(f"{name}: processes outlived the run: {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return code, seconds, log

    def run(self) -> int:
        print(self.plan_text(), flush=True)
        if self.dry_run:
            return 0
        for sub in ("reference", "faulted", "launches"):  # (logs/ holds stool's logs when the drill is a job)
            shutil.rmtree(os.path.join(self.root, sub), ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)
        ref_cfg, run_cfg = self.write_config("reference"), self.write_config("faulted")
        ref, dump = os.path.join(self.root, "reference"), os.path.join(self.root, "faulted")
        self.say(f"reference run ({self.steps} steps, {self.nproc} processes)")
        code, seconds, log = self.launch(ref_cfg, self.nproc, "", "reference")
        if code != 0:
            return self.finish(f"the reference run failed (exit {code}); see {log}")
        self.checks["reference_seconds"] = round(seconds, 1)
        nproc, wandb_id = self.nproc, None
        for i, fault in enumerate(self.faults + [None], 1):
            if fault is None:
                what, rules = f"final rerun to step {self.steps}", ""
            else:
                what, rules = f"fault {i} of {len(self.faults)}: {fault.text}", fault.rules
            self.say(what)
            self._previous = self.faults[i - 2] if i > 1 else None  # what this launch recovers from
            before = self._train_log_size(dump)
            started = time.time()
            code, seconds, log = self.launch(run_cfg, nproc, rules, f"faulted_{i:02d}")
            resumed = self._resumed_from(dump, before)
            if i > 1:  # this launch recovered from the previous fault
                prev = self.faults[i - 2]
                prev.result.update(resumed_from=resumed, recovery_s=self._recovery_s(dump, started, resumed))
            if fault is not None:
                fault.result.update(exit=code, seconds=round(seconds, 1), log=log)
                expected_ok = (code == 0) if fault.kind == "preempt" else (code not in (0, "timeout"))
                if not expected_ok:
                    fault.result["problem"] = f"the launch ended with exit {code}, not as the fault should"
                if fault.kind == "corrupt":
                    fault.result["corrupted"] = self._corrupt_newest(dump)
                if fault.kind == "layout":
                    nproc = self.elastic_nproc
                    fault.result["new_nproc"] = nproc
            elif code != 0:
                return self.finish(f"the final rerun failed (exit {code}); see {log}")
            wandb_id = wandb_id or self._wandb_id(dump)
            divergence = self.compare_losses(ref, dump, partial=True)
            if divergence:
                return self.finish(divergence)
        self.compare(ref, dump, wandb_id)
        return self.finish()

    # ---------------------------------------------------------------------------------------- observations

    @staticmethod
    def _train_log_size(dump: str) -> int:
        path = os.path.join(dump, "train.log")
        return os.path.getsize(path) if os.path.exists(path) else 0

    @staticmethod
    def _resumed_from(dump: str, offset: int) -> Optional[int]:
        import re

        path = os.path.join(dump, "train.log")
        if not os.path.exists(path):
            return None
        with open(path, errors="replace") as f:
            f.seek(offset)
            m = re.findall(r"resumed from \S+ at step (\d+)", f.read())
        return int(m[0]) if m else 0  # 0: a fresh start

    @staticmethod
    def _recovery_s(dump: str, started: float, resumed: Optional[int]) -> Optional[float]:
        """From the rerun's start to its first step done."""
        for r in read_jsonl(os.path.join(dump, "metrics.jsonl")):
            if r.get("global_step") == (resumed or 0) + 1 and r.get("created_at", 0) >= started:
                return round(r["created_at"] - started, 1)
        return None

    @staticmethod
    def _wandb_id(dump: str) -> Optional[str]:
        path = os.path.join(dump, "wandb_run_id")
        return open(path).read().strip() if os.path.exists(path) else None

    def _corrupt_newest(self, dump: str) -> Optional[str]:
        """Flip a byte in the middle of the newest committed checkpoint's largest shard."""
        from lingua.checkpoint import list_checkpoints, read_commit

        ckpts = list_checkpoints(os.path.join(dump, "checkpoints"))
        if not ckpts:
            return None
        step, path = ckpts[0]
        files = read_commit(path)["files"]  # the largest file of the checkpoint: a shard of the state
        size, name = max((info["size"], name) for name, info in files.items())
        with open(os.path.join(path, name), "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        return f"step {step}, {name}"

    # ----------------------------------------------------------------------------------------- comparisons

    def _tolerance_at(self, step: int) -> float:
        layout = [f for f in self.faults if f.kind == "layout"]
        return max(self.tolerance, self.opts.layout_tolerance) if layout and step > layout[0].step else self.tolerance

    def compare_losses(self, ref: str, dump: str, partial: bool = False) -> Optional[str]:
        """The first step whose loss differs (beyond its tolerance), with the fault before it; None if none."""
        want = {r["global_step"]: r["loss/out"] for r in read_jsonl(os.path.join(ref, "metrics.jsonl"))}
        got = read_jsonl(os.path.join(dump, "metrics.jsonl"))
        worst = 0.0
        for r in got:
            step, loss = r["global_step"], r["loss/out"]
            rel = abs(loss - want[step]) / max(abs(want[step]), 1e-12)
            worst = max(worst, rel)
            if rel > self._tolerance_at(step):
                return self._divergence(step, f"loss {loss!r} != reference {want[step]!r} (relative {rel:.2e})")
        steps = [r["global_step"] for r in got]
        if not partial:
            self.checks["max_loss_rel_diff"] = worst
            if steps != list(range(1, self.steps + 1)):
                dup = sorted({s for s in steps if steps.count(s) > 1})
                self.problems.append(f"steps logged {len(steps)} times for {self.steps} steps (duplicated: {dup})")
        return None

    def _divergence(self, step: int, what: str) -> str:
        cause = f"; the fault before it: {self._previous.text}" if self._previous else ""
        hint = ""
        if self.cfg.checkpoint.reset_data_state:
            hint = " (checkpoint.reset_data_state=true restarts the data stream at every resume: it cannot match)"
        return f"first divergent step {step}: {what}{cause}{hint}"

    def compare(self, ref: str, dump: str, wandb_id: Optional[str]) -> None:
        import torch

        from lingua.checkpoint import full_tensors, list_checkpoints
        from lingua.data import read_trace

        divergence = self.compare_losses(ref, dump)
        if divergence:
            self.problems.append(divergence)
        # the data stream: every step consumed the same sequences
        def per_step(d):
            out: dict = {}
            for line in read_trace(d):
                out.setdefault(line["step"], []).extend(json.dumps(s) for s in line["sequences"])
            return {k: sorted(v) for k, v in out.items()}

        a, b = per_step(ref), per_step(dump)
        bad = [s for s in sorted(a) if a[s] != b.get(s)]
        self.checks["data_stream_identical"] = not bad and sorted(a) == sorted(b)
        if bad:
            self.problems.append(self._divergence(bad[0], "the data stream differs (other sequences in the step)"))
        # the final weights and optimizer state
        final_a = list_checkpoints(os.path.join(ref, "checkpoints"))[0][1]
        final_b = list_checkpoints(os.path.join(dump, "checkpoints"))[0][1]
        for section in ("model", "optim"):
            wa, wb = full_tensors(final_a, section), full_tensors(final_b, section)
            if sorted(wa) != sorted(wb):
                self.problems.append(f"the final {section} state has other entries than the reference's")
                continue
            worst = max((((wa[k].double() - wb[k].double()).abs().max() / wa[k].double().abs().max().clamp_min(1e-12))
                         .item() for k in wa), default=0.0)
            self.checks[f"final_{section}_max_rel_diff"] = worst
            self.checks[f"final_{section}_bitwise"] = all(torch.equal(wa[k], wb[k]) for k in wa)
            if worst > self._tolerance_at(self.steps):
                self.problems.append(f"the final {section} state differs from the reference (max relative {worst:.2e})")
        # the wandb run id, stray files
        if self.cfg.logging.wandb is not None and self.cfg.logging.wandb.mode != "disabled":
            same = wandb_id is not None and wandb_id == self._wandb_id(dump)
            self.checks["wandb_run_id_preserved"] = same
            if not same:
                self.problems.append(f"the wandb run id changed ({wandb_id} -> {self._wandb_id(dump)})")
        stray = [os.path.relpath(os.path.join(d, n), dump) for d, dirs, files in os.walk(dump)
                 for n in dirs + files if n.endswith((".tmp", ".deleting")) or ".part." in n
                 or n.startswith(".write_probe") or n == "run.lock"]
        self.checks["stray_files"] = stray
        if stray:
            self.problems.append(f"stray files left: {stray[:5]}")
        for f in self.faults:
            if f.result.get("problem"):
                self.problems.append(f"{f.text}: {f.result['problem']}")

    # -------------------------------------------------------------------------------------------- report

    def finish(self, failure: Optional[str] = None) -> int:
        if failure:
            self.problems.insert(0, failure)
        ok = not self.problems
        report = {
            "verdict": "PASS" if ok else "FAIL",
            "problems": self.problems,
            "dump_dir": self.cfg.dump_dir,
            "steps": self.steps, "every": self.every, "nproc": self.nproc, "elastic_nproc": self.elastic_nproc,
            "async_save": bool(self.cfg.checkpoint.async_save), "tolerance": self.tolerance,
            "layout_tolerance": self.opts.layout_tolerance, "seed": self.opts.seed,
            "launcher": "srun" if self.launcher.slurm else "torchrun",
            "faults": [{"kind": f.kind, "step": f.step, "rank": f.rank, "rules": f.rules, "what": f.text, **f.result}
                       for f in self.faults],
            "checks": self.checks,
            "seconds": round(time.time() - self.t0, 1),
        }
        os.makedirs(self.root, exist_ok=True)
        write_json(os.path.join(self.root, "report.json"), report)
        atomic_write(os.path.join(self.root, "report.md"), self.markdown(report))
        png = self.plot(report)
        print(f"drill {report['verdict']}" + (f": {self.problems[0]}" if self.problems else "")
              + f"; report: {os.path.join(self.root, 'report.md')}" + (f", {png}" if png else ""), flush=True)
        return 0 if ok else 1

    @staticmethod
    def markdown(report: dict) -> str:
        lines = [f"# Recovery drill: {report['verdict']}", "",
                 f"Run {report['dump_dir']}: {report['steps']} steps, checkpoint every {report['every']}, "
                 f"{report['nproc']} processes ({report['launcher']}), {'async' if report['async_save'] else 'sync'} "
                 f"saves; tolerance {report['tolerance']:g} (after a layout change {report['layout_tolerance']:g}); "
                 f"{report['seconds']:.0f} s.", ""]
        if report["problems"]:
            lines += ["## Problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
        lines += ["## Faults", "", "| # | fault | injected | recovered from | recovery | verdict |",
                  "|---|---|---|---|---|---|"]
        for i, f in enumerate(report["faults"], 1):
            resumed = f.get("resumed_from")
            frm = "-" if resumed is None else ("fresh start" if resumed == 0 else f"step {resumed}")
            if f.get("corrupted"):
                frm += f" (corrupted: {f['corrupted']})"
            rec = f"{f['recovery_s']:.1f} s" if f.get("recovery_s") is not None else "-"
            verdict = "problem: " + f["problem"] if f.get("problem") else ("ok" if "exit" in f else "not reached")
            lines.append(f"| {i} | {f['what']} | `{f['rules']}` | {frm} | {rec} | {verdict} |")
        lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in report["checks"].items()]
        return "\n".join(lines) + "\n"

    def plot(self, report: dict) -> Optional[str]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(no report.png: matplotlib is not installed; pip install matplotlib)")
            return None
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, style in (("reference", "-"), ("faulted", "--")):
            recs = read_jsonl(os.path.join(self.root, name, "metrics.jsonl"))
            ax.plot([r["global_step"] for r in recs], [r["loss/out"] for r in recs], style, label=name)
        for f in report["faults"]:
            ax.axvline(f["step"], color="red", alpha=0.35)
            ax.text(f["step"], ax.get_ylim()[1], f["kind"], rotation=90, va="top", fontsize=7, color="red")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"recovery drill: {report['verdict']}")
        ax.legend()
        path = os.path.join(self.root, "report.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def parse(argv: List[str]):
    script = next((a.split("=", 1)[1] for a in argv if a.startswith("drill.script=")), "apps.main.train")
    config, overrides = None, []
    for a in argv:
        if a.startswith(("config=", "--config=")):
            config = a.split("=", 1)[1]
        else:
            overrides.append(a)
    cfg = load_config(config_class(script), config, overrides)
    cfg.drill.validate()
    import importlib

    checks = getattr(importlib.import_module(script), "check_config", None)
    if checks:  # the training script's own checks (data files, mesh, ...) for the drill's number of processes
        checks(cfg, cfg.drill.nproc or default_nproc())
    return cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return 0  # one driver per job, even if a submission ran it on several tasks
    try:
        cfg = parse(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return Drill(cfg, dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
