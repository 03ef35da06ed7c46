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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.

    For exports made of several files (a model and its key): a crash mid-build never leaves a
    half-written folder where a good one was, and a failed build leaves no temporary folder.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process (two test workers, two notebooks) put its own folder there between
            # the removal and the rename: keep that one. Every reader checks the folder's key
            # file, so one built for another key is rebuilt on its next read, not used.
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op CPU threads to ``n`` inside the block (None: unchanged), then restore them.

    Args:
        n: thread count, or None to leave torch's setting alone.
    """
    import torch

    previous = torch.get_num_threads()
    if n and int(n) != previous:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: str | os.PathLike, *, inputs: tuple = (), overwrite: bool = False,
                      what: str = "output") -> Path:
    """Check, before any work, that ``path`` may be written; return it as a Path.

    Refuses (with a one-line :class:`SamliverError`) a path that is one of ``inputs``, an
    existing file unless ``overwrite``, and a folder that cannot be
    created or written. Creates the parent folder.

    Args:
        path: the file about to be written.
        inputs: paths the command reads (files or folders); never written over.
        overwrite: allow replacing an existing file that is not an input.
        what: the option's name for the message (e.g. ``"-o"``).

    Returns:
        ``path`` as a :class:`Path`.
    """
    out = Path(path).expanduser()
    for src in inputs:
        if src is None or str(src) == "sample":
            continue
        src = Path(src).expanduser()
        if _same_file(out, src) or out.resolve() == src.resolve():
            raise SamliverError(f"{what} {out} is an input of this command; refusing to write over it. "
                                "Choose another output path.")
    if out.is_dir():
        raise SamliverError(f"{what} {out} is a folder; give a file name.")
    if out.exists() and not overwrite:
        raise SamliverError(f"{what} {out} already exists; pass --overwrite to replace it or choose "
                            "another path.")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "a file of that name is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) \
            else err.strerror
        raise SamliverError(f"Cannot create the folder {parent} for {what} {out} ({why}). "
                            "Choose a writable location.") from err
    # Probe with a real file: permission bits say nothing for root or on read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=".samliver-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SamliverError(f"Folder {parent} is not writable ({err.strerror}), so {what} {out} cannot "
                            "be written. Choose a writable location.") from err
    return out


def check_number(name: str, value, *, minimum: float | None = None, positive: bool = False,
                 maximum: float | None = None) -> None:
    """Raise a one-line :class:`SamliverError` if a numeric option is out of range or not finite.

    Args:
        name: the option as the user typed it (e.g. ``"--steps"``).
        value: the parsed value; ``None`` (option not given) passes.
        minimum: smallest allowed value (inclusive).
        positive: require ``value > 0``.
        maximum: largest allowed value (inclusive).
    """
    if value is None:
        return
    v = float(value)
    if not np.isfinite(v):
        raise SamliverError(f"{name} {value} is not a finite number; give a number.")
    if positive and not v > 0:
        raise SamliverError(f"{name} {value} must be greater than 0.")
    if minimum is not None and v < minimum:
        raise SamliverError(f"{name} {value} must be at least {minimum:g}.")
    if maximum is not None and v > maximum:
        raise SamliverError(f"{name} {value} must be at most {maximum:g}.")


def parse_slice_spec(spec: str | None, depth: int | None = None) -> list[int] | None:
    """Read a slice list: ``"72-127"`` (inclusive), ``"3,5,9"`` or a mix, e.g. ``"1,5-8"``.

    Args:
        spec: the text; None, ``""`` or ``"all"`` mean every slice.
        depth: the volume's slice count, to refuse slices outside it (None: not checked).

    Returns:
        The sorted slice indices, or None for every slice.

    Raises:
        SamliverError: unreadable text, a backwards range, no slice named, or a slice outside
            ``0..depth-1``.
    """
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                a, b = int(a), int(b)
            else:
                a = b = int(part)
        except ValueError as err:
            raise SamliverError(f"Cannot read slice list {spec!r}: use e.g. 72-127 or 3,5,9.") from err
        if b < a:
            raise SamliverError(f"Slice range {part!r} runs backwards: write it low-high, e.g. {b}-{a}.")
        out.update(range(a, b + 1))
    if not out:
        raise SamliverError(f"Slice list {spec!r} names no slices: use e.g. 72-127 or 3,5,9.")
    return sorted(out) if depth is None else check_slices(out, depth)


def check_slices(slices, depth: int) -> list[int]:
    """Sorted unique slice indices, all inside ``0..depth-1`` (None: every slice).

    Raises:
        SamliverError: a slice outside the volume.
    """
    if slices is None:
        return list(range(depth))
    out = sorted({int(z) for z in slices})
    bad = [z for z in out if not 0 <= z < depth]
    if bad:
        raise SamliverError(f"Slices {bad[:5]} are outside the volume's 0..{depth - 1}: choose slices "
                            "in that range.")
    return out


def notebook_setup(out_dir: str | os.PathLike = "outputs") -> tuple[bool, Path]:
    """The first cell of every tutorial notebook: fast mode, the output folder, the version.

    Args:
        out_dir: where the notebook writes its figures and files (created).

    Returns:
        ``(FAST, OUT)``: whether ``SAMLIVER_FAST=1`` shortens the run (same code path, fewer
        slices and steps) and the output folder.
    """
    from . import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = fast_mode()
    print(f"samliver {__version__} | fast mode: {fast} | outputs: {out}/")
    return fast, out
