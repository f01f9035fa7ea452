"""stool: launch a lingua app (trainer, eval) as a SLURM job whose dump dir is self-contained.

    python -m lingua.stool script=apps.main.train config=configs/debug.yaml nodes=1 partition=learn \
        [ngpu=8 ncpu=8 mem= time= account= qos= constraint= exclude= launcher=sbatch|bash copy_code=true \
         dirs_exists_ok=false override=false|true|force signal_seconds=120 ...] [-- key=value config overrides]

Before anything is created the stool options and the app config (`<script>.CONFIG_CLASS` loaded from the
YAML plus the overrides after `--`) are validated. Then stool writes into the config's `dump_dir`:
`base_config.yaml` (resolved, dump_dir absolute), `code/` (snapshot of the lingua/apps/configs .py/.yaml files),
`logs/`, and `submit.slurm`, and submits it. `sbatch <dump_dir>/submit.slurm` later resumes the run from its
latest checkpoint. From Python: `launch_job(StoolArgs(...), config_overrides=[...])`.
"""

import dataclasses
import datetime
import difflib
import importlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from lingua.args import ConfigError, dump_config, load_config
from lingua.files import atomic_write, write_json
from lingua.slurm import job_free_env, request_fits

logger = logging.getLogger(__name__)

__all__ = ["StoolArgs", "StoolError", "launch_job", "validate_app_config", "render_submit_script", "main"]

SNAPSHOT_MARKER = "STOOL_SNAPSHOT"  # file at the root of a code snapshot; lets nested launches reuse it
SNAPSHOT_PACKAGES = ("lingua", "apps", "configs")
SNAPSHOT_SUFFIXES = (".py", ".yaml", ".yml")
SNAPSHOT_SKIP_DIRS = {"__pycache__", "checkpoints", "data", "dumps", "dump", "logs", "wandb"}


class StoolError(RuntimeError):
    """A launch that cannot go ahead; the message says why. Nothing was left half-created."""


@dataclass
class StoolArgs:
    # Python module run with `python -m <script> config=<dump_dir>/base_config.yaml`; it must define CONFIG_CLASS.
    script: str = "apps.main.train"
    # YAML config of the app; the overrides after `--` are applied on top of it.
    config: str = ""
    # sbatch: submit to SLURM. bash: run submit.slurm here in the foreground (inside `salloc`, or without
    # SLURM at all: then the tasks run locally, through torch.distributed.run when there are several).
    launcher: str = "sbatch"
    # Accept an existing, non-empty dump dir (relaunch/resume into it); its checkpoints are kept.
    dirs_exists_ok: bool = False
    # Delete an existing dump dir first: "true" asks for confirmation on stdin, "force" does not; "false": never.
    override: str = "false"
    # Answer yes to the override confirmation (same as override=force when override=true).
    yes: bool = False
    # Snapshot lingua/, apps/, configs/ (.py/.yaml) into <dump_dir>/code and run from it, so later edits of the
    # working tree do not change the running job.
    copy_code: bool = True
    # With copy_code=false: run from this existing snapshot (PYTHONPATH) instead; empty = the snapshot the
    # current process runs from, if any (e.g. an eval job launched by a training job).
    code_dir: str = ""
    # Number of nodes (>= 1).
    nodes: int = 1
    # GPUs per node; one task per GPU. 0 = CPU mode (no GPU requested; tasks per node from ntasks_per_node).
    ngpu: int = 8
    # Tasks per node; defaults to ngpu in GPU mode and 1 in CPU mode.
    ntasks_per_node: Optional[int] = None
    # CPUs per task (--cpus-per-task, also OMP_NUM_THREADS unless already set).
    ncpu: int = 8
    # Memory per node (--mem), e.g. "64G", "0" = all; empty = cluster default.
    mem: str = ""
    # Time limit (--time): minutes or SLURM time format ("2-00:00:00"); empty = partition default.
    time: str = ""
    # SLURM partition (required with launcher=sbatch).
    partition: str = ""
    # SLURM account (--account); empty = default.
    account: str = ""
    # SLURM quality of service (--qos); empty = default.
    qos: str = ""
    # Node features required (--constraint), e.g. "volta32gb".
    constraint: str = ""
    # Nodes to avoid (--exclude), e.g. "node[03-04]".
    exclude: str = ""
    # Job name; empty = the dump dir's basename.
    job_name: str = ""
    # Seconds before the time limit at which SLURM sends USR2 to the tasks (--signal=USR2@N), so the app can
    # checkpoint and requeue itself.
    signal_seconds: int = 120
    # Extra `#SBATCH` options, comma separated, e.g. "--exclusive,--mail-type=END".
    sbatch_args: str = ""


