"""Run health at a glance: progress, state, restarts, checkpoints, evals, disk and SLURM jobs of a dump dir.

    python -m lingua.status <dump_dir> [--json] [--plot out.png] [<dump_dir> ...]

Works on a running, finished, crashed or preempted run, and is strictly read-only: it never takes the run's lock
and never writes into the dump dir. It reads config.yaml (base_config.yaml before the run started), metrics.jsonl,
train.log, run.lock, the checkpoint folder (commit records and file sizes, no checksums), evals/,
metrics.eval.jsonl and, for a run launched by lingua.stool, logs/ and `squeue`/`sacct`. It imports no torch, so
it answers in well under a second.

train.log's time stamps have no date. A launch is dated from its "run start" line's `started <ISO time>` when
present; else from a metrics.jsonl record it wrote ("created_at", epoch seconds) minus the logger's elapsed seconds
on the matching "step N/M" line; else by its clock time on the latest day that fits before the next launch
(train.log's mtime for the last one). A launch's duration is the logger's elapsed seconds on its last line.

`disk_forecast(...)` is also called by the trainer (at start and after each save) to warn before the disk fills.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

from lingua import slurm
from lingua.checkpoint_format import STEP_RE, CheckpointError, check_files, folder_state, is_pinned, read_commit
from lingua.files import dir_size, read_json, read_jsonl
from lingua.lock import describe, read_lock, why_dead

# Files that make a folder a dump dir (any one of them).
DUMP_MARKERS = ("config.yaml", "base_config.yaml", "train.log", "metrics.jsonl", "checkpoints", "run.lock",
                "submit.slurm")
ACTIVE_JOBS = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED")
EVAL_SKIP = ("/tokens", "/perplexity")  # eval metrics not plotted: a count, and exp(loss)
RECENT = 20  # metrics records the "recent" speed is measured over
MAX_FORECAST_SAVES = 100_000  # a forecast looks this many saves ahead at most


class StatusError(RuntimeError):
    """The path is not something status can report on; the message says why, in one line."""


def checkpoint_root(dump_dir: str, config: dict) -> str:
    return (config.get("checkpoint") or {}).get("path") or os.path.join(dump_dir, "checkpoints")


def scan_checkpoints(root: str, check_sizes: bool = True) -> dict:
    """Committed checkpoints (newest first) and every other folder of the checkpoint folder, with sizes.
    check_sizes=False trusts the commit records (no stat of every file: the trainer's forecast after each save)."""
    committed, others = [], []
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if STEP_RE.match(name):
            try:
                record = read_commit(path)
                if check_sizes:
                    check_files(path, record)
            except CheckpointError as e:
                others.append({"name": name, "status": "invalid", "why": str(e).replace(path + ": ", ""),
                               "bytes": dir_size(path)})
                continue
            committed.append({"step": int(record["step"]), "kinds": record.get("kinds") or ["dump"],
                              "bytes": sum(f["size"] for f in record["files"].values()),
                              "pinned": is_pinned(path), "created": record.get("created")})
        else:
            state = folder_state(name)
            others.append({"name": name, "status": state, "why": _WHY[state], "bytes": dir_size(path)})
    committed.sort(key=lambda c: c["step"], reverse=True)
    total = sum(c["bytes"] for c in committed) + sum(o["bytes"] for o in others)
    return {"root": root, "committed": committed, "others": others, "total_bytes": total}


_WHY = {"staging": "a save in progress, or left by a dead run (removed at the next start)",
        "deleting": "retention is deleting it (removed at the next start if interrupted)",
        "abandoned": "moved aside by checkpoint.load_step; delete it when not needed",
        "other": "not a checkpoint folder"}


# ------------------------------------------------------------------------------------------------ reading


def read_config(dump_dir: str) -> dict:
    """The run's resolved config (config.yaml; before the run started, stool's base_config.yaml), or {}."""
    for name in ("config.yaml", "base_config.yaml"):
        path = os.path.join(dump_dir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    config = yaml.safe_load(f)
                return config if isinstance(config, dict) else {}
            except (OSError, yaml.YAMLError):
                return {}
    return {}


def read_metrics(path: str) -> tuple:
    """(records, problems): every JSON object line with a global_step; one problem line for unreadable lines."""
    records, bad, torn = [], [], False
    if not os.path.exists(path):
        return records, []
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("global_step"), int):
                records.append(record)
            elif line.endswith(b"\n"):
                bad.append(i)
            else:
                torn = True  # the last line, without its newline
    problems = ["metrics.jsonl: its last line is incomplete (being written, or cut by a kill; skipped)"] if torn else []
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        problems.append(f"metrics.jsonl: line {shown} is not a valid metrics record (skipped); a resume keeps "
                        "only the records before the first such line")
    return records, problems


def read_eval_metrics(path: str) -> list:
    """The eval records (a torn line, while an eval rewrites the file under its lock, is skipped)."""
    return [r for r in read_jsonl(path) if isinstance(r.get("global_step"), int)]


# ------------------------------------------------------------------------------------------------ train.log

LOG_LINE = re.compile(r"^([DIWEC]) (\d\d:\d\d:\d\d) +(-?\d+(?:\.\d+)?)s r\d+ (\S+): (.*)$")
RUN_START = re.compile(r"run start: (\d+) processes \((\w+)\), rank 0 on host (\S+) pid (\d+)"
                       r"(?:, SLURM job (\S+) restart (\d+))?(?:, started (\S+))?")


@dataclass
class Launch:
    """One start of the run, from its "run start" line in train.log to the next one."""

    clock: str  # HH:MM:SS of the "run start" line (local time of the host that logged it)
    elapsed: float = 0.0  # logger seconds at the launch's last line: how long the process ran
    processes: Optional[int] = None
    launcher: str = ""
    host: str = ""
    pid: Optional[int] = None
    slurm_job: Optional[str] = None
    slurm_restart: Optional[int] = None
    started_at: Optional[float] = None  # epoch seconds (see the module docstring)
    resumed_from: Optional[int] = None  # None: a fresh start
    last_step: Optional[int] = None
    # finished, already complete, preempted, requeued, stopped, not saved, crashed, failed; killed until a final
    # line says otherwise (running: set by run_state for the live lock holder's launch)
    end: str = "killed"
    detail: str = ""  # the launch's final line (or last error line) in words
    last_error: str = ""
    start_elapsed: float = 0.0
    step_elapsed: dict = field(default_factory=dict)  # step -> logger seconds of its "step N/M" line

    INTERNAL = ("clock", "elapsed", "start_elapsed", "step_elapsed")  # not shown in --json


def parse_log(path: str) -> tuple:
    """(launches, notes): every launch in train.log, and notable lines (eval failures, skipped saves)."""
    launches, notes = [], {"eval_failed": {}, "not_saving": None}
    if not os.path.exists(path):
        return launches, notes
    launch, crashed = None, False
    with open(path, errors="replace") as f:
        for raw in f:
            m = LOG_LINE.match(raw.rstrip("\n"))
            if m is None:  # a traceback line: the last one of a crash names the exception
                if crashed and raw.strip():
                    launch.last_error = raw.strip()
                continue
            level, clock, elapsed, name, msg = m.groups()
            if msg.startswith("run start: "):
                launch = Launch(clock=clock, start_elapsed=float(elapsed))
                launches.append(launch)
                s = RUN_START.match(msg)
                if s:
                    launch.processes, launch.launcher, launch.host, launch.pid = int(s[1]), s[2], s[3], int(s[4])
                    launch.slurm_job, launch.slurm_restart = s[5], int(s[6]) if s[6] else None
                    launch.started_at = _iso_epoch(s[7])
            if launch is None:
                continue  # lines before the first "run start" (an old log format): nothing to attach them to
            launch.elapsed = float(elapsed)
            _classify(launch, level, name, msg, notes)
            crashed = launch.end == "crashed" and msg == "crashed"
    return launches, notes


def _classify(launch: Launch, level: str, name: str, msg: str, notes: dict) -> None:
    """Update the launch from one log line of the trainer."""
    if m := re.match(r"step (\d+)/\d+ loss", msg):
        launch.last_step = int(m[1])
        launch.step_elapsed[int(m[1])] = launch.elapsed
    elif m := re.match(r"resumed from .+ at step (\d+)$", msg):
        launch.resumed_from = launch.last_step = int(m[1])
    elif m := re.match(r"training complete at step (\d+)", msg):
        launch.end, launch.detail, launch.last_step = "finished", msg, int(m[1])
    elif m := re.match(r"run already complete: step (\d+)", msg):
        launch.end, launch.detail, launch.last_step = "already complete", "run already complete", int(m[1])
    elif m := re.match(r"stopping on (.+?): (the )?checkpoint at step (\d+) (done|could NOT be saved)", msg):
        saved = m[4] == "done"
        launch.end = "preempted" if saved else "stopped"
        launch.last_step = int(m[3])
        launch.detail = f"stop requested ({m[1]}) at step {m[3]}, " + ("checkpoint saved" if saved else
                                                                        "its checkpoint could NOT be saved")
    elif m := re.match(r"requeued SLURM job (\S+) \(restart (\d+)", msg):
        launch.end = "requeued"
        launch.detail += f", requeued (SLURM job {m[1]} restart {m[2]})"
    elif msg.startswith("not requeueing"):
        launch.detail += ", not requeued: " + msg.split(": ", 1)[-1].split(";")[0]
    elif m := re.match(r"training reached step (\d+) but its final checkpoint was NOT saved", msg):
        launch.end, launch.detail, launch.last_step = "not saved", m[0], int(m[1])
    elif m := re.match(r"(?:launching the )?eval of step (\d+) FAILED(?:, training continues)?: (.*)", msg):
        notes["eval_failed"][int(m[1])] = m[2]
    elif msg.startswith("NOT SAVING"):
        notes["not_saving"] = msg
    elif level in "EC":
        launch.last_error = msg
        if name == "lingua.distributed":  # run_main: "crashed" + traceback, or "<ErrorType>: <message>"
            launch.end, launch.detail = ("crashed", "crashed") if msg == "crashed" else ("failed", msg)


def _iso_epoch(text: Optional[str]) -> Optional[float]:
    import datetime

    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def date_launches(launches: list, records: list, log_mtime: float) -> None:
    """Set each launch's started_at (epoch seconds); see the module docstring for the sources, best first."""
    created = {r["global_step"]: r["created_at"] for r in records if isinstance(r.get("created_at"), (int, float))}
    redone: set = set()  # steps a later launch logged again (its record replaced the earlier one's)
    for launch in reversed(launches):
        if launch.started_at is None:
            for step, elapsed in launch.step_elapsed.items():
                if step in created and step not in redone:
                    launch.started_at = created[step] - (elapsed - launch.start_elapsed)
                    break
        redone |= launch.step_elapsed.keys()
    limit = log_mtime
    for launch in reversed(launches):
        if launch.started_at is None:
            launch.started_at = _clock_before(launch.clock, limit - (launch.elapsed - launch.start_elapsed))
        limit = launch.started_at


def _clock_before(clock: str, limit: float) -> float:
    """The latest time <= limit (give or take the second the clock was cut to) whose local clock reads `clock`."""
    h, m, s = (int(x) for x in clock.split(":"))
    lt = time.localtime(limit)
    t = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, h, m, s, 0, 0, -1))
    return t if t <= limit + 1 else t - 86400


