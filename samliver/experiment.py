"""Label-efficiency experiment: prompt-free heads vs UNet / SimCLR-UNet / zero-shot SAM vs K.

On the sample case (default) both protocols of DESIGN.md are run (``--protocol`` picks one);
``--train-slices`` / ``--test-slices`` run any split a user chooses (the slices someone
actually annotated); ``--dataset`` (an MSD Task03_Liver / LiTS folder with ``imagesTr`` and
``labelsTr``) splits by volume: K labelled volumes, the held-out volumes for testing.
Writes ``experiment.csv``, ``experiment.md`` (mean +- sd over seeds) and ``experiment.png``
(Dice vs K) to ``--output-dir`` (default ``outputs/``); ``--json`` prints one record per run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .training import TrainConfig, parse_slices, train_head
from .training_data import slice_tensors, training_tensors
from .training import self_train as self_train_head
from .util import SamliverError, atomic_path, atomic_write_text, fast_mode

HEADS = ("linear", "cnn", "vit", "autosam")
BASELINES = ("unet", "ssl", "zeroshot")


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return float(2 * np.logical_and(pred, gt).sum() / s) if s else 1.0


def _scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Global Dice over the test slices as one 3D region (liver = label >= 1, tumour = 2)."""
    return {"liver_dice": _dice(pred >= 1, gt >= 1), "tumour_dice": _dice(pred == 2, gt == 2)}


