"""Shared fixtures: the real sample case and the synthetic phantom (both session-scoped).

Treat the returned volumes as read-only: they are shared by every test in the session;
copy arrays before changing them.
"""

from __future__ import annotations

import pytest

from samliver.io import CTVolume
from samliver.phantom import make_phantom
from samliver.sample import load_sample


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
