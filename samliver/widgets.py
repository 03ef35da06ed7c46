"""Notebook widgets: a slice browser and a box/click-to-segment widget on an ipympl canvas.

The logic lives in plain methods (``SliceBrowser.set_index``, ``SegmentWidget.on_box``,
``on_click``, ``accept``, ``propagate``, ``save``, ...) that tests call directly; the
matplotlib mouse events only translate gestures into those calls. Every user action is
guarded: bad input (an empty box, a click outside the image, a missing file) shows a message
in the widget's status line instead of a traceback.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .preprocess import WINDOWS, window_to_unit
from .util import SamliverError, fast_mode
from .visualization import CLASS_COLORS, CLASS_NAMES, class_cmap, overlay_rgb

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
# A press/release closer than this (screen pixels) is a click, farther is a box drag.
_CLICK_TOLERANCE_PX = 4.0


def new_figure(figsize: tuple[float, float] = (5.0, 5.0)):
    """A matplotlib Figure on an ipympl canvas (an ipywidget) without pyplot's global state.

    ``fig.canvas.syncing_data_url = False`` works around ipympl 0.10's blank-canvas bug when a
    figure is drawn before the browser connects (Run All, Voila). Falls back to a plain Agg
    canvas when ipympl is not installed (then nothing is clickable).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    try:
        from ipympl.backend_nbagg import new_figure_manager_given_figure

        new_figure_manager_given_figure(id(fig), fig)
        fig.canvas.syncing_data_url = False
        fig.canvas.header_visible = False
        fig.canvas.footer_visible = False
        fig.canvas.toolbar_visible = False
        fig.canvas.resizable = False
    except ImportError:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    return fig


