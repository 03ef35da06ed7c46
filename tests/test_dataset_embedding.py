"""Dataset-scale encoding: shards, resume after a killed rank, the summary (tiny RANDOM model).

The distributed runs start two gloo processes with ``torchrun`` (``torch.distributed.run``),
exactly as a user would on a multi-GPU node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from samliver.datasets import shard_bounds, slices_to_encode
from samliver.util import SamliverError

ROOT = Path(__file__).resolve().parents[1]


def test_shard_bounds_disjoint_and_complete():
    for n in (0, 1, 7, 60):
        for world in (1, 2, 3, 8):
            covered = []
            for rank in range(world):
                a, b = shard_bounds(n, rank, world)
                covered += list(range(a, b))
                assert (b - a) in (n // world, n // world + 1)
            assert covered == list(range(n))  # disjoint, in order, complete
    with pytest.raises(SamliverError):
        shard_bounds(4, 2, 2)


def test_slices_to_encode_liver_margin():
    label = np.zeros((20, 4, 4), np.uint8)
    label[6:9, 1, 1] = 1
    assert slices_to_encode(label, 20, "all") == list(range(20))
    assert slices_to_encode(label, 20, "liver") == [6, 7, 8]
    assert slices_to_encode(label, 20, "liver", margin=2) == list(range(4, 11))
    assert slices_to_encode(label, 10, "liver", margin=5) == list(range(1, 10))  # clipped
    assert slices_to_encode(np.zeros_like(label), 20, "liver") == []
    with pytest.raises(SamliverError):
        slices_to_encode(None, 20, "liver")
    with pytest.raises(SamliverError):
        slices_to_encode(label, 20, "bones")


def torchrun_env(home: Path) -> dict:
    """The environment of a torchrun child: this checkout, its own cache, one thread, no rank variables."""
    env = dict(os.environ, SAMLIVER_HOME=str(home), SAMLIVER_BACKEND="torch",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc-per-node N -m samliver ARGS`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "samliver",
            *args]


def _valid_slices(home: Path) -> int:
    """Slices whose embedding and checksum are both on disk (what a rerun will reuse)."""
    return sum(1 for p in (home / "embeddings").rglob("z*.crc32") if p.with_suffix(".npy").exists())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from samliver.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("ds") / "Task", volumes=3,
                                 shape=(12, 64, 64), n_lesions=1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One embedding cache shared by this module's runs (as ranks and reruns share it)."""
    return tmp_path_factory.mktemp("home")


def test_killed_rank_resumes_and_shards_are_disjoint(dataset, home, tmp_path):
    """Two ranks; rank 1 is killed (SIGKILL) mid-run; a rerun finishes only what is missing."""
    psutil = pytest.importorskip("psutil")  # to find rank 1 among torchrun's children

    args = ["embed-dataset", str(dataset), "--model", "tiny", "--slices", "liver", "--margin", "1",
            "--json"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(torchrun(2, *args), env=torchrun_env(home), stdout=log, stderr=log,
                            start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 180
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if home.exists() and _valid_slices(home) >= 2:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            child.send_signal(signal.SIGKILL)
                            killed = child.pid
                    except psutil.Error:
                        pass
            time.sleep(0.02)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # never leave workers behind
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
        log.close()
    assert killed is not None, "the run ended before a rank could be killed"
    assert proc.returncode != 0  # torchrun reports the killed rank
    before = _valid_slices(home)

    done = subprocess.run(torchrun(2, *args), env=torchrun_env(home), capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    n = summary["items"]
    assert 0 < before < n  # the killed run left part of the work
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["items"] for r in ranks) == n  # the shares cover every item exactly once
    assert summary["cached"] == before and summary["computed"] == n - before  # nothing twice
    assert _valid_slices(home) == n
    for key in ("items", "computed", "cached", "seconds"):
        assert key in summary and all(key in r for r in ranks)


def test_one_process_run_reuses_the_cache(dataset, home, monkeypatch, capsys):
    """Without torchrun: one process takes every item and encodes only what is not cached."""
    from samliver import cli

    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    monkeypatch.setenv("SAMLIVER_BACKEND", "torch")
    before = _valid_slices(home) if (home / "embeddings").exists() else 0
    args = ["embed-dataset", str(dataset), "--model", "tiny", "--slices", "liver", "--margin",
            "1", "--json"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["world_size"] == 1 and out["ranks"][0]["items"] == out["items"] > 0
    assert out["cached"] == before and out["computed"] == out["items"] - before
    assert _valid_slices(home) == out["items"]


def test_embed_dataset_bad_options(dataset, capsys):
    from samliver import cli

    assert cli.main(["embed-dataset", str(dataset), "--margin", "-1"]) == 2
    assert cli.main(["embed-dataset", str(dataset.parent / "missing")]) == 2
    assert cli.main(["train-dataset", str(dataset), "--test-fraction", "1.5"]) == 2
    assert cli.main(["train-dataset", str(dataset), "--volumes", "5", "--model", "tiny"]) == 2
    assert "error" in capsys.readouterr().err
