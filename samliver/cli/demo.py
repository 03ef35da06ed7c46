"""``samliver demo``: the main job on the sample case (:mod:`samliver.demo`)."""

from __future__ import annotations

import argparse

from ..demo import __doc__ as DEMO_DOC
from ..demo import run_demo


def main(argv: list[str] | None = None) -> int:
    """``samliver demo [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="samliver demo", description=DEMO_DOC.splitlines()[0])
    parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    args = parser.parse_args(argv)
    ctx = run_demo(args.out)
    print(f"wrote {ctx.out_dir / 'summary.json'}")
    return 0
