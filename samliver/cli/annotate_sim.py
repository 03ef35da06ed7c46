"""``samliver annotate-sim``: a simulated annotator measures the annotation loop on a volume."""

from __future__ import annotations

import argparse
import json


def _int_list(text: str, what: str) -> list[int]:
    from ..util import SamliverError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SamliverError(f"{what} is a comma-separated list of integers, got {text!r}.") from err
    if not values or min(values) < 0:
        raise SamliverError(f"{what} needs at least one integer >= 0, got {text!r}.")
    return values


def main(argv: list[str] | None = None) -> int:
    """Play a user who boxes the liver and each lesion from the reference on the slice each
    strategy picks, accepts SAM's masks, retrains and predicts; one record per round."""
    from ..annotate import STRATEGIES, UNCERTAINTY, annotation_train_config
    from ..io import SERIES_UID_HELP
    from ..util import SamliverError, check_number, check_output_path

    p = argparse.ArgumentParser(prog="samliver annotate-sim", description=main.__doc__)
    p.add_argument("volume", help="CT volume with a reference label: NIfTI (+ --label), DICOM "
                                  "folder, .mrc or 'sample'")
    p.add_argument("--label", help="reference label file (not needed for 'sample')")
    p.add_argument("--series-uid", help=SERIES_UID_HELP)
    p.add_argument("--model", default="litemedsam", help="model (default litemedsam)")
    p.add_argument("--checkpoint", help="model weights file (SAM / MedSAM)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated: suggest, even, random (default all three)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--start", type=int, default=3,
                   help="slices labelled before the first training, evenly inside the liver "
                        "(default 3; the same for every strategy)")
    p.add_argument("--max-slices", type=int, default=8, help="stop at this many confirmed slices (default 8)")
    p.add_argument("--per-round", type=int, default=1, help="slices labelled per round (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per retrain (default: the loop's recipe)")
    p.add_argument("--head", default=None, choices=("linear", "cnn", "vit"),
                   help="head kind (default: the loop's recipe, cnn)")
    p.add_argument("--uncertainty", default="entropy", choices=UNCERTAINTY,
                   help="how 'suggest' ranks slices (default entropy)")
    p.add_argument("--json", action="store_true", help="print one JSON record per round")
    p.add_argument("--plot", help="write Dice vs slices labelled to this image (PNG/SVG/PDF)")
    args = p.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise SamliverError(f"--strategies {args.strategies!r}: choose from {', '.join(STRATEGIES)}.")
    seeds = _int_list(args.seeds, "--seeds")
    check_number("--start", args.start, minimum=1)
    check_number("--max-slices", args.max_slices, minimum=1)
    check_number("--per-round", args.per_round, minimum=1)
    if args.steps is not None:
        check_number("--steps", args.steps, minimum=1)
    if args.max_slices < args.start:
        raise SamliverError(f"--max-slices {args.max_slices} is below --start {args.start}.")
    plot = None
    if args.plot:
        plot = check_output_path(args.plot, inputs=(args.volume, args.label), overwrite=True,
                                 what="--plot")

    from ..annotate_sim import format_table, simulate
    from ..embeddings import embed_volume
    from ..io import load_volume_arg
    from ..models import get_model

    volume = load_volume_arg(args.volume, args.label, series_uid=args.series_uid)
    if volume.label is None:
        raise SamliverError(f"{args.volume} has no reference label: pass --label (the simulated "
                            "user copies its boxes from it).")
    model = get_model(args.model, checkpoint=args.checkpoint)
    embeddings = embed_volume(volume, model, progress=not args.json)  # once, then cached
    records = []
    for seed in seeds:
        for strategy in strategies:
            config = annotation_train_config(seed=seed) if args.steps is None else \
                annotation_train_config(seed=seed, steps=args.steps)
            if args.head and args.head != config.kind:
                config.kind, config.head_options, config.lr = args.head, {}, None
            simulate(volume, model, strategy=strategy, seed=seed, start=args.start,
                     max_slices=args.max_slices, per_round=args.per_round, embeddings=embeddings,
                     config=config, uncertainty=args.uncertainty,
                     on_round=lambda r: (records.append(r),
                                         print(json.dumps(r), flush=True) if args.json else None))
    if not args.json:
        print(format_table(records))
    if plot is not None:
        from ..visualization import annotation_sim_figure

        annotation_sim_figure(records, plot)
        if not args.json:
            print(f"wrote {plot}")
    return 0