# ------------------------------------------------------------------------------------------------ the forecast


@dataclass
class Forecast:
    """Whether the run's remaining checkpoints fit on the checkpoint folder's filesystem, with retention."""

    root: str
    free_bytes: int
    bytes_per_checkpoint: Optional[int]  # None: no committed checkpoint yet, nothing to forecast from
    margin: float
    current_step: int
    steps: int
    saves_left: int  # periodic saves still due, and the final one
    fits_now: Optional[int]  # more checkpoints the free space holds now, without deleting any
    saves_fit: Optional[int] = None  # how many of the saves left fit, with retention
    first_failing_step: Optional[int] = None  # the first save that will not fit after retention; None: all fit
    free_then: Optional[int] = None  # free bytes at that save
    eta_s: Optional[float] = None  # seconds until that save at the given rate

    @property
    def warning(self) -> Optional[str]:
        """One line when a save before the end of the run will not fit, else None."""
        if self.first_failing_step is None:
            return None
        when = f" (in ~{fmt_duration(self.eta_s)} at the recent rate)" if self.eta_s is not None else ""
        return (f"disk: the checkpoint of step {self.first_failing_step} will not fit in {self.root}{when}: it needs "
                f"{fmt_bytes(self.bytes_per_checkpoint * self.margin)} with margin, {fmt_bytes(self.free_then)} will "
                f"be free after retention; the run ends at step {self.steps}. Free space or lower checkpoint.*.keep")


