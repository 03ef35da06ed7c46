"""``samliver embed VOLUME``: compute and cache the image embeddings of a volume's slices."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..embeddings import embed_volume
from ..util import SamliverError, check_number, parse_slice_spec
from . import options


def main(argv: list[str] | None = None) -> int:
    """``samliver embed VOLUME [--model M] [--slices 72-127] [--window abdomen]``."""
    parser = argparse.ArgumentParser(prog="samliver embed", description="Compute and cache image embeddings.")
    options.add_volume(parser)
    options.add_model(parser)
    options.add_window(parser)
    parser.add_argument("--slices", default=None, help="e.g. 72-127 or 3,5,9 (default: all)")
    parser.add_argument("--liver-slices", action="store_true", help="only slices whose label contains liver")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per encoder call (default: 1 on CPU, 16 on GPU)")
    args = parser.parse_args(argv)
    # every option is checked before the volume is read or a model loaded
    if args.batch_size is not None:
        check_number("--batch-size", args.batch_size, minimum=1)
    volume = options.load_volume(args)
    zs = parse_slice_spec(args.slices, volume.shape[0])
    if args.liver_slices:
        if volume.label is None:
            raise SamliverError(f"{args.volume} has no label: --liver-slices needs one.")
        liver = [int(z) for z in np.flatnonzero((volume.label > 0).any(axis=(1, 2)))]
        zs = sorted(set(liver) & set(zs)) if zs is not None else liver
        if not zs:
            raise SamliverError(f"No slice of {args.volume} in --slices holds liver: widen --slices.")
    model = options.load_model(args)
    t0 = time.perf_counter()
    emb = embed_volume(volume, model, slices=zs, window=args.window, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    computed = len(emb.computed)
    print(f"{computed} slices embedded, {len(emb.slices) - computed} reused from the cache, with "
          f"{model.name} in {dt:.1f} s -> {emb.path}")
    return 0