# ---------------------------------------------------------------------------------------------------------
# argument parsing and validation


def parse_cli(argv: Sequence[str]) -> Tuple[StoolArgs, list]:
    """`key=value ... [-- config overrides]` -> (StoolArgs, overrides). Raises StoolError."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        stool_items, overrides = argv[:i], argv[i + 1:]
    else:
        stool_items, overrides = argv, []
    options = [f.name for f in dataclasses.fields(StoolArgs)]
    for item in stool_items:
        if item in ("-h", "--help", "help"):
            raise StoolError("usage")
        if "=" not in item:
            raise StoolError(f"bad argument '{item}': stool options are key=value (config overrides go after `--`)")
        key = item.split("=", 1)[0].lstrip("-")
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if "." in key:
                hint += f" (app config overrides go after `--`: ... -- {item})"
            raise StoolError(f"unknown stool option '{key}'{hint}. Valid options: {', '.join(options)}")
    cleaned = [item.lstrip("-") for item in stool_items]
    try:
        args = load_config(StoolArgs, None, cleaned)
    except ConfigError as e:
        raise StoolError(str(e).replace("config key", "stool option")) from None
    return args, list(overrides)


def _tasks_per_node(args: StoolArgs) -> int:
    if args.ntasks_per_node is not None:
        return args.ntasks_per_node
    return args.ngpu if args.ngpu > 0 else 1


def check_args(args: StoolArgs) -> None:
    """Validate the stool options themselves (nothing touched on disk)."""
    if not args.script or not re.fullmatch(r"[A-Za-z_][\w.]*", args.script):
        raise StoolError(f"script={args.script!r}: expected a Python module path such as apps.main.train")
    if not args.config:
        raise StoolError("missing config=<yaml> (the app config to launch, e.g. config=configs/debug.yaml)")
    if args.launcher not in ("sbatch", "bash"):
        raise StoolError(f"launcher={args.launcher!r}: expected 'sbatch' or 'bash'")
    if args.launcher == "sbatch" and not args.partition:
        raise StoolError("missing partition=<name> (the SLURM partition to submit to; see `sinfo`)")
    if args.nodes < 1:
        raise StoolError(f"nodes={args.nodes}: need at least 1 node")
    if args.ngpu < 0:
        raise StoolError(f"ngpu={args.ngpu}: must be >= 0 (0 = CPU mode)")
    ntasks = _tasks_per_node(args)
    if ntasks < 1:
        raise StoolError(f"ntasks_per_node={ntasks}: need at least 1 task per node")
    if args.ngpu > 0 and ntasks != args.ngpu:
        raise StoolError(
            f"ntasks_per_node={ntasks} with ngpu={args.ngpu}: GPU mode runs one task per GPU "
            "(leave ntasks_per_node unset, or use ngpu=0 for CPU tasks)"
        )
    if args.ncpu < 1:
        raise StoolError(f"ncpu={args.ncpu}: need at least 1 CPU per task")
    if args.signal_seconds < 0:
        raise StoolError(f"signal_seconds={args.signal_seconds}: must be >= 0")
    if str(args.override).lower() not in ("false", "true", "force"):
        raise StoolError(f"override={args.override!r}: expected false, true (asks) or force (does not ask)")
    if args.time and not re.fullmatch(r"[\d:-]+", str(args.time)):
        raise StoolError(f"time={args.time!r}: expected minutes or a SLURM time such as 1-12:00:00")
    for name in ("mem", "partition", "account", "qos", "constraint", "exclude", "job_name"):
        if re.search(r"\s", str(getattr(args, name))):
            raise StoolError(f"{name}={getattr(args, name)!r}: must not contain whitespace")
    for f in dataclasses.fields(StoolArgs):
        check_script_value(f.name, getattr(args, f.name))


def validate_app_config(script: str, config_path: str, overrides: Sequence[str] = ()):
    """Import `script`, load its CONFIG_CLASS from the YAML + overrides; returns the config object."""
    try:
        module = importlib.import_module(script)
    except ImportError as e:
        raise StoolError(f"cannot import script '{script}': {e}") from None
    cls = getattr(module, "CONFIG_CLASS", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise StoolError(f"script '{script}' defines no CONFIG_CLASS dataclass; stool cannot validate its config")
    if "dump_dir" not in {f.name for f in dataclasses.fields(cls)}:
        raise StoolError(f"{script}.CONFIG_CLASS has no dump_dir field")
    try:
        cfg = load_config(cls, config_path, list(overrides))
    except ConfigError as e:
        raise StoolError(f"invalid config for {script}: {e}") from None
    if not getattr(cfg, "dump_dir", None):
        raise StoolError(f"config for {script} has an empty dump_dir (set it in the YAML or add `-- dump_dir=...`)")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# code snapshot and environment


def _package_root() -> Path:
    """The folder holding the `lingua` package this process imported (the repo, or a snapshot)."""
    return Path(__file__).resolve().parent.parent


def current_snapshot() -> Optional[str]:
    """The code snapshot this process runs from, if it runs from one."""
    root = _package_root()
    return str(root) if (root / SNAPSHOT_MARKER).exists() else None


def _package_dirs(script: str, src_root: Path) -> list:
    """(name, folder) of what to snapshot: lingua/, apps/, configs/ next to the lingua package, plus the
    script's top-level package wherever it is imported from."""
    out = [(pkg, src_root / pkg) for pkg in SNAPSHOT_PACKAGES if (src_root / pkg).is_dir()]
    top = script.split(".")[0]
    if top not in {name for name, _ in out}:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations:
            out.append((top, Path(locations[0])))
    return out


