"""apps.main.eval: validation numbers checked independently and identical with 1 and 2 processes, inline evals
that leave training bit-for-bit unchanged, a failing eval that does not stop training, resume after a kill,
local lm-eval tasks, bad input, and the async path through a real local SLURM cluster. Tiny models, CPU."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import clean_env

pytestmark = pytest.mark.e2e  # real torchrun / SLURM / benchmark processes

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "tests" / "assets" / "tinyshakespeare.txt"
STEPS, EVERY = 8, 4
MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "max_seqlen": 64}
VAL = {"max_steps": 2, "batch_size": 2, "seq_len": 32}


def _env(extra=None) -> dict:
    return clean_env({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(extra or {})})


def _cmd(module: str, nproc: int, *args) -> list:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
            *args]


def run(module: str, nproc: int, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(module, nproc, *args), cwd=REPO, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def _texts():
    return [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources, each with a chunk file and a *.val.jsonl held-out file (prepare_data's layout)."""
    root = tmp_path_factory.mktemp("corpus")
    paras = _texts()
    for i, name in enumerate(("a", "b")):
        (root / name).mkdir()
        base = i * 500
        for fname, docs in ((f"{name}.chunk.00.jsonl", paras[base : base + 300]),
                            (f"{name}.val.jsonl", paras[base + 300 : base + 340])):
            with open(root / name / fname, "w") as f:
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
    return root


def _train_config(path: Path, corpus: Path, eval_section=None) -> Path:
    cfg = {
        "name": "evaltest", "steps": STEPS,
        "data": {"root_dir": str(corpus), "sources": {"a": 1.0, "b": 1.0}, "batch_size": 2, "seq_len": 64,
                 "prefetch_size": 4, "load_async": False, "tokenizer": {"name": "bytes"}},
        "model": MODEL, "optim": {"lr": 3.0e-3, "warmup": 2},
        "checkpoint": {"dump": {"every": EVERY}, "eval": {"every": EVERY}},
        "logging": {"freq": 1},
    }
    if eval_section is not None:
        cfg["eval"] = eval_section
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(dump: Path) -> dict:
    return {r["global_step"]: r["loss/out"] for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines())}


