"""``samliver experiment``: label-efficiency experiment, heads vs baselines vs K (:mod:`samliver.experiment`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FIXED_PROTOCOLS, HEAD_KINDS, PROTOCOLS, RANDOM_PROTOCOLS
from ..embeddings import embed_volume
from ..experiment import BASELINES, HEAD_METHODS, markdown_table, read_records, run_dataset, run_slices, write_outputs
from ..experiment import __doc__ as EXPERIMENT_DOC
from ..util import SamliverError, check_number, parse_slice_spec
from . import options


def csv_list(text: str, allowed: tuple[str, ...] | None = None, what: str = "") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()] if text else []
    if allowed:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SamliverError(f"Unknown {what} {bad}: choose from {', '.join(allowed)}.")
    return items


def main(argv: list[str] | None = None) -> int:
    """``samliver experiment --k 1,2,4,8,16 --heads ... --baselines ... --seeds 0,1,2``."""
    p = argparse.ArgumentParser(prog="samliver experiment", description=EXPERIMENT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_volume(p, optional=True)
    p.add_argument("--dataset", help="MSD Task03_Liver / LiTS folder: split by volume")
    p.add_argument("--k", default="1,2,4,8,16", help="labelled slices (volumes with --dataset)")
    p.add_argument("--heads", default=",".join(HEAD_KINDS),
                   help=f"head kinds or recipe names: {', '.join(HEAD_METHODS)} (default: every "
                        "head kind; 'default' = the best recipe, config.RECIPES['default'])")
    p.add_argument("--baselines", default="unet,ssl,zeroshot",
                   help=f"{', '.join(BASELINES)} or none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--protocol", default="both", choices=[*PROTOCOLS, "both", "random"],
                   help="both = sparse and slab; random = slab-random and sparse-random")
    p.add_argument("--splits", type=int, default=10,
                   help="random protocols: split seeds 0..N-1 (default 10)")
    p.add_argument("--train-slices", help="user split: labelled slices, e.g. 3,20,41")
    p.add_argument("--test-slices", help="user split: test slices, e.g. 50-90 (default: the rest)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per method)")
    p.add_argument("--nnunet-epochs", type=int, default=None, metavar="EPOCHS",
                   help="nnU-Net's training budget in epochs (default samliver.nnunet.NNUNET_EPOCHS; "
                        "needs pip install 'samliver[baselines]')")
    p.add_argument("--views", type=int, default=0,
                   help="cached augmented views per labelled slice for the heads (default 0)")
    p.add_argument("--self-train", type=int, default=0, metavar="ROUNDS",
                   help="pseudo-label self-training rounds for the heads on the volume's "
                        "unlabelled slices (default 0); adds a '<head>+st' record per run")
    options.add_model(p)
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--report", nargs="+", metavar="JSONL",
                   help="run nothing: rebuild the CSV / Markdown / PNG from finished runs "
                        "(experiment.partial.jsonl files, or --json output), e.g. of an "
                        "interrupted grid or of protocols run in parallel")
    args = p.parse_args(argv)

    check_number("--steps", args.steps, minimum=1)
    check_number("--nnunet-epochs", args.nnunet_epochs, minimum=1)
    check_number("--splits", args.splits, minimum=1)
    check_number("--views", args.views, minimum=0)
    check_number("--self-train", args.self_train, minimum=0)
    if args.report:
        records = read_records(args.report)
        paths = write_outputs(records, args.output_dir)
        print(json.dumps(records) if args.json else markdown_table(records)
              + "wrote " + ", ".join(str(v) for v in paths.values()))
        return 0

    try:
        ks = [int(k) for k in csv_list(args.k)]
        seeds = [int(s) for s in csv_list(args.seeds)]
    except ValueError as err:
        raise SamliverError(f"--k and --seeds take comma-separated integers ({err}).") from err
    if any(k < 1 for k in ks):
        raise SamliverError("--k values must be >= 1.")
    heads = csv_list(args.heads, HEAD_METHODS, "heads")
    baselines = csv_list("" if args.baselines == "none" else args.baselines, BASELINES, "baselines")
    model = options.load_model(args)
    progress = not args.json
    if args.dataset:
        if args.views or args.self_train:
            raise SamliverError("--views and --self-train work with slice splits (sample, VOLUME or "
                                "--train-slices), not yet with --dataset.")
        from ..distributed import close_distributed, init_distributed

        env, device = init_distributed(args.device)  # under torchrun: this rank's GPU
        if device != str(model.device):
            model = model.to(device)
        try:
            records = run_dataset(args.dataset, model, ks=ks, heads=heads, seeds=seeds,
                                  steps=args.steps, progress=progress and env.is_main, env=env,
                                  device=device)
        finally:
            close_distributed()
        if not env.is_main:
            return 0  # rank 0 writes the outputs
    else:
        volume = options.load_volume(args)
        if volume.label is None:
            raise SamliverError(f"{volume.source} has no label: the experiment needs one "
                                "(pass --label).")
        train = parse_slice_spec(args.train_slices)
        test = parse_slice_spec(args.test_slices)
        if test is not None and train is None:
            raise SamliverError("--test-slices needs --train-slices too.")
        needed = None
        if train is not None:
            needed = sorted(set(train) | set(test or range(volume.hu.shape[0])))
        embeddings = embed_volume(volume, model, slices=needed, progress=progress)
        protocols = {"both": list(FIXED_PROTOCOLS), "random": list(RANDOM_PROTOCOLS)}.get(
            args.protocol, [args.protocol])
        if train is not None:
            protocols = ["custom"]
        records = []
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / "experiment.partial.jsonl", "w") as log:
            for protocol in protocols:
                records += run_slices(volume, model, embeddings, protocol=protocol, ks=ks,
                                      heads=heads, baselines=baselines, seeds=seeds,
                                      train_slices=train, test_slices=test, steps=args.steps,
                                      nnunet_epochs=args.nnunet_epochs,
                                      progress=progress, log=log, views=args.views,
                                      self_train=args.self_train,
                                      splits=list(range(args.splits)))
    paths = write_outputs(records, args.output_dir)
    if args.json:
        print(json.dumps(records))
    else:
        print(markdown_table(records))
        print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0
