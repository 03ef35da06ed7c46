"""Segmentation metrics as the LiTS benchmark defines them (Bilic et al., MedIA 2023).

NumPy arrays in, plain Python floats / ints / dicts out. Masks are cast to bool
(non-zero = foreground). Label volumes use the LiTS classes: 0 background, 1 liver,
2 tumour; "liver" is evaluated as ``label >= 1`` (liver including tumour, as LiTS does)
and "tumour" as ``label == 2``.

Overlap and volume metrics (P = prediction, G = ground truth):

=========  =====================================  =============================================
metric     definition                             empty masks
=========  =====================================  =============================================
Dice       2|P & G| / (|P| + |G|)                 both empty 1.0; one empty 0.0
Jaccard    |P & G| / |P | G|                      both empty 1.0; one empty 0.0
VOE        1 - Jaccard                            both empty 0.0; one empty 1.0
RVD        (|P| - |G|) / |G| (signed: > 0 means   both empty 0.0; G empty, P not: nan
           over-segmentation)
=========  =====================================  =============================================

Surface distances (computed with MONAI's edge and KD-tree code,
``monai.metrics.utils.get_edge_surface_distance``; the surface of a mask is its foreground
voxels that a 3x3(x3) cross erosion removes, and distances go between surface voxel centres):

=========  =====================================  =============================================
metric     definition                             empty masks
=========  =====================================  =============================================
ASSD       mean of all surface distances P->G     both empty 0.0; exactly one empty nan
           and G->P pooled (MONAI ``symmetric``)
MSD        maximum symmetric surface distance     same
           (Hausdorff distance)
HD95       max of the two directed 95th           same
           percentiles (MONAI's HD95)
=========  =====================================  =============================================

Distances are in millimetres when a voxel ``spacing`` (z, y, x) is given and in voxels when
it is ``None`` (the result of :func:`evaluate_volume` says which in ``distance_unit``).
**Exactly one empty mask gives nan**: LiTS scores such a case with the worst possible value,
which has no finite size; we return nan so a caller can choose (drop it with ``nanmean``, as
:func:`summarise` does while counting it, or substitute a worst value of their own). A Dice of
0.0 for the same case still records the failure.

Lesion detection (:func:`lesion_detection`): tumour components in 3D (26-connected by
default, as :func:`samliver.io.count_lesions`); a ground-truth lesion is detected when a
predicted component overlaps it with IoU > 0.5 (one-to-one). Empty conventions: nothing to
find and nothing predicted gives precision = recall = F1 = 1.0; no predictions gives
precision 1.0 (no false alarms), no ground-truth lesions gives recall 1.0 (nothing missed);
F1 = 2 TP / (n_gt + n_pred) in every case.

LiTS also reports "Dice global" (:func:`global_dice`: all intersections over all sizes, so
large cases weigh more) beside the mean per-case Dice (:func:`per_case_dice`).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np

from .util import SamliverError

__all__ = [
    "dice",
    "jaccard",
    "voe",
    "rvd",
    "surface_distances",
    "assd",
    "msd",
    "hd95",
    "lesion_detection",
    "evaluate_volume",
    "global_dice",
    "per_case_dice",
    "summarise",
    "CLASS_KEYS",
]

# Key prefix per LiTS class in evaluate_volume's dict.
CLASS_KEYS = {1: "liver", 2: "tumour"}


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of the same shape (SamliverError naming both otherwise)."""
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise SamliverError(
            f"Prediction shape {p.shape} does not match ground-truth shape {g.shape}: "
            "evaluate masks of the same volume / slices."
        )
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


def _spacing(spacing, ndim: int) -> tuple[float, ...] | None:
    """Validated spacing for an ndim array; a (z, y, x) spacing with 2D masks uses (y, x)."""
    if spacing is None:
        return None
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    elif sp.size == 3 and ndim == 2:
        sp = sp[1:]  # one axial slice of a (z, y, x) volume: in-plane spacing only
    if sp.size != ndim or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise SamliverError(
            f"Spacing {tuple(np.ravel(spacing))} does not fit masks with {ndim} dimensions: "
            f"give {ndim} positive voxel sizes in mm (z, y, x order), or None for voxel units."
        )
    return tuple(float(v) for v in sp)