def snapshot_code(dest: Path, script: str, src_root: Optional[Path] = None) -> int:
    """Copy the .py/.yaml files of lingua/, apps/, configs/ (and the script's top package) to dest."""
    src_root = Path(src_root or _package_root())
    count = 0
    dest.mkdir(parents=True, exist_ok=False)
    for pkg, src in _package_dirs(script, src_root):
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d not in SNAPSHOT_SKIP_DIRS and not d.startswith("."))
            rel = Path(pkg) / Path(dirpath).relative_to(src)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not name.endswith(SNAPSHOT_SUFFIXES) or path.is_symlink():
                    continue
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel / name)
                count += 1
    (dest / SNAPSHOT_MARKER).write_text(f"code snapshot of {src_root} taken by lingua.stool\n")
    return count


def python_env_activation() -> str:
    """Shell lines activating the Python environment running this process (venv or conda), or ''."""
    prefix = os.path.realpath(sys.prefix)
    conda_prefix = os.environ.get("CONDA_PREFIX")
    if conda_prefix and os.path.realpath(conda_prefix) == prefix:
        conda_exe = os.environ.get("CONDA_EXE") or shutil.which("conda") or "conda"
        return (
            f'eval "$({shlex.quote(conda_exe)} shell.bash hook)"\n'
            f"conda activate {shlex.quote(conda_prefix)}\n"
        )
    if sys.prefix != sys.base_prefix:  # a venv (VIRTUAL_ENV may be unset when python is called by path)
        venv = os.environ.get("VIRTUAL_ENV") or sys.prefix
        activate = os.path.join(venv, "bin", "activate")
        if os.path.isfile(activate):
            return f"source {shlex.quote(activate)}\n"
    return ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_script_value(name: str, value) -> str:
    """A value that goes into submit.slurm: control characters (a newline would end a comment or #SBATCH line and
    start a shell command) are refused with a StoolError naming it."""
    value = str(value)
    if _CONTROL.search(value):
        raise StoolError(f"{name}={value!r}: control characters (newline, tab, ...) cannot go into submit.slurm")
    return value