def _guarded(method: Callable) -> Callable:
    """Run a UI action; a SamliverError or unexpected error becomes a status message."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except SamliverError as err:
            self.message(str(err), error=True)
        except Exception as err:  # noqa: BLE001 - the UI must never show a traceback wall
            self.message(f"Unexpected error in {method.__name__}: {type(err).__name__}: {err}", error=True)
        return None

    return wrapper


def _legend_html(classes=(1, 2)) -> str:
    items = []
    for c in classes:
        r, g, b = (int(255 * v) for v in CLASS_COLORS[c])
        items.append(f"<span style='white-space:nowrap'><span style='display:inline-block;width:12px;height:12px;"
                     f"background:rgb({r},{g},{b});margin:0 4px 0 10px;vertical-align:middle'></span>"
                     f"{CLASS_NAMES[c]}</span>")
    return "<span style='white-space:nowrap'><b>legend:</b>" + "".join(items) + "</span>"


def _take(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(arr, index, axis=axis)


# ---------------------------------------------------------------------------------------------
# slice browser


class SliceBrowser:
    """Browse a CT volume: slice slider, HU window presets, label overlay (on/off, opacity),
    legend, and axial / coronal / sagittal views.

    volume: a ``CTVolume`` (its ``label`` is overlaid) or a (z, y, x) HU array.
    label: overrides ``volume.label`` (e.g. a prediction). Defaults: abdomen window, axial,
    opacity 0.4, the middle slice. Display with ``display(browser)`` or ``browser.widget``.
    """

    def __init__(self, volume: Any, label: np.ndarray | None = None, *, window: str = "abdomen",
                 axis: str = "axial", alpha: float = 0.4, figsize: tuple[float, float] = (5.0, 5.0),
                 title: str | None = None) -> None:
        import ipywidgets as widgets

        self.hu = np.asarray(getattr(volume, "hu", volume), dtype=np.float32)
        if self.hu.ndim != 3:
            raise SamliverError(f"SliceBrowser needs a 3D volume (z, y, x), got shape {self.hu.shape}.")
        self.spacing = getattr(volume, "spacing", None)
        self.label = label if label is not None else getattr(volume, "label", None)
        self.title = title or (Path(getattr(volume, "source", "") or "volume").name)
        self.window = window
        self.axis = axis
        self.alpha = float(alpha)
        self.show_overlay = self.label is not None
        self.index = self.hu.shape[AXES[axis]] // 2

        self.fig = new_figure(figsize)
        self.ax = self.fig.add_subplot()
        self._im = None
        self.slider = widgets.IntSlider(value=self.index, min=0, max=self.hu.shape[AXES[axis]] - 1,
                                        description="slice", continuous_update=False)
        self.window_dd = widgets.Dropdown(options=list(WINDOWS), value=window, description="window")
        self.axis_tb = widgets.ToggleButtons(options=list(AXES), value=axis, description="view")
        self.overlay_cb = widgets.Checkbox(value=self.show_overlay, description="label overlay",
                                           disabled=self.label is None)
        self.opacity = widgets.FloatSlider(value=self.alpha, min=0.0, max=1.0, step=0.05,
                                           description="opacity", continuous_update=False)
        self.legend = widgets.HTML(_legend_html())
        self.status = widgets.Label(value="")
        self.slider.observe(lambda ch: self.set_index(ch["new"]), names="value")
        self.window_dd.observe(lambda ch: self.set_window(ch["new"]), names="value")
        self.axis_tb.observe(lambda ch: self.set_axis(ch["new"]), names="value")
        self.overlay_cb.observe(lambda ch: self.set_overlay(on=ch["new"]), names="value")
        self.opacity.observe(lambda ch: self.set_overlay(alpha=ch["new"]), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.axis_tb]),
            widgets.HBox([self.slider, self.window_dd]),
            widgets.HBox([self.overlay_cb, self.opacity, self.legend]),
            self.fig.canvas if isinstance(self.fig.canvas, widgets.DOMWidget) else widgets.Label("(install ipympl)"),
            self.status,
        ])
        self.render()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def message(self, text: str, error: bool = False) -> None:
        self.status.value = ("⚠ " if error else "") + text

    def current(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The displayed slice in [0, 1] and its label slice (or None)."""
        ax = AXES[self.axis]
        img = window_to_unit(_take(self.hu, ax, self.index), self.window)
        lab = None if self.label is None else _take(np.asarray(self.label), ax, self.index)
        return img, lab

    def rgb(self) -> np.ndarray:
        """The displayed RGB image (overlay applied when on)."""
        img, lab = self.current()
        return overlay_rgb(img, lab if self.show_overlay else None, alpha=self.alpha)

    def render(self) -> None:
        """Redraw the figure for the current state."""
        rgb = self.rgb()
        names = {"axial": ("x", "y", "z"), "coronal": ("x", "z", "y"), "sagittal": ("y", "z", "x")}[self.axis]
        unit = "voxels"
        extent = None
        if self.spacing is not None:
            sizes = dict(zip("zyx", self.spacing))
            rows, cols = rgb.shape[:2]
            extent = (0, cols * sizes[names[0]], rows * sizes[names[1]], 0)
            unit = "mm"
        if self._im is None or self._im.get_array().shape != rgb.shape:
            self.ax.clear()
            self._im = self.ax.imshow(rgb, extent=extent, interpolation="nearest",
                                      aspect="auto" if extent is None and self.axis != "axial" else "equal")
        else:
            self._im.set_data(rgb)
            if extent is not None:
                self._im.set_extent(extent)
        self.ax.set_xlabel(f"{names[0]} ({unit})")
        self.ax.set_ylabel(f"{names[1]} ({unit})")
        self.ax.set_title(f"{self.title}: {self.axis} {names[2]} = {self.index}")
        self.fig.canvas.draw_idle()
        self.message(f"showing {self.axis} slice {self.index} ({self.window} window)")

    @_guarded
    def set_index(self, index: int) -> None:
        n = self.hu.shape[AXES[self.axis]]
        if not 0 <= int(index) < n:
            raise SamliverError(f"Slice {index} is outside 0..{n - 1}.")
        self.index = int(index)
        if self.slider.value != self.index:
            self.slider.value = self.index
        self.render()

    @_guarded
    def set_window(self, window: str | tuple[float, float]) -> None:
        window_to_unit(np.zeros(1), window)  # validates
        self.window = window
        self.render()

    @_guarded
    def set_axis(self, axis: str) -> None:
        if axis not in AXES:
            raise SamliverError(f"Unknown view {axis!r}: choose one of {', '.join(AXES)}.")
        self.axis = axis
        n = self.hu.shape[AXES[axis]]
        self.index = n // 2
        with self.slider.hold_trait_notifications():
            self.slider.max = n - 1
            self.slider.value = self.index
        self._im = None
        self.render()

    @_guarded
    def set_overlay(self, on: bool | None = None, alpha: float | None = None) -> None:
        if on is not None:
            self.show_overlay = bool(on) and self.label is not None
        if alpha is not None:
            self.alpha = float(alpha)
        self.render()

    def set_label(self, label: np.ndarray | None) -> None:
        """Show another label volume (e.g. a prediction)."""
        if label is not None and np.asarray(label).shape != self.hu.shape:
            raise SamliverError(f"Label shape {np.asarray(label).shape} != volume shape {self.hu.shape}.")
        self.label = label
        self.overlay_cb.disabled = label is None
        self.show_overlay = label is not None
        self.overlay_cb.value = self.show_overlay
        self.render()