def default_steps(kind: str) -> int:
    """Training steps per head kind (fewer in ``SAMLIVER_FAST`` mode)."""
    steps = {"linear": 300, "cnn": 300, "vit": 300, "autosam": 200}.get(kind, 300)
    return max(20, steps // 6) if fast_mode() else steps


def run_head(volume: Any, embeddings: Any, model: Any, kind: str, train: list[int],
             test: list[int], *, seed: int = 0, steps: int | None = None,
             postprocess_pred: bool = True, progress: bool = False,
             config: TrainConfig | None = None, views: int = 0, self_train: int = 0) -> dict:
    """Train one head on ``train`` slices, predict ``test`` slices, return scores (+ the head).

    ``views`` (default 0) adds that many cached augmented views of each labelled slice
    (``training.view_tensors``; encoded once, the time is counted in ``seconds``).
    ``self_train`` (default 0) adds that many pseudo-label rounds (``training.self_train``) on
    the embedded slices that are not labelled; the scores are the final head's, and
    ``out["round0"]`` holds the scores of the head before self-training.
    """
    t0 = time.time()
    emb, labels, images = training_tensors(volume, embeddings, train, model=model, views=views,
                                           seed=seed)
    cfg = config or TrainConfig(kind=kind, steps=steps or default_steps(kind), seed=seed,
                                val_fraction=0.0, eval_every=100)
    kwargs = dict(config=cfg, model=model, progress=progress,
                  model_info={"model_name": getattr(model, "name", None),
                              "weights_id": getattr(model, "weights_id", None),
                              "window": getattr(embeddings, "window", "abdomen")})
    res = train_head(emb, labels, images=images, **kwargs)
    out: dict = {}
    if self_train:
        out["round0"] = _predict_scores(volume, model, res.head, embeddings, test, postprocess_pred)
        out["round0"]["seconds"] = round(time.time() - t0, 1)
        unl = [z for z in getattr(embeddings, "slices", test) if z not in set(train)]
        u_emb, _, u_img = slice_tensors(volume, embeddings, unl, need_label=False)
        res = self_train_head(emb, labels, (u_emb, u_img), images=images, rounds=self_train,
                              first=res, **kwargs)
    out.update(_predict_scores(volume, model, res.head, embeddings, test, postprocess_pred))
    out.update(seconds=round(time.time() - t0, 1), head=res.head, history=res.history)
    return out


def _predict_scores(volume: Any, model: Any, head: Any, embeddings: Any, test: list[int],
                    postprocess_pred: bool = True) -> dict:
    """Predict ``test`` slices with ``head``; their scores and the prediction (``pred``)."""
    from .inference import predict_probabilities
    from .postprocess import postprocess

    _, probs = predict_probabilities(volume, model, head, embeddings=embeddings, slices=test,
                                     progress=False)
    pred = probs.argmax(1).astype(np.uint8)
    if postprocess_pred:
        pred = postprocess(pred)
    return {**_scores(pred, volume.label[test]), "pred": pred}


def _check_split(volume: Any, train: list[int], test: list[int], k: int | None) -> None:
    n = volume.hu.shape[0]
    bad = [z for z in list(train) + list(test) if not 0 <= z < n]
    if bad:
        raise SamliverError(f"Slices {bad[:5]} are outside the volume (0..{n - 1}).")
    if k is not None and len(train) < k:
        raise SamliverError(
            f"K={k} is larger than the {len(train)} labelled slices available for this "
            "protocol: choose a smaller --k.")
    if set(train) & set(test):
        raise SamliverError("Training and test slices overlap: choose disjoint slices.")


def run_slices(volume: Any, model: Any, embeddings: Any, *, protocol: str, ks: list[int],
               heads: list[str], baselines: list[str], seeds: list[int],
               train_slices: list[int] | None = None, test_slices: list[int] | None = None,
               steps: int | None = None, progress: bool = True,
               log: Any = None, views: int = 0, self_train: int = 0) -> list[dict]:
    """All runs for one volume and one protocol (or one user split); a list of records.

    ``log`` (a writable text stream) gets one JSON line per finished run, so a long experiment
    that is interrupted keeps what it measured. ``views`` (default 0) cached augmented views
    per labelled slice for the heads (the UNet baselines augment in image space anyway).
    ``self_train`` (default 0) pseudo-label rounds for the heads: each head run then gives two
    records, the head (``cnn``) and the same head after self-training (``cnn+st``).
    """
    from .baselines import run_unet_baseline, run_zero_shot

    records: list[dict] = []
    splits: list[tuple[int, list[int], list[int]]] = []
    if train_slices is not None:
        test = test_slices or [z for z in range(volume.hu.shape[0]) if z not in set(train_slices)]
        _check_split(volume, train_slices, test, None)
        splits.append((len(train_slices), list(train_slices), list(test)))
        protocol = "custom"
    else:
        from .datasets import protocol_split

        for k in ks:
            train, test = protocol_split(volume.label, protocol=protocol, k=k)
            _check_split(volume, train, test, k)
            splits.append((k, list(train), list(test)))
    from tqdm.auto import tqdm

    jobs = [(k, tr, te, m, s) for k, tr, te in splits for m in list(heads) + [
        b for b in baselines if b != "zeroshot"] for s in seeds]
    for k, train, test, method, seed in tqdm(jobs, desc=f"experiment {protocol}",
                                             disable=not progress):
        runs = []
        suffix = f"+{views}views" if views and method in HEADS else ""
        if method in HEADS:
            out = run_head(volume, embeddings, model, method, train, test, seed=seed, steps=steps,
                           views=views, self_train=self_train)
            if self_train:
                runs.append((method + suffix, out["round0"]))
                suffix += "+st"
        else:
            t0 = time.time()
            unet_steps = steps or (50 if fast_mode() else 300)
            out = run_unet_baseline(volume, train, test, ssl=(method == "ssl"), seed=seed,
                                    steps=unet_steps, ssl_steps=max(20, unet_steps // 2))
            out["seconds"] = round(time.time() - t0, 1)
        runs.append((method + suffix, out))
        for label, res in runs:
            records.append({"method": label, "protocol": protocol, "k": k, "seed": seed,
                            "liver_dice": round(res["liver_dice"], 4),
                            "tumour_dice": round(res["tumour_dice"], 4),
                            "n_test": len(test), "seconds": res["seconds"]})
            if log is not None:
                log.write(json.dumps(records[-1]) + "\n")
                log.flush()
    if "zeroshot" in baselines:
        test = splits[0][2]
        rows = run_zero_shot(volume, model, test)
        for row in rows:
            records.append({"method": f"zeroshot:{row.get('mode', 'box')}", "protocol": protocol,
                            "k": 0, "seed": 0,
                            "liver_dice": _round(row.get("liver_dice")),
                            "tumour_dice": _round(row.get("tumour_dice")),
                            "n_test": len(test), "seconds": _round(row.get("seconds"))})
    return records


def _round(v: Any) -> Any:
    try:
        return None if v is None or np.isnan(float(v)) else round(float(v), 4)
    except (TypeError, ValueError):
        return None


def dataset_cases(root: str | Path) -> list:
    """Labelled cases of an MSD Task03_Liver / LiTS / images+labels folder (``datasets.index_dataset``)."""
    from .datasets import index_dataset

    cases = [c for c in index_dataset(root) if c.label is not None]
    if not cases:
        raise SamliverError(f"{root}: no labelled cases (labelsTr / segmentation files) found.")
    return cases


def run_dataset(root: str | Path, model: Any, *, ks: list[int], heads: list[str],
                seeds: list[int], n_test: int | None = None, slices_per_volume: int = 32,
                steps: int | None = None, progress: bool = True, env: Any = None,
                device: str = "cpu") -> list[dict]:
    """Split by volume: K labelled volumes (``slices_per_volume`` liver slices each, spread
    over the liver) -> the held-out test volumes, whole.

    Training and evaluation are :func:`samliver.dataset_embedding.train_on_dataset`: streamed
    from the embedding cache, data-parallel over the ``torchrun`` ranks (``env``; one process
    without it), a fixed number of steps (no hold-out early stopping), test volumes sharded.
    Every rank returns the same records.
    """
    from .dataset_embedding import labelled_cases, split_cases, train_on_dataset

    cases = labelled_cases(root)
    records = []
    for seed in seeds:
        for k in ks:
            train, test = split_cases(cases, test_fraction=0.2, seed=seed, volumes=k, n_test=n_test)
            for kind in heads:
                cfg = TrainConfig(kind=kind, steps=steps or default_steps(kind), seed=seed,
                                  val_fraction=0.0)
                summary, _ = train_on_dataset(train, test, model, config=cfg, k=slices_per_volume,
                                              device=device, progress=progress, env=env)
                records.append({
                    "method": kind, "protocol": "volumes", "k": k, "seed": seed,
                    "liver_dice": round(summary["liver_dice"], 4),
                    "tumour_dice": round(summary["tumour_dice"], 4),
                    "n_test": len(test), "seconds": summary["train_seconds"]})
    return records


# ----------------------------------------------------------------------------- outputs


def summarise(records: list[dict]) -> list[dict]:
    """Mean and sample sd (ddof 1) over seeds per (protocol, method, k); sd 0 for one seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["protocol"], r["method"], r["k"]), []).append(r)
    rows = []
    for (protocol, method, k), rs in sorted(groups.items(), key=lambda t: (t[0][0], t[0][2], t[0][1])):
        row = {"protocol": protocol, "method": method, "k": k, "n": len(rs)}
        for key in ("liver_dice", "tumour_dice"):
            vals = [r[key] for r in rs if r[key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
            row[key + "_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(records: list[dict]) -> str:
    """Markdown table of mean +- sd over seeds."""
    lines = ["| protocol | K | method | liver Dice | tumour Dice | seeds |",
             "|---|---|---|---|---|---|"]

    def fmt(v, sd):
        return "-" if v is None else (f"{v:.3f} ± {sd:.3f}" if sd else f"{v:.3f}")

    for r in summarise(records):
        lines.append(f"| {r['protocol']} | {r['k']} | {r['method']} | "
                     f"{fmt(r['liver_dice'], r['liver_dice_sd'])} | "
                     f"{fmt(r['tumour_dice'], r['tumour_dice_sd'])} | {r['n']} |")
    return "\n".join(lines) + "\n"


def plot_results(records: list[dict], path: str | Path) -> Path:
    """Dice vs K per method (mean, sd band over seeds), one column per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(records)
    protocols = sorted({r["protocol"] for r in rows})
    fig, axes = plt.subplots(2, len(protocols), figsize=(5 * len(protocols), 7), squeeze=False)
    for j, protocol in enumerate(protocols):
        sub = [r for r in rows if r["protocol"] == protocol]
        ks = sorted({r["k"] for r in sub if r["k"] > 0}) or [0]
        for i, key in enumerate(("liver_dice", "tumour_dice")):
            ax = axes[i][j]
            for method in sorted({r["method"] for r in sub}):
                m = sorted([r for r in sub if r["method"] == method and r[key] is not None],
                           key=lambda r: r["k"])
                if not m:
                    continue
                if m[0]["k"] == 0:  # zero-shot: no labelled slices, a reference line
                    ax.axhline(m[0][key], ls="--", lw=1, color="grey")
                    ax.text(ks[0], m[0][key], method, fontsize=7, va="bottom", color="grey")
                    continue
                x = [r["k"] for r in m]
                y = np.array([r[key] for r in m])
                sd = np.array([r[key + "_sd"] for r in m])
                ax.plot(x, y, "o-", label=method)
                ax.fill_between(x, y - sd, y + sd, alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="labelled slices K", ylabel=key.replace("_", " "), ylim=(0, 1),
                   title=f"{protocol}: {key.split('_')[0]}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def write_outputs(records: list[dict], out_dir: str | Path, stem: str = "experiment") -> dict:
    """Write CSV, Markdown and PNG; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["method", "protocol", "k", "seed", "liver_dice", "tumour_dice", "n_test", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
    paths = {"csv": atomic_write_text(out_dir / f"{stem}.csv", buf.getvalue()),
             "md": atomic_write_text(out_dir / f"{stem}.md", markdown_table(records))}
    paths["png"] = plot_results(records, out_dir / f"{stem}.png")
    return paths


def read_records(paths: list[str | Path]) -> list[dict]:
    """Run records from JSON-lines files (``experiment.partial.jsonl``) or JSON lists (``--json``)."""
    records: list[dict] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SamliverError(f"{path} not found: give experiment.partial.jsonl or --json output.")
        text = path.read_text().strip()
        try:
            items = json.loads(text) if text.startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as err:
            raise SamliverError(f"{path} is not JSON lines / a JSON list of records ({err}).") from err
        for r in items:
            if not isinstance(r, dict) or not {"method", "protocol", "k", "seed", "liver_dice",
                                                "tumour_dice"} <= set(r):
                raise SamliverError(f"{path}: {str(r)[:80]} is not an experiment record.")
        records += items
    if not records:
        raise SamliverError(f"No records in {', '.join(map(str, paths))}.")
    return records


def _csv_list(text: str, allowed: tuple[str, ...] | None = None, what: str = "") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()] if text else []
    if allowed:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SamliverError(f"Unknown {what} {bad}: choose from {', '.join(allowed)}.")
    return items


def main(argv: list[str] | None = None) -> int:
    """``samliver experiment --k 1,2,4,8,16 --heads ... --baselines ... --seeds 0,1,2``."""
    from .io import SERIES_UID_HELP

    p = argparse.ArgumentParser(prog="samliver experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volume", nargs="?", help="labelled CT volume (default: the sample case)")
    p.add_argument("--label", help="label file for VOLUME")
    p.add_argument("--dataset", help="MSD Task03_Liver / LiTS folder: split by volume")
    p.add_argument("--k", default="1,2,4,8,16", help="labelled slices (volumes with --dataset)")
    p.add_argument("--heads", default="linear,cnn,vit,autosam")
    p.add_argument("--baselines", default="unet,ssl,zeroshot")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--protocol", default="both", choices=["sparse", "slab", "both"])
    p.add_argument("--train-slices", help="user split: labelled slices, e.g. 3,20,41")
    p.add_argument("--test-slices", help="user split: test slices, e.g. 50-90 (default: the rest)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per method)")
    p.add_argument("--views", type=int, default=0,
                   help="cached augmented views per labelled slice for the heads (default 0)")
    p.add_argument("--self-train", type=int, default=0, metavar="ROUNDS",
                   help="pseudo-label self-training rounds for the heads on the volume's "
                        "unlabelled slices (default 0); adds a '<head>+st' record per run")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--checkpoint", help="model weights file (SAM / MedSAM)")
    p.add_argument("--device", default=None)
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--report", nargs="+", metavar="JSONL",
                   help="run nothing: rebuild the CSV / Markdown / PNG from finished runs "
                        "(experiment.partial.jsonl files, or --json output), e.g. of an "
                        "interrupted grid or of protocols run in parallel")
    p.add_argument("--series-uid", help=SERIES_UID_HELP)
    args = p.parse_args(argv)
    from .util import check_number

    check_number("--steps", args.steps, minimum=1)
    check_number("--views", args.views, minimum=0)
    check_number("--self-train", args.self_train, minimum=0)
    if args.report:
        records = read_records(args.report)
        paths = write_outputs(records, args.output_dir)
        print(json.dumps(records) if args.json else markdown_table(records)
              + "wrote " + ", ".join(str(v) for v in paths.values()))
        return 0

    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    try:
        ks = [int(k) for k in _csv_list(args.k)]
        seeds = [int(s) for s in _csv_list(args.seeds)]
    except ValueError as err:
        raise SamliverError(f"--k and --seeds take comma-separated integers ({err}).") from err
    if any(k < 1 for k in ks):
        raise SamliverError("--k values must be >= 1.")
    heads = _csv_list(args.heads, HEADS, "heads")
    baselines = _csv_list(args.baselines, BASELINES, "baselines")
    from .models import get_model

    model = get_model(args.model, checkpoint=args.checkpoint, device=args.device)
    progress = not args.json
    if args.dataset:
        if args.views or args.self_train:
            raise SamliverError("--views and --self-train work with slice splits (sample, VOLUME or "
                                "--train-slices), not yet with --dataset.")
        from .distributed import close_distributed, init_distributed

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
        from .embeddings import embed_volume

        from .io import load_volume_arg

        volume = load_volume_arg(args.volume, args.label, series_uid=args.series_uid)
        if volume.label is None:
            raise SamliverError(f"{volume.source} has no label: the experiment needs one "
                                "(pass --label).")
        train = parse_slices(args.train_slices)
        test = parse_slices(args.test_slices)
        if test is not None and train is None:
            raise SamliverError("--test-slices needs --train-slices too.")
        needed = None
        if train is not None:
            needed = sorted(set(train) | set(test or range(volume.hu.shape[0])))
        embeddings = embed_volume(volume, model, slices=needed, progress=progress)
        protocols = ["sparse", "slab"] if args.protocol == "both" else [args.protocol]
        if train is not None:
            protocols = ["custom"]
        records = []
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / "experiment.partial.jsonl", "w") as log:
            for protocol in protocols:
                records += run_slices(volume, model, embeddings, protocol=protocol, ks=ks,
                                      heads=heads, baselines=baselines, seeds=seeds,
                                      train_slices=train, test_slices=test, steps=args.steps,
                                      progress=progress, log=log, views=args.views,
                                      self_train=args.self_train)
    paths = write_outputs(records, args.output_dir)
    if args.json:
        print(json.dumps(records))
    else:
        print(markdown_table(records))
        print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0