def _crop_to_union(p: np.ndarray, g: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus ``margin`` voxels.

    Surface distances are translation invariant and the erosion that finds the surface
    treats the array border as background, so this changes no distance; it only saves time.
    """
    idx = np.nonzero(p | g)
    sl = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    return p[sl], g[sl]


# ----------------------------------------------------------------------------------------
# overlap and volume
# ----------------------------------------------------------------------------------------
def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|) of two masks (cast to bool).

    Both empty gives 1.0 (nothing to find, nothing found); exactly one empty gives 0.0.

    Args:
        pred: predicted mask.
        gt: reference mask of the same shape.

    Returns:
        Dice in [0, 1].

    Raises:
        SamliverError: the shapes differ.
    """
    p, g = _pair(pred, gt)
    s = int(p.sum()) + int(g.sum())
    if s == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, g).sum() / s)


def label_dice(pred_label: np.ndarray, gt_label: np.ndarray) -> dict[str, float]:
    """Liver and tumour Dice of two label arrays (0 background, 1 liver, 2 tumour), as one region.

    Liver is ``label >= 1`` (the organ including its lesions), tumour is ``label == 2``; each
    is one Dice over the whole array (global Dice over a stack of slices), the figure every
    table in the project reports.

    Args:
        pred_label: predicted labels, any shape.
        gt_label: reference labels, the same shape.

    Returns:
        ``{"liver_dice": float, "tumour_dice": float}``.
    """
    p, g = np.asarray(pred_label), np.asarray(gt_label)
    return {"liver_dice": dice(p >= 1, g >= 1), "tumour_dice": dice(p == 2, g == 2)}


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index (IoU) |P & G| / |P | G|; both empty 1.0, exactly one empty 0.0."""
    p, g = _pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def voe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Volumetric overlap error 1 - Jaccard; both empty 0.0, exactly one empty 1.0."""
    return 1.0 - jaccard(pred, gt)


def rvd(pred: np.ndarray, gt: np.ndarray) -> float:
    """Relative volume difference (|P| - |G|) / |G|, signed (> 0: over-segmentation).

    Ground truth empty: 0.0 if the prediction is empty too, else nan (undefined).
    """
    p, g = _pair(pred, gt)
    ng, np_ = int(g.sum()), int(p.sum())
    if ng == 0:
        return 0.0 if np_ == 0 else math.nan
    return float((np_ - ng) / ng)


# ----------------------------------------------------------------------------------------
# surface distances (MONAI)
# ----------------------------------------------------------------------------------------
def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred -> gt, gt -> pred)`` as float64 arrays.

    One value per surface voxel of the first mask: the distance from its centre to the
    nearest surface voxel centre of the other, in mm with ``spacing`` (z, y, x; for 2D
    masks (y, x), or a (z, y, x) spacing whose z is ignored) and in voxels without.
    Uses MONAI's ``get_edge_surface_distance`` on the masks cropped to their union's
    bounding box. Both masks must be non-empty (SamliverError otherwise: the distances are
    undefined; :func:`assd` and friends apply the empty conventions).
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        raise SamliverError("Surface distances need two non-empty masks; one (or both) is empty.")
    p, g = _crop_to_union(p, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; we handled those above
        _, dists, _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(p)), torch.from_numpy(np.ascontiguousarray(g)),
            distance_metric="euclidean", spacing=sp, symmetric=True,
        )
    d_pg, d_gp = (np.asarray(d.detach().cpu().numpy(), dtype=np.float64).ravel() for d in dists)
    return d_pg, d_gp