def _arg(obj, dotted: str, default):
    """A config value from a config dict or dataclass: _arg(cfg, 'dump.every', 1000)."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def _free_bytes(path: str) -> int:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # a folder not created yet: the filesystem it will be on
    return shutil.disk_usage(path).free


def disk_forecast(ckpt_root: str, checkpoint_args, steps: int, current_step: int,
                  bytes_per_checkpoint: Optional[int] = None, steps_per_s: Optional[float] = None,
                  free_bytes: Optional[int] = None, committed: Optional[list] = None) -> Forecast:
    """Simulate the run's remaining saves and the trainer's retention (lingua.checkpoint: a save needs its size x
    checkpoint.space_margin free, retention deletes early when short, never the newest or a pinned checkpoint).

    checkpoint_args: the run's CheckpointArgs or the `checkpoint` section of config.yaml. bytes_per_checkpoint:
    default the newest committed checkpoint's recorded size. steps_per_s: to say when a failing save is due.
    free_bytes / committed (scan_checkpoints()["committed"]): measured here unless given."""
    rules = {kind: (int(_arg(checkpoint_args, f"{kind}.every", -1)), int(_arg(checkpoint_args, f"{kind}.keep", 0)))
             for kind in ("dump", "eval")}
    margin = float(_arg(checkpoint_args, "space_margin", 1.1))
    committed = scan_checkpoints(ckpt_root, check_sizes=False)["committed"] if committed is None else committed
    size = bytes_per_checkpoint or (committed[0]["bytes"] if committed else None)
    free = _free_bytes(ckpt_root) if free_bytes is None else free_bytes
    due = [range((current_step // every + 1) * every, steps + 1, every) for every, _ in rules.values() if every > 0]
    saves = sorted(set().union(*due, [steps] if steps > current_step else []))
    forecast = Forecast(ckpt_root, free, size, margin, current_step, steps, len(saves),
                        int(free // (size * margin)) if size else None)
    if not size:
        return forecast
    shelf = _Shelf(rules, committed)
    forecast.saves_fit = len(saves)
    for i, step in enumerate(saves[:MAX_FORECAST_SAVES]):
        kinds = [k for k, (every, _) in rules.items() if every > 0 and step % every == 0] or ["dump"]
        if free < size * margin:
            free += shelf.retain(upcoming=kinds)
        if free < size * margin:
            forecast.saves_fit, forecast.first_failing_step, forecast.free_then = i, step, int(free)
            if steps_per_s:
                forecast.eta_s = (step - current_step) / steps_per_s
            break
        free -= size
        free += shelf.add(step, kinds, size)
    return forecast


class _Shelf:
    """The simulated checkpoint folder: retention as lingua.checkpoint's apply_retention decides it (the newest
    stays, the pinned stay, every checkpoint of a kind whose keep <= 0 stays, and the newest `keep` of each other
    kind; `upcoming` kinds get one slot less)."""

    def __init__(self, rules: dict, committed: list):
        self.keep = {kind: keep for kind, (_, keep) in rules.items()}
        self.live = [(c["step"], c["kinds"], c["bytes"], c["pinned"]) for c in committed]  # newest first

    def add(self, step: int, kinds: list, nbytes: int) -> int:
        self.live.insert(0, (step, kinds, nbytes, False))
        return self.retain()

    def retain(self, upcoming=()) -> int:
        """Delete what the rules do not keep; returns the bytes freed."""
        in_slots = {self.live[0][0]} if self.live else set()
        for kind, keep in self.keep.items():
            if keep > 0:
                in_slots.update([c[0] for c in self.live if kind in c[1]][:max(keep - (kind in upcoming), 0)])
        forever = lambda c: c[3] or any(self.keep.get(k, 0) <= 0 for k in c[1])  # pinned, or a kind kept in full
        freed = sum(c[2] for c in self.live if c[0] not in in_slots and not forever(c))
        # Those kept forever and past every slot can never be deleted nor take a slot again: dropping them from
        # the list keeps each call O(keep) even when every checkpoint is kept.
        self.live = [c for c in self.live if c[0] in in_slots]
        return freed


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class Run:
    """Everything read from one dump dir (read once; summarize() and plot_data() compute from it)."""

    dump_dir: str
    config: dict
    records: list
    eval_records: list
    launches: list
    log_notes: dict
    checkpoints: dict
    lock: Optional[dict]
    problems: list
    now: float


def load_run(dump_dir: str, now: Optional[float] = None) -> Run:
    """Read a dump dir. StatusError (one line) if it is missing, empty or not a dump dir."""
    dump_dir = os.path.abspath(dump_dir)
    if not os.path.exists(dump_dir):
        raise StatusError(f"{dump_dir} does not exist")
    if not os.path.isdir(dump_dir):
        raise StatusError(f"{dump_dir} is not a folder (give the run's dump dir)")
    if not os.listdir(dump_dir):
        raise StatusError(f"{dump_dir} is empty: no run has written to it yet")
    if not any(os.path.exists(os.path.join(dump_dir, m)) for m in DUMP_MARKERS):
        raise StatusError(f"{dump_dir} is not a lingua dump dir (it has none of {', '.join(DUMP_MARKERS)})")
    config = read_config(dump_dir)
    records, problems = read_metrics(os.path.join(dump_dir, "metrics.jsonl"))
    log = os.path.join(dump_dir, "train.log")
    launches, notes = parse_log(log)
    date_launches(launches, records, os.path.getmtime(log) if launches else 0.0)
    return Run(dump_dir, config, records, read_eval_metrics(os.path.join(dump_dir, "metrics.eval.jsonl")), launches,
               notes, scan_checkpoints(checkpoint_root(dump_dir, config)), read_lock(dump_dir), problems,
               time.time() if now is None else now)


def _boundaries(run: Run) -> set:
    """Steps after which a new launch wrote the next metrics record (a rate across them spans a restart)."""
    return {launch.resumed_from or 0 for launch in run.launches}


def recent_rate(run: Run) -> dict:
    """Tokens/s and s/step over the last RECENT records of the latest launch that logged (global, all ranks)."""
    cut, tail = _boundaries(run), []
    for r in reversed(run.records):
        if tail and any(r["global_step"] <= b < tail[-1]["global_step"] for b in cut):
            break
        tail.append(r)
        if len(tail) == RECENT:
            break
    first, last = (tail[-1], tail[0]) if tail else (None, None)
    dt = (last.get("created_at") or 0) - (first.get("created_at") or 0) if tail else 0
    if len(tail) < 2 or dt <= 0:  # one record: its own per-rank measure
        wps, step_time = (last or {}).get("speed/wps"), (last or {}).get("speed/step_time_s")
        return {"tokens_per_s": None, "tokens_per_s_per_rank": wps, "s_per_step": step_time,
                "steps_per_s": 1 / step_time if step_time else None}
    tokens = (last.get("data/tokens_seen") or 0) - (first.get("data/tokens_seen") or 0)
    steps = last["global_step"] - first["global_step"]
    return {"tokens_per_s": tokens / dt if tokens else None, "tokens_per_s_per_rank": last.get("speed/wps"),
            "s_per_step": dt / steps, "steps_per_s": steps / dt}


# ------------------------------------------------------------------------------------------------ summary


def summarize(run: Run, ask_slurm: bool = True) -> dict:
    """The status of a run as one JSON-able dict (what --json prints; format_text() words it)."""
    cfg, now, last = run.config, run.now, run.records[-1] if run.records else {}
    steps = cfg.get("steps") if isinstance(cfg.get("steps"), int) else None
    committed = run.checkpoints["committed"]
    step = max(last.get("global_step", 0), committed[0]["step"] if committed else 0)
    rate = recent_rate(run)
    left = steps - step if steps is not None else None
    problems = list(run.problems)

    evals_launched = _launched_evals(run.dump_dir)
    jobs = stool_jobs(run)
    job_ids = (jobs or []) + [e["job_id"] for e in evals_launched if e["job_id"]]
    states, note = slurm.query_jobs(job_ids) if ask_slurm and job_ids else ({}, None if ask_slurm else
                                                                            "SLURM not asked (--no-slurm)")
    state = run_state(run, steps, step, problems)
    if jobs and state["state"] in ("stopped", "not started") and states.get(jobs[-1], {}).get("state") in ACTIVE_JOBS:
        job = states[jobs[-1]]
        state["how"] += f"; SLURM job {jobs[-1]} is {job['state']}" + (
            f" (Reason={job['reason']})" if job["state"] == "PENDING" else "")
    if state["state"] == "running" and run.launches:  # since this launch's start or its last record
        quiet = now - max(last.get("created_at") or 0, run.launches[-1].started_at or 0)
        every = (rate["s_per_step"] or 0) * _arg(cfg, "logging.freq", 1)
        if quiet > max(120.0, 10 * every):
            problems.append(f"no step logged for {fmt_duration(quiet)} (usually every {fmt_duration(every)}): hung, "
                            "or a long save or eval?")
    if run.log_notes["not_saving"]:
        problems.append("a save was skipped for lack of space: " + run.log_notes["not_saving"])

    # A stopped run saves again from the step it resumes from; a running one from where it is.
    from_step = step if state["state"] == "running" else state["resumable_from"] or 0
    disk = disk_forecast(run.checkpoints["root"], cfg.get("checkpoint") or {}, steps if steps is not None else step,
                         from_step, steps_per_s=rate["steps_per_s"], committed=committed)
    launches = [{**{k: v for k, v in dataclasses.asdict(launch).items() if k not in Launch.INTERNAL},
                 "duration_s": launch_duration(launch, now)} for launch in run.launches]
    return {
        "dump_dir": run.dump_dir,
        "name": cfg.get("name"),
        "now": now,
        "state": state,
        "progress": {
            "step": step, "steps": steps, "percent": 100.0 * step / steps if steps else None,
            "tokens_seen": last.get("data/tokens_seen"), "loss": last.get("loss/out"), **rate,
            "eta_s": left / rate["steps_per_s"] if left and rate["steps_per_s"] else None,
            "elapsed_s": sum(launch["duration_s"] for launch in launches), "last_logged_at": last.get("created_at"),
        },
        "launches": launches,
        "checkpoints": run.checkpoints,
        "evals": eval_status(run, evals_launched, states),
        "disk": {**dataclasses.asdict(disk), "warning": disk.warning,
                 **{f"{kind}_{key}": _arg(cfg, f"checkpoint.{kind}.{key}", None)
                    for kind in ("dump", "eval") for key in ("every", "keep")}},
        "slurm": None if jobs is None else slurm_jobs(run, jobs, states, note),
        "problems": problems,
    }


def run_state(run: Run, steps: Optional[int], step: int, problems: list) -> dict:
    """running (a live lock holder), finished, stopped (how), or not started."""
    committed = run.checkpoints["committed"]
    out = {"state": "", "how": "", "holder": None, "resumable_from": committed[0]["step"] if committed else None}
    if run.lock is not None:
        dead = why_dead(run.lock)  # read-only: asks the process table, or squeue, or the heartbeat's age
        if dead is None:
            out.update(state="running", how=f"lock held by {describe(run.lock)}",
                       holder={k: run.lock.get(k) for k in ("host", "pid", "slurm_job_id", "slurm_restart",
                                                             "taken_at", "age_s")})
            if run.launches:
                run.launches[-1].end, run.launches[-1].detail = "running", "running"
            return out
        problems.append(f"run.lock was left by a dead run ({describe(run.lock)}: {dead}); the next start takes it over")
    last = run.launches[-1] if run.launches else None
    if last is None:
        out.update(state="not started", how="no launch in train.log yet")
    elif last.end in ("finished", "already complete") and (steps is None or step >= steps):
        out.update(state="finished", how=f"training complete at step {step}")
    else:
        out.update(state="stopped", how=launch_end(last))
    return out


def launch_end(launch) -> str:
    """How a launch ended, in words (a Launch or its dict)."""
    get = launch.get if isinstance(launch, dict) else lambda k: getattr(launch, k)
    step, error = get("last_step") or 0, get("last_error")
    if get("end") == "killed":
        return f"killed at step {step} (" + (f"last error: {error})" if error else "no final line in train.log)")
    if get("end") in ("crashed", "failed"):
        return f"{get('end')} at step {step}: {error or get('detail')}"
    return get("detail")


def launch_duration(launch: Launch, now: float) -> float:
    """Seconds the launch ran (the live one: until now), counted from its logger's start."""
    if launch.end == "running" and launch.started_at:
        return max(now - launch.started_at, 0.0) + launch.start_elapsed
    return launch.elapsed


