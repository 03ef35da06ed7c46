"""``samliver embed-dataset DIR``: encode every (volume, slice) of a dataset into the cache.

One process, or N under ``torchrun --nproc-per-node N -m samliver embed-dataset DIR``: each
rank encodes its own disjoint share. Run it again after a crash or a kill to resume.
"""

from __future__ import annotations

import argparse
import json

from . import options


def main(argv: list[str] | None = None) -> int:
    """Parse the options, encode this rank's share, print the summary on rank 0."""
    from ..datasets import SLICE_MODES
    from ..util import check_number

    p = argparse.ArgumentParser(
        prog="samliver embed-dataset",
        description="Encode every (volume, slice) item of a dataset folder once into the shared "
                    "embedding cache; under torchrun each rank encodes a disjoint share. Cached "
                    "slices are skipped, so rerunning resumes.")
    options.add_dataset(p)
    options.add_model(p)
    p.add_argument("--slices", default="all", choices=SLICE_MODES,
                   help="all slices (default), or the liver's z-range from the label +- --margin")
    p.add_argument("--margin", type=int, default=5,
                   help="slices each side of the liver range with --slices liver (default 5)")
    options.add_window(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per encoder call (default: 1 on CPU, 16 on GPU)")
    options.add_json(p, "the summary (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    window = args.window
    check_number("--margin", args.margin, minimum=0)
    if args.batch_size is not None:
        check_number("--batch-size", args.batch_size, minimum=1)

    from ..dataset_embedding import embed_dataset
    from ..distributed import close_distributed, cpu_threads_per_rank, init_distributed
    from ..models import get_model

    env, device = init_distributed(args.device)
    try:
        threads = cpu_threads_per_rank(env) if device == "cpu" else None
        model = get_model(args.model, checkpoint=args.checkpoint, device=device,
                          num_threads=threads)
        summary = embed_dataset(args.dataset, model, slices=args.slices, margin=args.margin,
                                window=window, batch_size=args.batch_size,
                                progress=not (args.json or args.no_progress), env=env)
    finally:
        close_distributed()
    if env.is_main:
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{summary['items']} slices of {summary['volumes']} volumes: "
                  f"{summary['computed']} encoded, {summary['cached']} already cached, "
                  f"{summary['seconds']:.1f} s on {summary['world_size']} process(es)")
            for r in summary["ranks"]:
                rate = f"{r['slices_per_s']:.2f} slices/s" if r["slices_per_s"] else "-"
                print(f"  rank {r['rank']}: {r['items']} items, {r['computed']} encoded, "
                      f"{r['cached']} cached, {r['seconds']:.1f} s, {rate}")
    return 0
