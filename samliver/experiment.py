"""Label-efficiency experiment: prompt-free heads vs UNet / SimCLR-UNet / zero-shot SAM vs K.

On the sample case (default) both fixed protocols (sparse and slab, docs/design.md) are run
(``--protocol`` picks one); ``--protocol slab-random`` / ``sparse-random`` / ``random`` run a
family of splits drawn from split seeds 0..N-1 (``--splits N``, default 10), reported as mean
+- sd over splits and as wins / losses per split of each head against each baseline;
``--train-slices`` / ``--test-slices`` run any split a user chooses (the slices someone
actually annotated); ``--dataset`` (an MSD Task03_Liver / LiTS folder with ``imagesTr`` and
``labelsTr``) splits by volume: K labelled volumes, the held-out volumes for testing.
Writes ``experiment.csv``, ``experiment.md`` (mean +- sd over seeds) and ``experiment.png``
(Dice vs K) to ``--output-dir`` (default ``outputs/``); ``--json`` prints one record per run.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .baselines import BASELINE_METHODS
from .checkpoints import model_info
from .config import HEAD_KINDS, RANDOM_PROTOCOLS, RECIPES
from .evaluation import label_dice, lesion_scores
from .training import TrainConfig, recipe, train_head
from .training import self_train as self_train_head
from .training_data import fine_tensors, slice_tensors, training_tensors
from .util import SamliverError, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings
    from .heads import Head
    from .io import CTVolume
    from .models import SamModel

BASELINES = (*BASELINE_METHODS, "zeroshot")
"""Baseline names ``samliver experiment --baselines`` takes: the image-space ones of
:data:`samliver.baselines.BASELINE_METHODS` and ``zeroshot`` (prompted SAM)."""

HEAD_METHODS = tuple(dict.fromkeys((*HEAD_KINDS, *RECIPES)))
"""Head methods ``--heads`` takes: a head kind (its recipe, ``config.RECIPES[kind]``) or a
recipe name such as ``default`` (the best recipe); records name the method as given."""


def run_head(volume: CTVolume, embeddings: VolumeEmbeddings, model: SamModel, kind: str, train: list[int],
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
    cfg = config or recipe(kind, steps=steps, seed=seed, val_fraction=0.0, eval_every=100)
    context = int((cfg.head_options or {}).get("context", 0))  # a 2.5D head reads z +- context
    emb, labels, images = training_tensors(volume, embeddings, train, model=model, views=views,
                                           seed=seed, context=context)
    fine = fine_tensors(volume, model, embeddings, train, cfg.head_options, views=views,
                        self_train=self_train)
    kwargs = dict(config=cfg, model=model, progress=progress,
                  model_info=model_info(model, embeddings))
    res = train_head(emb, labels, images=images, fine=fine, **kwargs)
    out: dict = {}
    if self_train:
        out["round0"] = _predict_and_score(volume, model, res.head, embeddings, test, postprocess_pred)
        out["round0"]["seconds"] = round(time.time() - t0, 1)
        unl = [z for z in getattr(embeddings, "slices", test) if z not in set(train)]
        u_emb, _, u_img = slice_tensors(volume, embeddings, unl, need_label=False, context=context)
        res = self_train_head(emb, labels, (u_emb, u_img), images=images, rounds=self_train,
                              first=res, **kwargs)
    out.update(_predict_and_score(volume, model, res.head, embeddings, test, postprocess_pred))
    out.update(seconds=round(time.time() - t0, 1), head=res.head, history=res.history)
    return out


def _predict_and_score(volume: CTVolume, model: SamModel, head: Head, embeddings: VolumeEmbeddings, test: list[int],
                    postprocess_pred: bool = True) -> dict:
    """Predict ``test`` slices with ``head``; their scores and the prediction (``pred``)."""
    from .inference import predict_probabilities
    from .postprocess import postprocess

    _, probs = predict_probabilities(volume, model, head, embeddings=embeddings, slices=test,
                                     progress=False)
    pred = probs.argmax(1).astype(np.uint8)
    if postprocess_pred:
        pred = postprocess(pred)
    return {**label_dice(pred, volume.label[test]), "pred": pred}


def _check_split(volume: CTVolume, train: list[int], test: list[int], k: int | None) -> None:
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


def run_slices(volume: CTVolume, model: SamModel, embeddings: VolumeEmbeddings, *, protocol: str, ks: list[int],
               heads: list[str], baselines: list[str], seeds: list[int],
               train_slices: list[int] | None = None, test_slices: list[int] | None = None,
               steps: int | None = None, progress: bool = True,
               log: Any = None, views: int = 0, self_train: int = 0,
               splits: list[int] | None = None, nnunet_epochs: int | None = None) -> list[dict]:
    """All runs for one volume and one protocol (or one user split); a list of records.

    A random protocol (``slab-random``, ``sparse-random``) runs every split seed of ``splits``
    (default ``[0]``); records carry ``split`` (the seed, None for a fixed protocol or a user
    split). Records keep the keys ``method, protocol, k, seed, split, liver_dice, tumour_dice``.

    ``log`` (a writable text stream) gets one JSON line per finished run, so a long experiment
    that is interrupted keeps what it measured. ``views`` (default 0) cached augmented views
    per labelled slice for the heads (the UNet baselines augment in image space anyway).
    ``self_train`` (default 0) pseudo-label rounds for the heads: each head run then gives two
    records, the head (``cnn``) and the same head after self-training (``cnn+st``).
    ``nnunet_epochs`` is nnU-Net's training budget (None: ``nnunet.NNUNET_EPOCHS``); its records
    carry ``epochs`` and ``iterations`` so a comparison states the budget.
    """
    from .baselines import run_baseline
    from .zero_shot import BASELINE_MODES, evaluate_zero_shot

    records: list[dict] = []
    runs_to_do: list[tuple[int | None, int, list[int], list[int]]] = []
    if train_slices is not None:
        test = test_slices or [z for z in range(volume.hu.shape[0]) if z not in set(train_slices)]
        _check_split(volume, train_slices, test, None)
        runs_to_do.append((None, len(train_slices), list(train_slices), list(test)))
        protocol = "custom"
    else:
        from .datasets import protocol_split

        split_seeds: list[int | None] = list(splits or [0]) if protocol in RANDOM_PROTOCOLS else [None]
        for split in split_seeds:
            for k in ks:
                train, test = protocol_split(volume.label, protocol=protocol, k=k, split=split or 0)
                _check_split(volume, train, test, k)
                runs_to_do.append((split, k, list(train), list(test)))
    unknown = [m for m in heads if m not in HEAD_METHODS] + [
        b for b in baselines if b not in BASELINES]
    if unknown:
        raise SamliverError(f"Unknown method(s) {unknown}: heads {', '.join(HEAD_METHODS)}; "
                            f"baselines {', '.join(BASELINES)}.")
    from tqdm.auto import tqdm

    jobs = [(sp, k, tr, te, m, s) for sp, k, tr, te in runs_to_do for m in list(heads) + [
        b for b in baselines if b != "zeroshot"] for s in seeds]
    for split, k, train, test, method, seed in tqdm(jobs, desc=f"experiment {protocol}",
                                                    disable=not progress):
        runs = []
        is_head = method in HEAD_METHODS
        suffix = f"+{views}views" if views and is_head else ""
        if is_head:
            out = run_head(volume, embeddings, model, method, train, test, seed=seed, steps=steps,
                           views=views, self_train=self_train)
            if self_train:
                runs.append((method + suffix, out["round0"]))
                suffix += "+st"
        else:
            t0 = time.time()
            out = run_baseline(method, volume, train, test, seed=seed, steps=steps,
                               budget=nnunet_epochs if method == "nnunet" else None)
            out["seconds"] = round(time.time() - t0, 1)
        runs.append((method + suffix, out))
        for label, res in runs:
            # Lesion-level figures over the test slices stacked in order (3D components).
            lesions = lesion_scores(res["pred"], volume.label[test]) if "pred" in res else {}
            records.append({"method": label, "protocol": protocol, "k": k, "seed": seed,
                            "split": split, "liver_dice": round(res["liver_dice"], 4),
                            "tumour_dice": round(res["tumour_dice"], 4),
                            **{key: _round(v) for key, v in lesions.items()},
                            "n_test": len(test), "seconds": res["seconds"],
                            **{key: res[key] for key in ("epochs", "iterations") if key in res}})
            if log is not None:
                log.write(json.dumps(records[-1]) + "\n")
                log.flush()
    if "zeroshot" in baselines:
        # Zero-shot needs no labelled slice (k 0): one run per split, on the test slices of
        # that split's first K (the same for every K of a slab protocol).
        firsts = {}
        for split, _k, _train, test in runs_to_do:
            firsts.setdefault(split, test)
        for split, test in firsts.items():
            rows = evaluate_zero_shot(volume, model, list(test), modes=BASELINE_MODES, progress=False)
            for row in rows:
                records.append({"method": f"zeroshot:{row.get('mode', 'box')}", "protocol": protocol,
                                "k": 0, "seed": 0, "split": split,
                                "liver_dice": _round(row.get("liver_dice")),
                                "tumour_dice": _round(row.get("tumour_dice")),
                                "n_test": len(test), "seconds": _round(row.get("seconds"))})
                if log is not None:
                    log.write(json.dumps(records[-1]) + "\n")
                    log.flush()
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


def run_dataset(root: str | Path, model: SamModel, *, ks: list[int], heads: list[str],
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
                cfg = recipe(kind, steps=steps, seed=seed, val_fraction=0.0)
                summary, _ = train_on_dataset(train, test, model, config=cfg, k=slices_per_volume,
                                              device=device, progress=progress, env=env)
                records.append({
                    "method": kind, "protocol": "volumes", "k": k, "seed": seed,
                    "liver_dice": round(summary["liver_dice"], 4),
                    "tumour_dice": round(summary["tumour_dice"], 4),
                    "n_test": len(test), "seconds": summary["train_seconds"]})
    return records


# ----------------------------------------------------------------------------- outputs


def _seed_means(records: list[dict]) -> dict[tuple, dict]:
    """Mean over seeds per (protocol, method, k, split): one value per split and metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["protocol"], r["method"], r["k"], r.get("split")), []).append(r)
    out = {}
    for key, rs in groups.items():
        row: dict = {"n": len(rs)}
        for metric in _METRICS:
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            row[metric] = float(np.mean(vals)) if vals else None
        out[key] = row
    return out


