"""``samliver bench``: speed and memory benchmark of the encoder backends, decoder and head training."""

from __future__ import annotations

import argparse
import sys

from ..bench import format_table, run_bench, write_json
from ..config import DEFAULT_MODEL
from ..util import SamliverError, fast_mode


def main(argv: list[str] | None = None) -> int:
    """``samliver bench [--quick] [--model litemedsam] [--volume sample] [--slices 4] [--out outputs/bench.json]``."""
    parser = argparse.ArgumentParser(prog="samliver bench", description="Speed benchmark (prints a table, writes JSON).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("--volume", default="sample", help="'sample' (default), 'phantom', or a CT file")
    parser.add_argument("--slices", type=int, default=4, help="slices per timed encoder call (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds, medians reported (default 3)")
    parser.add_argument("--prompts", type=int, default=40, help="box prompts for the decoder latency (default 40)")
    parser.add_argument("--accuracy-slices", type=int, default=12, help="liver slices for the mask Dice vs fp32 (default 12)")
    parser.add_argument("--no-int8", action="store_true", help="skip OpenVINO int8 (its first run calibrates, minutes)")
    parser.add_argument("--no-head", action="store_true", help="skip the head-training timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 slices, 1 round, torch backends, no head training")
    parser.add_argument("--out", default="outputs/bench.json", help="JSON output (default outputs/bench.json)")
    args = parser.parse_args(argv)
    quick = args.quick or fast_mode()
    for name in ("slices", "repeats", "prompts", "accuracy_slices"):
        if getattr(args, name) < 1:
            raise SamliverError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if quick:
        args.prompts = min(args.prompts, 10)
    rows = run_bench(
        model_name=args.model, volume_spec=args.volume, n_slices=args.slices, repeats=args.repeats,
        n_prompts=args.prompts, accuracy_slices=args.accuracy_slices, quick=quick, int8=not args.no_int8,
        head=not args.no_head,
    )
    print(format_table(rows))
    path = write_json(rows, args.out)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0