def stool_jobs(run: Run) -> Optional[list]:
    """The SLURM job ids of a run launched by lingua.stool (submit.slurm), oldest first; None for other runs."""
    if not os.path.exists(os.path.join(run.dump_dir, "submit.slurm")):
        return None
    logs = os.path.join(run.dump_dir, "logs")
    names = os.listdir(logs) if os.path.isdir(logs) else []
    jobs = {n for n in names if n.isdigit()} | {m[1] for n in names if (m := re.fullmatch(r"slurm-(\d+)\.out", n))}
    jobs |= {launch.slurm_job for launch in run.launches if launch.slurm_job}
    return sorted(jobs, key=lambda j: int(re.sub(r"\D", "", j) or 0))


def slurm_jobs(run: Run, jobs: list, states: dict, note: Optional[str]) -> dict:
    """The latest job's state, requeue count and log files."""
    latest = jobs[-1] if jobs else None
    logs = os.path.join(run.dump_dir, "logs")
    requeues = max([(launch.slurm_restart or 0) + (launch.end == "requeued") for launch in run.launches
                    if launch.slurm_job == latest] or [0])
    files = []
    batch_log = os.path.join(logs, f"slurm-{latest}.out")
    if os.path.exists(batch_log):  # the batch script logs "job J (restart R)" at every start
        files.append(batch_log)
        with open(batch_log, errors="replace") as f:
            requeues = max([requeues] + [int(m[1]) for m in re.finditer(r"\(restart (\d+)\)", f.read())])
    if latest and os.path.isdir(os.path.join(logs, latest)):
        files += [os.path.join(logs, latest, n) for n in sorted(os.listdir(os.path.join(logs, latest)))]
    return {"jobs": jobs, "latest": latest, "requeues": requeues, "states": {j: states[j] for j in jobs if j in states},
            "note": note, "log_files": files}


