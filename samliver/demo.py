"""``samliver demo``: the main job on the real sample case.

Stage 2 (after the stage 1 steps below): encode every slice with LiteMedSAM (cached), the
zero-shot baseline, train the best prompt-free head on K = 8 labelled slices (sparse
protocol), predict the other slices, evaluate and write ``outputs/report.md``.

Stage 1: fetch the sample, print a summary (shape, label volumes in voxels, lesion count
from 3D connected components) and write ``outputs/overview.png`` (axial, coronal and
sagittal slices with the label overlay and a legend) plus ``outputs/summary.json``.

The job is a list of small steps (:data:`STEPS`) that share a :class:`DemoContext`; later
stages add steps to the list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import DEFAULT_K, DEFAULT_MODEL, RECIPES
from .evaluation import label_dice
from .util import atomic_write_text, fast_mode


@dataclass
class DemoContext:
    """State shared by the demo steps: output folder, the volume, results and timings."""

    out_dir: Path
    fast: bool = False
    volume: object = None  # samliver.io.CTVolume once step_fetch ran
    results: dict = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def step_fetch(ctx: DemoContext) -> None:
    """Fetch (or reuse) the sample case and load it."""
    from .sample import fetch_sample, load_sample

    info = fetch_sample()
    ctx.volume = load_sample()
    ctx.results["sample"] = {k: info[k] for k in ("case_id", "image", "label", "shape", "spacing")}


def step_summary(ctx: DemoContext) -> None:
    """Print shape, HU range, label volumes in voxels and the 3D lesion count."""
    from .io import format_summary, summarise_volume

    summary = summarise_volume(ctx.volume)
    ctx.results["summary"] = summary
    print(format_summary(summary))


def step_overview(ctx: DemoContext) -> None:
    """Write the overview figure (three planes, label overlay, legend)."""
    from .visualization import overview_figure

    path = ctx.out_dir / "overview.png"
    overview_figure(ctx.volume, path, title="LiTS sample case (liver-ct-segmentation-package 1.6.0)")
    ctx.outputs.append(path)
    print(f"wrote {path}")


# The demo runs these in order; later stages append their steps.
STEPS: list[Callable[[DemoContext], None]] = [step_fetch, step_summary, step_overview]


# ----------------------------------------------------------------------------------------
# Stage 2 (heads): embed every slice (cached), the zero-shot baseline, train the best
# prompt-free head on K = 8 labelled slices (sparse protocol), predict the other slices,
# evaluate and write outputs/report.md. The trained head is cached too (keyed on the volume,
# the model weights, the slices and the recipe), so a warm run only predicts.
# ----------------------------------------------------------------------------------------
HEAD_KIND = RECIPES["default"]["kind"]  # the best prompt-free head measured on the sample
# The demo's zero-shot baseline: a tight box per slice for the liver and per lesion (the
# strongest prompts). 3D propagation is left to
# `samliver zero-shot` and notebook 03: it decodes one lesion at a time across many slices,
# several minutes on a 2-core CPU, which would break the demo's 15-minute budget.
DEMO_ZERO_SHOT_MODES = ("liver_box", "lesion_boxes")




def _result_cache_path(folder: str, volume, model, name: str, suffix: str, **key) -> Path:
    """A cache file for a deterministic demo result, keyed on the volume, its label, the model
    weights and ``key`` (the slices and settings that produced it)."""
    import hashlib

    from .util import cache_dir, sha256_array

    key.update(volume=sha256_array(volume.hu), label=sha256_array(volume.label), model=model.name,
               weights=model.weights_id, encoder=f"{getattr(model, 'backend', 'torch')}/{getattr(model, 'precision', 'fp32')}")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir(folder) / f"{name}_{digest}{suffix}"


def _head_cache_path(volume, model, train, config) -> Path:
    from dataclasses import asdict

    return _result_cache_path("heads", volume, model, f"{model.name}_{config.kind}", ".pt",
                              train=[int(z) for z in train], v=2,
                              config={k: v for k, v in asdict(config).items() if k != "device"})


def _json_default(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _zero_shot_cache_path(volume, model, slices, modes) -> Path:
    return _result_cache_path("zero_shot", volume, model, model.name, ".json",
                              slices=[int(z) for z in slices], modes=list(modes), v=1)


def step_embed(ctx: DemoContext) -> None:
    """Load LiteMedSAM and encode every slice through the embedding cache."""
    from .datasets import protocol_split
    from .embeddings import embed_volume
    from .models import get_model

    ctx.results["model"] = model = get_model(DEFAULT_MODEL)
    train, test = protocol_split(ctx.volume.label, protocol="sparse", k=DEFAULT_K)
    ctx.results["split"] = {"protocol": "sparse", "k": DEFAULT_K, "train": train, "test": test}
    ctx.results["embeddings"] = emb = embed_volume(ctx.volume, model)
    print(f"embeddings: {len(emb.slices)} slices cached in {emb.path}")


def step_zero_shot(ctx: DemoContext) -> None:
    """Zero-shot prompted SAM (prompts simulated from the ground truth) on the test slices."""
    from .zero_shot import evaluate_zero_shot

    test = ctx.results["split"]["test"]
    # Every second test slice (every fourth in FAST mode): the same figure within ~0.01, at
    # half the decoder time (the zero-shot baseline costs ~0.14 s per box on a 2-core CPU).
    stride = 4 if ctx.fast else 2
    slices = test[::stride]
    ctx.results["zero_shot_stride"] = stride
    # The baseline is deterministic (prompts from the ground truth): cache its rows like the
    # embeddings and the head, so a warm demo only predicts (it is ~2-3 min of decoder calls).
    cached = _zero_shot_cache_path(ctx.volume, ctx.results["model"], slices, DEMO_ZERO_SHOT_MODES)
    rows = None
    if cached.exists():
        try:
            rows = json.loads(cached.read_text())
            print(f"zero-shot: reusing cached results {cached}")
        except ValueError:
            rows = None
    if rows is None:
        rows = evaluate_zero_shot(ctx.volume, ctx.results["model"], slices,
                                  modes=DEMO_ZERO_SHOT_MODES, embeddings=ctx.results["embeddings"])
        atomic_write_text(cached, json.dumps(rows, default=_json_default))
    ctx.results["zero_shot"] = rows
    for row in rows:
        print(f"zero-shot {row.get('mode')}: liver Dice {row.get('liver_dice')}, "
              f"tumour Dice {row.get('tumour_dice')}")


def step_train_head(ctx: DemoContext) -> None:
    """Train (or load from the cache) the best head on the K labelled slices."""
    import shutil

    from .checkpoints import load_head, model_info
    from .training import recipe, train_head
    from .training_data import slice_tensors
    from .visualization import save_figure, training_curves_figure

    model, emb = ctx.results["model"], ctx.results["embeddings"]
    train = ctx.results["split"]["train"]
    config = recipe("default", fast=ctx.fast)
    cached = _head_cache_path(ctx.volume, model, train, config)
    if cached.exists():
        head = load_head(cached, model)
        history = head.checkpoint_info.get("history") or {}
        print(f"head: reusing the cached {HEAD_KIND} head {cached}")
    else:
        x, y, images = slice_tensors(ctx.volume, emb, train)
        res = train_head(x, y, images=images, config=config, model=model, checkpoint=cached,
                         model_info=model_info(model, emb))
        head, history = res.head, res.history
        print(f"head: trained {HEAD_KIND} on slices {train} in {history['seconds']:.0f} s")
    ctx.results["head"], ctx.results["history"] = head, history
    curves = save_figure(training_curves_figure(history), ctx.out_dir / "training_curves.png", dpi=100)
    shutil.copyfile(cached, ctx.out_dir / "head.pt")
    ctx.outputs += [curves, ctx.out_dir / "head.pt"]


def step_predict(ctx: DemoContext) -> None:
    """Predict the unlabelled (test) slices, post-process, write the label NIfTI."""
    import numpy as np

    from .inference import predict_volume
    from .io import save_label_nifti
    from .postprocess import postprocess

    test = ctx.results["split"]["test"]
    raw = predict_volume(ctx.volume, ctx.results["model"], ctx.results["head"],
                         embeddings=ctx.results["embeddings"], slices=test,
                         postprocess_label=False, progress=False)
    pred = np.zeros_like(raw)
    pred[test] = postprocess(raw[test])
    ctx.results["prediction"] = pred  # test slices only: what step_evaluate scores
    # The exported label is what a user wants from K labelled slices: their own labels where
    # they gave them, the head's prediction everywhere else (never empty labelled slices).
    train = ctx.results["split"]["train"]
    export = pred.copy()
    export[train] = ctx.volume.label[train]
    path = save_label_nifti(export, ctx.volume, ctx.out_dir / "prediction.nii.gz")
    ctx.outputs.append(path)
    print(f"wrote {path} (your labels on the {len(train)} labelled slices, the head's prediction "
          "on the others)")


def step_evaluate(ctx: DemoContext) -> None:
    """Global Dice over the test slices as one 3D region, the engine's metrics, tumour burden."""
    from .postprocess import format_burden, tumour_burden

    test = ctx.results["split"]["test"]
    gt, pred = ctx.volume.label[test], ctx.results["prediction"][test]
    scores = label_dice(pred, gt)
    try:
        from .evaluation import evaluate_volume

        scores["metrics"] = evaluate_volume(pred, gt, spacing=ctx.volume.spacing)
    except Exception as err:  # noqa: BLE001 - the report keeps the Dice scores
        scores["metrics_error"] = str(err)
    ctx.results["head_scores"] = scores
    ctx.results["burden"] = tumour_burden(pred, ctx.volume.spacing)
    print(f"{HEAD_KIND} head, K={DEFAULT_K} sparse: liver Dice {scores['liver_dice']:.3f}, "
          f"tumour Dice {scores['tumour_dice']:.3f}")
    print(f"tumour burden (test slices): {format_burden(ctx.results['burden'])}")


