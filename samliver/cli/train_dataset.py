"""``samliver train-dataset DIR --k K``: train a head on a dataset's training volumes with DDP.

One process, or N under ``torchrun --nproc-per-node N -m samliver train-dataset DIR``
(DistributedDataParallel; NCCL on GPUs, gloo on CPUs). The dataset is split by volume; the
labelled slices of the training volumes are streamed from the embedding cache; rank 0
writes the head checkpoint; the held-out volumes are evaluated, each rank its share.
"""

from __future__ import annotations

import argparse
import json

from . import options


def main(argv: list[str] | None = None) -> int:
    """Parse the options, train (every rank), print the summary on rank 0."""
    from ..config import HEAD_KINDS
    from ..util import SamliverError, check_number, check_output_path

    p = argparse.ArgumentParser(
        prog="samliver train-dataset",
        description="Train a prompt-free head on the labelled slices of a dataset's training "
                    "volumes (split by volume), data-parallel under torchrun, and evaluate it on "
                    "the held-out volumes.")
    options.add_dataset(p)
    p.add_argument("--k", type=int, default=None,
                   help="labelled slices per training volume, spread over its liver (default: "
                        "every slice with liver)")
    p.add_argument("--volumes", type=int, default=None,
                   help="use only the first V training volumes of the split (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the volumes held out for testing (default 0.2)")
    p.add_argument("--n-test", type=int, default=None, help="evaluate at most this many test volumes")
    p.add_argument("--head", default="cnn", choices=list(HEAD_KINDS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8,
                   help="global batch (all ranks together; a multiple of the process count)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--augment", default="flip", choices=["none", "flip", "flip+rot"])
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (rank 0)")
    p.add_argument("--seed", type=int, default=0, help="split, slice choice, init and data order")
    options.add_model(p)
    options.add_window(p)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes per rank")
    p.add_argument("--no-eval", action="store_true", help="train only; do not score the test volumes")
    p.add_argument("--resume", help="continue from this head checkpoint (same options)")
    p.add_argument("-o", "--output", default="outputs/head_dataset.pt",
                   help="head checkpoint (default outputs/head_dataset.pt)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (rank 0)")
    args = p.parse_args(argv)
    for name in ("k", "volumes", "n_test"):
        check_number("--" + name.replace("_", "-"), getattr(args, name), minimum=1)
    check_number("--steps", args.steps, minimum=1)
    check_number("--batch-size", args.batch_size, minimum=1)
    check_number("--save-every", args.save_every, minimum=1)
    check_number("--workers", args.workers, minimum=0)
    check_number("--seed", args.seed, minimum=0)
    check_number("--lr", args.lr, positive=True, maximum=10)
    if not 0 < args.test_fraction < 1:
        raise SamliverError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}.")
    window = args.window
    out = check_output_path(args.output, inputs=(args.checkpoint,), overwrite=True, what="-o")

    from ..dataset_embedding import labelled_cases, split_cases, train_on_dataset
    from ..distributed import close_distributed, cpu_threads_per_rank, init_distributed
    from ..models import get_model
    from ..training import TrainConfig
    from ..util import torch_threads

    cases = labelled_cases(args.dataset)
    train, test = split_cases(cases, test_fraction=args.test_fraction, seed=args.seed,
                              volumes=args.volumes, n_test=args.n_test)
    config = TrainConfig(kind=args.head, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         augment=args.augment, seed=args.seed, eval_every=args.save_every,
                         val_fraction=0.0)
    env, device = init_distributed(args.device)
    try:
        threads = cpu_threads_per_rank(env) if device == "cpu" else None
        model = get_model(args.model, checkpoint=args.checkpoint, device=device, num_threads=threads)
        with torch_threads(threads):
            summary, _ = train_on_dataset(train, test, model, config=config, k=args.k,
                                          window=window, checkpoint=out, resume=args.resume,
                                          device=device, workers=args.workers,
                                          evaluate=not args.no_eval,
                                          progress=not args.json, env=env)
    finally:
        close_distributed()
    if env.is_main:
        if args.json:
            print(json.dumps(summary))
        else:
            scores = (f"; test liver Dice {summary['liver_dice']:.3f}, tumour "
                      f"{summary['tumour_dice']:.3f} over {len(summary['test'])} volumes"
                      if "test" in summary else "")
            print(f"trained {summary['head']} on {summary['train_slices']} slices of "
                  f"{len(summary['train_volumes'])} volumes, {summary['steps']} steps on "
                  f"{summary['world_size']} process(es) in {summary['train_seconds']:.1f} s "
                  f"(loss {summary['loss']}){scores} -> {out}")
    return 0