def _launched_evals(dump_dir: str) -> list:
    out = []
    root = os.path.join(dump_dir, "evals")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        record = {"step": int(name) if name.isdigit() else None, "dir": folder,
                  "results": os.path.exists(os.path.join(folder, "results.json"))}
        record["job_id"] = (read_json(os.path.join(folder, "launched.json")) or {}).get("job_id")
        out.append(record)
    return out


def eval_status(run: Run, launched: list, states: dict) -> dict:
    """Evaluated steps (metrics.eval.jsonl), the latest results, and evals still pending or failed."""
    by_step = {r["global_step"]: r for r in run.eval_records}
    latest = by_step[max(by_step)] if by_step else None
    open_evals = []
    for e in launched:
        if e["results"] or e["step"] in by_step or e["step"] in run.log_notes["eval_failed"]:
            continue
        job = e.get("job_id")
        info = states.get(str(job)) if job else None
        if job is None:
            status = "no results yet (an inline eval running, or an eval or its submission interrupted)"
        elif info is None:
            status = f"job {job}: state unknown"
        elif info["state"] in ACTIVE_JOBS:
            status = f"job {job} {info['state']}" + (f" ({info['reason']})" if info.get("reason") not in
                                                     (None, "", "None") else "")
        else:
            status = f"failed: job {job} ended {info['state']} without results"
        open_evals.append({"step": e["step"], "dir": e["dir"], "job_id": job, "status": status})
    failed = [{"step": s, "error": why} for s, why in sorted(run.log_notes["eval_failed"].items()) if s not in by_step]
    metrics = {k: v for k, v in (latest or {}).items() if k not in ("global_step", "created_at", "eval_dir")}
    return {"evaluated_steps": sorted(by_step), "latest_step": latest["global_step"] if latest else None,
            "latest": metrics, "open": open_evals, "failed": failed}


