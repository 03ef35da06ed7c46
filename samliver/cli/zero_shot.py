"""``samliver zero-shot``: evaluate prompted SAM with prompts simulated from the reference label."""

from __future__ import annotations

import argparse
import json

from ..config import DEFAULT_K
from ..datasets import protocol_split
from ..util import SamliverError, atomic_write_text, check_number, check_output_path, parse_slice_spec
from ..zero_shot import MODES, evaluate_zero_shot, format_table
from . import options


def main(argv: list[str] | None = None) -> int:
    """``samliver zero-shot [VOLUME] [--protocol slab|sparse] [--json]``: prompted SAM on the sample."""
    parser = argparse.ArgumentParser(prog="samliver zero-shot", description=__doc__.split("\n\n")[0])
    options.add_volume(parser, optional=True)
    parser.add_argument("--protocol", choices=("slab", "sparse"), default="slab",
                        help="test slices of the sample's protocol (default slab: z 72-127)")
    parser.add_argument("--k", type=int, default=DEFAULT_K,
                        help=f"labelled slices of the sparse protocol (default {DEFAULT_K})")
    parser.add_argument("--slices", default=None, help="evaluate these slices instead, e.g. '72-127' or '3,20,41'")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list (default all: {','.join(MODES)})")
    options.add_model(parser)
    options.add_window(parser)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--jitter", type=float, default=0.0, help="box jitter in pixels (default 0: tight)")
    parser.add_argument("--seed", type=int, default=0)
    options.add_json(parser, "a JSON list, one object per mode")
    parser.add_argument("-o", "--output", default=None, help="also write the JSON rows to this file")
    args = parser.parse_args(argv)

    check_number("--k", args.k, minimum=1)
    check_number("--clicks", args.clicks, minimum=1)
    check_number("--jitter", args.jitter, minimum=0)
    if args.output:
        check_output_path(args.output, inputs=(args.volume, args.label), overwrite=True, what="-o")
    volume = options.load_volume(args)
    if volume.label is None:
        raise SamliverError(f"{args.volume} has no label: pass --label LABEL so prompts can be simulated.")
    if args.slices:
        slices = parse_slice_spec(args.slices, volume.shape[0]) or list(range(volume.shape[0]))
    else:
        slices = protocol_split(volume.label, args.protocol, k=args.k)[1]
    model = options.load_model(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = evaluate_zero_shot(volume, model, slices, modes=modes, progress=not args.json, window=args.window,
                              clicks=args.clicks, jitter=args.jitter, seed=args.seed)
    for r in rows:
        r["protocol"] = None if args.slices else args.protocol
    text = json.dumps(rows, indent=1)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        print(f"{model.name} on {len(slices)} slices ({slices[0]}..{slices[-1]}), prompts from the label:")
        print(format_table(rows))
    return 0
