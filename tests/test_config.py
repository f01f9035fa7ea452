"""Config parsing: defaults <- YAML <- dotlist, and the errors a user sees."""

import subprocess
import sys

import pytest
import yaml

from apps.main.train import TrainArgs, load_train_config
from lingua.args import ConfigError, dump_config, load_config, parse_args
from tests.helpers import REPO, clean_env, make_corpus, tiny_config


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(str(tmp_path / "data"))


def test_defaults_yaml_and_cli_layering(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    args = parse_args(TrainArgs, [f"config={cfg}", "dump_dir=/tmp/x", "model.dim=64", "steps=10", "optim.lr=0.5"])
    assert args.model.dim == 64 and args.steps == 10 and args.optim.lr == 0.5  # CLI wins
    assert args.model.n_layers == 2 and args.data.seq_len == 32  # from the YAML
    assert args.optim.beta2 == 0.95  # default
    assert args.checkpoint.dump.every == 4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.dimm=3", "unknown config key 'model.dimm'; did you mean 'model.dim'?"),
        ("chekpoint.dump.every=3", "did you mean 'checkpoint'?"),
        ("checkpoint.dump.evry=3", "did you mean 'checkpoint.dump.every'?"),
        ("stesp=3", "did you mean 'steps'?"),
        ("steps=abc", "config key 'steps'"),
        ("model.dim=1.5x", "config key 'model.dim'"),
        ("distributed.fsdp_type=zero3", "distributed.fsdp_type"),
        ("optim.scheduler=exp", "optim.scheduler"),
        ("checkpoint.writer_nice=20", "checkpoint.writer_nice must be in 0..19"),
    ],
)
def test_bad_keys_and_types_name_the_key(tmp_path, corpus, override, expected):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    with pytest.raises(ConfigError) as e:
        parse_args(TrainArgs, [f"config={cfg}", "dump_dir=/tmp/x", override])
    assert expected in str(e.value)


def test_typo_in_yaml_file(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    data = yaml.safe_load(open(cfg))
    data["optim"]["warmpu"] = 3
    yaml.safe_dump(data, open(cfg, "w"))
    with pytest.raises(ConfigError, match="'optim.warmpu'; did you mean 'optim.warmup'"):
        parse_args(TrainArgs, [f"config={cfg}", "dump_dir=/tmp/x"])


def test_missing_required_value(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    with pytest.raises(ConfigError, match="missing required config value 'dump_dir'"):
        parse_args(TrainArgs, [f"config={cfg}"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(TrainArgs, ["config=/nonexistent.yaml"])


def test_resolved_config_round_trips(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    args = parse_args(TrainArgs, [f"config={cfg}", "dump_dir=/tmp/x", "model.dim=48"])
    dump_config(args, str(tmp_path / "resolved.yaml"))
    again = load_config(TrainArgs, str(tmp_path / "resolved.yaml"))
    assert again == args


def test_mesh_not_dividing_world_is_a_config_error(tmp_path, corpus, monkeypatch):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3"):
        load_train_config([f"config={cfg}", "dump_dir=/tmp/x", "distributed.dp_replicate=2"])


def test_every_config_field_is_documented():
    """Every dataclass field in the config tree carries a comment on its line."""
    import dataclasses
    import inspect
    import typing

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        src = "\n".join(inspect.getsource(c) for c in cls.__mro__ if dataclasses.is_dataclass(c))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            line = next((ln for ln in src.splitlines() if ln.strip().startswith(f"{f.name}:")), "")
            assert "#" in line, f"{cls.__name__}.{f.name} has no comment"
            tp = hints[f.name]
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t):
                    walk(t)

    walk(TrainArgs)


def test_cli_config_error_exits_before_any_process_group(tmp_path, corpus):
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus)
    dump = tmp_path / "dump"
    proc = subprocess.run(
        [sys.executable, "-m", "apps.main.train", f"config={cfg}", f"dump_dir={dump}", "model.n_layer=3"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: unknown config key 'model.n_layer'; did you mean 'model.n_layers'?" in proc.stderr
    assert not dump.exists()  # nothing written