# ------------------------------------------------------------------------------------------------ text


def fmt_bytes(n) -> str:
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_duration(s) -> str:
    if s is None:
        return "?"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def fmt_count(n) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_time(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def format_text(status: dict) -> str:
    """The status in words, one topic per block."""
    st, p, ck, disk = status["state"], status["progress"], status["checkpoints"], status["disk"]
    lines = [f"run         {status['dump_dir']}" + (f" ({status['name']})" if status.get("name") else "")]
    resumable = f"; resumable from step {st['resumable_from']}" if st["state"] == "stopped" and \
        st["resumable_from"] is not None else ""
    lines.append(f"state       {st['state']}: {st['how']}{resumable}")
    total = f"/{p['steps']} ({p['percent']:.1f}%)" if p["steps"] else ""
    tokens = f", {fmt_count(p['tokens_seen'])} tokens seen" if p["tokens_seen"] is not None else ""
    loss = f", loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""
    lines.append(f"progress    step {p['step']}{total}{tokens}{loss}")
    if p["s_per_step"]:
        speed = (f"{fmt_count(p['tokens_per_s'])} tokens/s" if p["tokens_per_s"] else
                 f"{fmt_count(p['tokens_per_s_per_rank'])} tokens/s per rank")
        eta = ""
        if p["eta_s"] is not None:
            eta = (f"; ETA {fmt_time(status['now'] + p['eta_s'])} (in {fmt_duration(p['eta_s'])})"
                   if st["state"] == "running" else f"; {fmt_duration(p['eta_s'])} of training left at that rate")
        lines.append(f"speed       {speed}, {p['s_per_step']:.3g} s/step (recent){eta}")
    n = len(status["launches"])
    if n:
        lines.append(f"time        {fmt_duration(p['elapsed_s'])} of training (the launches' durations added up)")
    restarts = f" ({n - 1} restart{'s' if n != 2 else ''})" if n > 1 else ""
    lines += [f"launches    {n}{restarts}"] + _launch_lines(status["launches"])
    lines += _checkpoint_lines(ck)
    lines += _eval_lines(status["evals"])
    each = f", {fmt_bytes(disk['bytes_per_checkpoint'])} each; room for {disk['fits_now']} more" \
        if disk["bytes_per_checkpoint"] else ""
    lines.append(f"disk        {fmt_bytes(disk['free_bytes'])} free for {ck['root']}; checkpoints use "
                 f"{fmt_bytes(ck['total_bytes'])}{each}")
    keep = f"dump every {disk['dump_every']} keep {disk['dump_keep'] or 'all'}"
    if disk["eval_every"] and disk["eval_every"] > 0:
        keep += f", eval every {disk['eval_every']} keep {disk['eval_keep'] or 'all'}"
    if disk["bytes_per_checkpoint"] and disk["saves_left"]:
        verdict = f"only {disk['saves_fit']} fit" if disk["warning"] else "they fit"
        lines.append(f"            {disk['saves_left']} save{'s' if disk['saves_left'] != 1 else ''} left to step "
                     f"{disk['steps']} ({keep}): {verdict}")
    lines += _slurm_lines(status["slurm"])
    warnings = ([disk["warning"]] if disk["warning"] else []) + status["problems"]
    lines += [f"WARNING     {w}" for w in warnings]
    return "\n".join(lines)


def _launch_lines(launches: list) -> list:
    out = []
    for i, launch in enumerate(launches, 1):
        start = "fresh start" if launch["resumed_from"] is None else f"resumed from step {launch['resumed_from']}"
        who = f"{launch['processes']} processes ({launch['launcher']}) on {launch['host']} pid {launch['pid']}"
        if launch["slurm_job"]:
            who += f", SLURM job {launch['slurm_job']} restart {launch['slurm_restart']}"
        out.append(f"  #{i:<2} {fmt_time(launch['started_at'])}  {start:<21} {who}, "
                   f"{fmt_duration(launch['duration_s'])}: {launch_end(launch)}")
    return out


def _checkpoint_lines(ck: dict) -> list:
    out = [f"checkpoints {len(ck['committed'])} committed in {ck['root']} ({fmt_bytes(ck['total_bytes'])})"]
    for c in ck["committed"]:
        out.append(f"  step {c['step']:>10}  {'+'.join(c['kinds']):<9} {fmt_bytes(c['bytes']):>9}  "
                   f"{fmt_time(c['created'])}" + ("  pinned" if c["pinned"] else ""))
    for o in ck["others"]:
        out.append(f"  {o['name']}  {o['status']} ({fmt_bytes(o['bytes'])}): {o['why']}")
    return out


def _eval_lines(ev: dict) -> list:
    if not (ev["evaluated_steps"] or ev["open"] or ev["failed"]):
        return ["evals       none"]
    steps = ", ".join(str(s) for s in ev["evaluated_steps"]) or "none yet"
    out = [f"evals       evaluated steps: {steps}"]
    if ev["latest"]:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev["latest"].items())
        out.append(f"            latest (step {ev['latest_step']}): {shown}")
    out += [f"            step {e['step']}: {e['status']}" for e in ev["open"]]
    out += [f"            step {e['step']}: FAILED: {e['error']}" for e in ev["failed"]]
    return out


