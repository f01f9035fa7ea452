"""Shared pytest fixtures. Keep this file small: put heavy helpers in their own modules."""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _p in (REPO_ROOT, TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM cluster on localhost (tests/slurm_cluster.py): `.env` (SLURM_CONF),
    `.client_env()`, `.partition`. Reuses a cluster started by `python tests/slurm_cluster.py start` when
    LINGUA_SLURM_DIR points at it. Skips only where the daemons cannot be started; with LINGUA_REQUIRE_SLURM=1
    or CI=true that is a failure instead."""
    import slurm_cluster as sc

    reuse = os.environ.get("LINGUA_SLURM_DIR")
    if reuse:
        cluster = sc.attach(reuse)
        if not cluster.is_running():
            pytest.fail(f"LINGUA_SLURM_DIR={reuse} but no cluster runs there (python tests/slurm_cluster.py start)")
        yield cluster
        return
    cluster = sc.SlurmCluster()
    try:
        cluster.start()
    except sc.ClusterUnavailable as e:
        if os.environ.get("LINGUA_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true":
            pytest.fail(f"CI / LINGUA_REQUIRE_SLURM=1 but the local SLURM cluster cannot start: {e}")
        pytest.skip(f"cannot start a local SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


# A small corpus, a tiny 12-step config and its uninterrupted reference runs, shared by the checkpoint and
# hardening tests (each reference run is a real 2-process torchrun; made once per session).


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory):
    from tests.helpers import make_corpus

    return make_corpus(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def cfg(tmp_path_factory, shared_corpus):
    from tests.helpers import tiny_config

    return tiny_config(str(tmp_path_factory.mktemp("cfg") / "c.yaml"), shared_corpus)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cfg):
    """Uninterrupted 12-step 2-process runs (sync, and with grad accumulation), checkpoint every 4 steps."""
    from tests.helpers import output, run_train

    tmp = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, extra in (("plain", []), ("acc", ["grad_acc_steps=2"])):
        dump = str(tmp / name)
        proc = run_train(cfg, dump, nproc=2, args=extra)
        assert proc.returncode == 0, output(proc)[-4000:]
        runs[name] = dump
    return runs


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> the path of a real small filesystem (tmpfs). The test machines and CI run as root; where
    mounting is impossible the test fails (a disk-full test must not silently pass by skipping)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()

    def mount(size):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if res.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs (run the tests as root): {res.stderr.decode().strip()}")
        return str(mnt)

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)
