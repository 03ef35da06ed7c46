"""``samliver info VOLUME``: summarise a CT volume (shape, spacing, HU range, labels)."""

from __future__ import annotations

import argparse
import json

from ..io import format_summary, summarise_volume
from . import options


def main(argv: list[str] | None = None) -> int:
    """``samliver info VOLUME [--label LABEL] [--series-uid UID] [--json]``."""
    parser = argparse.ArgumentParser(prog="samliver info", description="Summarise a CT volume.")
    options.add_volume(parser)
    options.add_json(parser, "the summary")
    args = parser.parse_args(argv)
    vol = options.load_volume(args)
    summary = summarise_volume(vol)
    if vol.meta.get("format") == "dicom":
        summary["series_uid"] = vol.meta["series_uid"]
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
