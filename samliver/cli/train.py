"""``samliver train``: train a prompt-free head on the cached embeddings of labelled slices."""

from __future__ import annotations

import argparse
import json
import sys

from ..checkpoints import model_info
from ..config import DEFAULT_K, PROTOCOLS, RECIPES
from ..datasets import protocol_split
from ..embeddings import embed_volume
from ..training import recipe, self_train, train_head
from ..training_data import fine_tensors, slice_tensors, training_tensors
from ..util import SamliverError, check_number, check_output_path, parse_slice_spec
from . import options


def _dataset_argv(argv: list[str]) -> list[str] | None:
    """``--dataset DIR`` turned into ``train-dataset``'s arguments (``DIR`` first), else None."""
    for i, arg in enumerate(argv):
        if arg == "--dataset" and i + 1 < len(argv):
            return [argv[i + 1], *argv[:i], *argv[i + 2:]]
        if arg.startswith("--dataset="):
            return [arg.split("=", 1)[1], *argv[:i], *argv[i + 1:]]
    return None


def main(argv: list[str] | None = None) -> int:
    """``samliver train [VOLUME] [--label L] --head cnn --k 8 --protocol sparse -o head.pt``.

    ``samliver train --dataset DIR ...`` trains on a dataset's volumes instead: the same as
    ``samliver train-dataset DIR ...`` (data-parallel under torchrun).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    dataset_argv = _dataset_argv(argv)
    if dataset_argv is not None:
        from .train_dataset import main as train_dataset

        return train_dataset(dataset_argv)
    p = argparse.ArgumentParser(prog="samliver train", description=main.__doc__,
                                epilog="With --dataset DIR: see `samliver train-dataset --help`.")
    options.add_volume(p, optional=True)
    options.add_model(p)
    p.add_argument("--head", default="default", choices=list(RECIPES),
                   help="training recipe: a head kind or a named recipe of config.RECIPES (default: 'default', "
                        "the best measured recipe, a cnn head)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"number of labelled slices (default {DEFAULT_K})")
    p.add_argument("--protocol", default="sparse", choices=PROTOCOLS)
    p.add_argument("--train-slices", help="explicit labelled slices, e.g. 3,20,41 or 10-20")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--augment", default="flip", choices=["none", "flip", "flip+rot"])
    p.add_argument("--train-parts", default=None, choices=["all", "tokens", "transformer"],
                   help="autosam only: which decoder parts learn (default all)")
    p.add_argument("--views", type=int, default=0,
                   help="cached augmented views per labelled slice (rotate/scale/shift/HU; default 0)")
    p.add_argument("--self-train", type=int, default=0, metavar="ROUNDS",
                   help="pseudo-label self-training rounds on the volume's other slices (default "
                        "0; encodes every slice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="outputs/head.pt",
                   help="head checkpoint (default outputs/head.pt; never one of the inputs)")
    args = p.parse_args(argv)
    # Checked before loading anything: a bad flag should not cost a volume's embeddings.
    if args.train_parts and args.head != "autosam":
        raise SamliverError(f"--train-parts applies to the autosam head, not {args.head!r}.")
    check_number("--k", args.k, minimum=1)
    check_number("--steps", args.steps, minimum=1)
    check_number("--lr", args.lr, positive=True, maximum=10)
    check_number("--views", args.views, minimum=0)
    check_number("--self-train", args.self_train, minimum=0)
    check_number("--seed", args.seed, minimum=0)
    out = check_output_path(args.output, inputs=(args.volume, args.label, args.checkpoint),
                            overwrite=True, what="-o")
    check_output_path(out.with_suffix(".curves.png"), inputs=(args.volume, args.label),
                      overwrite=True, what="curves")

    volume = options.load_volume(args)
    if volume.label is None:
        raise SamliverError(f"{args.volume} has no label: pass --label with the annotation file.")
    if args.train_slices is not None and not args.train_slices.strip():
        raise SamliverError(f"--train-slices {args.train_slices!r} names no slices: write ranges "
                            "low-high, e.g. 10-20.")
    train = parse_slice_spec(args.train_slices)
    if train is None:
        train, _ = protocol_split(volume.label, protocol=args.protocol, k=args.k)
        if len(train) < args.k:
            raise SamliverError(f"K={args.k} is larger than the {len(train)} labelled slices "
                                "available for this protocol: choose a smaller --k.")
    bad = [z for z in train if not 0 <= z < volume.hu.shape[0]]
    if bad:
        raise SamliverError(f"Slices {bad} are outside the volume (0..{volume.hu.shape[0] - 1}).")
    model = options.load_model(args)
    extra = {"head_options": {"train_parts": args.train_parts}} if args.train_parts else {}
    config = recipe(args.head, steps=args.steps, augment=args.augment, seed=args.seed,
                    device=args.device, threads=model.cpu_threads(), **extra)
    # A 2.5D recipe (head_options context=c) reads the neighbours z +- c too: encode them.
    context = int((config.head_options or {}).get("context", 0))
    depth = volume.hu.shape[0]
    needed = sorted({min(max(z + d, 0), depth - 1) for z in train for d in range(-context, context + 1)})
    embs = embed_volume(volume, model, slices=needed)
    emb, labels, images = training_tensors(volume, embs, train, model=model, views=args.views,
                                           seed=args.seed, progress=True, context=context)
    if args.lr is not None:
        config.lr = args.lr
    kwargs = dict(config=config, model=model, model_info=model_info(model, embs), checkpoint=out,
                  curves_path=out.with_suffix(".curves.png"))
    if args.self_train:
        fine_tensors(volume, model, embs, train, config.head_options, self_train=args.self_train)
        rest = [z for z in range(volume.hu.shape[0]) if z not in set(train)]
        u_emb, _, u_img = slice_tensors(volume, embed_volume(volume, model, slices=list(range(depth))), rest,
                                        need_label=False, context=context)
        res = self_train(emb, labels, (u_emb, u_img), images=images, rounds=args.self_train,
                         **kwargs)
    else:
        res = train_head(emb, labels, images=images,
                         fine=fine_tensors(volume, model, embs, train, config.head_options,
                                          views=args.views), **kwargs)
    print(json.dumps({"checkpoint": str(out), "train_slices": train,
                      "best_step": res.history["best_step"], "stopped": res.history["stopped"],
                      "val_on": res.history["val_on"], "val_score": res.history["best_score"],
                      "seconds": round(res.history["seconds"], 1)}))
    return 0