# Pending reasons that no amount of waiting fixes.
HOPELESS_REASONS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidAccount", "InvalidQOS",
                    "BadConstraints")


def _slurm_lines(info: Optional[dict]) -> list:
    if info is None:
        return []
    if not info["jobs"]:
        return ["slurm       launched by stool (submit.slurm), no job id recorded yet"]
    latest, state = info["latest"], (info["states"] or {}).get(info["latest"])
    what = f"{state['state']}" if state else "state unknown"
    if state and state["state"] == "PENDING" and state.get("reason"):
        what += f" (Reason={state['reason']}" + (": it can never start as requested, see submit.slurm"
                                                 if state["reason"] in HOPELESS_REASONS else "") + ")"
    out = [f"slurm       jobs {', '.join(info['jobs'])}; latest {latest}: {what}; requeued {info['requeues']} "
           f"time{'s' if info['requeues'] != 1 else ''}"]
    if info["note"]:
        out.append(f"            {info['note']}")
    if info["log_files"]:
        out.append(f"            logs: {', '.join(info['log_files'])}")
    return out


# ------------------------------------------------------------------------------------------------ plots


def plot_data(runs: list) -> list:
    """What the plot shows, per run: series against step and the step markers (restarts are resumed-from steps)."""
    out = []
    names = [os.path.basename(r.dump_dir) for r in runs]
    for run, name in zip(runs, names):
        recs, cut = run.records, _boundaries(run)
        speed_steps, speed = [], []
        for a, b in zip(recs, recs[1:]):  # tokens/s between consecutive records of the same launch
            dt = (b.get("created_at") or 0) - (a.get("created_at") or 0)
            dtok = (b.get("data/tokens_seen") or 0) - (a.get("data/tokens_seen") or 0)
            if dt > 0 and dtok > 0 and not any(a["global_step"] <= x < b["global_step"] for x in cut):
                speed_steps.append(b["global_step"])
                speed.append(dtok / dt)
        evals = {}
        for r in sorted(run.eval_records, key=lambda r: r["global_step"]):
            for k, v in r.items():
                if isinstance(v, (int, float)) and k not in ("global_step", "created_at") and not k.endswith(EVAL_SKIP):
                    evals.setdefault(k, ([], []))
                    evals[k][0].append(r["global_step"])
                    evals[k][1].append(v)
        out.append({
            "label": run.dump_dir if names.count(name) > 1 else name,
            "loss": _series(recs, "loss/out"),
            "lr": _series(recs, "optim/lr"),
            "tokens_per_s": (speed_steps, speed),
            "eval": evals,
            "restarts": sorted({launch.resumed_from for launch in run.launches if launch.resumed_from}),
            "checkpoints": sorted(c["step"] for c in run.checkpoints["committed"]),
            "evals": sorted({r["global_step"] for r in run.eval_records}),
        })
    return out