def _sbatch_value(name: str, value) -> str:
    """A value for an #SBATCH line. sbatch (not bash) reads those lines: double quotes group words and nothing is
    expanded, so a value with spaces, quotes or $ is double-quoted; one holding a double quote or a backslash
    cannot be written safely and is refused."""
    value = check_script_value(name, value)
    if re.fullmatch(r"[\w@%.:/,=+\[\]-]+", value):
        return value
    if '"' in value or "\\" in value:
        raise StoolError(f"{name}={value!r}: a double quote or a backslash cannot go into an #SBATCH line")
    return f'"{value}"'


def render_submit_script(args: StoolArgs, dump_dir: str, workdir: str, code_dir: Optional[str],
                         driver: bool = False) -> str:
    """The text of submit.slurm. Every value is checked (no control characters) and quoted: shlex.quote in the
    shell lines and comments, double quotes where needed in the #SBATCH lines (which sbatch reads). A `driver`
    script (STOOL_DRIVER = True, e.g. lingua.drill) runs once in the batch step and launches its own srun steps;
    any other runs as one task per process through srun."""
    q = shlex.quote
    for name, value in (("dump_dir", dump_dir), ("working directory", workdir), ("code_dir", code_dir or ""),
                        ("python", sys.executable)):
        check_script_value(name, value)
    ntasks = _tasks_per_node(args)
    logs = os.path.join(dump_dir, "logs")
    config = os.path.join(dump_dir, "base_config.yaml")
    job_name = args.job_name or os.path.basename(dump_dir.rstrip("/")) or "lingua"
    lines = [
        "#!/bin/bash",
        f"# Written by lingua.stool on {datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"# Resume (after a crash, or when requeueing stopped): sbatch {q(os.path.join(dump_dir, 'submit.slurm'))}",
        f"#SBATCH --job-name={_sbatch_value('job_name', job_name)}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={ntasks}",
        f"#SBATCH --cpus-per-task={args.ncpu}",
    ]
    if args.ngpu > 0:
        lines.append(f"#SBATCH --gres=gpu:{args.ngpu}")
    optional = [("partition", args.partition), ("mem", args.mem), ("time", args.time), ("account", args.account),
                ("qos", args.qos), ("constraint", args.constraint), ("exclude", args.exclude)]
    lines += [f"#SBATCH --{k}={_sbatch_value(k, v)}" for k, v in optional if str(v)]
    lines += [
        # The batch log sits directly in logs/ because SLURM cannot create folders: a manual
        # `sbatch submit.slurm` gets a new job id whose logs/<id>/ does not exist yet.
        f"#SBATCH --output={_sbatch_value('dump_dir', os.path.join(logs, 'slurm-%j.out'))}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=USR2@{args.signal_seconds}",
        "#SBATCH --requeue",
    ]
    lines += [f"#SBATCH {check_script_value('sbatch_args', opt.strip())}" for opt in args.sbatch_args.split(",")
              if opt.strip()]
    py = q(sys.executable)
    safe = " -P" if code_dir and sys.version_info >= (3, 11) else ""  # keep the cwd from shadowing the snapshot
    body = [
        "",
        "set -o pipefail",
        python_env_activation().rstrip("\n") or None,
        f"PYTHON={py}",
        (f"export PYTHONPATH={q(code_dir)}${{PYTHONPATH:+:$PYTHONPATH}}" if code_dir
         else "# copy_code=false: code from the working dir"),
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.ncpu}}}",
        f"cd {q(workdir)} || exit 1",
        f"LOGS={q(logs)}",
        "",
        'if [ -n "${SLURM_JOB_ID:-}" ]; then',
        '    mkdir -p "$LOGS/$SLURM_JOB_ID"',
        '    echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: '
        'task logs in $LOGS/$SLURM_JOB_ID/"',
        *([f'    "$PYTHON" -u{safe} -m {args.script} config={q(config)} >> "$LOGS/$SLURM_JOB_ID/driver.log" 2>&1']
          if driver else
          [f"    srun --kill-on-bad-exit=1 --cpus-per-task={args.ncpu} --open-mode=append \\",
           '        --output="$LOGS/%j/%j.%t.stdout" --error="$LOGS/%j/%j.%t.stderr" \\',
           f'        "$PYTHON" -u{safe} -m {args.script} config={q(config)}']),
        "    rc=$?",
        '    echo "[$(date -Is)] job $SLURM_JOB_ID: ' + ("the driver" if driver else "srun") + ' exited with $rc"',
        "    exit $rc",
        "fi",
        "# Not inside a SLURM allocation (launcher=bash without salloc): run the tasks on this machine.",
    ]
    ntotal = 1 if driver else args.nodes * ntasks
    if ntotal > 1:
        env = "PYTHONSAFEPATH=1 " if safe else ""
        body.append(f'{env}"$PYTHON" -u -m torch.distributed.run --standalone --nproc_per_node={ntotal} '
                    f"-m {args.script} config={q(config)}")
    else:
        body.append(f'"$PYTHON" -u{safe} -m {args.script} config={q(config)}')
    return "\n".join(lines + [line for line in body if line is not None]) + "\n"


