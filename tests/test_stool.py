"""lingua.stool and lingua.slurm without a cluster: bad input, dump dir handling, submit.slurm, code snapshot,
node-list parsing. Jobs that must really run use launcher=bash (the generated script runs locally)."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from lingua import slurm, stool
from lingua.stool import StoolArgs, StoolError, launch_job

REPO = Path(__file__).resolve().parent.parent

FAKE_APP = '''
import dataclasses, json, os, sys
from lingua.args import parse_args

@dataclasses.dataclass
class ModelArgs:
    dim: int = 8

@dataclasses.dataclass
class FakeArgs:
    dump_dir: str = ""
    steps: int = 1
    data_path: str = "data/x"
    model: ModelArgs = dataclasses.field(default_factory=ModelArgs)

    def validate(self):
        from lingua.args import ConfigError
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")

CONFIG_CLASS = FakeArgs

if __name__ == "__main__":
    cfg = parse_args(FakeArgs)
    import lingua
    with open(os.path.join(cfg.dump_dir, "ran.json"), "w") as f:
        json.dump({"app": __file__, "lingua": lingua.__file__, "cwd": os.getcwd(), "steps": cfg.steps,
                   "dim": cfg.model.dim, "data_exists": os.path.exists(cfg.data_path)}, f)
'''


@pytest.fixture(scope="module")
def fake_app(tmp_path_factory):
    """A tiny app package `stoolfake` with CONFIG_CLASS, importable in this process and in subprocesses."""
    root = tmp_path_factory.mktemp("fakeapp")
    pkg = root / "stoolfake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(FAKE_APP)
    (pkg / "notes.txt").write_text("not code")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("")
    cfg = root / "fake.yaml"
    cfg.write_text("steps: 3\nmodel:\n  dim: 16\n")
    sys.path.insert(0, str(root))
    yield {"root": root, "config": str(cfg), "script": "stoolfake.main"}
    sys.path.remove(str(root))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run each test from its own folder (the job `cd`s there), holding a relative data path."""
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / "data" / "x").write_text("data")
    monkeypatch.chdir(wd)
    return wd


def _args(fake_app, **kw):
    base = dict(script=fake_app["script"], config=fake_app["config"], partition="debug", ngpu=0, ncpu=1)
    base.update(kw)
    return StoolArgs(**base)


def _cli(*argv, env=None, input=None, cwd=None):
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-m", "lingua.stool", *argv], capture_output=True, text=True, env=env,
                          input=input, cwd=cwd, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing created


def test_unknown_option_suggests_closest(fake_app, workdir):
    res = _cli(f"script={fake_app['script']}", f"config={fake_app['config']}", "partiton=debug",
               env={**os.environ, "PYTHONPATH": str(fake_app["root"])})
    assert res.returncode == 2
    assert "unknown stool option 'partiton'" in res.stderr and "did you mean 'partition'" in res.stderr
    assert list(workdir.iterdir()) == [workdir / "data"]


def test_config_override_before_separator_is_explained():
    with pytest.raises(StoolError, match=r"model.dim.*go after `--`"):
        stool.parse_cli(["config=x.yaml", "model.dim=3"])


def test_cli_splits_stool_options_and_config_overrides():
    args, overrides = stool.parse_cli(["nodes=2", "ngpu=0", "ntasks_per_node=2", "time=90", "override=force", "--",
                                       "steps=20", "model.dim=32"])
    assert (args.nodes, args.ngpu, args.ntasks_per_node, args.time, args.override) == (2, 0, 2, "90", "force")
    assert overrides == ["steps=20", "model.dim=32"]
    with pytest.raises(StoolError, match="stool option 'nodes'"):
        stool.parse_cli(["nodes=two"])


