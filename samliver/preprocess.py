"""HU windows, scaling to [0, 1] and the per-model resize/pad with its coordinate transform.

The resize follows segment-anything's ``ResizeLongestSide``: the longest side becomes
``target`` (new size ``int(side * scale + 0.5)``), the image is zero-padded at the bottom
and right to ``target x target``. Coordinates are pixel coordinates ``(x, y)`` as SAM uses
them (a point at pixel index ``(col, row)``), scaled by ``new_size / old_size`` per axis;
the inverse divides by the same factors, so ``inverse_coords(apply_coords(p)) == p``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .util import SamliverError

# Named HU windows (lo, hi). "abdomen" is W400/L40 as in MedSAM; the others are common in
# liver CT papers.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),
    "liver": (-200.0, 200.0),
    "wide": (-100.0, 400.0),
    "soft_tissue": (-125.0, 225.0),
    "bone": (-450.0, 1050.0),
    "lung": (-1350.0, 150.0),
}


def get_window(window: str | tuple[float, float] = "abdomen") -> tuple[float, float]:
    """Return ``(lo, hi)`` for a window name in :data:`WINDOWS` or a custom ``(lo, hi)`` pair."""
    if isinstance(window, str):
        try:
            return WINDOWS[window]
        except KeyError:
            raise SamliverError(
                f"Unknown HU window {window!r}. Use one of {sorted(WINDOWS)} or a (lo, hi) pair."
            ) from None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise SamliverError(f"HU window must be a name or a (lo, hi) pair, got {window!r}.") from None
    if not hi > lo:
        raise SamliverError(f"HU window {window!r} needs hi > lo.")
    return lo, hi


def window_to_unit(hu: np.ndarray, window: str | tuple[float, float] = "abdomen") -> np.ndarray:
    """Clip HU to a window (default ``"abdomen"`` = [-160, 240]) and scale to float32 [0, 1]."""
    lo, hi = get_window(window)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class SliceTransform:
    """Resize a 2D slice so its longest side is ``target`` (default 256), zero-pad bottom/right.

    ``original_hw``: the slice size ``(H, W)``. ``input_hw``: the size after the resize,
    before padding. Coordinates are ``(x, y)`` in pixels (x = column, y = row).
    """

    def __init__(self, original_hw: tuple[int, int], target: int = 256) -> None:
        h, w = (int(v) for v in original_hw)
        if h <= 0 or w <= 0 or target <= 0:
            raise SamliverError(f"SliceTransform needs positive sizes, got {original_hw} -> {target}.")
        self.original_hw = (h, w)
        self.target = int(target)
        scale = self.target / max(h, w)
        self.input_hw = (int(h * scale + 0.5), int(w * scale + 0.5))
        # per-axis factors (x, y): exact ratios of the integer sizes, as SAM's apply_coords
        self._scale_xy = np.array(
            [self.input_hw[1] / w, self.input_hw[0] / h], dtype=np.float64
        )

    def __repr__(self) -> str:
        return f"SliceTransform(original_hw={self.original_hw}, target={self.target}, input_hw={self.input_hw})"

    # -- images ------------------------------------------------------------------------
    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Resize ``(H, W)`` or ``(H, W, C)`` bilinearly (antialiased when shrinking), pad with 0.

        Returns float32 ``(target, target[, C])``.
        """
        import torch
        import torch.nn.functional as F

        img = np.asarray(image, dtype=np.float32)
        if img.shape[:2] != self.original_hw or img.ndim not in (2, 3):
            raise SamliverError(
                f"apply_image expects shape {self.original_hw} (+ channels), got {img.shape}."
            )
        chw = torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[..., None]))
        chw = chw.permute(2, 0, 1)[None]
        if self.input_hw != self.original_hw:
            shrink = self.input_hw[0] < self.original_hw[0]
            chw = F.interpolate(chw, size=self.input_hw, mode="bilinear", align_corners=False,
                                antialias=shrink)
        out = np.zeros((self.target, self.target, chw.shape[1]), dtype=np.float32)
        out[: self.input_hw[0], : self.input_hw[1]] = chw[0].permute(1, 2, 0).numpy()
        return out if img.ndim == 3 else out[..., 0]

    # -- prompts -----------------------------------------------------------------------
    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` ``(x, y)`` original-pixel coordinates to model-input coordinates."""
        xy = np.asarray(coords, dtype=np.float64)
        return xy * self._scale_xy

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``(..., 4)`` boxes ``x0, y0, x1, y1`` to model-input coordinates."""
        b = np.asarray(boxes, dtype=np.float64)
        return self.apply_coords(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)

    def inverse_coords(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` model-input ``(x, y)`` back to original pixels (exact inverse)."""
        xy = np.asarray(coords, dtype=np.float64)
        return xy / self._scale_xy

    def inverse_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``(..., 4)`` model-input boxes back to original pixels."""
        b = np.asarray(boxes, dtype=np.float64)
        return self.inverse_coords(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)

    # -- masks -------------------------------------------------------------------------
    def _nearest_index(self, n_orig: int, n_input: int, n_frame: int) -> np.ndarray:
        # centre of each original pixel -> model-input frame -> index in an n_frame grid
        centres = (np.arange(n_orig) + 0.5) * (n_input / n_orig) * (n_frame / self.target)
        return np.clip(np.floor(centres).astype(np.int64), 0, n_frame - 1)

    def mask_to_original(self, arr: Any) -> Any:
        """Bring ``(..., h, w)`` maps over the padded ``target`` frame back to ``(..., H, W)``.

        Any resolution works (64x64 logits, 256x256 masks). Float input is upsampled to the
        target frame bilinearly, cropped to ``input_hw`` and resized (as SAM's
        ``postprocess_masks``); bool/int input uses nearest neighbour. NumPy in, NumPy out;
        a torch tensor in gives a tensor out.
        """
        is_t = _is_tensor(arr)
        if not is_t:
            arr = np.asarray(arr)
        if arr.ndim < 2:
            raise SamliverError(f"mask_to_original expects (..., h, w), got shape {tuple(arr.shape)}.")
        fh, fw = int(arr.shape[-2]), int(arr.shape[-1])
        floating = arr.dtype.is_floating_point if is_t else np.issubdtype(arr.dtype, np.floating)
        H, W = self.original_hw
        if not floating:
            rows = self._nearest_index(H, self.input_hw[0], fh)
            cols = self._nearest_index(W, self.input_hw[1], fw)
            if is_t:
                import torch

                r = torch.as_tensor(rows, device=arr.device)
                c = torch.as_tensor(cols, device=arr.device)
                return arr.index_select(-2, r).index_select(-1, c)
            return arr[..., rows[:, None], cols[None, :]]
        import torch
        import torch.nn.functional as F

        t = arr if is_t else torch.from_numpy(np.ascontiguousarray(arr))
        lead = t.shape[:-2]
        t4 = t.reshape(-1, 1, fh, fw)
        src_dtype = t4.dtype
        if src_dtype in (torch.float16, torch.bfloat16):
            t4 = t4.float()
        if (fh, fw) != (self.target, self.target):
            t4 = F.interpolate(t4, size=(self.target, self.target), mode="bilinear", align_corners=False)
        t4 = t4[..., : self.input_hw[0], : self.input_hw[1]]
        if self.input_hw != self.original_hw:
            t4 = F.interpolate(t4, size=self.original_hw, mode="bilinear", align_corners=False)
        out = t4.to(src_dtype).reshape(*lead, H, W)
        return out if is_t else out.numpy()

    def label_to_input(self, label: np.ndarray) -> np.ndarray:
        """Resize an ``(H, W)`` label into the ``(target, target)`` frame (nearest, padding 0), int64."""
        lab = np.asarray(label)
        if lab.shape != self.original_hw:
            raise SamliverError(f"label_to_input expects shape {self.original_hw}, got {lab.shape}.")
        ih, iw = self.input_hw
        H, W = self.original_hw
        rows = np.clip(np.floor((np.arange(ih) + 0.5) * (H / ih)).astype(np.int64), 0, H - 1)
        cols = np.clip(np.floor((np.arange(iw) + 0.5) * (W / iw)).astype(np.int64), 0, W - 1)
        out = np.zeros((self.target, self.target), dtype=np.int64)
        out[:ih, :iw] = lab[rows[:, None], cols[None, :]]
        return out


def parse_window_arg(text: str) -> str | tuple[float, float]:
    """A CLI ``--window`` value: a window name, or ``lo,hi`` in HU (e.g. ``-160,240``).

    Args:
        text: the option's text.

    Returns:
        The name, or ``(lo, hi)`` floats, checked (known name, finite, hi > lo).
    """
    text = str(text).strip()
    if "," not in text:
        if text not in WINDOWS:
            raise SamliverError(f"--window {text!r} is unknown: use one of {', '.join(WINDOWS)} or "
                                "lo,hi in HU (e.g. --window=-160,240).")
        return text
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SamliverError(f"--window {text!r} is not lo,hi in HU: write two numbers, e.g. "
                            "--window=-160,240.") from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise SamliverError(f"--window {text!r} must be finite numbers, e.g. --window=-160,240.")
    return get_window((lo, hi))
