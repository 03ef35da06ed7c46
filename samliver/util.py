"""Shared helpers: the cache folder, atomic writes, hashing, device choice, errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


class SamliverError(Exception):
    """An error a user can act on: the message names the problem and what to do."""


def fast_mode() -> bool:
    """True when ``SAMLIVER_FAST=1``: notebooks and CI shrink slice counts and training steps."""
    return os.environ.get("SAMLIVER_FAST", "0").strip().lower() not in ("", "0", "false", "no")


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Return ``$SAMLIVER_HOME/<parts>`` (default ``~/.cache/samliver``), created and checked writable."""
    root = Path(os.environ.get("SAMLIVER_HOME", Path.home() / ".cache" / "samliver")).expanduser()
    path = root.joinpath(*parts)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SamliverError(
                f"Cache folder {path} cannot be created ({err.strerror}). "
                "Set SAMLIVER_HOME to a writable folder."
            ) from err
        if not os.access(path, os.W_OK):
            raise SamliverError(
                f"Cache folder {path} is not writable. Set SAMLIVER_HOME to a writable folder."
            )
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash mid-write never leaves a half-written file where a good one was. ``suffix`` keeps
    the extension for writers that infer the format from the name (default: ``path``'s suffixes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (content hash for cache keys)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(str(array.dtype).encode())
    digest.update(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def get_device(device: str | None = None) -> str:
    """Pick a torch device: ``device`` if given, else CUDA, then MPS, then CPU."""
    import torch

    if device:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