def _distance_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None) -> dict[str, float]:
    """ASSD, MSD and HD95 from one MONAI surface computation, with the empty conventions."""
    p, g = _pair(pred, gt)
    _spacing(spacing, p.ndim)  # validate even when the masks are empty
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return {"assd": 0.0, "msd": 0.0, "hd95": 0.0}
    if has_p != has_g:
        return {"assd": math.nan, "msd": math.nan, "hd95": math.nan}
    d_pg, d_gp = surface_distances(p, g, spacing)
    both = np.concatenate([d_pg, d_gp])
    # Same reductions as monai.metrics.compute_average_surface_distance(symmetric=True) and
    # compute_hausdorff_distance(percentile=95 / None); torch.quantile and np.quantile both
    # interpolate linearly.
    return {
        "assd": float(both.mean()),
        "msd": float(max(d_pg.max(), d_gp.max())),
        "hd95": float(max(np.quantile(d_pg, 0.95), np.quantile(d_gp, 0.95))),
    }


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance (mm with ``spacing``, else voxels).

    Both empty 0.0; exactly one empty nan (see the module docstring).
    """
    return _distance_metrics(pred, gt, spacing)["assd"]


def msd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Maximum symmetric surface distance (Hausdorff distance); empty conventions as :func:`assd`."""
    return _distance_metrics(pred, gt, spacing)["msd"]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance (max of the two directed 95th percentiles, as MONAI).

    Empty conventions as :func:`assd`.
    """
    return _distance_metrics(pred, gt, spacing)["hd95"]


# ----------------------------------------------------------------------------------------
# lesion detection
# ----------------------------------------------------------------------------------------
def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, min(max(int(connectivity), 1), mask.ndim))
    lab, n = ndimage.label(mask, structure=structure)
    return lab, int(n)


def lesion_detection(pred_tumour: np.ndarray, gt_tumour: np.ndarray, iou_threshold: float = 0.5,
                     connectivity: int = 3) -> dict:
    """Per-lesion detection counts as LiTS scores them.

    Lesions are connected components of each mask (``connectivity`` 3 = 26-connected in 3D,
    the same as :func:`samliver.io.count_lesions`; capped at the array's dimension, so 2D
    masks use 8-connectivity by default). A ground-truth lesion counts as detected (a true
    positive) when a predicted component overlaps it with IoU > ``iou_threshold`` (default
    0.5). Matching is one-to-one, greedy by decreasing IoU; for thresholds >= 0.5 that is
    exact, since one component cannot reach IoU > 0.5 with two disjoint others. So a
    prediction merging two lesions usually detects neither and counts as one false positive.

    Returns ``dict(n_gt, n_pred, tp, fp, fn, precision, recall, f1)``, counts as ints and
    rates as floats: precision = tp / n_pred (1.0 with no predictions), recall = tp / n_gt
    (1.0 with no ground-truth lesions), f1 = 2 tp / (n_gt + n_pred) (1.0 when both are 0).
    """
    p, g = _pair(pred_tumour, gt_tumour)
    gl, n_gt = _components(g, connectivity)
    pl, n_pred = _components(p, connectivity)
    tp = 0
    if n_gt and n_pred:
        # Overlap counts between every gt and pred component in one pass.
        both = (gl > 0) & (pl > 0)
        inter = np.zeros((n_gt + 1, n_pred + 1), dtype=np.int64)
        np.add.at(inter, (gl[both], pl[both]), 1)
        size_g = np.bincount(gl.ravel(), minlength=n_gt + 1)
        size_p = np.bincount(pl.ravel(), minlength=n_pred + 1)
        gi, pi = np.nonzero(inter)
        ious = inter[gi, pi] / (size_g[gi] + size_p[pi] - inter[gi, pi])
        used_g, used_p = set(), set()
        for k in np.argsort(-ious, kind="stable"):
            if ious[k] <= iou_threshold:
                break
            if gi[k] in used_g or pi[k] in used_p:
                continue
            used_g.add(gi[k])
            used_p.add(pi[k])
        tp = len(used_g)
    return {
        "n_gt": n_gt,
        "n_pred": n_pred,
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        "precision": float(tp / n_pred) if n_pred else 1.0,
        "recall": float(tp / n_gt) if n_gt else 1.0,
        "f1": float(2 * tp / (n_gt + n_pred)) if (n_gt + n_pred) else 1.0,
    }


# ----------------------------------------------------------------------------------------
# whole volumes and aggregates
# ----------------------------------------------------------------------------------------
def lesion_scores(pred_label: np.ndarray, gt_label: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """What a clinician reads beside Dice: lesion detection and the tumour-burden error.

    Args:
        pred_label: predicted labels (0 background, 1 liver, 2 tumour), a volume or a stack.
        gt_label: reference labels, the same shape.
        iou_threshold: a reference lesion is found when a predicted one overlaps it with IoU
            above this (default 0.5, as LiTS scores detection).

    Returns:
        ``{"lesion_precision", "lesion_recall", "lesion_f1"}`` from :func:`lesion_detection`
        on the tumour masks (26-connected 3D components), and ``"burden_error"``: predicted
        minus true tumour volume over the true one (0.1 = 10 % too much; NaN without tumour).
    """
    p, g = np.asarray(pred_label) == 2, np.asarray(gt_label) == 2
    det = lesion_detection(p, g, iou_threshold=iou_threshold)
    true = int(g.sum())
    return {"lesion_precision": det["precision"], "lesion_recall": det["recall"], "lesion_f1": det["f1"],
            "burden_error": float((int(p.sum()) - true) / true) if true else float("nan")}


def _class_mask(label: np.ndarray, c: int) -> np.ndarray:
    # LiTS: the liver is evaluated including its tumours.
    return label >= 1 if c == 1 else label == c


def evaluate_volume(pred_label: np.ndarray, gt_label: np.ndarray, spacing: Sequence[float] | None = None,
                    classes: Sequence[int] = (1, 2), distances: bool = True) -> dict:
    """All LiTS metrics for one predicted label volume (or slice) against the reference.

    ``pred_label`` and ``gt_label`` are integer label arrays (0 background, 1 liver,
    2 tumour) of the same shape, 3D (z, y, x) or 2D (y, x). ``spacing`` is the voxel size
    in mm (z, y, x; None = distances in voxels). ``classes`` picks the classes (default
    liver = label >= 1 and tumour = label == 2; any other class c is ``label == c`` under
    the key ``class<c>``). ``distances=False`` skips the surface distances (the slow part).

    Args:
        pred_label: predicted labels.
        gt_label: reference labels, the same shape.
        spacing: voxel size in mm, or None.
        classes: the classes to score.
        distances: compute the surface distances.

    Returns:
        A flat dict: ``<cls>_dice, _jaccard, _voe, _rvd, _assd, _msd, _hd95,
        _n_pred_voxels, _n_gt_voxels`` per class, for the tumour class also ``tumour_n_gt,
        tumour_n_pred, tumour_tp, tumour_fp, tumour_fn, tumour_precision, tumour_recall,
        tumour_f1`` from :func:`lesion_detection`, and ``distance_unit`` ("mm" or "voxels").
        Values are Python floats / ints (nan where undefined; see the module docstring).

    Raises:
        SamliverError: shapes that differ, or arrays that are neither 2D nor 3D.
    """
    pred, gt = np.asarray(pred_label), np.asarray(gt_label)
    if pred.shape != gt.shape:
        raise SamliverError(
            f"Predicted label shape {pred.shape} does not match ground-truth label shape {gt.shape}: "
            "evaluate the prediction on the same volume / slices as the reference."
        )
    if pred.ndim not in (2, 3):
        raise SamliverError(f"evaluate_volume takes 2D (y, x) or 3D (z, y, x) labels, got shape {pred.shape}.")
    sp = _spacing(spacing, pred.ndim)
    out: dict = {}
    for c in classes:
        name = CLASS_KEYS.get(int(c), f"class{int(c)}")
        p, g = _class_mask(pred, int(c)), _class_mask(gt, int(c))
        out[f"{name}_dice"] = dice(p, g)
        out[f"{name}_jaccard"] = jaccard(p, g)
        out[f"{name}_voe"] = 1.0 - out[f"{name}_jaccard"]
        out[f"{name}_rvd"] = rvd(p, g)
        if distances:
            for k, v in _distance_metrics(p, g, sp).items():
                out[f"{name}_{k}"] = v
        out[f"{name}_n_pred_voxels"] = int(p.sum())
        out[f"{name}_n_gt_voxels"] = int(g.sum())
        if int(c) == 2:
            for k, v in lesion_detection(p, g).items():
                out[f"{name}_{k}"] = v
    out["distance_unit"] = "voxels" if sp is None else "mm"
    return out


def global_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """LiTS "Dice global": 2 sum|P & G| / sum(|P| + |G|) over all (pred, gt) mask pairs.

    Large cases weigh more than in the per-case mean. 1.0 when every mask is empty.
    """
    inter = total = 0
    for pred, gt in pairs:
        p, g = _pair(pred, gt)
        inter += int(np.logical_and(p, g).sum())
        total += int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else float(2.0 * inter / total)


def per_case_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean of the per-case :func:`dice` over (pred, gt) mask pairs (nan for no pairs)."""
    scores = [dice(p, g) for p, g in pairs]
    return float(np.mean(scores)) if scores else math.nan


def summarise(rows: Iterable[dict]) -> dict:
    """Average metric dicts (e.g. :func:`evaluate_volume` results per case) with nanmean.

    Numeric keys get their nanmean (nan if all are nan) and, where some values were nan,
    ``<key>_n_nan`` counts them, so dropped cases (e.g. a surface distance with one empty
    mask) stay visible. ``n_cases`` is the number of rows; string values (``distance_unit``)
    are kept when all rows agree, else joined with "/".
    """
    rows = list(rows)
    out: dict = {"n_cases": len(rows)}
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] is not None]
        if vals and all(isinstance(v, str) for v in vals):
            out[k] = "/".join(sorted(set(vals)))
            continue
        nums = np.array([float(v) for v in vals if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)],
                        dtype=np.float64)
        if nums.size == 0:
            continue
        n_nan = int(np.isnan(nums).sum())
        out[k] = float(np.nanmean(nums)) if n_nan < nums.size else math.nan
        if n_nan:
            out[f"{k}_n_nan"] = n_nan
    return out
