"""``samliver make-phantom-dataset DIR --volumes N``: synthetic phantoms in the MSD layout."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    """Write N phantom volumes as an MSD task folder (imagesTr/, labelsTr/, dataset.json)."""
    from ..util import SamliverError, check_number

    p = argparse.ArgumentParser(
        prog="samliver make-phantom-dataset",
        description="Write synthetic CT phantoms (liver + lesions) as an MSD Task03-like folder, "
                    "to try the dataset commands without the 27 GB download.")
    p.add_argument("dir", help="folder to create (must not exist, or be empty)")
    p.add_argument("--volumes", type=int, default=4, help="number of volumes (default 4)")
    p.add_argument("--shape", default="32,128,128", help="z,y,x of every volume (default 32,128,128)")
    p.add_argument("--lesions", type=int, default=2, help="lesions per volume (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of volume 0 (volume i: seed + i)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    args = p.parse_args(argv)
    check_number("--volumes", args.volumes, minimum=1)
    check_number("--lesions", args.lesions, minimum=0)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError as err:
        raise SamliverError(f"--shape {args.shape!r}: give z,y,x as whole numbers, e.g. 32,128,128.") from err
    if len(shape) != 3:
        raise SamliverError(f"--shape {args.shape!r}: give three numbers z,y,x, e.g. 32,128,128.")

    from ..phantom import write_phantom_dataset

    root = write_phantom_dataset(args.dir, volumes=args.volumes, shape=shape,
                                 n_lesions=args.lesions, seed=args.seed)
    if args.json:
        print(json.dumps({"dataset": str(root), "volumes": args.volumes, "shape": list(shape)}))
    else:
        print(f"wrote {args.volumes} phantom volumes {shape} to {root}")
    return 0