_METRICS = ("liver_dice", "tumour_dice", "lesion_f1", "burden_error")


def summarise(records: list[dict]) -> list[dict]:
    """Mean and sample sd (ddof 1) per (protocol, method, k); sd 0 for one value.

    For a fixed protocol the mean and sd are over seeds. For a random protocol (records with a
    ``split``) each split's seeds are averaged first, then mean and sd are over the splits:
    the spread then says how much the figure depends on which slices were labelled. ``n`` is
    the number of runs, ``splits`` the number of splits (0 for a fixed protocol).
    """
    per_split = _seed_means(records)
    groups: dict[tuple, list[tuple]] = {}
    for key in per_split:
        groups.setdefault(key[:3], []).append(key)
    rows = []
    for (protocol, method, k), keys in sorted(groups.items(), key=lambda t: (t[0][0], t[0][2], t[0][1])):
        has_splits = any(key[3] is not None for key in keys)
        row = {"protocol": protocol, "method": method, "k": k,
               "n": sum(per_split[key]["n"] for key in keys),
               "splits": len(keys) if has_splits else 0}
        for metric in _METRICS:
            if has_splits:
                vals = [per_split[key][metric] for key in keys if per_split[key][metric] is not None]
            else:
                vals = [r[metric] for r in records if (r["protocol"], r["method"], r["k"]) == (protocol, method, k)
                        and r.get(metric) is not None]
            row[metric] = float(np.mean(vals)) if vals else None
            row[metric + "_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def split_wins(records: list[dict], method: str, against: list[str] | None = None,
               metrics: tuple[str, ...] = ("tumour_dice", "liver_dice")) -> list[dict]:
    """Per-split wins and losses of ``method`` against each baseline.

    For every (protocol, K, split) where both were run, the mean over seeds of ``method`` is
    compared with the baseline's; a baseline record with ``k`` 0 (zero-shot: no labelled
    slice) is compared at every K of its split. Only records with a ``split`` (random
    protocols) count.

    Args:
        records: experiment records (``run_slices``).
        method: the head's method name, e.g. ``"cnn"`` or ``"default"``.
        against: baseline method names (default: every method in ``records`` whose name
            starts with one of :data:`BASELINES`).
        metrics: the Dice keys compared.

    Returns:
        One row per (protocol, K, baseline): ``protocol, k, method, against, splits`` and,
        per metric, ``<metric>_wins``, ``<metric>_losses``, ``<metric>_ties``.
    """
    means = {key: v for key, v in _seed_means(records).items() if key[3] is not None}
    if against is None:
        against = sorted({key[1] for key in means if key[1].startswith(BASELINES)})
    rows = []
    mine = sorted({(key[0], key[2]) for key in means if key[1] == method}, key=str)
    for protocol, k in mine:
        for other in against:
            row: dict = {"protocol": protocol, "k": k, "method": method, "against": other, "splits": 0}
            row.update({f"{m}_{w}": 0 for m in metrics for w in ("wins", "losses", "ties")})
            for (p, meth, kk, split), mv in means.items():
                if (p, meth, kk) != (protocol, method, k):
                    continue
                ov = means.get((protocol, other, k, split)) or means.get((protocol, other, 0, split))
                if ov is None:
                    continue
                row["splits"] += 1
                for m in metrics:
                    a, b = mv.get(m), ov.get(m)
                    if a is None or b is None:
                        continue
                    row[f"{m}_{'wins' if a > b else 'losses' if a < b else 'ties'}"] += 1
            if row["splits"]:
                rows.append(row)
    return rows