def step_report(ctx: DemoContext) -> None:
    """Write outputs/report.md: the metric table and the figures."""
    from .postprocess import format_burden
    from .visualization import comparison_figure, save_figure

    r = ctx.results
    split, scores, history = r["split"], r["head_scores"], r.get("history") or {}
    test = split["test"]
    with_tumour = [z for z in test if (ctx.volume.label[z] == 2).any()] or test
    picks = sorted({with_tumour[len(with_tumour) * i // 4] for i in (1, 2, 3)})
    overlays = save_figure(comparison_figure(ctx.volume, r["prediction"], picks),
                           ctx.out_dir / "overlays.png")
    ctx.outputs.append(overlays)

    def f(v):
        return "-" if v is None else f"{float(v):.3f}"

    lines = ["# samliver demo report: the sample case", "",
             f"LiTS case 117 (128^3 crop). Protocol **sparse**: K = {split['k']} labelled slices "
             f"{split['train']}; evaluated on the other {len(test)} slices as one 3D region "
             "(liver = label >= 1, tumour = label 2). Voxel spacing unknown: volumes in voxels.",
             "", "| method | labels used | liver Dice | tumour Dice |", "|---|---|---|---|"]
    for row in r.get("zero_shot", []):
        lines.append(f"| zero-shot SAM ({row.get('mode')}) | prompts from the ground truth on "
                     f"{row.get('n_slices', '?')} of the test slices (every "
                     f"{ {2: 'second', 4: 'fourth'}.get(r.get('zero_shot_stride'), 'n-th')}) | "
                     f"{f(row.get('liver_dice'))} | {f(row.get('tumour_dice'))} |")
    lines.append(f"| prompt-free {HEAD_KIND} head | {split['k']} labelled slices | "
                 f"{f(scores['liver_dice'])} | {f(scores['tumour_dice'])} |")
    metrics = scores.get("metrics")
    if isinstance(metrics, dict):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if flat:
            lines += ["", "Head, all metrics on the test slices:", "", "| metric | value |",
                      "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in flat.items()]
    lines += ["", f"Tumour burden of the prediction (test slices): {format_burden(r['burden'])}.",
              "", f"Training: {len(history.get('loss', []))} steps ({history.get('stopped', '-')}).",
              "", "## Ground truth vs prediction", "", "![overlays](overlays.png)", "",
              "## Training curves", "", "![training curves](training_curves.png)", "",
              "## Overview", "", "![overview](overview.png)", "", "## Timings (s)", "",
              "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in ctx.timings.items()]
    path = atomic_write_text(ctx.out_dir / "report.md", "\n".join(lines) + "\n")
    ctx.outputs.append(path)
    # drop the non-JSON objects before summary.json is written
    for key in ("model", "embeddings", "head", "prediction"):
        r.pop(key, None)
    r["head_scores"] = {k: v for k, v in scores.items() if k != "metrics"} | (
        {"metrics": metrics} if isinstance(metrics, dict) else {})
    print(f"wrote {path}")


STEPS += [step_embed, step_zero_shot, step_train_head, step_predict, step_evaluate, step_report]


def run_demo(out_dir: str | Path = "outputs", *, steps: list | None = None, fast: bool | None = None) -> DemoContext:
    """Run ``steps`` (default :data:`STEPS`) and write ``summary.json`` to ``out_dir`` (default ``outputs``)."""
    ctx = DemoContext(out_dir=Path(out_dir), fast=fast_mode() if fast is None else fast)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    for step in steps if steps is not None else STEPS:
        start = time.perf_counter()
        step(ctx)
        ctx.timings[step.__name__] = round(time.perf_counter() - start, 2)
    path = ctx.out_dir / "summary.json"
    report = {"results": ctx.results, "outputs": [str(p) for p in ctx.outputs], "timings_s": ctx.timings}
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
    ctx.outputs.append(path)
    return ctx