@pytest.mark.parametrize("kw, msg", [
    (dict(partition=""), "missing partition"),
    (dict(nodes=0), "nodes=0: need at least 1 node"),
    (dict(ngpu=0, ntasks_per_node=0), "at least 1 task"),
    (dict(ngpu=4, ntasks_per_node=2), "one task per GPU"),
    (dict(launcher="srun"), "launcher='srun'"),
    (dict(override="maybe"), "override='maybe'"),
    (dict(config=""), "missing config"),
    (dict(config="nope.yaml"), "config file 'nope.yaml' does not exist"),
    (dict(script="no_such_pkg.train"), "cannot import script 'no_such_pkg.train'"),
    (dict(script="json"), "defines no CONFIG_CLASS"),
])
def test_bad_stool_args(fake_app, workdir, kw, msg):
    dump = workdir / "dump"
    with pytest.raises(StoolError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        launch_job(_args(fake_app, **kw), [f"dump_dir={dump}"])
    assert not dump.exists()


@pytest.mark.parametrize("overrides, msg", [
    (["model.dimm=3"], "unknown config key 'model.dimm'; did you mean 'model.dim'"),
    (["steps=0"], "steps must be >= 1"),
    (["steps=abc"], "steps"),
    ([], "empty dump_dir"),
])
def test_invalid_app_config_fails_before_anything(fake_app, workdir, overrides, msg):
    dump = workdir / "dump"
    extra = [f"dump_dir={dump}"] if overrides != [] else []
    with pytest.raises(StoolError, match=msg):
        launch_job(_args(fake_app), overrides + extra)
    assert not dump.exists()


def test_sbatch_not_on_path(fake_app, workdir, tmp_path):
    dump = workdir / "dump"
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin), "PYTHONPATH": str(fake_app["root"])}
    res = _cli(f"script={fake_app['script']}", f"config={fake_app['config']}", "partition=debug", "ngpu=0",
               "--", f"dump_dir={dump}", env=env)
    assert res.returncode == 2, res.stderr
    assert "sbatch is not on PATH" in res.stderr
    assert not dump.exists()


def test_sbatch_rejection_rolls_back(fake_app, workdir, tmp_path, monkeypatch):
    """A real `sbatch` that fails (no controller reachable) leaves no dump dir behind."""
    if not stool.shutil.which("sbatch"):
        pytest.skip("sbatch not installed")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=2\n"
                    "NodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    dump = workdir / "dump"
    with pytest.raises(StoolError, match="sbatch failed"):
        launch_job(_args(fake_app), [f"dump_dir={dump}"])
    assert not dump.exists()


# ---------------------------------------------------------------------------------------------------------
# dump dir: refusal, dirs_exists_ok, override with confirmation


def _run_bash(fake_app, dump, **kw):
    return launch_job(_args(fake_app, launcher="bash", **kw), [f"dump_dir={dump}"])


def test_launcher_bash_runs_from_snapshot_in_workdir(fake_app, workdir):
    dump = workdir / "runs" / "a"
    assert launch_job(_args(fake_app, launcher="bash"), ["dump_dir=runs/a", "model.dim=32"]) == str(dump)
    import json
    ran = json.loads((dump / "ran.json").read_text())
    assert ran["app"].startswith(str(dump / "code"))  # the snapshot, not the original package
    assert ran["lingua"].startswith(str(dump / "code"))
    assert ran["cwd"] == str(workdir) and ran["data_exists"]  # relative config paths resolve as for stool
    assert (ran["steps"], ran["dim"]) == (3, 32)
    base = (dump / "base_config.yaml").read_text()
    assert f"dump_dir: {dump}" in base and "dim: 32" in base


def test_existing_dump_dir_refused_unless_dirs_exists_ok(fake_app, workdir):
    dump = workdir / "dump"
    _run_bash(fake_app, dump)
    (dump / "checkpoints").mkdir()
    (dump / "checkpoints" / "keep").write_text("ckpt")
    before = sorted(p.name for p in dump.iterdir())
    with pytest.raises(StoolError, match="already exists.*dirs_exists_ok=true"):
        _run_bash(fake_app, dump)
    assert sorted(p.name for p in dump.iterdir()) == before
    _run_bash(fake_app, dump, dirs_exists_ok=True)
    assert (dump / "checkpoints" / "keep").read_text() == "ckpt"
    assert not [p for p in dump.iterdir() if p.name.startswith(".code")]


def test_empty_existing_dump_dir_is_fine(fake_app, workdir):
    dump = workdir / "dump"
    dump.mkdir()
    _run_bash(fake_app, dump)
    assert (dump / "ran.json").exists()


