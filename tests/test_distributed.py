"""Data-parallel training: the global loss, streamed slices, resume, 2 gloo processes vs 1.

``FakeEncoder`` writes random embeddings through the real cache (fast: no encoder), for the
tests that need many slices on disk; the 1-vs-2-process test runs the real CLI with the tiny
RANDOM model under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from samliver.losses import IGNORE, seg_loss

ROOT = Path(__file__).resolve().parents[1]


class FakeEncoder:
    """Stands in for a SamModel in the embedding cache: random float16 embeddings, no network."""

    name = "fake"
    weights_id = "fake-encoder"
    backend = "torch"
    precision = "fp32"
    image_size = 256
    embed_dim = 256
    embed_hw = (64, 64)
    device = "cpu"

    def preprocessing_params(self) -> dict:
        return {"fake": True}

    def prepare(self, image):
        return torch.zeros(1)

    def encode(self, batch):
        return torch.randn(len(batch), 256, 64, 64) * 0.5


def test_global_seg_loss_is_seg_loss_in_one_process():
    from samliver.distributed import global_seg_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 16, 16, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (3, 16, 16), generator=gen)
    target[0, :4] = IGNORE
    a = global_seg_loss(logits, target, 3.0, 1.0)
    b = seg_loss(logits, target, 3.0, 1.0)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    ga, = torch.autograd.grad(a, logits)
    gb, = torch.autograd.grad(b, logits)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)


def _items(tmp_path, volumes=1, shape=(12, 64, 64)):
    from samliver.dataset_embedding import labelled_cases, prepare_training_items
    from samliver.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "Task", volumes=volumes, shape=shape, n_lesions=1)
    return prepare_training_items(labelled_cases(root), FakeEncoder(), progress=False,
                                  cache_root=tmp_path / "cache")


def test_slice_dataset_reads_items_and_augments_per_item(tmp_path):
    from samliver.distributed import SliceDataset

    items = _items(tmp_path)
    assert items and [i.row for i in items] == list(range(len(items)))
    ds = SliceDataset(items, augment="flip+rot", seed=1)
    x, y, im = ds[2]
    assert x.shape == (256, 64, 64) and x.dtype == torch.float32
    assert y.shape == (256, 256) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1, 2}
    assert im.shape == (1, 256, 256) and 0 <= float(im.min()) and float(im.max()) <= 1
    again = ds[2]
    assert all(torch.equal(a, b) for a, b in zip((x, y, im), again))  # (seed, epoch, item)
    ds.epoch = 1
    changed = [not torch.equal(ds[i][0], SliceDataset(items, "flip+rot", 1)[i][0])
               for i in range(len(items))]
    assert any(changed)  # another epoch draws other flips / rotations


def test_resume_continues_the_same_run(tmp_path):
    from samliver.distributed import SliceDataset, train_head_ddp
    from samliver.training import TrainConfig

    items = _items(tmp_path)
    cfg = {"kind": "linear", "batch_size": 4, "warmup": 2, "seed": 0, "eval_every": 2}
    full = train_head_ddp(SliceDataset(items), config=TrainConfig(steps=4, **cfg),
                          progress=False)
    ckpt = tmp_path / "head.pt"

    def crash(step, loss):
        if step == 3:  # after the checkpoint of step 2, before the final one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head_ddp(SliceDataset(items), config=TrainConfig(steps=4, **cfg), checkpoint=ckpt,
                       progress=False, on_step=crash)
    from samliver.checkpoints import read_checkpoint

    assert read_checkpoint(ckpt)["step"] == 2
    resumed = train_head_ddp(SliceDataset(items), config=TrainConfig(steps=4, **cfg),
                             resume=ckpt, progress=False)
    assert resumed.history["step"] == list(range(4))
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], rtol=1e-5)


def test_two_gloo_processes_match_one(tmp_path, monkeypatch, capsys):
    """Same seed: DDP on 2 processes gives the one-process loss curve and test Dice.

    Tolerance: loss curves within 1e-4 relative, Dice within 1e-3 (the only differences are
    the order of floating-point sums; the linear head has no dropout).
    """
    from test_dataset_embedding import torchrun, torchrun_env

    from samliver import cli
    from samliver.checkpoints import read_checkpoint
    from samliver.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "Task", volumes=3, shape=(12, 64, 64), n_lesions=1)
    home = tmp_path / "home"
    args = ["train-dataset", str(root), "--model", "tiny", "--head", "linear", "--k", "3",
            "--steps", "6", "--batch-size", "4", "--test-fraction", "0.34", "--save-every", "3",
            "--json"]
    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    monkeypatch.setenv("SAMLIVER_BACKEND", "torch")
    with pytest.warns(UserWarning, match="RANDOM"):
        assert cli.main(args + ["-o", str(tmp_path / "one.pt")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    proc = subprocess.run(torchrun(2, *args, "-o", str(tmp_path / "two.pt")), env=torchrun_env(home),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["train_slices"] == two["train_slices"] == 6 and len(two["test"]) == 1
    curve1 = read_checkpoint(tmp_path / "one.pt")["history"]["loss"]
    curve2 = read_checkpoint(tmp_path / "two.pt")["history"]["loss"]
    assert len(curve1) == len(curve2) == 6
    np.testing.assert_allclose(curve2, curve1, rtol=1e-4)
    for key in ("liver_dice", "tumour_dice"):
        assert abs(one[key] - two[key]) <= 1e-3


def _rss() -> int:
    """Resident memory of this process now, in bytes (Linux ``/proc``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_streaming_keeps_memory_bounded(tmp_path):
    """An epoch over ~170 MB of embeddings: memory after step 1 grows by far less than that,
    and not at all through the second half of the epoch.

    Reading the epoch's slices into memory (or leaving them mapped) would grow resident memory
    by about their size; streaming keeps it at one batch (8 slices, 32 MiB as float32),
    whatever the dataset's size. The first step is the baseline: it loads torch's kernels and
    workspaces once.
    """
    from samliver.dataset_embedding import EMBEDDING_BYTES
    from samliver.distributed import SliceDataset, train_head_ddp
    from samliver.training import TrainConfig

    items = _items(tmp_path, volumes=3, shape=(32, 64, 64))
    size = len(items) * EMBEDDING_BYTES
    seen: list[int] = []
    cfg = TrainConfig(kind="linear", steps=len(items) // 8, batch_size=8, augment="flip")
    train_head_ddp(SliceDataset(items), config=cfg, progress=False,
                   on_step=lambda step, loss: seen.append(_rss()))
    assert size > 150e6 and len(seen) >= 8  # big next to one batch
    # Holding the epoch would grow memory by about the dataset's size (and keep growing through the
    # epoch); streaming grows by allocator slack only, which stops growing once warm. The margins
    # leave room for a tuned allocator (samliver.backends.tune_allocator keeps freed memory).
    growth = max(seen) - seen[0]
    late = seen[-1] - seen[len(seen) // 2]
    assert growth < 0.5 * size, (growth, size)
    assert late < 0.25 * size, (late, size)
