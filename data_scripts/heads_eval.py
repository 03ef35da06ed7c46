"""Evaluate head options (2.5D context, focal Tversky, flip TTA, seed ensembles, lesion-size
filter) on the sample case, K = 8, both protocols (docs/heads.md).

Two kinds of run, one JSON line each (appended to ``--out``; lines already there are skipped,
so an interrupted run resumes):

- ``val``: train on 6 of the 8 labelled slices (slots 2 and 5, evenly spaced, held out), seed 0,
  score on the 2 held-out labelled slices. This is what options are chosen on.
- ``test``: train on all 8 labelled slices, score on the protocol's test slices (reported once).

Inference-only variants (flip TTA, the 3-seed probability average, the lesion-size filter) are
scored from the same heads, with their inference seconds.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python data_scripts/heads_eval.py --out results/heads_options.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from samliver.checkpoints import model_info
from samliver.datasets import protocol_split
from samliver.embeddings import embed_volume
from samliver.evaluation import label_dice, lesion_scores
from samliver.inference import predict_probabilities
from samliver.models import get_model
from samliver.postprocess import postprocess
from samliver.sample import load_sample
from samliver.training import recipe, train_head
from samliver.training_data import training_tensors

OPTIONS = {
    "base": {},
    "ctx1": {"head_options": {"refine_size": 128, "context": 1}},
    "ctx2": {"head_options": {"refine_size": 128, "context": 2}},
    "tversky": {"tversky_weight": 1.0},
    "ctx2+tversky": {"head_options": {"refine_size": 128, "context": 2}, "tversky_weight": 1.0},
}
VAL_SLOTS = (2, 5)


def _score(volume, probs, zs, post: bool = True, min_lesion: int | None = None) -> dict:
    pred = probs.argmax(1).astype(np.uint8)
    if post:
        pred = postprocess(pred) if min_lesion is None else postprocess(pred, min_lesion_size=min_lesion)
    out = {k: round(float(v), 4) for k, v in label_dice(pred, volume.label[zs]).items()}
    if post:
        les = lesion_scores(pred, volume.label[zs])
        out["lesion_f1"] = None if les.get("lesion_f1") is None else round(float(les["lesion_f1"]), 4)
    return out


def read_groups(paths: list[str]) -> dict:
    """The JSON-lines records of ``paths`` grouped by (mode, protocol, option, variant)."""
    recs = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["mode"], r["protocol"], r["option"], r["variant"]), []).append(r)
    return groups


def fmt(vals: list, nd: int = 3) -> str:
    """Mean ± sample sd of the finite values (one value as is, none as "-")."""
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f}"
    return f"{np.mean(vals):.{nd}f} ± {np.std(vals, ddof=1):.{nd}f}"


def summary(paths: list[str]) -> str:
    """Markdown tables (mean +- sd over seeds) of the records in ``paths``."""
    lines = ["| split | protocol | option | variant | liver Dice | tumour Dice | lesion F1 | train s | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (mode, protocol, option, variant), rs in sorted(read_groups(paths).items()):
        lines.append(f"| {mode} | {protocol} | {option} | {variant} | "
                     f"{fmt([r.get('liver_dice') for r in rs])} | {fmt([r.get('tumour_dice') for r in rs])} | "
                     f"{fmt([r.get('lesion_f1') for r in rs])} | {fmt([r.get('train_seconds') for r in rs])} | {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/heads_options.jsonl")
    ap.add_argument("--options", nargs="+", default=list(OPTIONS))
    ap.add_argument("--modes", nargs="+", default=["val", "test"])
    ap.add_argument("--protocols", nargs="+", default=["sparse", "slab"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--summary", nargs="+", help="print the tables of these JSONL files and stop")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["option"], r["mode"], r["protocol"], r["seed"], r["variant"]))
    volume = load_sample()
    model = get_model()
    embeddings = embed_volume(volume, model, progress=False)
    info = model_info(model, embeddings)

    def write(rec: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    # Seeds outermost: an interrupted run still has every option on both protocols.
    probs_by: dict = {}
    for mode in args.modes:
        seeds = [0] if mode == "val" else args.seeds
        for seed in seeds:
            for protocol in args.protocols:
                train, test = protocol_split(volume.label, protocol=protocol, k=8)
                if mode == "val":
                    score_on = [train[i] for i in VAL_SLOTS]
                    train = [z for z in train if z not in score_on]
                else:
                    score_on = test
                for name in args.options:
                    key = (name, mode, protocol, seed, "plain")
                    if key in done and mode == "val":
                        continue
                    cfg = recipe("default", seed=seed, threads=1, **OPTIONS[name])
                    ctx = int(cfg.head_options.get("context", 0))
                    t0 = time.time()
                    emb, labels, images = training_tensors(volume, embeddings, train, context=ctx)
                    res = train_head(emb, labels, images=images, config=cfg, model=model,
                                     progress=False, model_info=info)
                    base = {"option": name, "mode": mode, "protocol": protocol, "seed": seed,
                            "train_seconds": round(time.time() - t0, 1)}
                    t0 = time.time()
                    _, p = predict_probabilities(volume, model, res.head, embeddings=embeddings,
                                                 slices=score_on, progress=False, tta=False)
                    inf_s = time.time() - t0
                    t0 = time.time()
                    _, pt = predict_probabilities(volume, model, res.head, embeddings=embeddings,
                                                  slices=score_on, progress=False, tta=True)
                    tta_s = time.time() - t0
                    post = mode == "test"  # 2 non-adjacent val slices are no 3D volume
                    if key not in done:
                        write({**base, "variant": "plain", "infer_seconds": round(inf_s, 1),
                               **_score(volume, p, score_on, post)})
                        write({**base, "variant": "tta", "infer_seconds": round(tta_s, 1),
                               **_score(volume, pt, score_on, post)})
                        if post:
                            for m in (0, 50):
                                write({**base, "variant": f"minlesion{m}",
                                       **_score(volume, p, score_on, post, min_lesion=m)})
                    if mode == "test":
                        probs_by.setdefault((name, protocol), []).append(
                            (p.astype(np.float16), pt.astype(np.float16)))
                        runs = probs_by[(name, protocol)]
                        if len(runs) == len(args.seeds) > 1:
                            for variant, j in (("ens3", 0), ("ens3+tta", 1)):
                                avg = np.mean([r[j].astype(np.float32) for r in runs], axis=0)
                                write({"option": name, "mode": mode, "protocol": protocol,
                                       "seed": -1, "variant": variant,
                                       **_score(volume, avg, score_on, True)})

if __name__ == "__main__":
    main()
