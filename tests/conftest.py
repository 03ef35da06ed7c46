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


# Seconds per test file (and notebook) in a two-process `make test`, from `--junitxml` (2026-12-03;
# refresh them when the suite changes: they only order the files). Files run longest first
# (`make test` passes --no-loadscope-reorder, so pytest-xdist hands them out in this order): with
# the two browser tests collected late, one process finished them alone for over a minute while
# the other sat idle. Files not listed keep their collection order, after these.
FILE_SECONDS = {
    "tests/test_experiment.py": 83, "tests/test_browser.py": 81, "tests/test_bad_input.py": 80,
    "tests/test_prompt_based_segmentation.py": 70, "tests/test_models.py": 61,
    "tests/test_decoder_backends.py": 46, "tests/test_backends.py": 37, "tests/test_nnunet.py": 34,
    "tests/test_training.py": 33, "tests/test_zero_shot.py": 27,
    "notebooks/05_label_efficiency.ipynb": 27, "tests/test_distributed.py": 26,
    "notebooks/03_how_good_are_prompts.ipynb": 25, "tests/test_dataset_embedding.py": 24,
    "tests/test_results.py": 23, "tests/test_embeddings.py": 22,
    "notebooks/08_label_a_volume.ipynb": 20, "tests/test_annotate.py": 19,
    "notebooks/04_fine_tuning_a_head.ipynb": 18, "tests/test_widgets.py": 13, "tests/test_bench.py": 12,
    "tests/test_evaluation.py": 12, "tests/test_training_data.py": 11, "tests/test_heads.py": 11,
    "notebooks/06_whole_volume_inference.ipynb": 10, "notebooks/02_zero_shot_box_and_click.ipynb": 8,
    "notebooks/01_ct_basics.ipynb": 6,
}


def pytest_collection_modifyitems(config, items) -> None:
    """Longest files first (a stable sort: a file's tests stay together and in order)."""
    def cost(item) -> float:
        return -FILE_SECONDS.get(item.nodeid.split("::", 1)[0], 0)

    items.sort(key=cost)


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