def test_override_asks_for_confirmation(fake_app, workdir):
    dump = workdir / "dump"
    _run_bash(fake_app, dump)
    (dump / "marker").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(fake_app["root"])}
    common = [f"script={fake_app['script']}", f"config={fake_app['config']}", "ngpu=0", "ncpu=1", "launcher=bash"]
    for answer in ("n\n", ""):  # "no", and no answer at all (EOF): nothing deleted
        res = _cli(*common, "override=true", "--", f"dump_dir={dump}", env=env, input=answer)
        assert res.returncode == 2 and "not confirmed" in res.stderr, res.stderr
        assert (dump / "marker").exists()
    res = _cli(*common, "override=true", "--", f"dump_dir={dump}", env=env, input="y\n")
    assert res.returncode == 0, res.stderr
    assert "delete the existing dump dir" in res.stdout
    assert not (dump / "marker").exists() and (dump / "ran.json").exists()
    (dump / "marker").write_text("old")
    for extra in (["override=force"], ["override=true", "yes=true"]):
        res = _cli(*common, *extra, "--", f"dump_dir={dump}", env=env, input="")
        assert res.returncode == 0, res.stderr
        assert "delete the existing" not in res.stdout and not (dump / "marker").exists()
        (dump / "marker").write_text("old")


def test_override_refuses_to_delete_the_working_dir(fake_app, workdir):
    (workdir / "f").write_text("x")
    with pytest.raises(StoolError, match="refusing to delete"):
        launch_job(_args(fake_app, launcher="bash", override="force"), [f"dump_dir={workdir}"])
    assert (workdir / "f").exists()


# ---------------------------------------------------------------------------------------------------------
# what stool writes


def test_submit_script_cpu_mode(fake_app, workdir, monkeypatch):
    dump = workdir / "dump"
    text = stool.render_submit_script(
        _args(fake_app, ntasks_per_node=2, time="30", account="acc", qos="high", exclude="n[1-2]", signal_seconds=90,
              sbatch_args="--exclusive"),
        str(dump), str(workdir), str(dump / "code"))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1",
                     "#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --account=acc", "#SBATCH --qos=high",
                     "#SBATCH --exclude=n[1-2]", f"#SBATCH --output={dump}/logs/slurm-%j.out",
                     "#SBATCH --open-mode=append", "#SBATCH --signal=USR2@90", "#SBATCH --requeue",
                     "#SBATCH --exclusive", "#SBATCH --job-name=dump", f"PYTHON={sys.executable}",
                     f"export PYTHONPATH={dump}/code${{PYTHONPATH:+:$PYTHONPATH}}", f"cd {workdir} || "):
        assert any(line.startswith(expected) for line in lines), expected
    assert "gres" not in text and "--mem" not in text
    srun = text[text.index("srun "):text.index("rc=$?")]
    assert "--open-mode=append" in srun and '--output="$LOGS/%j/%j.%t.stdout"' in srun
    assert f"-m {fake_app['script']} config={dump}/base_config.yaml" in srun
    assert '"$PYTHON" -u' in srun
    # all #SBATCH lines come before the first command, or sbatch ignores them
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    res = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert res.returncode == 0, res.stderr


def test_submit_script_gpu_mode_and_no_copy(fake_app, workdir):
    text = stool.render_submit_script(StoolArgs(config="c.yaml", partition="learn", nodes=2, ngpu=8, mem="0",
                                                constraint="volta32gb"), "/d", "/w", None)
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:8", "#SBATCH --ntasks-per-node=8",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=0", "#SBATCH --constraint=volta32gb"):
        assert expected in text.splitlines()
    assert "export PYTHONPATH" not in text and " -P " not in text


def test_python_env_activation_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    code = "from lingua.stool import python_env_activation as a; print(a())"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    # The nested venv sees the base interpreter's site-packages, not those of the environment running the tests
    # (a venv or conda env): hand it ours so that lingua's dependencies import the same in every setup.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *site.getsitepackages()])
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"source {venv}/bin/activate"


