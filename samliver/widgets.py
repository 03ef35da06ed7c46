"""Notebook widgets: a slice browser, a box/click segment widget and the annotation loop.

:class:`SegmentWidget` and :class:`AnnotateWidget` are thin views over
:class:`samliver.annotate.Session`, which holds every prompt, mask, label, head and undo step;
the widgets translate gestures (matplotlib mouse events on an ipympl canvas, buttons) into
session calls and draw the session's state. Their plain methods (``on_box``, ``accept``,
``train``, ``suggest_next``, ...) are what tests call. Every user action is guarded: bad input
(an empty box, a click outside the image, training with nothing confirmed) shows a message in
the status line next to the buttons instead of a traceback; long actions run in a worker
thread with the buttons disabled, a progress bar and elapsed seconds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .annotate import box_from_click  # noqa: F401 - part of this module's interface since the first widget
from .preprocess import WINDOWS, window_to_unit
from .util import SamliverError, fast_mode
from .visualization import CLASS_COLORS, CLASS_NAMES, overlay_rgb

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

    def set_label(self, label: np.ndarray | None, name: str | None = None) -> None:
        """Show another label volume (e.g. a prediction), named in the title (``name``, e.g.
        "head prediction") so that nobody takes it for the reference."""
        if label is not None and np.asarray(label).shape != self.hu.shape:
            raise SamliverError(f"Label shape {np.asarray(label).shape} != volume shape {self.hu.shape}.")
        self.label = label
        if name:
            self.title = f"{self.title.split(' | overlay: ')[0]} | overlay: {name}"
        self.overlay_cb.disabled = label is None
        self.show_overlay = label is not None
        self.overlay_cb.value = self.show_overlay
        self.render()


def browse(volume: Any, label: np.ndarray | None = None, **kwargs) -> SliceBrowser:
    """Shortcut for :class:`SliceBrowser` (``display`` the result)."""
    return SliceBrowser(volume, label, **kwargs)


# ---------------------------------------------------------------------------------------------
# segment and annotate widgets: thin views over samliver.annotate.Session

# SAM's mask before it is accepted: magenta, a colour no label class uses, so a fresh mask is
# never mistaken for an accepted one.
CANDIDATE_COLOR: tuple[float, float, float] = (0.85, 0.15, 0.85)
# Per-slice state on the strip under the slice slider: unlabelled, predicted, confirmed.
STATE_COLORS = {0: "#d9d9d9", 1: "#9ecae1", 2: "#08519c"}
STATE_NAMES = {0: "unlabelled", 1: "predicted by the head", 2: "confirmed by you"}
SUGGEST_COLOR = "#e69f00"
SCORES_HELP = ("scores: SAM's own estimate of how well each mask fits the object (predicted IoU, "
               "0..1); higher means SAM is more confident, not that the mask is right")
CLASS_HELP = ("Prompts belong to a class: after a liver box, switch to <i>tumour</i> before clicking a "
              "lesion (the click then starts a tumour prompt; the liver prompt is kept).")


def _swatch(rgb, text: str, outline: bool = False) -> str:
    r, g, b = (int(255 * v) for v in rgb)
    style = (f"border:2px solid rgb({r},{g},{b});background:transparent" if outline
             else f"background:rgb({r},{g},{b})")
    return (f"<span style='white-space:nowrap'><span style='display:inline-block;width:11px;height:11px;"
            f"{style};margin:0 4px 0 10px;vertical-align:middle'></span>{text}</span>")


def loop_legend_html(prediction: bool = False) -> str:
    """The segment/annotate legend: your labels (filled), SAM's mask, the head's outlines."""
    items = [_swatch(CLASS_COLORS[1], "liver"), _swatch(CLASS_COLORS[2], "tumour"),
             _swatch(CANDIDATE_COLOR, "SAM mask, not yet accepted")]
    if prediction:
        items += [_swatch(CLASS_COLORS[1], "head: liver", outline=True),
                  _swatch(CLASS_COLORS[2], "head: tumour", outline=True)]
    return "<span><b>legend:</b>" + "".join(items) + "</span>"


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a 2D boolean mask."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    return m & ~ndimage.binary_erosion(m, border_value=0)


def slice_rgb(image_unit: np.ndarray, label: np.ndarray | None = None, *, prediction: np.ndarray | None = None,
              candidate: np.ndarray | None = None, alpha: float = 0.35) -> np.ndarray:
    """One slice as the segment widget draws it: grey CT, the user's label filled in the class
    colours, the head's prediction as outlines in the class colours, SAM's candidate mask
    blended in :data:`CANDIDATE_COLOR`.

    Args:
        image_unit: (H, W) slice in [0, 1].
        label: the user's label slice (0/1/2) or None.
        prediction: the head's label slice or None.
        candidate: SAM's not-yet-accepted mask (bool) or None.
        alpha: opacity of the filled label.

    Returns:
        (H, W, 3) float RGB in [0, 1].
    """
    rgb = overlay_rgb(image_unit, label, alpha=alpha)
    if prediction is not None:
        pred = np.asarray(prediction)
        for cls in (1, 2):
            edge = outline(pred >= 1 if cls == 1 else pred == 2)
            rgb[edge] = np.asarray(CLASS_COLORS[cls], np.float32)
    if candidate is not None and np.asarray(candidate).any():
        m = np.asarray(candidate, bool)
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(CANDIDATE_COLOR, np.float32)
    return rgb


def strip_html(states: np.ndarray, current: int | None = None, suggested: list[int] | tuple = (),
               width_px: int = 420) -> str:
    """A strip of one coloured cell per slice (unlabelled / predicted / confirmed), the current
    slice marked by a black bar, suggestions in orange; hover shows slice and state."""
    n = len(states)
    cells = []
    for z, st in enumerate(np.asarray(states).tolist()):
        colour = SUGGEST_COLOR if (z in suggested and st != 2) else STATE_COLORS[int(st)]
        mark = "box-shadow:inset 0 -4px 0 #000;" if z == current else ""
        tip = f"slice {z}: " + ("suggested, " if z in suggested and st != 2 else "") + STATE_NAMES[int(st)]
        cells.append(f"<div title='{tip}' style='flex:1 1 0;height:12px;background:{colour};{mark}'></div>")
    key = " ".join(f"<span style='white-space:nowrap'><span style='display:inline-block;width:10px;height:10px;"
                   f"background:{c};vertical-align:middle;margin:0 3px 0 8px'></span>{STATE_NAMES[k]}</span>"
                   for k, c in STATE_COLORS.items())
    key += (f" <span style='white-space:nowrap'><span style='display:inline-block;width:10px;height:10px;"
            f"background:{SUGGEST_COLOR};vertical-align:middle;margin:0 3px 0 8px'></span>suggested</span>")
    return (f"<div style='width:{width_px}px'><div style='display:flex;gap:0;border:1px solid #999' "
            f"data-slices='{n}'>{''.join(cells)}</div>"
            f"<div style='font-size:85%;color:#444'>slices 0..{n - 1}:{key}</div></div>")


def loop_config(fast: bool | None = None) -> Any:
    """The head recipe of the widgets' loop: the ``loop`` recipe (``config.RECIPES``), whose
    ``SAMLIVER_FAST`` variant (CI, browser tests) is a linear head for 30 steps.

    Args:
        fast: force FAST (True) or full (False); default: :func:`samliver.util.fast_mode`.

    Returns:
        A ``TrainConfig``.
    """
    from .annotate import annotation_train_config

    return annotation_train_config(fast=fast)


def _set_disabled(buttons, disabled: bool) -> None:
    for b in buttons:
        b.disabled = disabled


class SegmentWidget:
    """Segment a CT volume slice by slice with SAM prompts: a view over an annotation
    :class:`~samliver.annotate.Session` (which holds every prompt, mask, label and undo step).

    Drag a box on the image, or click (left / "positive" mode: object, right / "negative"
    mode: not object). With a box-trained model (``litemedsam``, ``medsam_vit_b``) a lone
    click seeds a box from the similar-intensity region around it. Prompts belong to a
    (slice, class): switch the class to *tumour* before prompting a lesion. SAM's mask is
    drawn in magenta until it is accepted into the label (then in the class colour). Choose
    among several masks (multimask), undo, clear the prompt, clear the slice's label,
    propagate a mask through neighbouring slices, save the label as NIfTI.

    Args:
        volume: a ``CTVolume``.
        model: a ``SamModel`` (default ``get_model("litemedsam")``).
        session: an existing ``Session`` to show (volume, model, embeddings are then its own).
        embeddings: a ``VolumeEmbeddings`` to reuse (default: the cache; missing slices are
            encoded on demand).
        slices: the slices the slider offers (default all).
        window: the HU window of the display (default "abdomen").
        z: the first slice (default the middle of ``slices``).
        figsize: the figure's size in inches.
        out_path: where ``save`` writes (default ``samliver_label.nii.gz``).
        config: the ``TrainConfig`` of a new session's head (default :func:`loop_config`).
        background: run long actions (propagate, train) in a worker thread (default True;
            tests pass False to run them in the calling thread).
    """

    def __init__(self, volume: Any = None, model: Any = None, *, session: Any = None, embeddings: Any = None,
                 slices: list[int] | None = None, window: str = "abdomen", z: int | None = None,
                 figsize: tuple[float, float] = (5.5, 5.5), out_path: str | None = None,
                 config: Any = None, background: bool = True) -> None:
        import ipywidgets as widgets

        from .annotate import Session

        if session is None:
            hu = np.asarray(getattr(volume, "hu", volume))
            if hu.ndim != 3:
                raise SamliverError(f"{type(self).__name__} needs a 3D volume (z, y, x), got shape {hu.shape}.")
            if not hasattr(volume, "hu"):
                from .io import CTVolume

                volume = CTVolume(hu=np.asarray(volume, np.float32))
            if model is None:
                from .models import get_model

                model = get_model("litemedsam")
            session = Session(volume, model, embeddings=embeddings,
                              config=config if config is not None else loop_config())
        self.session = session
        self.volume, self.model = session.volume, session.model
        self.hu = np.asarray(session.volume.hu, dtype=np.float32)
        self.window = window
        self.background = bool(background)
        depth = self.hu.shape[0]
        self.slices = sorted(int(s) for s in (range(depth) if slices is None else slices))
        if not self.slices or not all(0 <= s < depth for s in self.slices):
            raise SamliverError(f"slices must lie in 0..{depth - 1}, got {slices}.")
        start = int(z) if z is not None else self.slices[len(self.slices) // 2]
        self.session.set_slice(start)
        self.out_path = out_path or "samliver_label.nii.gz"
        self._press: tuple[float, float, float, float, int] | None = None
        self._worker = None
        self.last_error: str | None = None

        self.fig = new_figure(figsize)
        self.ax = self.fig.add_subplot()
        self._im = None
        self._drag_patch = None
        self._prompt_artists: list = []
        is_widget = isinstance(self.fig.canvas, widgets.DOMWidget)
        self.slider = self._make_slider()
        self.mode = widgets.ToggleButtons(options=["positive", "negative"], value="positive",
                                          description="click", tooltips=["object", "not object"],
                                          style={"button_width": "80px"})
        self.target = widgets.ToggleButtons(options=[("liver", 1), ("tumour", 2)], value=self.session.cls,
                                            description="class", style={"button_width": "80px"})
        self.class_help = widgets.HTML(f"<span style='font-size:90%'>{CLASS_HELP}</span>")
        self.multimask = widgets.Checkbox(value=False, description="multimask", indent=False,
                                          layout=widgets.Layout(width="100px"))
        self.mask_choice = widgets.ToggleButtons(options=[("mask 1", 0)], value=0, description="mask",
                                                 style={"button_width": "110px"})
        self.scores_help = widgets.HTML("")
        self.b_accept = widgets.Button(description="accept", button_style="success", icon="check",
                                       tooltip="write SAM's mask into your label as the chosen class")
        self.b_reset = widgets.Button(description="clear prompt", icon="times",
                                      tooltip="forget the box and clicks of this slice and class")
        self.b_undo = widgets.Button(description="undo", icon="undo",
                                     tooltip="take back the last click/box, else the last label change")
        self.b_clear = widgets.Button(description="clear label", icon="eraser",
                                      tooltip="erase your label on this slice")
        self.b_prop = widgets.Button(description="propagate 3D", button_style="info",
                                     tooltip="continue the mask slice by slice up and down (stops on a leak)")
        self.b_save = widgets.Button(description="save NIfTI", icon="save")
        self.path_text = widgets.Text(value=self.out_path, description="save to")
        self.status = widgets.Label(value="")
        self.latency = widgets.Label(value="decoder: - ms", layout=widgets.Layout(margin="0 16px 0 4px"))
        self.work = widgets.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                        layout=widgets.Layout(width="220px", visibility="hidden"))
        self.work_label = widgets.Label(value="")
        self.legend = widgets.HTML(loop_legend_html(prediction=False))
        self.slider.observe(lambda ch: self.set_slice(ch["new"]), names="value")
        self.target.observe(lambda ch: self.set_class(ch["new"]), names="value")
        self.multimask.observe(lambda ch: self.set_multimask(ch["new"]), names="value")
        self._syncing_choice = False
        self.mask_choice.observe(lambda ch: None if self._syncing_choice else self.choose_mask(ch["new"]),
                                 names="value")
        self.b_accept.on_click(lambda _: self.accept())
        self.b_reset.on_click(lambda _: self.reset())
        self.b_undo.on_click(lambda _: self.undo())
        self.b_clear.on_click(lambda _: self.clear_slice())
        self.b_prop.on_click(lambda _: self.propagate())
        self.b_save.on_click(lambda _: self.save(self.path_text.value))
        if is_widget:
            self.fig.canvas.mpl_connect("button_press_event", self._on_press)
            self.fig.canvas.mpl_connect("motion_notify_event", self._on_motion)
            self.fig.canvas.mpl_connect("button_release_event", self._on_release)
        self.canvas_widget = self.fig.canvas if is_widget else widgets.Label("(install ipympl to draw on the image)")
        self.action_buttons = [self.b_accept, self.b_reset, self.b_undo, self.b_clear, self.b_prop, self.b_save]
        self.widget = self._layout()
        self.render()
        self.message(("Drag a box" if self.box_trained else "Drag a box or click") +
                     f" around the liver on slice {self.z} ({self.model.name}).")

    # ---- layout (subclasses add rows)
    def _make_slider(self):
        import ipywidgets as widgets

        return widgets.SelectionSlider(options=self.slices, value=self.z, description="slice",
                                       continuous_update=False)

    def _layout(self):
        import ipywidgets as widgets

        return widgets.VBox([
            widgets.HTML("<b>Drag a box</b> around the liver or a tumour, or click inside it "
                         "(right click or 'negative' mode: not object), then <b>accept</b>."),
            self.legend,
            self.slider,
            widgets.HBox([self.target, self.mode]),
            self.class_help,
            widgets.HBox([self.multimask, self.mask_choice]),
            self.scores_help,
            self.canvas_widget,
            widgets.HBox([self.b_accept, self.b_reset, self.b_undo, self.b_clear, self.b_prop]),
            widgets.HBox([self.latency, self.status]),
            widgets.HBox([self.work, self.work_label]),
            widgets.HBox([self.path_text, self.b_save]),
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ---- state (all of it in the session)
    @property
    def z(self) -> int:
        return int(self.session.z)

    @property
    def cls(self) -> int:
        return int(self.session.cls)

    @property
    def label(self) -> np.ndarray:
        """The user's (z, y, x) label (the session's)."""
        return self.session.label

    @property
    def box_trained(self) -> bool:
        return bool(self.session.box_trained)

    @property
    def mask(self) -> np.ndarray | None:
        """SAM's current mask (bool, H, W) for the slice and class, not yet accepted, or None."""
        return self.session.candidate

    @property
    def masks(self) -> np.ndarray | None:
        return self.session.candidates

    @property
    def scores(self) -> list[float]:
        return self.session.scores

    @property
    def box(self) -> tuple | None:
        """The current (slice, class) box, rounded to whole pixels, or None."""
        b = self.session.prompts()["box"]
        return None if b is None else tuple(int(round(v)) for v in b)

    @property
    def points(self) -> list:
        return self.session.prompts()["points"]

    @property
    def busy(self) -> bool:
        """True while a background action (propagate, train, predict) runs."""
        return self._worker is not None and self._worker.is_alive()

    def message(self, text: str, error: bool = False) -> None:
        self.status.value = ("⚠ " if error else "") + text
        if error:
            self.last_error = text

    # ---- state -> pixels
    def current_rgb(self) -> np.ndarray:
        """The displayed slice: label filled, prediction outlined, SAM's mask in magenta."""
        z = self.z
        pred = None if self.session.prediction is None or z in self.session.confirmed else self.session.prediction[z]
        return slice_rgb(window_to_unit(self.hu[z], self.window), self.label[z], prediction=pred,
                         candidate=self.mask)

    def _title(self) -> str:
        m = self.mask
        return f"slice z = {self.z}" + ("" if m is None else f": SAM mask {int(m.sum())} px (not accepted)")

    def render(self) -> None:
        """Redraw the slice, labels, SAM's mask and the prompts; refresh the mask choice."""
        rgb = self.current_rgb()
        if self._im is None:
            self.ax.clear()
            self._im = self.ax.imshow(rgb, interpolation="nearest")
            self.ax.set_xlabel("x (pixels)")
            self.ax.set_ylabel("y (pixels)")
        else:
            self._im.set_data(rgb)
        self.ax.set_title(self._title())
        for art in self._prompt_artists:
            art.remove()
        self._prompt_artists = []
        box = self.session.prompts()["box"]
        if box is not None:
            from matplotlib.patches import Rectangle

            x0, y0, x1, y1 = box
            self._prompt_artists.append(self.ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.5)))
        for x, y, lab in self.points:
            self._prompt_artists += self.ax.plot([x], [y], "+" if lab else "x", ms=10, mew=2,
                                                 color="lime" if lab else "red")
        self._sync_choice()
        self.fig.canvas.draw_idle()

    def _sync_choice(self) -> None:
        scores = self.scores
        if not scores:
            opts, value = [("mask 1", 0)], 0
            self.scores_help.value = ""
        else:
            opts = [(f"mask {i + 1} ({s:.2f})", i) for i, s in enumerate(scores)]
            value = self.session.choice
            self.scores_help.value = f"<span style='font-size:90%;color:#444'>{SCORES_HELP}.</span>"
        # Options first, then the value; the observer ignores these programmatic changes.
        self._syncing_choice = True
        try:
            if list(self.mask_choice.options) != opts:
                self.mask_choice.options = opts
            self.mask_choice.value = value
        finally:
            self._syncing_choice = False

    def _after_prompt(self, mask: np.ndarray) -> np.ndarray:
        ms = self.session.latency_ms
        self.latency.value = "decoder: - ms" if ms is None else f"decoder: {ms:.0f} ms"
        self.render()
        n = int(mask.sum())
        if n == 0:
            self.message("SAM returned an empty mask: drag a tighter box around the structure.", error=True)
        else:
            self.message(f"SAM mask: {n} px on slice {self.z} as {CLASS_NAMES[self.cls]} "
                         f"({len(self.scores)} candidate(s)); accept it or refine with clicks")
        return mask

    # ---- prompts
    @_guarded
    def on_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray | None:
        """Prompt with a box (pixel coordinates, any corner order); returns SAM's mask."""
        self._check_idle()
        return self._after_prompt(self.session.prompt_box((x0, y0, x1, y1)))

    @_guarded
    def on_click(self, x: float, y: float, positive: bool = True) -> np.ndarray | None:
        """Prompt with a click (pixel coordinates) on the current slice and class."""
        self._check_idle()
        had_box = self.session.prompts()["box"] is not None
        out = self._after_prompt(self.session.prompt_click(x, y, positive=positive))
        if self.box_trained and not had_box and out is not None and out.any():
            self.message(self.status.value + " (box seeded from the click's region; drag a box for a "
                         "tighter result)")
        return out

    def _check_idle(self) -> None:
        if self.busy:
            raise SamliverError("Wait: another action is still running (see the progress bar).")

    # ---- actions
    @_guarded
    def set_slice(self, z: int) -> None:
        self.session.set_slice(int(z))
        if self.slider.value != self.z and self.z in self.slices:
            self.slider.value = self.z
        self.render()
        self.message(self._slice_message())

    def _slice_message(self) -> str:
        what = "drag a box" + ("" if self.box_trained else " or click")
        if self.z in self.session.confirmed:
            return f"slice {self.z}: confirmed (yours); {what} to add, or 'clear label'"
        return f"slice {self.z}: {what} around the {CLASS_NAMES[self.cls]}"

    @_guarded
    def set_class(self, cls: int) -> None:
        """Choose liver (1) or tumour (2): the next prompt and accept apply to it."""
        self.session.set_class(int(cls))
        if self.target.value != self.cls:
            self.target.value = self.cls
        self.render()
        other = self.session.prompts(cls=3 - self.cls)
        kept = " (the " + CLASS_NAMES[3 - self.cls] + " prompt on this slice is kept)" if (
            other["box"] is not None or other["points"]) else ""
        self.message(f"class: {CLASS_NAMES[self.cls]}: your next box or click prompts a "
                     f"{CLASS_NAMES[self.cls]}{kept}")

    @_guarded
    def set_multimask(self, on: bool) -> None:
        if self.multimask.value != bool(on):
            self.multimask.value = bool(on)
        self.session.set_multimask(bool(on))
        self.render()

    @_guarded
    def choose_mask(self, index: int) -> None:
        if self.masks is None:
            return
        self.session.choose_mask(int(index))
        self.render()

    @_guarded
    def undo(self) -> None:
        """Take back the last box/click of this slice and class; with none, the last label change."""
        self._check_idle()
        if self.session.undo_prompt():
            self.render()
            self.message("undone: the last prompt" + ("" if self.mask is not None else " (no prompt left)"))
            return
        if self.session.undo():
            self._label_changed()
            self.message(f"undone: the last label change ({self.session.log[-1].get('undone')})")
            return
        self.message("Nothing to undo.")

    @_guarded
    def reset(self) -> None:
        """Forget the prompts of the current slice and class (the label stays)."""
        self.session.clear_prompts()
        self.render()
        self.message("prompt cleared: drag a box to start again")

    @_guarded
    def clear_slice(self) -> None:
        """Erase the user's label on the current slice (undo brings it back)."""
        self._check_idle()
        self.session.clear_slice()
        self._label_changed()
        self.message(f"cleared your label on slice {self.z} (undo brings it back)")

    def _label_changed(self) -> None:
        """Hook: the label or the confirmed slices changed."""
        self.render()

    @_guarded
    def accept(self, cls: int | None = None) -> int | None:
        """Write SAM's mask into the label as ``cls`` (default: the class toggle); confirms the slice."""
        self._check_idle()
        cls = self.cls if cls is None else int(cls)
        n = self.session.accept(cls=cls)
        self._label_changed()
        self.message(f"accepted {n} px as {CLASS_NAMES[cls]} on slice {self.z}; "
                     f"label now has {int((self.label == cls).sum())} {CLASS_NAMES[cls]} voxels")
        return n

    @_guarded
    def propagate(self, cls: int | None = None, max_slices: int | None = None) -> list[int] | None:
        """Continue the mask (SAM's, else the label's) through neighbouring slices and accept them.

        Runs in a worker thread (buttons disabled, elapsed seconds shown) unless the widget
        was made with ``background=False``; then returns the slices written.
        """
        self._check_idle()
        cls = self.cls if cls is None else int(cls)
        if max_slices is None and fast_mode():
            max_slices = 3
        z = self.z

        def job(tick):
            return self.session.propagate(cls=cls, max_slices=max_slices)

        def done(slices):
            self._label_changed()
            self.message(f"propagated {CLASS_NAMES[cls]} from slice {z} to {len(slices)} slices "
                         f"(z {min(slices)}..{max(slices)}) in {self._elapsed:.1f} s")
            return slices

        return self._run(f"propagating {CLASS_NAMES[cls]} from slice {z}", job, done)

    @_guarded
    def save(self, path: str | None = None) -> Path | None:
        """Save the label as NIfTI in the source geometry (default ``samliver_label.nii.gz``)."""
        from .io import save_label_nifti

        path = Path(path or self.out_path)
        if not str(path).endswith((".nii", ".nii.gz")):
            raise SamliverError(f"Save path {path} must end in .nii or .nii.gz.")
        try:
            out = save_label_nifti(self.export(), self.volume, path)
        except OSError as err:
            raise SamliverError(f"Cannot write {path} ({err.strerror or err}): choose a writable place.") from err
        self.message(f"saved the label ({int((self.export() > 0).sum())} voxels) to {out}")
        return out

    def export(self) -> np.ndarray:
        """The label this widget saves: the user's label."""
        return self.label

    # ---- long actions: a worker thread, buttons disabled, progress and elapsed seconds
    def _run(self, what: str, job: Callable, done: Callable, *, total: int | None = None):
        """Run ``job(tick)`` (``tick(done, total, text)`` reports progress) then ``done(result)``.

        In the background (default) returns None at once; ``wait()`` joins. With
        ``background=False`` runs here and returns ``done``'s result.
        """
        import threading

        self._elapsed = 0.0
        t0 = time.perf_counter()
        self.work.layout.visibility = "visible"
        self.work.bar_style = "info"
        self.work.max, self.work.value = max(1, total or 1), 0
        self.work_label.value = f"{what} ..."
        self._set_busy(True)
        stop_ticker = threading.Event()
        state = {"text": ""}

        def tick(n: int | None = None, of: int | None = None, text: str = "") -> None:
            if of:
                self.work.max = max(1, int(of))
                self.work.value = min(int(n or 0), self.work.max)
            state["text"] = text
            self._elapsed = time.perf_counter() - t0
            self.work_label.value = f"{what}: {text + ', ' if text else ''}{self._elapsed:.0f} s"

        def ticker() -> None:
            while not stop_ticker.wait(1.0):
                tick(text=state["text"])

        def body():
            result, error = None, None
            try:
                result = job(tick)
            except SamliverError as err:
                error = str(err)
            except Exception as err:  # noqa: BLE001 - shown in the status line, never a traceback wall
                error = f"Unexpected error while {what}: {type(err).__name__}: {err}"
            finally:
                stop_ticker.set()
                self._elapsed = time.perf_counter() - t0
            out = None
            try:
                if error is None:
                    out = done(result)
                    self.work.bar_style = "success"
                    self.work.value = self.work.max
                else:
                    self.message(error, error=True)
                    self.work.bar_style = "danger"
            except Exception as err:  # noqa: BLE001
                self.message(f"Unexpected error after {what}: {type(err).__name__}: {err}", error=True)
            finally:
                self._finish_work()
                self._set_busy(False)
            return out

        if not self.background:
            return body()
        threading.Thread(target=ticker, daemon=True).start()
        self._worker = threading.Thread(target=body, name="samliver-widget", daemon=True)
        self._worker.start()
        return None

    def _finish_work(self) -> None:
        """Hook: what stays on screen after a long action (default: its time)."""
        self.work_label.value = f"done in {self._elapsed:.1f} s"

    def _set_busy(self, busy: bool) -> None:
        _set_disabled(self.action_buttons, busy)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background action; True when none is running any more."""
        if self._worker is not None:
            self._worker.join(timeout)
        return not self.busy

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


class AnnotateWidget(SegmentWidget):
    """Label a whole volume: prompt a few slices, train a head, look, fix, repeat.

    Everything :class:`SegmentWidget` does, plus the loop of
    :class:`~samliver.annotate.Session`: a strip under the slice slider shows each slice's
    state (confirmed by you / predicted by the head / unlabelled; suggestions in orange);
    **train** fits a head on your confirmed slices (in a worker thread, with a progress bar,
    elapsed seconds and a *cancel* button) and predicts every slice, drawn as outlines;
    **suggest next** jumps to the slice the head is least sure about; **confirm** takes the
    head's prediction of a slice as it is; **save** writes the label NIfTI (your slices as
    labelled, the others as predicted), the head and the session log. The last training's
    summary (steps, final loss, time, Dice against a reference when there is one) stays on
    screen.

    Args: those of :class:`SegmentWidget`; ``out_dir`` is the folder ``save`` writes to
    (default ``samliver_session``).
    """

    def __init__(self, volume: Any = None, model: Any = None, *, out_dir: str | None = None, **kwargs) -> None:
        import ipywidgets as widgets

        self.out_dir = out_dir or "samliver_session"
        self.suggested: list[int] = []
        self.summary: dict | None = None
        self.saved: dict | None = None
        self._cancel = None
        # callbacks(widget) after a training (finished or cancelled) and after a save: the app
        # uses them to refresh its other views and offer downloads
        self.on_trained: list[Callable] = []
        self.on_saved: list[Callable] = []
        self.strip = widgets.HTML("")
        self.b_train = widgets.Button(description="train", button_style="warning", icon="graduation-cap",
                                      tooltip="train a head on your confirmed slices, then predict every slice")
        self.b_cancel = widgets.Button(description="cancel", icon="stop", disabled=True,
                                       tooltip="stop training (the previous head stays)")
        self.b_suggest = widgets.Button(description="suggest next", icon="search",
                                        tooltip="go to the slice the head is least sure about")
        self.b_confirm = widgets.Button(description="confirm", icon="thumbs-up",
                                        tooltip="take the head's prediction of this slice as it is")
        self.b_save_all = widgets.Button(description="save", icon="save",
                                         tooltip="label NIfTI + head + session log into the folder")
        self.dir_text = widgets.Text(value=self.out_dir, description="folder")
        self.train_summary = widgets.HTML("")
        self.downloads = widgets.HTML("")
        super().__init__(volume, model, **kwargs)
        self.b_train.on_click(lambda _: self.train())
        self.b_cancel.on_click(lambda _: self.cancel())
        self.b_suggest.on_click(lambda _: self.suggest_next())
        self.b_confirm.on_click(lambda _: self.confirm())
        self.b_save_all.on_click(lambda _: self.save_session(self.dir_text.value))
        self.action_buttons += [self.b_train, self.b_suggest, self.b_confirm, self.b_save_all]
        self.b_save.layout.display = "none"  # one save for the loop: the session's
        self.path_text.layout.display = "none"
        self._refresh_strip()

    def _make_slider(self):
        import ipywidgets as widgets

        return widgets.IntSlider(value=self.z, min=0, max=self.hu.shape[0] - 1, description="slice",
                                 continuous_update=False, layout=widgets.Layout(width="520px"))

    def _layout(self):
        import ipywidgets as widgets

        strip_row = widgets.HBox([widgets.HTML("", layout=widgets.Layout(width="90px")), self.strip])
        return widgets.VBox([
            widgets.HTML("<b>Label a volume:</b> box the liver on ~3 slices spread over it (drag, then "
                         "<b>accept</b>), press <b>train</b>, look at the outlines on other slices, "
                         "<b>suggest next</b> / fix or <b>confirm</b> a slice, train again, <b>save</b>."),
            self.legend,
            self.slider,
            strip_row,
            widgets.HBox([self.target, self.mode]),
            self.class_help,
            widgets.HBox([self.multimask, self.mask_choice]),
            self.scores_help,
            self.canvas_widget,
            widgets.HBox([self.b_accept, self.b_reset, self.b_undo, self.b_clear, self.b_prop]),
            widgets.HBox([self.b_train, self.b_cancel, self.b_suggest, self.b_confirm]),
            widgets.HBox([self.latency, self.status]),
            widgets.HBox([self.work, self.work_label]),
            self.train_summary,
            widgets.HBox([self.dir_text, self.b_save_all]),
            self.downloads,
        ])

    def _refresh_strip(self) -> None:
        self.strip.value = strip_html(self.session.slice_states(), self.z, self.suggested, width_px=420)
        self.legend.value = loop_legend_html(prediction=self.session.prediction is not None)

    def render(self) -> None:
        super().render()
        if hasattr(self, "strip"):
            self._refresh_strip()

    def _title(self) -> str:
        state = STATE_NAMES[int(self.session.slice_states()[self.z])]
        return super()._title() + f" [{state}]"

    def _slice_message(self) -> str:
        if self.z not in self.session.confirmed and self.session.prediction is not None:
            return (f"slice {self.z}: the head's outlines; 'confirm' if right, else box and accept "
                    "to correct it")
        return super()._slice_message()

    def export(self) -> np.ndarray:
        """Confirmed slices as labelled, the others as the head predicted them."""
        return self.session.export_label()

    # ---- the loop
    @_guarded
    def train(self, *, predict: bool = True) -> dict | None:
        """Train a head on the confirmed slices, then predict every slice (worker thread).

        The progress bar counts steps (then predicted slices); the summary line keeps the
        final loss, the time and, when the session has a reference, the whole-volume Dice.
        """
        import threading

        self._check_idle()
        zs = sorted(self.session.confirmed)
        if not zs:
            raise SamliverError("No confirmed slice to train on: box the liver on a slice and accept it "
                                "(3 slices spread over the liver are a good start).")
        self._cancel = threading.Event()
        self.b_cancel.disabled = False

        def job(tick):
            summary = self.session.train(progress=lambda s, n, loss: tick(s, n, f"step {s}/{n}, loss {loss:.3f}"),
                                         cancel=self._cancel)
            if summary.get("stopped") == "cancelled" or not predict:
                return summary
            t1 = time.perf_counter()
            self.session.encode(progress=lambda d, n: tick(d, n, f"encoding new slices {d}/{n} (once; cached)"))
            self.session.predict(progress=lambda d, n: tick(d, n, f"predicting slice {d}/{n}"))
            summary["predict_seconds"] = time.perf_counter() - t1
            return summary

        def done(summary):
            self.summary = summary
            self.suggested = []
            self._label_changed()
            cancelled = summary.get("stopped") == "cancelled"
            self.train_summary.value = self._summary_html(summary)
            for callback in self.on_trained:
                callback(self)
            self.message("training cancelled: the previous head stays" if cancelled else
                         f"trained on {len(summary['slices'])} slices and predicted every slice: look at the "
                         "outlines, then 'suggest next'")
            return summary

        return self._run(f"training on {len(zs)} slices", job, done)

    def _summary_html(self, s: dict) -> str:
        loss = "-" if s.get("final_loss") is None else f"{s['final_loss']:.3f}"
        parts = [(f"<b>last training</b> ({s.get('kind', 'head')}): {len(s['slices'])} confirmed slices, "
                  f"{s['steps']} steps, final loss {loss}, {s['seconds']:.1f} s")]
        if s.get("stopped") == "cancelled":
            parts.append("<b>cancelled</b> (previous head kept)")
        elif "predict_seconds" in s:
            parts.append(f"prediction of all slices {s['predict_seconds']:.1f} s")
        scores = self.session.scores_vs_reference() if self.session.prediction is not None else None
        if scores is not None:
            parts.append(f"whole-volume Dice vs reference: liver {scores['liver_dice']:.3f}, "
                         f"tumour {scores['tumour_dice']:.3f}")
        return "<div style='font-size:92%'>" + "; ".join(parts) + "</div>"

    def cancel(self) -> None:
        """Ask the running training to stop (the previous head stays)."""
        if self._cancel is not None:
            self._cancel.set()
            self.message("cancelling ...")

    def _finish_work(self) -> None:
        super()._finish_work()
        self.b_cancel.disabled = True

    @_guarded
    def suggest_next(self, n: int = 1) -> list[int] | None:
        """Jump to the suggested slice (the head's most uncertain one; before training, the
        slice farthest from the confirmed ones)."""
        self._check_idle()
        self.suggested = self.session.suggest(max(1, int(n)))
        if not self.suggested:
            self.message("No slice left to suggest: every slice is confirmed.")
            return []
        self.set_slice(self.suggested[0])
        why = "the head is least sure here" if self.session.prediction is not None else \
            "farthest from your confirmed slices (train for uncertainty-based suggestions)"
        self.message(f"suggested slice {self.suggested[0]}: {why}; fix it (box, accept) or confirm it")
        return self.suggested

    @_guarded
    def confirm(self) -> None:
        """Take the head's prediction of the current slice as it is (one click when it is right)."""
        self._check_idle()
        self.session.confirm()
        self._label_changed()
        self.message(f"confirmed slice {self.z} as predicted ({len(self.session.confirmed)} confirmed slices)")

    @_guarded
    def save_session(self, folder: str | None = None) -> dict | None:
        """Save label NIfTI, head and session log into ``folder`` (default ``out_dir``)."""
        self._check_idle()
        paths = self.session.save(folder or self.out_dir)
        self.saved = paths
        for callback in self.on_saved:
            callback(self)
        self.message("saved " + ", ".join(f"{k} {p.name}" for k, p in paths.items()) + f" in {paths['label'].parent}")
        return paths


def annotate(volume: Any, model: Any = None, **kwargs) -> AnnotateWidget:
    """Shortcut for :class:`AnnotateWidget` (``display`` the result)."""
    return AnnotateWidget(volume, model, **kwargs)
