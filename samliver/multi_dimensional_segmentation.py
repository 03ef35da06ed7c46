"""3D segmentation from one 2D prompt: propagate a mask slice by slice through the volume.

MedSAM's recipe for 3D CT: segment a key slice from a box, then prompt each neighbouring slice
with the bounding box of the previous slice's mask plus a small margin, going up and down, and
stop where the mask vanishes. All slices are decoded from cached embeddings; missing ones are
encoded on the way when the volume is given.

Left alone, that recipe leaks: each mask fills the box it was given, the next box is that
mask's box plus the margin, so the box never shrinks with the organ and the mask creeps into
the bowel, stomach or kidney next to the liver (on the sample case, from the largest liver
slice, a third of the voxels it labelled were not liver). Three guards keep it on the organ
(figures in docs/annotation_loop.md): each new mask is cut to the previous mask grown by
``max_shift`` pixels (an outline moves a few pixels per slice), to the key mask's intensity
band (``hu_band`` percentiles of its HU; needs the volume) and to its component that overlaps
the previous mask; a direction stops when the mask no longer resembles the previous one
(IoU below ``min_iou``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .prompts import box_from_mask
from .util import SamliverError

# Leak guards (docs/annotation_loop.md has the measurements that chose them).
MIN_IOU = 0.5
MAX_SHIFT: int | None = 3
HU_BAND: tuple[float, float] | None = (2.0, 98.0)


def _depth(embeddings: Any, volume: Any) -> int:
    if volume is not None:
        return int(np.asarray(getattr(volume, "hu", volume)).shape[0])
    return int(embeddings.key["volume_shape"][0])


def _ensure_slice(predictor: Any, embeddings: Any, z: int, volume: Any) -> None:
    """Point the predictor at slice ``z``, encoding it first if the cache lacks it."""
    if z not in embeddings:
        if volume is None:
            raise SamliverError(
                f"Slice {z} has no cached embedding: pass volume=... so propagation can encode it, "
                f"or embed the slices first (samliver embed)."
            )
        from .embeddings import embed_volume

        embed_volume(volume, predictor.model, slices=[z], window=embeddings.window, progress=False,
                     cache_root=embeddings.path.parent.parent)  # <root>/<model>/<key>
    predictor.set_slice(embeddings, z)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _constrain(mask: np.ndarray, prev: np.ndarray, hu: np.ndarray | None,
               band: tuple[float, float] | None, max_shift: int | None) -> np.ndarray:
    """Cut ``mask`` to what can still be the organ of ``prev`` (see the module doc)."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if band is not None and hu is not None:
        smooth = ndimage.median_filter(np.asarray(hu, np.float32), size=3)  # noise, not edges
        m = m & (smooth >= band[0]) & (smooth <= band[1])
        m = ndimage.binary_opening(m)  # the thin bridges a band leaves between organs
    if max_shift is not None:
        m = m & ndimage.binary_dilation(prev, iterations=int(max_shift))
    if m.any():
        comps, n = ndimage.label(m)
        if n > 1:
            overlap = ndimage.sum_labels(prev, comps, index=np.arange(1, n + 1))
            m = comps == int(np.argmax(overlap)) + 1
        m = ndimage.binary_fill_holes(m)  # vessels inside the liver fall outside the band
    return m


