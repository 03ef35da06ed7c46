"""``samliver results``: rebuild docs/results.md from stored run records, computing missing ones first."""

from __future__ import annotations

import argparse
import sys

from ..config import DEFAULT_K, FIXED_PROTOCOLS, PROTOCOLS, RANDOM_PROTOCOLS
from ..experiment import BASELINES, HEAD_METHODS
from ..results import DEFAULT_OUTPUT, DEFAULT_RESULTS_DIR, SECTIONS, command_line, parse_sections, run_section, write_markdown
from ..results import __doc__ as RESULTS_DOC
from ..util import SamliverError, check_number, check_output_path
from . import options


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise SamliverError(f"{what} takes comma-separated integers, e.g. {what} 1,4,8 ({err}).") from err
    if not values:
        raise SamliverError(f"{what} is empty: give at least one value.")
    return values


def _names(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip() and t.strip() != "none"]


def main(argv: list[str] | None = None) -> int:
    """``samliver results [--run zeroshot,heads] [--results-dir results] [--output docs/results.md]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="samliver results", description=RESULTS_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", metavar="SECTION[,SECTION]",
                   help=f"compute the missing records of these sections first: {', '.join(SECTIONS)} "
                        "(default: run nothing, only rebuild the page)")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help=f"folder of the JSON-lines run records (default {DEFAULT_RESULTS_DIR}/)")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"the page to write (default {DEFAULT_OUTPUT})")
    options.add_volume(p, optional=True)
    options.add_model(p)
    p.add_argument("--protocol", default="both", choices=[*PROTOCOLS, "both", "random"],
                   help="sample protocol(s) of the zeroshot and heads sections (default both = "
                        "sparse and slab; random = slab-random and sparse-random)")
    p.add_argument("--k", default=str(DEFAULT_K), help=f"labelled slices, comma list (default {DEFAULT_K})")
    p.add_argument("--seeds", default="0", help="comma list (default 0)")
    p.add_argument("--heads", default="cnn",
                   help=f"heads for the heads section: {','.join(HEAD_METHODS)} (default cnn)")
    p.add_argument("--baselines", default="none",
                   help=f"baselines for the heads and splits sections: {','.join(BASELINES)} or "
                        "none (default none)")
    p.add_argument("--splits", type=int, default=10,
                   help="random protocols: split seeds 0..N-1 (default 10)")
    p.add_argument("--split-protocol", default="random", choices=[*RANDOM_PROTOCOLS, "random"],
                   help="the splits section's split family (default random = both)")
    p.add_argument("--split-k", default=str(DEFAULT_K),
                   help=f"labelled slices in the splits section (default {DEFAULT_K})")
    p.add_argument("--split-heads", default="default",
                   help="heads of the splits section (default: default, the best recipe)")
    p.add_argument("--modes", default="", help="zero-shot prompt modes (default all)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: each method's recipe)")
    p.add_argument("--nnunet-epochs", type=int, default=None, metavar="EPOCHS",
                   help="nnU-Net's budget in epochs (default samliver.nnunet.NNUNET_EPOCHS)")
    p.add_argument("--jitter", type=float, default=0.0, help="zero-shot box jitter in pixels (default 0)")
    p.add_argument("--note", default=None, help="free text stored with the run, e.g. 'machine shared with 3 jobs'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    sections = parse_sections(args.run)
    check_number("--steps", args.steps, minimum=1)
    check_number("--jitter", args.jitter, minimum=0)
    check_number("--splits", args.splits, minimum=1)
    ks, seeds = _ints(args.k, "--k"), _ints(args.seeds, "--seeds")
    split_ks = _ints(args.split_k, "--split-k")
    if min(ks + split_ks) < 1:
        raise SamliverError("--k and --split-k values must be >= 1.")
    groups = {"both": list(FIXED_PROTOCOLS), "random": list(RANDOM_PROTOCOLS)}
    check_output_path(args.output, inputs=(args.volume, args.label), overwrite=True, what="--output")
    if sections:
        volume = options.load_volume(args)
        model = options.load_model(args)
        for section in sections:
            split = section == "splits"
            protocol = args.split_protocol if split else args.protocol
            info = run_section(section, volume, model, results_dir=args.results_dir,
                               protocols=groups.get(protocol, [protocol]), ks=split_ks if split else ks,
                               seeds=seeds, heads=_names(args.split_heads if split else args.heads),
                               splits=args.splits, nnunet_epochs=args.nnunet_epochs,
                               baselines=_names(args.baselines), modes=_names(args.modes) or None,
                               steps=args.steps, jitter=args.jitter, command=command_line(argv),
                               note=args.note, volume_name=args.volume, progress=not args.quiet,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True))
            print(f"{section}: {info['n_new']} new records, {info['n_skipped']} already stored, "
                  f"{info['wall_s']:.0f} s")
    path = write_markdown(args.output, args.results_dir)
    print(f"wrote {path}")
    return 0
