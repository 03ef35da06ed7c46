"""Shared fixtures: the real sample case and the synthetic phantom (both session-scoped).

Treat the returned volumes as read-only: they are shared by every test in the session;
copy arrays before changing them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest

from samliver.io import CTVolume
from samliver.phantom import make_phantom
from samliver.sample import load_sample

# Predictors decode with the exact torch shared decoder in tests: the OpenVINO decoder that "auto"
# picks is built once per weights and $SAMLIVER_HOME (seconds each), and many tests use a private
# home. The OpenVINO decoder has its own tests (tests/test_decoder_backends.py and the
# needs_openvino tests), which ask for it by name.
os.environ.setdefault("SAMLIVER_DECODER", "shared")

# Under pytest-xdist (`make test` runs two test processes), each process and the kernels and
# CLI runs it starts compute on one thread: two processes of two threads each on two cores
# made OpenMP threads wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_volume() -> CTVolume:
    """The real LiTS sample (128^3, label 0/1/2, spacing None), fetched once into $SAMLIVER_HOME."""
    return load_sample()


@pytest.fixture(scope="session")
def phantom() -> CTVolume:
    """Synthetic CT phantom: shape (32, 128, 128), 3 lesions, spacing (2.5, 0.8, 0.8) mm, seed 0."""
    return make_phantom()


@pytest.fixture(scope="session")
def small_phantom() -> CTVolume:
    """A smaller phantom for quick tests: shape (16, 64, 64), 2 lesions, seed 1."""
    return make_phantom((16, 64, 64), n_lesions=2, seed=1)


def _disc_volume(n: int = 8, size: int = 32, spacing: tuple | None = None) -> CTVolume:
    """A liver disc (HU 60) holding a tumour disc (HU 10) on -100 HU, both moving a little per slice."""
    s = size / 32
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((n, size, size), -100.0, np.float32)
    lab = np.zeros((n, size, size), np.uint8)
    for z in range(n):
        liver = (yy - 16 * s) ** 2 + (xx - 14 * s) ** 2 < (9 * s + z % 3) ** 2
        tum = (yy - 15 * s) ** 2 + (xx - 12 * s - z % 2) ** 2 < 9 * s * s
        hu[z][liver] = 60
        hu[z][tum] = 10
        lab[z][liver] = 1
        lab[z][tum] = 2
    return CTVolume(hu=hu, label=lab, spacing=spacing, source="synthetic")


@pytest.fixture
def disc_volume() -> Callable[..., CTVolume]:
    """Factory of tiny synthetic volumes for training tests: ``disc_volume(n=8, size=32, spacing=None)``."""
    return _disc_volume