def _series(records: list, key: str) -> tuple:
    pairs = [(r["global_step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def draw_plot(data: list, path: str) -> None:
    """loss (with eval losses), learning rate, tokens/s and other eval metrics against step; vertical lines at
    restarts (red dashed), checkpoints (grey dotted) and evals (green dash-dot). matplotlib: the 'plot' extra."""
    from matplotlib.figure import Figure

    has_other_evals = any(not k.endswith("loss") for d in data for k in d["eval"])
    panels = ["loss", "learning rate", "tokens/s"] + (["eval metrics"] if has_other_evals else [])
    fig = Figure(figsize=(10, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(10)]
    for i, run in enumerate(data):
        c = colors[i % len(colors)]
        axes[0].plot(*run["loss"], color=c, label=f"{run['label']} train")
        for j, (k, (xs, ys)) in enumerate(run["eval"].items()):
            ax = axes[0] if k.endswith("loss") else axes[3]
            ax.plot(xs, ys, "os^vD*"[j % 6] + "--", color=c, markersize=4, label=f"{run['label']} eval {k}")
        axes[1].plot(*run["lr"], color=c)
        axes[2].plot(*run["tokens_per_s"], color=c, linewidth=0.8)
        for ax in axes:
            for x in run["checkpoints"]:
                ax.axvline(x, color="grey", linestyle=":", linewidth=0.7)
            for x in run["evals"]:
                ax.axvline(x, color="green", linestyle="-.", linewidth=0.8)
            for x in run["restarts"]:
                ax.axvline(x, color=c if len(data) > 1 else "red", linestyle="--", linewidth=1.2)
    for ax, title in zip(axes, panels):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if has_other_evals:
        axes[3].legend(fontsize=8)
    axes[-1].set_xlabel("step  (dashed: restarts, dotted: checkpoints, dash-dot: evals)")
    fig.suptitle(" vs ".join(d["label"] for d in data))
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua.status", description=__doc__.split("\n")[0])
    parser.add_argument("dump_dirs", nargs="+", metavar="dump_dir", help="a run's dump dir (several: compare them)")
    parser.add_argument("--json", action="store_true", help="one JSON object (a list for several dump dirs)")
    parser.add_argument("--plot", metavar="OUT.png", help="draw loss, lr, tokens/s (and evals) against step")
    parser.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct about the run's jobs")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.dump_dirs]
    except StatusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    statuses = [summarize(run, ask_slurm=not args.no_slurm) for run in runs]
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=1, default=str))
    else:
        print("\n\n".join(format_text(s) for s in statuses))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib: pip install matplotlib (the 'plot' extra)", file=sys.stderr)
            return 1
        draw_plot(plot_data(runs), args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
