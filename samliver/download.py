"""Resumable, verified HTTP downloads: the one downloader for checkpoints and datasets.

``fetch_resumable`` continues a ``<file>.part`` with an HTTP Range request (a server that ignores
the range restarts it) and turns network failures into one-line errors that keep the partial
file for the next try. ``download_file`` adds the checksum check and the atomic rename, so the
final path never holds a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from .util import SamliverError


def file_hash(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file (``sha256`` default, or ``md5``)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_resumable(url: str, part: str | os.PathLike, *, progress: bool = True, timeout: float = 60.0,
                    label: str | None = None, chunk: int = 1 << 20) -> Path:
    """Download ``url`` into ``part``, continuing what an earlier try left there.

    Args:
        url: the HTTP(S) address.
        part: the partial file (created, or extended with a Range request).
        progress: show a byte progress bar.
        timeout: network timeout in seconds.
        label: the progress bar's name (default: the file name).
        chunk: bytes per read.

    Returns:
        ``part`` as a Path, holding the whole body (a 416 answer means it already did).

    Raises:
        SamliverError: HTTP or network failure; ``part`` is kept for resuming.
    """
    from tqdm.auto import tqdm

    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "samliver"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # range not satisfiable: the part file is already complete
            return part
        raise SamliverError(f"Download of {url} failed: HTTP {err.code} {err.reason}.") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise SamliverError(f"Download of {url} failed ({err}). Check the network and retry; "
                            f"the partial file {part} is kept for resuming.") from err
    with response:
        resumed = have > 0 and getattr(response, "status", None) == 206  # else the server restarted
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        try:
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                    total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                    desc=label or part.name, disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(chunk), b""):
                    out.write(block)
                    bar.update(len(block))
        except (OSError, TimeoutError) as err:
            raise SamliverError(f"Download of {url} interrupted ({err}); run again to resume from "
                                f"{part}.") from err
    return part


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    chunk: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming a ``dest.part`` file with an HTTP Range request.

    The finished file is checked against ``sha256`` (or ``md5``) before it is renamed onto
    ``dest``; a mismatch deletes the partial file and raises. An existing ``dest`` with the
    right checksum is reused.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = ("sha256", sha256.lower()) if sha256 else (("md5", md5.lower()) if md5 else None)
    if dest.exists():
        if expected is None or file_hash(dest, expected[0]) == expected[1]:
            return dest
        dest.unlink()  # stale or corrupt: download again
    part = dest.with_name(dest.name + ".part")
    fetch_resumable(url, part, progress=progress, timeout=timeout, label=dest.name, chunk=chunk)
    if expected is not None:
        got = file_hash(part, expected[0])
        if got != expected[1]:
            part.unlink()
            raise SamliverError(
                f"Checksum mismatch for {url}: {expected[0]} {got}, expected {expected[1]}. "
                "The partial download was deleted; run again (or check the URL)."
            )
    os.replace(part, dest)
    return dest
