"""``samliver fetch-sample``: download the real LiTS sample case and write it as NIfTI."""

from __future__ import annotations

import argparse
import json

from ..sample import PACKAGE, VERSION, fetch_sample
from . import options


def main(argv: list[str] | None = None) -> int:
    """``samliver fetch-sample [--json] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="samliver fetch-sample",
        description=f"Download the real LiTS sample ({PACKAGE}=={VERSION} via pip, not installed), "
                    "check its SHA-256 and write NIfTI image + label to $SAMLIVER_HOME/sample.",
    )
    options.add_json(parser, "the description")
    parser.add_argument("--force", action="store_true", help="download and convert again")
    args = parser.parse_args(argv)
    info = fetch_sample(force=args.force)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"sample case {info['case_id']}: shape {tuple(info['shape'])} (z, y, x), "
              f"labels {info['labels_present']}, HU [{info['hu_range'][0]:.1f}, {info['hu_range'][1]:.1f}], "
              "spacing unknown (voxels)")
        print(f"image: {info['image']}\nlabel: {info['label']}")
    return 0