def _grow(box: np.ndarray, margin: float, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    x0, y0, x1, y1 = box
    return np.array([max(0.0, x0 - margin), max(0.0, y0 - margin),
                     min(w - 1.0, x1 + margin), min(h - 1.0, y1 + margin)])


def propagate_mask(
    predictor: Any,
    embeddings: Any,
    z: int,
    mask2d: np.ndarray,
    *,
    volume: Any = None,
    margin: float = 3.0,
    min_area: int = 5,
    max_slices: int | None = None,
    bounds: tuple[int, int] | None = None,
    progress: bool = False,
    min_iou: float | None = MIN_IOU,
    max_shift: int | None = MAX_SHIFT,
    hu_band: tuple[float, float] | None = HU_BAND,
) -> tuple[np.ndarray, list[int]]:
    """Propagate the 2D ``mask2d`` of slice ``z`` up and down the volume.

    Each next slice is prompted with the previous mask's box grown by ``margin`` pixels
    (default 3); a direction stops when the mask has fewer than ``min_area`` pixels (default 5),
    after ``max_slices`` slices (default: no limit) or at ``bounds`` = (first, last) slice
    (default: the whole volume).

    Leak guards (module doc; None turns one off): the mask is cut to the previous mask grown
    by ``max_shift`` pixels (default :data:`MAX_SHIFT`), to the ``hu_band`` percentiles of the
    key mask's HU (default :data:`HU_BAND`; only when ``volume`` is given) and to its component
    overlapping the previous mask; a direction stops when the IoU with the previous mask falls
    below ``min_iou`` (default :data:`MIN_IOU`).

    Returns:
        ``(mask (Z, H, W) bool, sorted list of filled slices)``.
    """
    from tqdm.auto import tqdm

    m0 = np.asarray(mask2d, dtype=bool)
    depth = _depth(embeddings, volume)
    hw = tuple(embeddings.original_hw)
    if m0.shape != hw:
        raise SamliverError(f"The start mask has shape {m0.shape} but the volume's slices are {hw}.")
    if not 0 <= z < depth:
        raise SamliverError(f"Start slice {z} is outside the volume's 0..{depth - 1}.")
    if not m0.any():
        raise SamliverError(f"The start mask on slice {z} is empty: nothing to propagate (draw a box first).")
    lo, hi = (0, depth - 1) if bounds is None else (max(0, int(bounds[0])), min(depth - 1, int(bounds[1])))
    if not lo <= z <= hi:
        raise SamliverError(f"Start slice {z} lies outside the bounds {lo}..{hi}.")
    limit = depth if max_slices is None else int(max_slices)

    hu = None if volume is None else np.asarray(getattr(volume, "hu", volume))
    band = None
    if hu_band is not None and hu is not None:
        band = tuple(float(v) for v in np.percentile(hu[z][m0], [hu_band[0], hu_band[1]]))
    guarded = band is not None or max_shift is not None
    out = np.zeros((depth, *hw), dtype=bool)
    out[z] = m0
    done = [z]
    with tqdm(total=hi - lo, desc="propagating", unit="slice", disable=not progress) as bar:
        for step in (1, -1):
            prev, zz = m0, z + step
            while lo <= zz <= hi and abs(zz - z) <= limit:
                _ensure_slice(predictor, embeddings, zz, volume)
                box = _grow(box_from_mask(prev), margin, hw)
                masks, _, _ = predictor.predict(box=box)
                mask = masks[0]
                bar.update(1)
                if guarded:
                    mask = _constrain(mask, prev, None if hu is None else hu[zz], band, max_shift)
                if mask.sum() < min_area:
                    break
                if min_iou is not None and _iou(mask, prev) < min_iou:
                    break  # not the previous slice's object any more: a jump to another organ
                out[zz] = mask
                done.append(zz)
                prev, zz = mask, zz + step
    return out, sorted(done)


def propagate_box(
    predictor: Any,
    embeddings: Any,
    z: int,
    box,
    *,
    volume: Any = None,
    margin: float = 3.0,
    min_area: int = 5,
    max_slices: int | None = None,
    bounds: tuple[int, int] | None = None,
    progress: bool = False,
    min_iou: float | None = MIN_IOU,
    max_shift: int | None = MAX_SHIFT,
    hu_band: tuple[float, float] | None = HU_BAND,
) -> tuple[np.ndarray, list[int]]:
    """Segment slice ``z`` from ``box`` (x0, y0, x1, y1), then :func:`propagate_mask` it to 3D.

    Same defaults as :func:`propagate_mask`. If the key slice's mask is empty, returns an
    empty volume and ``[]`` rather than failing: a box around nothing segments nothing.
    """
    _ensure_slice(predictor, embeddings, int(z), volume)
    masks, _, _ = predictor.predict(box=np.asarray(box, dtype=np.float64))
    depth = _depth(embeddings, volume)
    if masks[0].sum() < min_area:
        return np.zeros((depth, *embeddings.original_hw), dtype=bool), []
    return propagate_mask(predictor, embeddings, int(z), masks[0], volume=volume, margin=margin,
                          min_area=min_area, max_slices=max_slices, bounds=bounds, progress=progress,
                          min_iou=min_iou, max_shift=max_shift, hu_band=hu_band)
