"""``samliver segment VOLUME --slice Z --box ...``: segment one slice from a box or points."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..embeddings import embed_volume
from ..io import save_label_nifti
from ..prompt_based_segmentation import Predictor
from ..util import SamliverError, check_output_path
from ..visualization import prompt_figure, save_figure
from . import options


def main(argv: list[str] | None = None) -> int:
    """``samliver segment VOLUME --slice Z (--box x0 y0 x1 y1 | --point x y [--negative x y]) -o mask.nii.gz``."""
    parser = argparse.ArgumentParser(prog="samliver segment", description="Segment one slice from a box or points.")
    options.add_volume(parser, label=False)
    parser.add_argument("--slice", "-z", type=int, required=True, dest="z")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--point", type=float, nargs=2, action="append", metavar=("X", "Y"), default=[])
    parser.add_argument("--negative", type=float, nargs=2, action="append", metavar=("X", "Y"), default=[])
    parser.add_argument("-o", "--output", default="mask.nii.gz",
                        help="label NIfTI (default mask.nii.gz); never an input, an existing file "
                             "only with --overwrite")
    parser.add_argument("--png", default=None, help="overlay PNG (default: beside the mask)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    options.add_model(parser)
    options.add_window(parser)
    parser.add_argument("--multimask", action="store_true", help="keep the best of 3 masks by predicted IoU")
    args = parser.parse_args(argv)
    if args.box is None and not args.point and not args.negative:
        raise SamliverError("Give a prompt: --box x0 y0 x1 y1 or --point x y (and optionally --negative x y).")
    for name, values in [("--box", [args.box] if args.box else []), ("--point", args.point),
                         ("--negative", args.negative)]:
        for v in values:
            if not np.all(np.isfinite(v)):
                raise SamliverError(f"{name} {' '.join(map(str, v))} holds a non-finite number; give pixel "
                                    "coordinates.")

    # Both outputs are checked before any work: never a mask written and its PNG refused.
    inputs = (args.volume, args.checkpoint)
    out_path = check_output_path(args.output, inputs=inputs, overwrite=args.overwrite, what="-o")
    name = out_path.name
    stem = name[:-7] if name.endswith(".nii.gz") else Path(name).stem
    png = check_output_path(Path(args.png) if args.png else out_path.with_name(stem + ".png"),
                            inputs=inputs + (out_path,), overwrite=args.overwrite, what="--png")
    volume = options.load_volume(args)
    if not 0 <= args.z < volume.shape[0]:
        raise SamliverError(f"--slice {args.z} is outside the volume's 0..{volume.shape[0] - 1}.")
    model = options.load_model(args)
    emb = embed_volume(volume, model, slices=[args.z], window=args.window, progress=False)
    predictor = Predictor(model)
    predictor.set_slice(emb, args.z)
    points = args.point + args.negative
    labels = [1] * len(args.point) + [0] * len(args.negative)
    masks, scores, _ = predictor.predict(
        points=np.array(points) if points else None,
        point_labels=np.array(labels) if points else None,
        box=np.array(args.box) if args.box is not None else None,
        multimask_output=args.multimask,
    )
    best = int(np.argmax(scores))
    mask = masks[best]
    label = np.zeros(volume.shape, np.uint8)
    label[args.z] = mask.astype(np.uint8)
    out = save_label_nifti(label, volume, out_path)
    fig = prompt_figure(volume.hu[args.z], mask, box=args.box, points=points or None, labels=labels,
                        window=args.window)
    save_figure(fig, png, dpi=100)
    print(f"slice {args.z}: {int(mask.sum())} pixels, predicted IoU {float(scores[best]):.3f} -> {out}, {png}")
    return 0