def _eval_lines(dump: Path) -> list:
    path = dump / "metrics.eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Three 2-process runs, concurrently: inline evals (A), no eval section (B), an eval that fails (C)."""
    tmp = tmp_path_factory.mktemp("runs")
    good = {"validation": VAL, "samples": ["ROMEO:"], "generator": {"max_gen_len": 8}}
    bad = {"validation": {**VAL, "sources": ["a", "no_such_source"]}, "samples": []}
    specs = {"A": good, "B": None, "C": bad}
    procs = {}
    for key, section in specs.items():
        cfg = _train_config(tmp / f"{key}.yaml", corpus, section)
        dump = tmp / key
        procs[key] = (dump, subprocess.Popen(
            _cmd("apps.main.train", 2, f"config={cfg}", f"dump_dir={dump}"), cwd=REPO, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for key, (dump, p) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"run {key} failed:\n{log[-4000:]}"
        out[key] = dump
    return out


# ------------------------------------------------------------------------------------------ inline evals


def test_inline_eval_leaves_training_identical(runs):
    a, b = _losses(runs["A"]), _losses(runs["B"])
    assert sorted(a) == list(range(1, STEPS + 1))
    assert a == b  # bit for bit: the evals at steps 4 and 8 changed nothing
    lines = [r for r in _eval_lines(runs["A"]) if r["eval_dir"].startswith(str(runs["A"] / "evals"))]
    assert [r["global_step"] for r in lines] == [4, 8]
    for r in lines:
        assert {"val/a/loss", "val/b/loss", "val/a/perplexity", "val/a/bits_per_byte"} <= set(r)
        assert math.isclose(r["val/a/perplexity"], math.exp(r["val/a/loss"]), rel_tol=1e-12)
    samples = (runs["A"] / "evals" / "0000000008" / "samples.jsonl").read_text().splitlines()
    assert json.loads(samples[0])["prompt"] == "ROMEO:"
    assert not _eval_lines(runs["B"])


def test_failing_eval_does_not_stop_training(runs):
    c = runs["C"]
    assert _losses(c) == _losses(runs["B"])
    log = (c / "train.log").read_text()
    assert "eval of step 4 FAILED" in log and "no_such_source" in log, log[-3000:]
    assert "training complete at step 8" in log
    assert sorted(os.listdir(c / "checkpoints")) == ["0000000004", "0000000008"]
    assert not _eval_lines(c)


# ---------------------------------------------------------------------------------------- standalone evals


def _eval_config(path: Path, tasks_dir=None, tasks=()) -> Path:
    cfg = {"validation": VAL, "samples": [], "generator": {"max_gen_len": 6}}
    if tasks:
        cfg["harness"] = {"tasks": list(tasks), "include_path": str(tasks_dir), "include_defaults": False,
                          "batch_size": 4}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """Three tiny lm-eval tasks defined by local files (no hub): multiple choice, rolling loglikelihood,
    generate_until."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"q": "ROMEO: I love thee,", "choices": [" Juliet", " xqzv"], "label": 0, "answer": " Juliet"},
        {"q": "To be, or not to", "choices": [" be", " 7777"], "label": 0, "answer": " be"},
        {"q": "My lord,", "choices": [" I", " #"], "label": 0, "answer": " I"},
    ]))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "To be, or not to be, that is the question.", "All the world's a stage, and all the men and women merely "
        "players; they have their exits and their entrances, and one man in his time plays many parts."]))
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "lingua_tiny_mc": {**common, "dataset_kwargs": {"data_files": {"test": str(d / "qa.jsonl")}},
                           "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
                           "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
        "lingua_tiny_rolling": {**common, "dataset_kwargs": {"data_files": {"test": str(d / "text.jsonl")}},
                                "output_type": "loglikelihood_rolling", "doc_to_text": "",
                                "doc_to_target": "{{text}}", "metric_list": [{"metric": "bits_per_byte"}]},
        "lingua_tiny_gen": {**common, "dataset_kwargs": {"data_files": {"test": str(d / "qa.jsonl")}},
                            "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{answer}}",
                            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                            "metric_list": [{"metric": "exact_match"}]},
    }
    for name, cfg in tasks.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **cfg}, sort_keys=False))
    return d, list(tasks)


def _have_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _read_raw_model(ckpt: Path) -> dict:
    """The model's full tensors, read from the shard files as docs/checkpoints.md describes them (each piece's
    bytes at the offset .metadata records), without lingua's or DCP's reader."""
    import pickle

    import numpy as np
    import torch

    md = pickle.loads((ckpt / ".metadata").read_bytes())  # test code reading its own run's checkpoint
    out = {}
    for fqn, tmd in md.state_dict_metadata.items():
        if not fqn.startswith("model."):
            continue
        full = torch.empty(tmd.size, dtype=tmd.properties.dtype)
        for i, chunk in enumerate(tmd.chunks):
            info = next(v for k, v in md.storage_data.items() if k.fqn == fqn and list(k.offset) == list(chunk.offsets))
            assert list(info.transform_descriptors) == ["lingua.raw/1"]
            with open(ckpt / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = np.frombuffer(f.read(info.length), dtype=np.uint8).copy()
            piece = torch.from_numpy(data).view(tmd.properties.dtype).reshape(chunk.sizes)
            full[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] = piece
        out[fqn[len("model."):]] = full
    return out


def _plain_model(ckpt: Path):
    """The checkpoint's model as a plain module, its weights read independently of lingua's loading code."""
    from lingua.transformer import LMTransformer, LMTransformerArgs

    params = json.loads((ckpt / "params.json").read_text())
    model = LMTransformer(LMTransformerArgs(**params["model"]))
    model.init_weights()
    model.load_state_dict(_read_raw_model(ckpt))
    return model.eval()


def _independent_val(ckpt: Path, corpus: Path, source: str, tmp: Path) -> tuple:
    """(mean loss, bits per byte) of the first VAL batches of a source, from a consolidated copy of the
    checkpoint and a plain (non-FSDP) model, without apps.main.eval."""
    model = _plain_model(ckpt)
    tokens, texts = [], []
    n_targets = VAL["max_steps"] * VAL["batch_size"] * VAL["seq_len"]
    for line in (corpus / source / f"{source}.val.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        texts.append(text)
        tokens += [256] + list(text.encode("utf-8")) + [257]  # bytes tokenizer: bos 256, eos 257
        if len(tokens) > n_targets:
            break
    stream = torch.tensor(tokens[: n_targets + 1])
    losses = []
    with torch.no_grad():
        for s in range(0, n_targets, VAL["seq_len"]):
            x = stream[s : s + VAL["seq_len"]][None]
            y = stream[s + 1 : s + VAL["seq_len"] + 1][None]
            losses.append(F.cross_entropy(model(x)[0].float(), y[0], reduction="none"))
    per_token = torch.cat(losses).double()
    n_bytes = sum(1 for t in stream[1:].tolist() if t < 256)
    return per_token.mean().item(), per_token.sum().item() / math.log(2) / n_bytes


def test_eval_exact_independent_and_same_with_1_and_2_processes(runs, corpus, local_tasks, tmp_path):
    ckpt = runs["A"] / "checkpoints" / "0000000008"
    tasks_dir, tasks = local_tasks
    tasks = tasks if _have_lm_eval() else []
    cfg = _eval_config(tmp_path / "eval.yaml", tasks_dir, tasks)
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        res = run("apps.main.eval", nproc, f"config={cfg}", f"ckpt_dir={ckpt}", f"dump_dir={out}")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        results[nproc] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert one["global_step"] == 8
    assert one["metrics"] == two["metrics"]  # exact, whatever the number of processes
    inline = next(r for r in _eval_lines(runs["A"]) if r["global_step"] == 8)
    for key, value in one["metrics"].items():
        if key.startswith("val/"):
            assert inline[key] == value, key  # the inline eval of the live model gives the same numbers
    for source in ("a", "b"):
        v = one["validation"][source]
        loss, bpb = _independent_val(ckpt, corpus, source, tmp_path / source)
        assert v["tokens"] == VAL["max_steps"] * VAL["batch_size"] * VAL["seq_len"]
        assert math.isclose(v["loss"], loss, rel_tol=1e-6), (v["loss"], loss)
        assert math.isclose(v["perplexity"], math.exp(loss), rel_tol=1e-5)
        assert math.isclose(v["bits_per_byte"], bpb, rel_tol=1e-6)
    # a consolidated file (torch.save of the full state dict + params.json) evaluates the same
    cons = tmp_path / "cons" / "0000000008" / "consolidated"
    cons.mkdir(parents=True)
    torch.save(_plain_model(ckpt).state_dict(), cons / "consolidated.pth")
    shutil.copy(ckpt / "params.json", cons / "params.json")
    out = tmp_path / "eval_cons"
    res = run("apps.main.eval", 1, f"config={_eval_config(tmp_path / 'val_only.yaml')}", f"ckpt_dir={cons}",
              f"dump_dir={out}", f"run_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    cons_results = json.loads((out / "results.json").read_text())
    assert cons_results["global_step"] == 8
    assert cons_results["validation"]["a"]["loss"] == one["validation"]["a"]["loss"]
    # one line per eval dir in the run's metrics.eval.jsonl (next to the two inline evals)
    dirs = [r["eval_dir"] for r in _eval_lines(runs["A"])]
    assert dirs.count(str(tmp_path / "eval1")) == 1 and dirs.count(str(tmp_path / "eval2")) == 1
    if not tasks:
        pytest.skip("lm_eval is not installed: the harness part was not exercised (pip install lm-eval)")
    m = one["metrics"]
    assert 0.0 <= m["lingua_tiny_mc/acc"] <= 1.0
    assert m["lingua_tiny_rolling/bits_per_byte"] > 0
    assert 0.0 <= m["lingua_tiny_gen/exact_match"] <= 1.0


def test_eval_resumes_after_kill_without_recomputing(runs, tmp_path):
    ckpt = runs["A"] / "checkpoints" / "0000000008"
    cfg = _eval_config(tmp_path / "eval.yaml")
    out = tmp_path / "ev"
    args = (f"config={cfg}", f"ckpt_dir={ckpt}", f"dump_dir={out}")
    res = run("apps.main.eval", 1, *args, env={"LINGUA_FAULTS": "eval.after_part=kill"})
    assert res.returncode != 0
    part_a = out / "parts" / "val.a.json"
    assert part_a.exists() and not (out / "parts" / "val.b.json").exists()
    assert not (out / "results.json").exists()
    assert str(out) not in [r["eval_dir"] for r in _eval_lines(runs["A"])]
    pins = list((ckpt / "pins").iterdir())
    assert pins, "the checkpoint must stay pinned while its eval is unfinished"
    first = part_a.read_text()
    stamp = part_a.stat().st_mtime_ns
    time.sleep(0.05)
    for _ in range(2):  # resume, then a rerun of a finished eval
        res = run("apps.main.eval", 1, *args)
        assert res.returncode == 0, res.stderr[-3000:]
        assert part_a.read_text() == first and part_a.stat().st_mtime_ns == stamp  # not recomputed
        assert "validation 'a': already recorded, skipped" in res.stdout
        assert [r["eval_dir"] for r in _eval_lines(runs["A"])].count(str(out)) == 1
    results = json.loads((out / "results.json").read_text())
    assert set(results["validation"]) == {"a", "b"}
    assert results["validation"]["a"]["computed_at"] == json.loads(first)["computed_at"]
    assert not any(p.name == pins[0].name for p in (ckpt / "pins").iterdir())  # released when done


# ------------------------------------------------------------------------------------------------ bad input


def _main_error(capsys, *argv) -> str:
    from apps.main import eval as ev

    rc = ev.main(list(argv))
    err = capsys.readouterr().err
    assert rc != 0, err
    return err


def test_bad_input_clear_errors(runs, tmp_path, capsys, local_tasks):
    ckpt = runs["A"] / "checkpoints" / "0000000004"
    broken = tmp_path / "checkpoints" / "0000000004"
    shutil.copytree(ckpt, broken)
    (broken / "COMMIT.json").unlink()
    out = f"dump_dir={tmp_path / 'ev'}"
    err = _main_error(capsys, f"ckpt_dir={broken}", out)
    assert "no commit record" in err and str(broken) in err
    err = _main_error(capsys, f"ckpt_dir={ckpt}", out, "validation.sources=[a,missing_src]")
    assert "validation source 'missing_src'" in err
    err = _main_error(capsys, f"ckpt_dir={tmp_path / 'nowhere'}", out)
    assert "does not exist" in err
    err = _main_error(capsys, f"ckpt_dir={ckpt}")
    assert "dump_dir" in err
    if _have_lm_eval():
        tasks_dir, _ = local_tasks
        err = _main_error(capsys, f"ckpt_dir={ckpt}", out, "harness.tasks=[lingua_no_such_task]",
                          f"harness.include_path={tasks_dir}", "harness.include_defaults=false")
        assert "unknown harness task 'lingua_no_such_task'" in err


# ------------------------------------------------------------------------------------------------ async


def test_async_eval_submits_a_slurm_job(slurm_cluster, corpus, tmp_path):
    """Training (2 processes, not under SLURM) submits its evals as jobs to the local cluster and goes on;
    the job's results land in metrics.eval.jsonl; resubmitting the eval's submit.slurm adds no line."""
    section = {"validation": VAL, "samples": [], "slurm": {"partition": slurm_cluster.partition, "ncpu": 1}}
    cfg = _train_config(tmp_path / "train.yaml", corpus, section)
    dump = tmp_path / "run"
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    res = run("apps.main.train", 2, f"config={cfg}", f"dump_dir={dump}", "steps=4", "async_eval_gpus=0", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    eval_dir = dump / "evals" / "0000000004"
    launched = json.loads((eval_dir / "launched.json").read_text())
    assert (eval_dir / "submit.slurm").exists() and not (eval_dir / "code").exists()  # no code copy
    info = slurm_cluster.wait_job(launched["job_id"], timeout=180)
    assert info.get("JobState") == "COMPLETED", (info, _job_logs(eval_dir))
    lines = _eval_lines(dump)
    assert [r["global_step"] for r in lines] == [4], _job_logs(eval_dir)
    assert math.isclose(lines[0]["val/a/perplexity"], math.exp(lines[0]["val/a/loss"]), rel_tol=1e-12)
    ckpt = dump / "checkpoints" / "0000000004"
    assert not any((ckpt / "pins").iterdir())  # the job released its pin
    res = subprocess.run(["sbatch", "--parsable", str(eval_dir / "submit.slurm")], env=slurm_cluster.client_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = slurm_cluster.wait_job(res.stdout.strip().split(";")[0], timeout=180)
    assert info.get("JobState") == "COMPLETED", (info, _job_logs(eval_dir))
    assert _eval_lines(dump) == lines  # finished parts skipped, no duplicated line


def _job_logs(eval_dir: Path) -> str:
    return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(eval_dir.rglob("*"))
                     if p.is_file() and p.suffix in (".out", ".stdout", ".stderr", ".log"))