def browse(volume: Any, label: np.ndarray | None = None, **kwargs) -> SliceBrowser:
    """Shortcut for :class:`SliceBrowser` (``display`` the result)."""
    return SliceBrowser(volume, label, **kwargs)


# ---------------------------------------------------------------------------------------------
# segment widget


def box_from_click(hu_slice: np.ndarray, x: float, y: float, *, tolerance_hu: float = 20.0,
                   max_radius: int = 48, margin: int = 3) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) around the region of similar intensity that contains pixel (x, y).

    Box-trained models (LiteMedSAM, MedSAM) give nearly empty masks for a lone point, so a
    click is turned into a box: pixels within ``tolerance_hu`` (default 20 HU) of the median
    around the click, connected to it, inside a window of ``max_radius`` (default 48) pixels;
    the component's bounding box plus ``margin`` (default 3) pixels.
    """
    from scipy import ndimage

    h, w = hu_slice.shape
    xi, yi = int(round(x)), int(round(y))
    y0, y1 = max(0, yi - max_radius), min(h, yi + max_radius + 1)
    x0, x1 = max(0, xi - max_radius), min(w, xi + max_radius + 1)
    patch = ndimage.median_filter(np.asarray(hu_slice[y0:y1, x0:x1], np.float32), size=3)
    cy, cx = yi - y0, xi - x0
    ref = float(np.median(patch[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3]))
    similar = np.abs(patch - ref) <= tolerance_hu
    similar = ndimage.binary_opening(similar, iterations=1)
    similar[cy, cx] = True  # the clicked pixel always belongs to its region
    comps, _ = ndimage.label(similar)
    region = comps == comps[cy, cx]
    ys, xs = np.nonzero(region)
    bx0, bx1 = xs.min() + x0 - margin, xs.max() + x0 + margin
    by0, by1 = ys.min() + y0 - margin, ys.max() + y0 + margin
    # A region smaller than a few pixels gives no useful box: use a small square instead.
    if bx1 - bx0 < 8:
        bx0, bx1 = xi - 6, xi + 6
    if by1 - by0 < 8:
        by0, by1 = yi - 6, yi + 6
    return (int(max(0, bx0)), int(max(0, by0)), int(min(w - 1, bx1)), int(min(h - 1, by1)))


class SegmentWidget:
    """Segment a CT volume slice by slice with SAM prompts, on cached embeddings.

    Drag a box on the image, or click (left / "positive" mode: object, right / "negative" mode:
    not object). With a box-trained model (``litemedsam``, ``medsam_vit_b``) a lone click seeds
    a box from the similar-intensity region around it (:func:`box_from_click`); with SAM ViT
    models points go to SAM as they are. Choose among several masks (multimask), undo / reset,
    accept the mask into a 3D label volume as liver or tumour, propagate it through neighbouring
    slices, save the label as NIfTI. The status line reports the decoder latency.

    volume: ``CTVolume`` (or HU array). model: a ``SamModel`` (default ``get_model("litemedsam")``).
    embeddings: a ``VolumeEmbeddings`` to reuse; slices: those to offer (default all; in FAST
    mode five slices around the middle of the liver). Missing embeddings are computed on demand.
    """

    def __init__(self, volume: Any, model: Any = None, *, embeddings: Any = None,
                 slices: list[int] | None = None, window: str = "abdomen", z: int | None = None,
                 figsize: tuple[float, float] = (5.5, 5.5), out_path: str | None = None) -> None:
        import ipywidgets as widgets

        from .models import get_model

        self.volume = volume
        self.hu = np.asarray(getattr(volume, "hu", volume), dtype=np.float32)
        if self.hu.ndim != 3:
            raise SamliverError(f"SegmentWidget needs a 3D volume (z, y, x), got shape {self.hu.shape}.")
        self.model = model if model is not None else get_model("litemedsam")
        self.window = window
        self.embeddings = embeddings
        depth = self.hu.shape[0]
        if slices is None:
            slices = list(range(depth))
            if fast_mode():
                gt = getattr(volume, "label", None)
                centre = depth // 2
                if gt is not None and (gt >= 1).any():
                    centre = int(np.argmax((gt >= 1).sum(axis=(1, 2))))
                slices = [s for s in range(centre - 2, centre + 3) if 0 <= s < depth]
        self.slices = sorted(int(s) for s in slices)
        self.z = int(z) if z is not None else self.slices[len(self.slices) // 2]
        self.label = np.zeros(self.hu.shape, np.uint8)
        self.box: tuple[int, int, int, int] | None = None
        self.points: list[tuple[float, float, int]] = []
        self.history: list[tuple] = []
        self.masks: np.ndarray | None = None
        self.scores: np.ndarray | None = None
        self.choice = 0
        self.latency_ms: float | None = None
        self.out_path = out_path or "samliver_label.nii.gz"
        self._predictor = None
        self._predictor_z: int | None = None
        self.encode_s: float | None = None  # encoder time of the last prompt, when it had to encode
        self._press: tuple[float, float, float, float, int] | None = None
        self.box_trained = "points" not in tuple(getattr(self.model, "prompt_types", ("points",))) or \
            getattr(self.model, "name", "") in ("litemedsam", "medsam_vit_b")

        self.fig = new_figure(figsize)
        self.ax = self.fig.add_subplot()
        self._im = None
        self._drag_patch = None
        self._prompt_artists: list = []
        is_widget = isinstance(self.fig.canvas, widgets.DOMWidget)
        self.slider = widgets.SelectionSlider(options=self.slices, value=self.z, description="slice",
                                              continuous_update=False)
        self.mode = widgets.ToggleButtons(options=["positive", "negative"], value="positive",
                                          description="click", tooltips=["object", "not object"])
        self.target = widgets.ToggleButtons(options=[("liver", 1), ("tumour", 2)], value=1, description="class")
        self.multimask = widgets.Checkbox(value=False, description="multimask")
        self.mask_choice = widgets.ToggleButtons(options=[("mask 1", 0)], value=0, description="mask")
        self.b_undo = widgets.Button(description="undo", icon="undo")
        self.b_reset = widgets.Button(description="reset", icon="times")
        self.b_accept = widgets.Button(description="accept", button_style="success", icon="check")
        self.b_prop = widgets.Button(description="propagate 3D", button_style="info")
        self.b_save = widgets.Button(description="save NIfTI", icon="save")
        self.path_text = widgets.Text(value=self.out_path, description="save to")
        self.status = widgets.Label(value="")
        self.latency = widgets.Label(value="decoder: - ms", layout=widgets.Layout(margin="0 24px 0 4px"))
        self.slider.observe(lambda ch: self.set_slice(ch["new"]), names="value")
        self.multimask.observe(lambda ch: self.set_multimask(ch["new"]), names="value")
        self._syncing_choice = False
        self.mask_choice.observe(lambda ch: None if self._syncing_choice else self.choose_mask(ch["new"]),
                                 names="value")
        self.b_undo.on_click(lambda _: self.undo())
        self.b_reset.on_click(lambda _: self.reset())
        self.b_accept.on_click(lambda _: self.accept())
        self.b_prop.on_click(lambda _: self.propagate())
        self.b_save.on_click(lambda _: self.save(self.path_text.value))
        if is_widget:
            self.fig.canvas.mpl_connect("button_press_event", self._on_press)
            self.fig.canvas.mpl_connect("motion_notify_event", self._on_motion)
            self.fig.canvas.mpl_connect("button_release_event", self._on_release)
        self.widget = widgets.VBox([
            widgets.HTML("<b>Drag a box</b> around the liver or a tumour, or click inside it "
                         "(right click or 'negative' mode: not object). " + _legend_html()),
            self.slider,
            widgets.HBox([self.mode, self.target]),
            widgets.HBox([self.multimask, self.mask_choice]),
            self.fig.canvas if is_widget else widgets.Label("(install ipympl to draw on the image)"),
            widgets.HBox([self.b_undo, self.b_reset, self.b_accept, self.b_prop]),
            widgets.HBox([self.path_text, self.b_save]),
            widgets.HBox([self.latency, self.status]),
        ])
        self.render()
        self.message(("Drag a box" if self.box_trained else "Drag a box or click") +
                     f" on slice {self.z} ({self.model.name}).")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ---- state -> pixels
    def message(self, text: str, error: bool = False) -> None:
        self.status.value = ("⚠ " if error else "") + text

    @property
    def mask(self) -> np.ndarray | None:
        """The currently chosen 2D mask (bool, H, W) or None."""
        if self.masks is None:
            return None
        return self.masks[min(self.choice, len(self.masks) - 1)]

    def render(self) -> None:
        """Redraw image, accepted labels, the current mask and the prompts."""
        img = window_to_unit(self.hu[self.z], self.window)
        rgb = overlay_rgb(img, self.label[self.z], alpha=0.35)
        m = self.mask
        if m is not None and m.any():
            colour = np.asarray(CLASS_COLORS[int(self.target.value)], np.float32)
            rgb[m] = 0.45 * rgb[m] + 0.55 * colour
        if self._im is None:
            self.ax.clear()
            self._im = self.ax.imshow(rgb, interpolation="nearest")
            self.ax.set_xlabel("x (pixels)")
            self.ax.set_ylabel("y (pixels)")
        else:
            self._im.set_data(rgb)
        self.ax.set_title(f"slice z = {self.z}" + ("" if m is None else f": mask {int(m.sum())} px"))
        for art in self._prompt_artists:
            art.remove()
        self._prompt_artists = []
        if self.box is not None:
            from matplotlib.patches import Rectangle

            x0, y0, x1, y1 = self.box
            self._prompt_artists.append(self.ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.5)))
        for x, y, lab in self.points:
            self._prompt_artists += self.ax.plot([x], [y], "+" if lab else "x", ms=10, mew=2,
                                                 color="lime" if lab else "red")
        self.fig.canvas.draw_idle()

    # ---- prompts
    def _check_xy(self, x: float | None, y: float | None) -> tuple[float, float]:
        h, w = self.hu.shape[1:]
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)) or \
                not (-0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5):
            raise SamliverError(f"The click is outside the image (0..{w - 1} x 0..{h - 1}): click on the slice.")
        return float(x), float(y)

    @_guarded
    def on_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray | None:
        """Prompt with a box (pixel coordinates, any corner order); returns the chosen mask."""
        h, w = self.hu.shape[1:]
        xa, xb = sorted((float(x0), float(x1)))
        ya, yb = sorted((float(y0), float(y1)))
        xa, xb = max(0.0, xa), min(w - 1.0, xb)
        ya, yb = max(0.0, ya), min(h - 1.0, yb)
        if xb - xa < 2 or yb - ya < 2:
            raise SamliverError("The box is empty (narrower than 2 pixels or outside the image): "
                                "drag a box around the structure.")
        self.history.append((self.box, list(self.points)))
        self.box = (int(round(xa)), int(round(ya)), int(round(xb)), int(round(yb)))
        return self._predict()

    @_guarded
    def on_click(self, x: float, y: float, positive: bool = True) -> np.ndarray | None:
        """Prompt with a click (pixel coordinates). See the class doc for box-trained models."""
        x, y = self._check_xy(x, y)
        if self.box_trained and self.box is None:
            if not positive:
                raise SamliverError(f"{self.model.name} is box-trained: drag a box first, then use "
                                    "negative clicks to correct it.")
            self.history.append((self.box, list(self.points)))
            self.box = box_from_click(self.hu[self.z], x, y)
            self.points.append((x, y, 1))
            out = self._predict()
            if out is not None:
                self.message(self.status.value + " (box seeded from the click's region; drag a box "
                             "for a tighter result)")
            return out
        self.history.append((self.box, list(self.points)))
        self.points.append((x, y, 1 if positive else 0))
        return self._predict()

    def _ensure_embedding(self, z: int) -> None:
        """Make sure slice ``z`` has a cached embedding, encoding it (LiteMedSAM: ~0.85 s on a 2-core
        AVX2 CPU with the default OpenVINO backend) if not.

        New slices go into the same cache as ``self.embeddings`` (same window and cache folder).
        """
        from .embeddings import embed_volume

        if self.embeddings is not None and z in self.embeddings:
            return
        self.message(f"encoding slice {z} with {self.model.name} (once; cached for next time) ...")
        kwargs: dict[str, Any] = {"window": self.window}
        if self.embeddings is not None and hasattr(self.embeddings, "window"):
            kwargs["window"] = self.embeddings.window  # the cache's window, not the display's
            kwargs["cache_root"] = Path(self.embeddings.path).parent.parent  # <root>/<model>/<key>
        t0 = time.perf_counter()
        new = embed_volume(self.hu, self.model, slices=[z], progress=False, **kwargs)
        self.encode_s = time.perf_counter() - t0
        if self.embeddings is None or not hasattr(self.embeddings, "window"):
            self.embeddings = new

    def _set_predictor_slice(self) -> None:
        if self._predictor is None:
            from .prompt_based_segmentation import Predictor

            self._predictor = Predictor(self.model)
        if self._predictor_z == self.z:
            return
        self._ensure_embedding(self.z)
        if hasattr(self.embeddings, "model_name"):  # a VolumeEmbeddings cache
            self._predictor.set_slice(self.embeddings, self.z)  # checks model and weights
        else:  # a plain array of embeddings
            self._predictor.set_embedding(np.asarray(self.embeddings[self.z], np.float32), self.hu.shape[1:],
                                          model_name=self.model.name)
        self._predictor_z = self.z

    def _predict(self) -> np.ndarray | None:
        self.encode_s = None
        self._set_predictor_slice()
        points = labels = None
        if self.points:
            points = np.array([[x, y] for x, y, _ in self.points], np.float32)
            labels = np.array([lab for _, _, lab in self.points], np.int64)
        box = None if self.box is None else np.array(self.box, np.float32)
        t0 = time.perf_counter()
        masks, scores, _ = self._predictor.predict(points=points, point_labels=labels, box=box,
                                                   multimask_output=bool(self.multimask.value))
        self.latency_ms = 1000.0 * (time.perf_counter() - t0)
        self.masks = np.asarray(masks, bool).reshape(-1, *self.hu.shape[1:])
        self.scores = np.asarray(scores, np.float32).reshape(-1)
        best = int(np.argmax(self.scores)) if len(self.scores) > 1 else 0
        opts = [(f"mask {i + 1} ({s:.2f})", i) for i, s in enumerate(self.scores)]
        # Options first, then the value (in one hold, the new value would be checked against the
        # old options); the observer ignores these programmatic changes.
        self._syncing_choice = True
        try:
            self.mask_choice.options = opts
            self.mask_choice.value = best
        finally:
            self._syncing_choice = False
        self.choice = best
        self.latency.value = f"decoder: {self.latency_ms:.0f} ms" + \
            ("" if self.encode_s is None else f" (+ encoder {self.encode_s:.1f} s, now cached)")
        self.render()
        n = int(self.mask.sum())
        if n == 0:
            self.message("The model returned an empty mask: drag a tighter box around the structure.", error=True)
        else:
            self.message(f"mask: {n} px on slice {self.z} ({len(self.scores)} candidate(s)); "
                         "accept it or refine with clicks")
        return self.mask

    # ---- actions
    @_guarded
    def set_slice(self, z: int) -> None:
        depth = self.hu.shape[0]
        if not 0 <= int(z) < depth:
            raise SamliverError(f"Slice {z} is outside 0..{depth - 1}.")
        self.z = int(z)
        self.box, self.points, self.history, self.masks, self.scores = None, [], [], None, None
        if self.slider.value != self.z and self.z in self.slices:
            self.slider.value = self.z
        self.render()
        self.message(f"slice {self.z}: drag a box" + ("" if self.box_trained else " or click"))

    @_guarded
    def set_multimask(self, on: bool) -> None:
        if self.multimask.value != bool(on):
            self.multimask.value = bool(on)
        if self.box is not None or self.points:
            self._predict()

    @_guarded
    def choose_mask(self, index: int) -> None:
        if self.masks is None:
            return
        if not 0 <= int(index) < len(self.masks):
            raise SamliverError(f"There is no mask {index + 1}: choose 1..{len(self.masks)}.")
        self.choice = int(index)
        self.render()

    @_guarded
    def undo(self) -> None:
        if not self.history:
            self.message("Nothing to undo.")
            return
        self.box, self.points = self.history.pop()
        if self.box is None and not self.points:
            self.masks = self.scores = None
            self.render()
            self.message("undone: no prompt left")
        else:
            self._predict()

    @_guarded
    def reset(self) -> None:
        self.box, self.points, self.history, self.masks, self.scores = None, [], [], None, None
        self.render()
        self.message("reset: drag a box to start again")

    def _write(self, z: int, mask: np.ndarray, cls: int) -> None:
        sl = self.label[z]
        if cls == 2:
            sl[mask] = 2
        else:
            sl[mask & (sl != 2)] = 1  # accepting liver keeps tumours already marked

    @_guarded
    def accept(self, cls: int | None = None) -> int:
        """Write the current mask into the 3D label as ``cls`` (default: the class toggle)."""
        cls = int(self.target.value if cls is None else cls)
        if cls not in (1, 2):
            raise SamliverError(f"Class must be 1 (liver) or 2 (tumour), got {cls}.")
        m = self.mask
        if m is None or not m.any():
            raise SamliverError("No mask to accept: drag a box first.")
        self._write(self.z, m, cls)
        n = int(m.sum())
        self.box, self.points, self.history, self.masks, self.scores = None, [], [], None, None
        self.render()
        self.message(f"accepted {n} px as {CLASS_NAMES[cls]} on slice {self.z}; "
                     f"label now has {int((self.label == cls).sum())} {CLASS_NAMES[cls]} voxels")
        return n

    @_guarded
    def propagate(self, cls: int | None = None, max_slices: int | None = None, margin: int = 3) -> list[int]:
        """Segment neighbouring slices from the current mask, up and down, and accept them.

        Calls :func:`samliver.multi_dimensional_segmentation.propagate_mask` (MedSAM's 3D recipe:
        each next slice is prompted with the previous mask's box plus ``margin`` pixels, default
        3); it stops at an empty mask, the volume's end or ``max_slices`` per direction (default 3
        in FAST mode, else unlimited). Missing embeddings are computed on the way.
        """
        from .multi_dimensional_segmentation import propagate_mask

        cls = int(self.target.value if cls is None else cls)
        m = self.mask
        if m is None or not m.any():
            raise SamliverError("No mask to propagate: segment a slice first (drag a box).")
        if max_slices is None:
            max_slices = 3 if fast_mode() else self.hu.shape[0]
        self._set_predictor_slice()
        self.message(f"propagating {CLASS_NAMES[cls]} from slice {self.z} ...")
        t0 = time.perf_counter()
        try:
            vol_mask, done = propagate_mask(self._predictor, self.embeddings, self.z, m, volume=self.hu,
                                            margin=margin, max_slices=max_slices)
        finally:
            self._predictor_z = None  # propagation moved the predictor to other slices
        for z in done:
            self._write(z, vol_mask[z], cls)
        self.box, self.points, self.history, self.masks, self.scores = None, [], [], None, None
        self.render()
        self.message(f"propagated {CLASS_NAMES[cls]} to {len(done)} slices "
                     f"(z {min(done)}..{max(done)}) in {time.perf_counter() - t0:.1f} s")
        return sorted(done)

    @_guarded
    def save(self, path: str | None = None) -> Path:
        """Save the 3D label as NIfTI in the source geometry (default ``samliver_label.nii.gz``)."""
        from .io import CTVolume, save_label_nifti

        path = Path(path or self.out_path)
        if not str(path).endswith((".nii", ".nii.gz")):
            raise SamliverError(f"Save path {path} must end in .nii or .nii.gz.")
        vol = self.volume if isinstance(self.volume, CTVolume) else CTVolume(hu=self.hu)
        out = save_label_nifti(self.label, vol, path)
        self.message(f"saved the label ({int((self.label > 0).sum())} voxels) to {out}")
        return out

    # ---- matplotlib events -> the methods above
    def _on_press(self, event) -> None:
        if event.inaxes is not self.ax or event.xdata is None:
            self.message("The click is outside the image: click on the slice.", error=True)
            self._press = None
            return
        self._press = (event.x, event.y, event.xdata, event.ydata, int(event.button or 1))

    def _on_motion(self, event) -> None:
        if self._press is None or event.inaxes is not self.ax or event.xdata is None:
            return
        from matplotlib.patches import Rectangle

        _, _, x0, y0, _ = self._press
        if self._drag_patch is None:
            self._drag_patch = self.ax.add_patch(Rectangle((x0, y0), 0, 0, fill=False, edgecolor="yellow",
                                                           lw=1.0, ls="--"))
        self._drag_patch.set_bounds(min(x0, event.xdata), min(y0, event.ydata),
                                    abs(event.xdata - x0), abs(event.ydata - y0))
        self.fig.canvas.draw_idle()

    def _on_release(self, event) -> None:
        press, self._press = self._press, None
        if self._drag_patch is not None:
            self._drag_patch.remove()
            self._drag_patch = None
        if press is None:
            return
        px, py, x0, y0, button = press
        if np.hypot(event.x - px, event.y - py) <= _CLICK_TOLERANCE_PX:
            positive = button != 3 and self.mode.value == "positive"
            self.on_click(x0, y0, positive=positive)
            return
        if event.xdata is None:  # released outside the axes: clip to the image
            h, w = self.hu.shape[1:]
            x1, y1 = self.ax.transData.inverted().transform((event.x, event.y))
            x1, y1 = float(np.clip(x1, 0, w - 1)), float(np.clip(y1, 0, h - 1))
        else:
            x1, y1 = event.xdata, event.ydata
        self.on_box(x0, y0, x1, y1)


def segment(volume: Any, model: Any = None, **kwargs) -> SegmentWidget:
    """Shortcut for :class:`SegmentWidget` (``display`` the result)."""
    return SegmentWidget(volume, model, **kwargs)
