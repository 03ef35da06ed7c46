#!/usr/bin/env python
"""Download and extract the Medical Segmentation Decathlon Task03_Liver (a large archive: tens of GB).

Resumable: an interrupted download leaves `Task03_Liver.tar.part`, which the next run
continues with an HTTP Range request. The archive is checked against its published MD5
(or a SHA-256 you pass) before it is extracted. Running again after success does nothing.

    python data_scripts/download_msd_liver.py DEST_DIR [--url URL] [--sha256 HEX | --md5 HEX]
                                              [--no-extract] [--delete-archive]

Then index it with `samliver.datasets.index_msd(DEST_DIR / "Task03_Liver")`.
The data are CC-BY-SA 4.0 (http://medicaldecathlon.com/).
"""

import argparse
import sys

from samliver.datasets import MSD_LIVER_MD5, MSD_LIVER_URL, download_msd_liver, index_msd
from samliver.util import SamliverError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="folder to download into (Task03_Liver/ is created inside)")
    parser.add_argument("--url", default=MSD_LIVER_URL, help=f"archive URL (default {MSD_LIVER_URL})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sha256", help="expected SHA-256 of the archive")
    group.add_argument("--md5", default=MSD_LIVER_MD5, help="expected MD5 (default: the published one)")
    parser.add_argument("--no-extract", action="store_true", help="only download and check")
    parser.add_argument("--delete-archive", action="store_true", help="remove the .tar after extracting")
    args = parser.parse_args(argv)
    try:
        out = download_msd_liver(args.dest, url=args.url, sha256=args.sha256,
                                 md5=None if args.sha256 else args.md5, extract=not args.no_extract,
                                 keep_archive=not args.delete_archive)
    except SamliverError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_extract:
        print(f"archive: {out}")
    else:
        cases = index_msd(out)
        print(f"{out}: {sum(c.label is not None for c in cases)} labelled cases, "
              f"{sum(c.label is None for c in cases)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
