"""Zero-shot prompted SAM, evaluated with prompts simulated from the reference label.

This is the baseline the thesis's prompt-free heads must beat. The prompts come from the ground
truth, so the figures are what a perfect user would get for each kind of prompt:

| mode                | prompt (per test slice unless said)                                  | scores        |
|---------------------|----------------------------------------------------------------------|---------------|
| ``liver_box``       | a tight box around the liver                                         | liver         |
| ``lesion_boxes``    | one tight box per lesion (2D connected component)                    | tumour        |
| ``lesion_points``   | one positive point at each lesion's centre (max of distance transform) | tumour      |
| ``corrective_clicks`` | the boxes above, then ``clicks`` corrective clicks each (next click at the centre of the largest error region, with the previous logits as mask input) | liver, tumour |
| ``propagation_3d``  | one box on one key slice per structure (the liver; each 3D lesion), propagated up and down | liver, tumour |

Dice is computed over all evaluated slices as one 3D region (liver = label >= 1, tumour =
label == 2), as for the heads; slices without the structure get no prompt and so an empty
prediction. Scores that a mode does not produce are ``None``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .config import DEFAULT_WINDOW
from .evaluation import dice
from .util import SamliverError

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings
    from .io import CTVolume
    from .models import SamModel

MODES = ("liver_box", "lesion_boxes", "lesion_points", "corrective_clicks", "propagation_3d")
# The modes used as the baseline against the heads (demo, experiment): what a user gives with
# boxes, per slice and in 3D. Points and clicks are for the prompt study (notebook 03).
BASELINE_MODES = ("liver_box", "lesion_boxes", "propagation_3d")




def _best(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, int]:
    i = int(np.argmax(scores))
    return masks[i], i


def _liver_box(pred_ctx, z, gt_liver, gt_tumour, clicks, rng):
    from .prompts import box_from_mask

    box = box_from_mask(gt_liver, jitter=pred_ctx["jitter"], rng=rng)
    if box is None:
        return None, None, 0
    masks, _, _ = pred_ctx["predictor"].predict(box=box)
    return masks[0], None, 1


def _lesion_boxes(pred_ctx, z, gt_liver, gt_tumour, clicks, rng):
    from .prompts import lesion_boxes

    boxes = lesion_boxes(gt_tumour, jitter=pred_ctx["jitter"], rng=rng)
    if len(boxes) == 0:
        return None, None, 0
    masks, _, _ = pred_ctx["predictor"].predict(boxes=boxes)  # (M, 1, H, W): one mask per box
    return None, masks[:, 0].any(axis=0), len(boxes)


def _lesion_points(pred_ctx, z, gt_liver, gt_tumour, clicks, rng):
    from .prompts import centre_point, lesion_components

    out = np.zeros_like(gt_tumour, dtype=bool)
    comps = lesion_components(gt_tumour)
    for comp in comps:
        # One click is ambiguous (SAM's paper): ask for 3 masks and keep the most confident.
        masks, scores, _ = pred_ctx["predictor"].predict(points=centre_point(comp)[None], point_labels=[1],
                                                         multimask_output=True)
        out |= _best(masks, scores)[0]
    return None, (out if comps else None), len(comps)


def _refine(predictor, boxes: np.ndarray, gts: list[np.ndarray], clicks: int) -> tuple[np.ndarray, int]:
    """Boxes, then up to ``clicks`` corrective clicks per object, each round decoded with the
    previous low-res logits as mask input; all objects of a slice in one batch."""
    from .prompts import corrective_click

    masks, _, low = predictor.predict(boxes=boxes)
    cur = masks[:, 0]
    n = len(boxes)
    pts = np.zeros((len(boxes), 0, 2))
    labs = np.zeros((len(boxes), 0), np.int64)
    for _ in range(clicks):
        new = [corrective_click(m, g) for m, g in zip(cur, gts)]
        if all(c is None for c in new):
            break
        # An object already right gets a padding point (label -1), which SAM's prompt encoder ignores.
        pts = np.concatenate([pts, np.array([[c[0] if c else (0.0, 0.0)] for c in new])], axis=1)
        labs = np.concatenate([labs, np.array([[c[1] if c else -1] for c in new])], axis=1)
        masks, _, low = predictor.predict(points=pts, point_labels=labs, boxes=boxes, mask_input=low)
        cur = masks[:, 0]
        n += sum(c is not None for c in new)
    return cur, n


def _corrective(pred_ctx, z, gt_liver, gt_tumour, clicks, rng):
    from .prompts import box_from_mask, lesion_components

    gts = ([gt_liver] if gt_liver.any() else []) + lesion_components(gt_tumour)
    boxes = np.array([box_from_mask(g, jitter=pred_ctx["jitter"], rng=rng) for g in gts])
    masks, n = _refine(pred_ctx["predictor"], boxes, gts, clicks)
    liver = masks[0] if gt_liver.any() else None
    rest = masks[1:] if gt_liver.any() else masks
    tumour = rest.any(axis=0) if len(rest) else None
    return liver, tumour, n


_PER_SLICE = {"liver_box": _liver_box, "lesion_boxes": _lesion_boxes, "lesion_points": _lesion_points,
              "corrective_clicks": _corrective}


def _propagation(predictor, emb, volume, slices, gt, jitter, rng):
    """Liver: box on the slice with the largest liver area; tumour: one box per 3D lesion."""
    from .multi_dimensional_segmentation import propagate_box
    from .prompts import box_from_mask

    depth = gt.shape[0]
    bounds = (min(slices), max(slices))
    sel = np.zeros(depth, bool)
    sel[slices] = True
    liver = np.zeros(gt.shape, bool)
    tumour = np.zeros(gt.shape, bool)
    n = 0
    gl = (gt >= 1) & sel[:, None, None]
    if gl.any():
        z = int(np.argmax(gl.sum(axis=(1, 2))))
        liver, done = propagate_box(predictor, emb, z, box_from_mask(gl[z], jitter=jitter, rng=rng),
                                    volume=volume, bounds=bounds)
        n += len(done)
    lesions, count = ndimage.label((gt == 2) & sel[:, None, None], structure=np.ones((3, 3, 3), bool))
    for i in range(1, count + 1):
        comp = lesions == i
        z = int(np.argmax(comp.sum(axis=(1, 2))))
        m, done = propagate_box(predictor, emb, z, box_from_mask(comp[z], jitter=jitter, rng=rng),
                                volume=volume, bounds=bounds)
        tumour |= m
        n += len(done)
    return liver, tumour, n


def evaluate_zero_shot(
    volume: CTVolume,
    model: SamModel,
    slices,
    modes=None,
    embeddings: VolumeEmbeddings | None = None,
    progress: bool = True,
    *,
    window: str = DEFAULT_WINDOW,
    clicks: int = 3,
    jitter: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """Evaluate prompted ``model`` on ``slices`` of ``volume`` (a CTVolume with a label).

    Defaults: all :data:`MODES`, embeddings from the cache (computed if missing) with the
    ``"abdomen"`` window, 3 corrective clicks, tight boxes (``jitter=0`` px), seed 0.

    Args:
        volume: the CT volume, with its reference label (the prompts are placed from it).
        model: the prompted model.
        slices: axial slices to evaluate (Dice over them as one 3D region).
        modes: prompt modes, from :data:`MODES` (default all).
        embeddings: cached embeddings to reuse (default: from the cache, computed if missing).
        progress: show progress bars.
        window: HU window for encoding.
        clicks: corrective clicks per prompt in ``corrective_clicks``.
        jitter: random box noise in pixels.
        seed: seed of the jitter.

    Returns:
        One dict per mode: ``mode, liver_dice, tumour_dice`` (``None`` where the mode does not
        prompt that structure), ``n_slices, n_prompts, ms_per_prompt, seconds, model, clicks,
        jitter``.

    Raises:
        SamliverError: no label, no slices or slices outside the volume, an unknown mode.
    """
    from tqdm.auto import tqdm

    from .embeddings import embed_volume
    from .prompt_based_segmentation import Predictor

    gt = getattr(volume, "label", None)
    if gt is None:
        raise SamliverError("Zero-shot evaluation needs a reference label: load the volume with its label.")
    slices = sorted({int(z) for z in slices})
    if not slices:
        raise SamliverError("No slices to evaluate: give at least one slice index.")
    if slices[0] < 0 or slices[-1] >= gt.shape[0]:
        raise SamliverError(f"Slices must lie in 0..{gt.shape[0] - 1}; got {slices[0]}..{slices[-1]}.")
    modes = list(MODES if modes is None else modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SamliverError(f"Unknown zero-shot mode(s) {unknown}; choose from {', '.join(MODES)}.")
    if embeddings is None:
        embeddings = embed_volume(volume, model, slices=slices, window=window, progress=progress)
    predictor = Predictor(model)
    ctx = {"predictor": predictor, "jitter": float(jitter)}
    gt_sel = gt[slices]
    rows = []
    for mode in modes:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        liver = np.zeros(gt_sel.shape, bool)
        tumour = np.zeros(gt_sel.shape, bool)
        did_liver = did_tumour = False
        n_prompts = 0
        if mode == "propagation_3d":
            lv, tm, n_prompts = _propagation(predictor, embeddings, volume, slices, gt, jitter, rng)
            liver, tumour = lv[slices], tm[slices]
            did_liver = did_tumour = True
        else:
            fn = _PER_SLICE[mode]
            for i, z in enumerate(tqdm(slices, desc=mode, unit="slice", disable=not progress)):
                gl, gtm = gt[z] >= 1, gt[z] == 2
                if not gl.any() and not gtm.any():
                    continue
                predictor.set_slice(embeddings, z)
                lv, tm, n = fn(ctx, z, gl, gtm, clicks, rng)
                n_prompts += n
                if lv is not None:
                    liver[i] = lv
                if tm is not None:
                    tumour[i] = tm
            did_liver = mode in ("liver_box", "corrective_clicks")
            did_tumour = mode != "liver_box"
        seconds = time.perf_counter() - t0
        rows.append({
            "mode": mode,
            "liver_dice": dice(liver, gt_sel >= 1) if did_liver else None,
            "tumour_dice": dice(tumour, gt_sel == 2) if did_tumour else None,
            "n_slices": len(slices),
            "n_prompts": int(n_prompts),
            "ms_per_prompt": 1000.0 * seconds / max(n_prompts, 1),
            "seconds": seconds,
            "model": model.name,
            "clicks": clicks if mode == "corrective_clicks" else None,
            "jitter": float(jitter),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`evaluate_zero_shot` rows."""

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| mode | liver Dice | tumour Dice | prompts | ms/prompt |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {f(r['liver_dice'])} | {f(r['tumour_dice'])} | {r['n_prompts']} | "
              f"{r['ms_per_prompt']:.1f} |" for r in rows]
    return "\n".join(lines)