def test_python_env_activation_conda(monkeypatch):
    monkeypatch.setenv("CONDA_PREFIX", sys.prefix)
    monkeypatch.setenv("CONDA_EXE", "/opt/conda/bin/conda")
    text = stool.python_env_activation()
    assert 'eval "$(/opt/conda/bin/conda shell.bash hook)"' in text and f"conda activate {sys.prefix}" in text


def test_code_snapshot_content(fake_app, workdir):
    dump = workdir / "dump"
    _run_bash(fake_app, dump)
    code = dump / "code"
    files = {str(p.relative_to(code)) for p in code.rglob("*") if p.is_file()}
    assert "lingua/stool.py" in files and "lingua/slurm.py" in files and "lingua/args.py" in files
    assert "stoolfake/main.py" in files and "stoolfake/__init__.py" in files
    if (REPO / "configs" / "debug.yaml").exists():
        assert "configs/debug.yaml" in files
    assert stool.SNAPSHOT_MARKER in files
    assert all(f.endswith((".py", ".yaml", ".yml")) or f == stool.SNAPSHOT_MARKER for f in files), files
    assert not any("__pycache__" in f or f.startswith(("tests/", "data/")) for f in files)
    assert (code / "lingua" / "stool.py").read_bytes() == (REPO / "lingua" / "stool.py").read_bytes()


def test_copy_code_false(fake_app, workdir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(fake_app["root"]) + os.pathsep + str(REPO))
    dump = workdir / "dump"
    _run_bash(fake_app, dump, copy_code=False)
    assert not (dump / "code").exists()
    assert "export PYTHONPATH" not in (dump / "submit.slurm").read_text()
    assert (dump / "ran.json").exists()


def test_nested_launch_reuses_the_running_snapshot(fake_app, workdir):
    """copy_code=false from code running inside a snapshot (an eval launched by a training job) runs that snapshot."""
    dump = workdir / "dump"
    _run_bash(fake_app, dump)
    code = dump / "code"
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import lingua.stool as s; "
             "assert s.__file__.startswith(sys.argv[1]); print(s.current_snapshot())")
    out = subprocess.run([sys.executable, "-c", probe, str(code)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(code)
    assert stool.current_snapshot() is None  # the repo itself is not a snapshot


# ---------------------------------------------------------------------------------------------------------
# lingua.slurm helpers


@pytest.mark.parametrize("nodelist, first, expanded", [
    ("gpu5", "gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", "node01", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("node[7-9]", "node7", ["node7", "node8", "node9"]),
    ("a-b[009-011]", "a-b009", ["a-b009", "a-b010", "a-b011"]),
    ("rack[1-2]-n[3,5]", "rack1-n3", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("host1,host2", "host1", ["host1", "host2"]),
    ("localhost", "localhost", ["localhost"]),
    ("x[10]", "x10", ["x10"]),
])
def test_nodelist_parsing(nodelist, first, expanded):
    assert slurm.first_hostname(nodelist) == first
    assert slurm.expand_hostlist(nodelist) == expanded


def test_nodelist_errors(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol fallback
    for bad in ("", "node[1-", "node[3-1]", "node[a-b]"):
        with pytest.raises(ValueError):
            slurm.first_hostname(bad)


def test_port_from_job_id():
    ports = {slurm.port_from_job_id(str(j)) for j in range(1, 50000, 7)}
    assert all(20000 <= p < 40000 for p in ports)
    assert slurm.port_from_job_id("123") == slurm.port_from_job_id("123") == 20123
    assert 20000 <= slurm.port_from_job_id("4242_7") < 40000


def test_requeue_limits(monkeypatch, caplog):
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    assert not slurm.in_slurm_job()
    assert slurm.requeue_current_job(3) is False
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert slurm.in_slurm_job() and slurm.restart_count() == 3
    with caplog.at_level("WARNING"):
        assert slurm.requeue_current_job(3) is False
    assert "already restarted 3 time(s)" in caplog.text and "limit is 3" in caplog.text
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm.requeue_current_job(3) is False  # no scontrol: logged, not raised


def test_help(capsys):
    assert stool.main(["--help"]) == 0
    assert "partition" in capsys.readouterr().out
