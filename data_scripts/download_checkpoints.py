#!/usr/bin/env python
"""Download and verify the official SAM / MedSAM checkpoints (the same as ``samliver download-checkpoint``).

    python data_scripts/download_checkpoints.py sam_vit_b            # one model
    python data_scripts/download_checkpoints.py sam_vit_b medsam_vit_b --dir /data/ckpt
    python data_scripts/download_checkpoints.py --all                # sam_vit_b/l/h + medsam_vit_b
    python data_scripts/download_checkpoints.py --list               # names, files, sizes
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from samliver.cli.download_checkpoint import main as download_main

    return download_main(argv, prog="download_checkpoints.py")


if __name__ == "__main__":
    sys.exit(main())
