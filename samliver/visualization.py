"""Figures: the fixed class colours, label overlays and the volume overview.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they work in
scripts, tests and notebooks alike; pass ``path`` to save one (written atomically).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import DEFAULT_WINDOW
from .preprocess import window_to_unit
from .util import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .io import CTVolume

CLASS_NAMES: dict[int, str] = {0: "background", 1: "liver", 2: "tumour"}
# One colour per class across the whole project (Okabe-Ito bluish green / vermillion:
# distinct for colour-blind readers and on grey CT).
CLASS_COLORS: dict[int, tuple[float, float, float]] = {
    1: (0.0, 0.62, 0.45),
    2: (0.90, 0.30, 0.0),
}
# For prediction-vs-truth figures.
ERROR_COLORS: dict[str, tuple[float, float, float]] = {
    "false_positive": (0.95, 0.90, 0.25),
    "false_negative": (0.35, 0.70, 0.90),
}


def class_cmap():
    """A ListedColormap mapping label 0/1/2 to transparent / liver / tumour colours."""
    from matplotlib.colors import ListedColormap

    return ListedColormap([(0, 0, 0, 0), (*CLASS_COLORS[1], 1.0), (*CLASS_COLORS[2], 1.0)], name="samliver")


def legend_handles(classes=(1, 2)) -> list:
    """Matplotlib patches naming each class in its colour (for ``ax.legend(handles=...)``)."""
    from matplotlib.patches import Patch

    return [Patch(facecolor=CLASS_COLORS[c], edgecolor="none", label=CLASS_NAMES[c]) for c in classes]


def overlay_rgb(image_unit: np.ndarray, label: np.ndarray | None, alpha: float = 0.4) -> np.ndarray:
    """Grey ``(H, W)`` image in [0, 1] blended with the class colours of ``label``: float ``(H, W, 3)``."""
    img = np.clip(np.asarray(image_unit, dtype=np.float32), 0.0, 1.0)
    if img.ndim != 2:
        raise ValueError(f"overlay_rgb expects a 2D image, got shape {img.shape}")
    rgb = np.repeat(img[..., None], 3, axis=-1)
    if label is None:
        return rgb
    lab = np.asarray(label)
    if lab.shape != img.shape:
        raise ValueError(f"overlay_rgb: label shape {lab.shape} != image shape {img.shape}")
    for cls, colour in CLASS_COLORS.items():
        m = lab == cls
        if m.any():
            rgb[m] = (1.0 - alpha) * rgb[m] + alpha * np.asarray(colour, dtype=np.float32)
    return rgb


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the extension).

    Args:
        fig: a matplotlib ``Figure`` (from this module; never pyplot state).
        path: the output file (``.png``, ``.pdf``, ``.svg`` ...); its folder is created.
        dpi: resolution of raster formats.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def _centre_indices(volume: "CTVolume") -> tuple[int, int, int]:
    """Slices through the largest tumour area (axial) and the liver's centre (coronal, sagittal)."""
    lab = volume.label
    z0, y0, x0 = (n // 2 for n in volume.shape)
    if lab is None or not (lab >= 1).any():
        return z0, y0, x0
    liver = lab >= 1
    zc, yc, xc = (int(round(c.mean())) for c in np.nonzero(liver))
    tumour_area = (lab == 2).sum(axis=(1, 2))
    z = int(np.argmax(tumour_area)) if tumour_area.max() > 0 else int(np.argmax(liver.sum(axis=(1, 2))))
    return z, yc, xc


def overview_figure(
    volume: "CTVolume",
    path: str | os.PathLike | None = None,
    *,
    window: str | tuple[float, float] = DEFAULT_WINDOW,
    index: tuple[int, int, int] | None = None,
    alpha: float = 0.4,
    title: str | None = None,
) -> "Figure":
    """Axial, coronal and sagittal slices with the label overlay and a class legend.

    Default slices: axial through the largest tumour cross-section, coronal and sagittal
    through the liver's centre (``index=(z, y, x)`` to choose). Axes are in mm when the
    spacing is known, else in voxels (and the title says so). Saves to ``path`` if given.

    Args:
        volume: the CT volume (its label, if any, is overlaid).
        path: also save the figure there.
        window: HU window name or ``(lo, hi)``.
        index: ``(z, y, x)`` of the three planes.
        alpha: opacity of the label overlay.
        title: what the title names the volume by (default: its file name).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    hu = volume.hu
    lab = volume.label
    z, y, x = index if index is not None else _centre_indices(volume)
    unit = window_to_unit(hu, window)
    views = [
        ("axial", f"z = {z}", unit[z], None if lab is None else lab[z], ("x", "y")),
        ("coronal", f"y = {y}", unit[:, y, :], None if lab is None else lab[:, y, :], ("x", "z")),
        ("sagittal", f"x = {x}", unit[:, :, x], None if lab is None else lab[:, :, x], ("y", "z")),
    ]
    sp = volume.spacing
    size = {"z": 0, "y": 1, "x": 2}
    fig = Figure(figsize=(13.5, 5.0), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, where, img, lb, (hax, vax)) in zip(axes, views):
        rows, cols = img.shape
        if sp is not None:
            extent = (0, cols * sp[size[hax]], rows * sp[size[vax]], 0)
            unit_name = "mm"
        else:
            extent = (0, cols, rows, 0)
            unit_name = "voxels"
        ax.imshow(overlay_rgb(img, lb, alpha=alpha), extent=extent, interpolation="nearest")
        ax.set_title(f"{name} ({where})")
        ax.set_xlabel(f"{hax} ({unit_name})")
        ax.set_ylabel(f"{vax} ({unit_name})")
    present = [c for c in (1, 2) if lab is not None and (lab == c).any()]
    if present:
        fig.legend(handles=legend_handles(present), loc="outside lower center", ncol=len(present),
                   frameon=False)
    lo_hi = window if isinstance(window, str) else f"[{window[0]:g}, {window[1]:g}] HU"
    spacing_note = "spacing unknown: axes in voxels" if sp is None else \
        f"spacing {tuple(round(s, 2) for s in sp)} mm (z, y, x)"
    src = title or (Path(volume.source).name if volume.source else "CT volume")
    fig.suptitle(f"{src}: shape {volume.shape} (z, y, x); window {lo_hi}; {spacing_note}")
    if path is not None:
        save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------
# notebook figures (front end)


def hu_histogram_figure(
    volume: "CTVolume",
    windows: tuple[str, ...] = ("abdomen", "liver"),
    path: str | os.PathLike | None = None,
) -> "Figure":
    """Histogram of HU values (all voxels, and per class when a label exists) with window bounds."""
    from matplotlib.figure import Figure

    from .preprocess import get_window

    hu = np.asarray(volume.hu, np.float32)
    fig = Figure(figsize=(8.0, 3.8), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(-1000, 1000, 201)
    ax.hist(np.clip(hu.ravel(), -1000, 1000), bins=bins, color="0.6", label="all voxels", log=True)
    if volume.label is not None:
        for cls in (1, 2):
            vals = hu[volume.label == cls]
            if vals.size:
                ax.hist(np.clip(vals, -1000, 1000), bins=bins, color=CLASS_COLORS[cls], alpha=0.8,
                        label=CLASS_NAMES[cls], log=True)
    styles = ["--", ":", "-."]
    for i, name in enumerate(windows):
        lo, hi = get_window(name)
        for v in (lo, hi):
            ax.axvline(v, color="k", ls=styles[i % 3], lw=1, label=f"{name} window [{lo:g}, {hi:g}]" if v == lo else None)
    ax.set_xlabel("Hounsfield units (HU)")
    ax.set_ylabel("voxel count (log scale)")
    ax.set_title("HU histogram with display windows")
    ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def window_figure(
    volume: "CTVolume",
    z: int,
    windows: tuple[str, ...] = ("abdomen", "liver", "wide", "bone"),
    path: str | os.PathLike | None = None,
) -> "Figure":
    """One axial slice under several HU windows, side by side."""
    from matplotlib.figure import Figure

    from .preprocess import get_window

    fig = Figure(figsize=(3.2 * len(windows), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(windows)))
    for ax, name in zip(axes, windows):
        lo, hi = get_window(name)
        ax.imshow(window_to_unit(volume.hu[z], name), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name}: [{lo:g}, {hi:g}] HU")
        ax.set_xlabel("x (voxels)")
        ax.set_ylabel("y (voxels)")
    fig.suptitle(f"axial slice z = {z} under different HU windows")
    if path is not None:
        save_figure(fig, path)
    return fig


def prediction_figure(
    volume: "CTVolume",
    prediction: np.ndarray,
    slices: list[int],
    *,
    window: str | tuple[float, float] = DEFAULT_WINDOW,
    alpha: float = 0.45,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> "Figure":
    """Rows: slices; columns: CT, reference label (if any), prediction; class colours and legend."""
    from matplotlib.figure import Figure

    slices = list(slices)
    has_gt = volume.label is not None
    cols = 3 if has_gt else 2
    fig = Figure(figsize=(3.1 * cols, 3.0 * len(slices) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(slices), cols))
    for r, z in enumerate(slices):
        img = window_to_unit(volume.hu[z], window)
        panels = [("CT", None)] + ([("reference", volume.label[z])] if has_gt else []) + [("prediction", prediction[z])]
        for c, (name, lab) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(overlay_rgb(img, lab, alpha=alpha), interpolation="nearest")
            ax.set_title(f"{name}, z = {z}")
            ax.set_xlabel("x (voxels)")
            ax.set_ylabel("y (voxels)")
    fig.legend(handles=legend_handles(), loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(title or "prediction vs reference")
    if path is not None:
        save_figure(fig, path)
    return fig


def zero_shot_figure(rows: list[dict], path: str | os.PathLike | None = None,
                     title: str = "zero-shot SAM: Dice by prompt type") -> "Figure":
    """Bar chart of liver and tumour Dice per prompt mode (rows from ``evaluate_zero_shot``)."""
    from matplotlib.figure import Figure

    modes = [str(r.get("mode", f"run {i}")) for i, r in enumerate(rows)]
    fig = Figure(figsize=(max(5.0, 1.2 * len(modes) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(modes))
    for off, (key, cls) in zip((-0.2, 0.2), (("liver_dice", 1), ("tumour_dice", 2))):
        vals = [r.get(key) for r in rows]
        ax.bar(x + off, [np.nan if v is None else float(v) for v in vals], width=0.4,
               color=CLASS_COLORS[cls], label=CLASS_NAMES[cls])
    ax.set_xticks(x, modes, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_xlabel("prompt")
    ax.set_ylabel("Dice (0-1)")
    ax.set_title(title)
    ax.legend(title="class")
    if path is not None:
        save_figure(fig, path)
    return fig


def training_curves_figure(history: dict) -> "Figure":
    """Training loss (smoothed) and validation Dice against step.

    Args:
        history: ``TrainResult.history`` (``step``, ``loss``, ``val_step``, ``val_liver``,
            ``val_tumour``, ``val_on``).

    Returns:
        A two-panel ``Figure``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    loss = np.asarray(history.get("loss", []), float)
    if loss.size:
        k = max(1, loss.size // 30)  # a running mean over ~30 points: the raw loss is noisy
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a.plot(history["step"][: smooth.size], smooth)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    b.plot(history.get("val_step", []), history.get("val_liver", []), "o-", label="liver")
    b.plot(history.get("val_step", []), history.get("val_tumour", []), "s-", label="tumour")
    titles = {"train": "Dice on the training slices", "held-out": "validation Dice (held-out slices)"}
    b.set(xlabel="step", ylabel="Dice", ylim=(0, 1),
          title=titles.get(history.get("val_on"), "validation Dice"))
    b.legend()
    return fig


def label_efficiency_figure(rows: list[dict]) -> "Figure":
    """Dice against labelled slices K per method (mean and sd band), one column per protocol.

    Args:
        rows: summarised records (``experiment.summarise``): ``method``, ``protocol``, ``k``,
            ``liver_dice``/``tumour_dice`` and their ``_sd``. Methods with K = 0 (zero-shot) are
            drawn as dashed reference lines.

    Returns:
        A ``Figure`` with liver (top) and tumour (bottom) rows.
    """
    from matplotlib.figure import Figure

    protocols = sorted({r["protocol"] for r in rows}) or [""]
    fig = Figure(figsize=(5 * len(protocols), 7), layout="constrained")
    axes = fig.subplots(2, len(protocols), squeeze=False)
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
                sd = np.array([r.get(key + "_sd") or 0.0 for r in m])
                ax.plot(x, y, "o-", label=method)
                ax.fill_between(x, y - sd, y + sd, alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="labelled slices K", ylabel=key.replace("_", " "), ylim=(0, 1),
                   title=f"{protocol}: {key.split('_')[0]}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return fig


def comparison_figure(volume: "CTVolume", prediction: np.ndarray, slices: list[int],
                      window: str | tuple[float, float] = DEFAULT_WINDOW) -> "Figure":
    """Reference label beside the prediction on chosen axial slices (one row per slice).

    Args:
        volume: the CT volume with its reference ``label``.
        prediction: predicted label volume (z, y, x).
        slices: axial slice indices to show.
        window: HU window name or (low, high).

    Returns:
        A ``Figure`` with two columns (ground truth, prediction) and a class legend.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3 * len(slices)), layout="constrained")
    axes = fig.subplots(len(slices), 2, squeeze=False)
    for row, z in enumerate(slices):
        img = window_to_unit(volume.hu[z], window)
        for col, (lab, name) in enumerate(((volume.label[z], "ground truth"), (prediction[z], "prediction"))):
            ax = axes[row][col]
            ax.imshow(overlay_rgb(img, lab))
            ax.set_title(f"z={z}: {name}", fontsize=9)
            ax.axis("off")
    fig.legend(handles=legend_handles(), loc="outside lower center", ncol=2, fontsize=8)
    return fig


def prompt_figure(slice_hu: np.ndarray, mask: np.ndarray, *, box=None, points=None, labels=None,
                  window: str | tuple[float, float] = DEFAULT_WINDOW) -> "Figure":
    """One slice with a mask overlay and the prompts that made it (box, +/- points).

    Args:
        slice_hu: (H, W) slice in HU.
        mask: (H, W) boolean mask.
        box: ``(x0, y0, x1, y1)`` or None.
        points: (N, 2) ``(x, y)`` points or None; ``labels``: 1 positive / 0 negative each.
        window: HU window name or (low, high).

    Returns:
        A ``Figure``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.imshow(overlay_rgb(window_to_unit(slice_hu, window), np.asarray(mask).astype(np.uint8), alpha=0.4))
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.5))
    if points is not None:
        for (x, y), lab in zip(points, labels if labels is not None else [1] * len(points)):
            ax.plot(x, y, "o", color="lime" if lab else "red", ms=6)
    ax.set_axis_off()
    return fig


def annotation_sim_figure(records: list[dict], path: str | os.PathLike | None = None,
                          title: str = "simulated annotator: whole-volume Dice vs slices labelled"
                          ) -> "Figure":
    """Liver and tumour Dice against confirmed slices, one line per strategy.

    Args:
        records: rounds from ``samliver.annotate_sim.simulate`` (keys ``strategy``, ``seed``,
            ``slices``, ``liver_dice``, ``tumour_dice``).
        path: where to save the figure (PNG/SVG/PDF by extension), or None.
        title: the figure title.

    Returns:
        The matplotlib ``Figure``: the mean over seeds as a line, the range over seeds as a
        band.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    strategies = sorted({str(r["strategy"]) for r in records})
    colours = {"suggest": "tab:red", "even": "tab:blue", "random": "tab:grey"}
    for ax, (key, cls) in zip(axes, (("liver_dice", 1), ("tumour_dice", 2))):
        for s in strategies:
            rows = [r for r in records if r["strategy"] == s and r.get(key) is not None]
            xs = sorted({int(r["slices"]) for r in rows})
            if not xs:
                continue
            vals = [[float(r[key]) for r in rows if int(r["slices"]) == x] for x in xs]
            seeds = len({r["seed"] for r in rows})
            colour = colours.get(s)
            ax.plot(xs, [np.mean(v) for v in vals], marker="o", color=colour,
                    label=f"{s} ({seeds} seed{'s' if seeds != 1 else ''})")
            ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=colour,
                            alpha=0.15, linewidth=0)
        ax.set_xlabel("slices confirmed")
        ax.set_ylabel(f"{CLASS_NAMES[cls]} Dice (whole volume)")
        ax.set_title(CLASS_NAMES[cls])
        ax.grid(alpha=0.3)
    axes[0].legend(title="next slice", loc="lower right")
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig
