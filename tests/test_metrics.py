"""metrics.jsonl across restarts and Weights & Biases in offline mode (no network)."""

import glob
import json
import os

import pytest

from lingua.metrics import MetricLogger
from tests.helpers import make_corpus, metrics, output, run_train, tiny_config


def test_metric_logger_truncates_after_resume_step_and_drops_torn_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in range(1, 7):
            f.write(json.dumps({"global_step": step, "loss/out": float(step)}) + "\n")
        f.write('{"global_step": 7, "loss/o')  # the writer was killed mid-line
    logger = MetricLogger(path, resume_step=4)
    logger.log({"global_step": 5, "loss/out": 50.0})
    logger.close()
    records = [json.loads(line) for line in open(path)]
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["loss/out"] == 50.0


@pytest.mark.e2e
def test_wandb_offline_and_resumed_run_keeps_its_id(tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra (installed by setup/create_env.sh)")
    corpus = make_corpus(str(tmp_path / "data"))
    cfg = tiny_config(str(tmp_path / "c.yaml"), corpus, steps=6, **{"checkpoint.dump.every": 2})
    dump = str(tmp_path / "dump")
    extra = ["logging.wandb.mode=offline", "logging.wandb.project=test"]
    first = run_train(cfg, dump, nproc=0, args=extra, env={"LINGUA_FAULTS": "step@3=kill", "WANDB_SILENT": "true"})
    assert first.returncode != 0
    run_id = open(os.path.join(dump, "wandb_run_id")).read().strip()
    second = run_train(cfg, dump, nproc=0, args=extra, env={"WANDB_SILENT": "true"})
    assert second.returncode == 0, output(second)[-3000:]
    assert open(os.path.join(dump, "wandb_run_id")).read().strip() == run_id
    runs = glob.glob(os.path.join(dump, "wandb", "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
    assert [r["global_step"] for r in metrics(dump)] == [1, 2, 3, 4, 5, 6]