def _confirm_delete(path: str) -> bool:
    try:
        answer = input(f"stool: delete the existing dump dir {path} and everything in it (checkpoints too)? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _check_deletable(dump_dir: Path) -> None:
    protected = {Path("/"), Path.home().resolve(), _package_root()}
    cwd = Path.cwd().resolve()
    if dump_dir in protected or dump_dir in cwd.parents or dump_dir == cwd or dump_dir in _package_root().parents:
        raise StoolError(f"refusing to delete {dump_dir}: it holds the working directory or the code")


# ---------------------------------------------------------------------------------------------------------
# the launch


def launch_job(args: StoolArgs, config_overrides: Sequence[str] = ()) -> str:
    """Validate, create the dump dir, write base_config.yaml + submit.slurm (+ code snapshot), and launch.

    Returns the SLURM job id (launcher=sbatch) or the dump dir (launcher=bash). Raises StoolError; on an error
    nothing is left half-created (a dump dir created here is removed again)."""
    return _launch(args, config_overrides)[0]


def _launch(args: StoolArgs, config_overrides: Sequence[str]) -> Tuple[str, str]:
    if not isinstance(args, StoolArgs):
        raise TypeError("launch_job expects a StoolArgs")
    check_args(args)
    env = job_free_env()
    if args.launcher == "sbatch" and shutil.which("sbatch", path=env.get("PATH")) is None:
        raise StoolError("sbatch is not on PATH: is SLURM installed here? (launcher=bash runs without SLURM)")
    if args.launcher == "sbatch":  # a request no node can hold waits forever: say so (sbatch accepts some of them)
        warning = request_fits(args.partition, args.nodes, _tasks_per_node(args), args.ncpu, args.ngpu, args.mem)
        if warning:
            print(f"stool: warning: {warning}", file=sys.stderr)
    if not os.path.isfile(args.config):
        raise StoolError(f"config file '{args.config}' does not exist")
    cfg = validate_app_config(args.script, args.config, config_overrides)
    cfg.dump_dir = os.path.abspath(os.path.expanduser(cfg.dump_dir))
    # The job's folder (base_config.yaml, submit.slurm, code/, logs/): the dump dir, or the app's `job_dir`.
    dump_dir = Path(getattr(cfg, "job_dir", None) or cfg.dump_dir)
    check_script_value("dump_dir", dump_dir)  # before anything is created
    driver = bool(getattr(importlib.import_module(args.script), "STOOL_DRIVER", False))
    override = str(args.override).lower()

    code_dir: Optional[str] = None
    if not args.copy_code:
        code_dir = os.path.abspath(args.code_dir) if args.code_dir else current_snapshot()
        if code_dir and not os.path.isdir(code_dir):
            raise StoolError(f"code_dir={code_dir}: no such folder")

    existed = dump_dir.exists()
    if existed and not dump_dir.is_dir():
        raise StoolError(f"dump dir {dump_dir} exists and is not a folder")
    non_empty = existed and any(dump_dir.iterdir())
    if non_empty:
        if override in ("true", "force"):
            _check_deletable(dump_dir)
            if override == "true" and not args.yes and not _confirm_delete(str(dump_dir)):
                raise StoolError(f"not deleting {dump_dir} (not confirmed); nothing launched")
            shutil.rmtree(dump_dir)
            existed = non_empty = False
        elif not args.dirs_exists_ok:
            raise StoolError(
                f"dump dir {dump_dir} already exists; pass dirs_exists_ok=true to launch into it (it resumes from its "
                f"checkpoints), override=true to delete it first, or resume with `sbatch {dump_dir}/submit.slurm`"
            )

    created: list = []  # paths created here, removed again if the launch fails
    restore: dict = {}  # files we replaced in an existing dump dir: path -> old bytes (or old folder)
    launched = False
    try:
        if not existed:
            dump_dir.mkdir(parents=True)
            created.append(dump_dir)
        logs = dump_dir / "logs"
        if not logs.exists():
            logs.mkdir()
            created.append(logs)
        if args.copy_code:
            code = dump_dir / "code"
            tmp = dump_dir / f".code.tmp.{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            created.append(tmp)
            snapshot_code(tmp, args.script)
            if code.exists():
                old = dump_dir / f".code.old.{os.getpid()}"
                code.rename(old)
                restore[str(code)] = old
            tmp.rename(code)
            created[-1] = code
            code_dir = str(code)
        for name, writer in (
            ("base_config.yaml", lambda p: dump_config(cfg, str(p))),
            ("submit.slurm", lambda p: _write_text(p, render_submit_script(args, str(dump_dir), os.getcwd(), code_dir,
                                                                           driver))),
        ):
            path = dump_dir / name
            if path.exists():
                restore[str(path)] = path.read_bytes()
            else:
                created.append(path)
            writer(path)

        if args.launcher == "bash":
            _drop_backups(restore)
            launched = True  # from here on the run owns the dump dir, even if it fails
            res = subprocess.run(["bash", str(dump_dir / "submit.slurm")], env=os.environ.copy())
            if res.returncode != 0:
                raise StoolError(f"the job exited with status {res.returncode}; see {dump_dir}/logs")
            return str(dump_dir), str(dump_dir)

        res = subprocess.run(
            ["sbatch", "--parsable", str(dump_dir / "submit.slurm")], env=env, capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise StoolError(f"sbatch failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
        job_id = res.stdout.strip().split(";")[0]
        if not job_id:
            raise StoolError(f"sbatch printed no job id: {res.stdout!r}")
        launched = True
        (logs / job_id).mkdir(exist_ok=True)
        _drop_backups(restore)
        return job_id, str(dump_dir)
    except BaseException:
        if not launched:
            _rollback(created, restore)
        raise


def _write_text(path: Path, text: str) -> None:
    atomic_write(str(path), text, mode=0o755)


def _drop_backups(restore: dict) -> None:
    for old in restore.values():
        if isinstance(old, Path) and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _rollback(created: list, restore: dict) -> None:
    for path in reversed(created):
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    for path, old in restore.items():
        if isinstance(old, Path):
            if Path(path).exists():
                shutil.rmtree(path, ignore_errors=True)
            old.rename(path)
        else:
            Path(path).write_bytes(old)


def submit_in_background(script: str, config, job_dir: str, options: dict, what: str, record: dict,
                         on_failure=None):
    """Submit `script` with `config` (an app config object) as its own SLURM job through stool, from a background
    thread, so that the caller (a training job) does not wait for sbatch. The job runs this process's code (its
    snapshot if it runs from one; `options["code_dir"]` overrides) and partition (unless `options["partition"]`),
    with an environment free of the caller's job variables. Writes <job_dir>/job_request.yaml (the config) and,
    once submitted, <job_dir>/launched.json (`record` + job id + command); calls `on_failure()` if it fails.
    Returns the thread (not a daemon: the interpreter waits for the submission before it exits)."""
    import threading

    os.makedirs(job_dir, exist_ok=True)
    request = os.path.join(job_dir, "job_request.yaml")
    dump_config(config, request)
    options = dict(options, script=script, config=request, dirs_exists_ok="true", copy_code="false")
    options["code_dir"] = options.get("code_dir") or current_snapshot() or ""
    options["partition"] = options.get("partition") or os.environ.get("SLURM_JOB_PARTITION", "")
    safe = ["-P"] if sys.version_info >= (3, 11) else []  # the cwd must not shadow the code of this process
    cmd = [sys.executable, *safe, "-m", "lingua.stool"] + [f"{k}={v}" for k, v in options.items() if str(v) != ""]
    env = job_free_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_package_root()), env.get("PYTHONPATH", "")) if p)

    def submit():
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise StoolError(f"stool exited with {res.returncode}: {(res.stderr or res.stdout).strip()[-2000:]}")
            m = re.search(r"submitted job (\S+)", res.stdout)
            job = m.group(1) if m else None
            write_json(os.path.join(job_dir, "launched.json"),
                       {**record, "job_id": job, "launched_at": time.time(), "command": cmd})
            logger.info(f"{what} submitted as job {job} "
                        f"(resubmit with: sbatch {os.path.join(job_dir, 'submit.slurm')})")
        except Exception as e:  # noqa: BLE001 (never reaches the caller)
            if on_failure is not None:
                on_failure()
            logger.error(f"launching the {what} FAILED: {type(e).__name__}: {e}")

    thread = threading.Thread(target=submit, name=f"submit-{os.path.basename(job_dir)}", daemon=False)
    thread.start()
    return thread


USAGE = """usage: python -m lingua.stool script=apps.main.train config=<yaml> partition=<p> [option=value ...]
                              [-- key=value ...]

Options (see StoolArgs in lingua/stool.py):
""" + "\n".join(f"  {f.name}" for f in dataclasses.fields(StoolArgs)) + """

Everything after `--` overrides the app config, e.g. `-- steps=20 dump_dir=/tmp/run model.dim=32`.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, overrides = parse_cli(argv)
        result, dump_dir = _launch(args, overrides)
    except StoolError as e:
        if str(e) == "usage":
            print(USAGE)
            return 0
        print(f"stool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stool: interrupted; nothing launched", file=sys.stderr)
        return 130
    if args.launcher == "sbatch":
        print(f"stool: submitted job {result}")
        print(f"stool: dump dir {dump_dir}; logs in {dump_dir}/logs/{result}/ and {dump_dir}/logs/slurm-{result}.out")
        print(f"stool: resume later with: sbatch {dump_dir}/submit.slurm")
    else:
        print(f"stool: finished; dump dir {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