def wins_table(records: list[dict], methods: list[str] | None = None) -> str:
    """Markdown table of per-split wins / losses of each head against each baseline ('' if none)."""
    heads = methods or sorted({r["method"] for r in records if r.get("split") is not None
                               and not r["method"].startswith(BASELINES)})
    rows = [row for h in heads for row in split_wins(records, h)]
    if not rows:
        return ""
    lines = ["| protocol | K | head | vs | splits | tumour Dice wins / losses / ties | "
             "liver Dice wins / losses / ties |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['k']} | {r['method']} | {r['against']} | {r['splits']} | "
                     f"{r['tumour_dice_wins']} / {r['tumour_dice_losses']} / {r['tumour_dice_ties']} | "
                     f"{r['liver_dice_wins']} / {r['liver_dice_losses']} / {r['liver_dice_ties']} |")
    return "\n".join(lines) + "\n"


def markdown_table(records: list[dict]) -> str:
    """Markdown table of mean +- sd (over seeds; over splits for a random protocol), then the
    per-split wins / losses table when there are random-protocol records."""
    lines = ["| protocol | K | method | liver Dice | tumour Dice | lesion F1 | burden error | seeds | splits |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, sd):
        return "-" if v is None else (f"{v:.3f} ± {sd:.3f}" if sd else f"{v:.3f}")

    for r in summarise(records):
        seeds = len({x["seed"] for x in records if (x["protocol"], x["method"], x["k"])
                     == (r["protocol"], r["method"], r["k"])})
        lines.append(f"| {r['protocol']} | {r['k']} | {r['method']} | "
                     f"{fmt(r['liver_dice'], r['liver_dice_sd'])} | "
                     f"{fmt(r['tumour_dice'], r['tumour_dice_sd'])} | "
                     f"{fmt(r['lesion_f1'], r['lesion_f1_sd'])} | {fmt(r['burden_error'], r['burden_error_sd'])} | "
                     f"{seeds} | {r['splits'] or '-'} |")
    text = "\n".join(lines) + "\n"
    wins = wins_table(records)
    if wins:
        text += ("\nWins / losses per split (mean over seeds within a split; a higher Dice of "
                 "the head is a win):\n\n" + wins)
    return text


def plot_results(records: list[dict], path: str | Path) -> Path:
    """Dice vs K per method (mean, sd band over seeds), one column per protocol, as a PNG."""
    from .visualization import label_efficiency_figure, save_figure

    return save_figure(label_efficiency_figure(summarise(records)), path, dpi=100)


def write_outputs(records: list[dict], out_dir: str | Path, stem: str = "experiment") -> dict:
    """Write CSV, Markdown and PNG; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["method", "protocol", "k", "seed", "liver_dice", "tumour_dice", "lesion_precision", "lesion_recall",
            "lesion_f1", "burden_error", "n_test", "seconds", "split"]
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
