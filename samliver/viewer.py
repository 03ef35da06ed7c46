"""A medical volume viewer for notebooks and the app: NiiVue (``ipyniivue``), offline.

:class:`VolumeViewer` shows the CT in three linked planes plus a 3D render, with label layers
on top: the head's *prediction*, the *reference* label and the user's *label*, each a separate
layer that can be switched on and off, in the project's class colours
(:data:`samliver.visualization.CLASS_COLORS`), with a legend beside the view.

NiiVue reads NIfTI files, so the CT and every in-memory label travel as NIfTI files in the
volume's own geometry (labels through :func:`samliver.io.save_label_nifti`) kept in a private
temporary folder for as long as the viewer lives (the browser may ask for them again when a
page reloads). ipyniivue bundles its JavaScript, so nothing is fetched at run time; it needs
WebGL2 in the browser (headless Chromium falls back to software WebGL2). Where ipyniivue is
not installed, :func:`show_volume` falls back to the plotly surface view of
:mod:`samliver.view3d`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .preprocess import get_window
from .util import SamliverError
from .visualization import CLASS_COLORS, CLASS_NAMES

# The layers a viewer can show, bottom to top, and how each looks. The reference is drawn in
# lighter tints of the class colours so it never reads as the prediction when both are on.
LAYERS = ("reference", "prediction", "label")
LAYER_TITLES = {"reference": "reference label", "prediction": "head prediction", "label": "your label"}
_TINT = {"reference": 0.45, "prediction": 0.0, "label": 0.0}
DEFAULT_OPACITY = {"reference": 0.45, "prediction": 0.5, "label": 0.6}
BACKENDS = ("auto", "niivue", "plotly")


def niivue_available() -> bool:
    """True when ``ipyniivue`` can be imported (the NiiVue backend)."""
    try:
        import ipyniivue  # noqa: F401
    except ImportError:
        return False
    return True


def layer_rgb(layer: str, cls: int) -> tuple[int, int, int]:
    """The 0..255 RGB of class ``cls`` (1 liver, 2 tumour) in ``layer``.

    Args:
        layer: one of :data:`LAYERS`.
        cls: 1 (liver) or 2 (tumour).

    Returns:
        ``(r, g, b)`` integers; the class colour, tinted towards white for the reference.
    """
    tint = _TINT[layer]
    return tuple(int(round(255 * ((1 - tint) * c + tint))) for c in CLASS_COLORS[cls])  # type: ignore[return-value]


def label_colormap(layer: str) -> dict:
    """NiiVue's label colour table for ``layer``: 0 transparent, 1 liver, 2 tumour."""
    (r1, g1, b1), (r2, g2, b2) = layer_rgb(layer, 1), layer_rgb(layer, 2)
    return {"R": [0, r1, r2], "G": [0, g1, g2], "B": [0, b1, b2], "A": [0, 255, 255],
            "I": [0, 1, 2], "labels": [CLASS_NAMES[0], CLASS_NAMES[1], CLASS_NAMES[2]]}


def legend_html(layers: dict[str, bool]) -> str:
    """A legend: one row per layer present (its class colours), greyed out when switched off.

    Args:
        layers: layer name -> shown.

    Returns:
        HTML for an ``ipywidgets.HTML``.
    """
    rows = []
    for layer in LAYERS:
        if layer not in layers:
            continue
        swatches = "".join(
            f"<span style='display:inline-block;width:12px;height:12px;margin:0 4px 0 8px;vertical-align:middle;"
            f"background:rgb{layer_rgb(layer, c)}'></span>{CLASS_NAMES[c]}" for c in (1, 2))
        style = "" if layers[layer] else "opacity:0.4"
        state = "" if layers[layer] else " (hidden)"
        rows.append(f"<div style='{style}'><b>{LAYER_TITLES[layer]}</b>{state}<br>{swatches}</div>")
    if not rows:
        rows.append("<div>no label layer yet</div>")
    return "<div style='line-height:1.8'><b>legend</b>" + "".join(rows) + "</div>"


def write_ct_nifti(volume: Any, folder: str | Path) -> Path:
    """The CT as a NIfTI file in the geometry its labels are saved in.

    A NIfTI source is used as it is (same bytes, same geometry as
    :func:`samliver.io.save_label_nifti` writes back); other sources (DICOM, MRC, arrays) are
    written as int16 HU (half the bytes of float32; CT HU fit) into ``folder``.

    Args:
        volume: a ``CTVolume``.
        folder: where to write the file when one is needed.

    Returns:
        The path of a NIfTI file of the CT.
    """
    import nibabel as nib

    from .io import nifti_affine

    meta = getattr(volume, "meta", None) or {}
    src = Path(meta.get("source_path") or getattr(volume, "source", "") or "")
    if meta.get("format") == "nifti" and "to_canonical" in meta and src.is_file():
        return src
    hu = np.clip(np.rint(np.asarray(volume.hu, dtype=np.float32)), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), nifti_affine(volume))
    img.header.set_xyzt_units("mm" if getattr(volume, "spacing", None) is not None else "unknown")
    path = Path(folder) / "ct.nii.gz"
    nib.save(img, str(path))
    return path


class VolumeViewer:
    """CT in three linked planes plus a 3D render (NiiVue), label layers, legend, toggles.

    ``display(viewer)`` or ``viewer.widget`` shows it. Layers: ``prediction`` (a head's
    output), ``reference`` (default: ``volume.label``), ``label`` (the user's own); each can
    be replaced (:meth:`set_layer`) and switched on/off (:meth:`show`).

    Args:
        volume: a ``CTVolume``.
        prediction: (z, y, x) label 0/1/2 or None.
        reference: (z, y, x) label, None for none, or ``"auto"`` (``volume.label``).
        label: the user's (z, y, x) label or None.
        window: HU window name or (lo, hi) for the CT's grey levels (default "abdomen").
        height: the view's height in pixels (default 560).

    Raises:
        SamliverError: ipyniivue is missing, or a label's shape is not the volume's.
    """

    def __init__(self, volume: Any, *, prediction: np.ndarray | None = None, reference: Any = "auto",
                 label: np.ndarray | None = None, window: str | tuple[float, float] = "abdomen",
                 height: int = 560) -> None:
        import ipywidgets as widgets

        try:
            from ipyniivue import MultiplanarType, NiiVue, ShowRender, SliceType
        except ImportError as err:
            raise SamliverError("The NiiVue viewer needs ipyniivue: `pip install ipyniivue` "
                                "(or `pip install 'samliver[ui]'`); show_volume() falls back to plotly.") from err
        self.volume = volume
        self.window = get_window(window)
        self._tmp = tempfile.TemporaryDirectory(prefix="samliver_viewer_")
        self._serial = 0
        self._vols: dict[str, Any] = {}
        self.ct_path = write_ct_nifti(volume, self._tmp.name)
        self.arrays: dict[str, np.ndarray] = {}
        self.paths: dict[str, Path] = {}
        self.visible: dict[str, bool] = {}
        self.opacity: dict[str, float] = dict(DEFAULT_OPACITY)
        self.nv = NiiVue(height=int(height))
        self.nv.opts.multiplanar_show_render = ShowRender.ALWAYS
        self.nv.opts.multiplanar_layout = MultiplanarType.GRID  # 2 x 2: three planes and the 3D render
        # NiiVue sizes its canvas from its own element: give it a width (inside a flex box
        # without one the canvas is 0 pixels wide)
        self.nv.layout = widgets.Layout(width="calc(100% - 230px)", min_width="420px")
        self.nv.set_slice_type(SliceType.MULTIPLANAR)
        self.legend = widgets.HTML()
        self.toggles: dict[str, Any] = {}
        self.toggle_box = widgets.VBox([])
        self.status = widgets.HTML()
        if isinstance(reference, str) and reference == "auto":
            reference = getattr(volume, "label", None)
        for name, arr in (("reference", reference), ("prediction", prediction), ("label", label)):
            if arr is not None:
                self._store(name, arr)
        # a prediction, when there is one, is what the user came to see: the reference starts hidden
        if "prediction" in self.arrays and "reference" in self.arrays:
            self.visible["reference"] = False
        self._reload()
        self.widget = widgets.HBox([
            self.nv,
            widgets.VBox([self.legend, self.toggle_box, self.status],
                         layout=widgets.Layout(width="210px", margin="0 0 0 12px")),
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    @property
    def layers(self) -> list[str]:
        """The layers present, bottom to top."""
        return [name for name in LAYERS if name in self.arrays]

    def _store(self, name: str, arr: np.ndarray) -> None:
        from .io import save_label_nifti

        if name not in LAYERS:
            raise SamliverError(f"Unknown layer {name!r}: choose one of {', '.join(LAYERS)}.")
        arr = np.asarray(arr)
        if arr.shape != tuple(self.volume.hu.shape):
            raise SamliverError(f"The {name} layer has shape {arr.shape}, the volume {tuple(self.volume.hu.shape)}.")
        self._serial += 1  # a new file name per version: NiiVue volumes cannot change their path
        path = save_label_nifti(arr.astype(np.uint8), self.volume, Path(self._tmp.name) / f"{name}_{self._serial}.nii.gz")
        old = self.paths.get(name)
        self.arrays[name], self.paths[name] = arr, path
        self.visible.setdefault(name, True)
        if old is not None and old != path:
            old.unlink(missing_ok=True)

    def _reload(self, changed: str | None = None) -> None:
        """Give NiiVue the CT and the present layers (each at its opacity, 0 when hidden).

        Only ``changed`` (a layer name) is rebuilt; the CT and the other layers keep their
        NiiVue volumes, so their bytes are not sent to the browser again.
        """
        from ipyniivue import Volume

        if "CT" not in self._vols:
            lo, hi = self.window
            self._vols["CT"] = Volume(path=self.ct_path, name="CT", colormap="gray", cal_min=float(lo),
                                      cal_max=float(hi), colorbar_visible=False)
        for name in self.layers:
            if name == changed or name not in self._vols:
                v = Volume(path=self.paths[name], name=name, colorbar_visible=False,
                           opacity=self.opacity[name] if self.visible[name] else 0.0)
                v.set_colormap_label(label_colormap(name))
                self._vols[name] = v
        for name in [n for n in self._vols if n != "CT" and n not in self.arrays]:
            self._vols.pop(name)
        self.nv.volumes = [self._vols["CT"], *(self._vols[n] for n in self.layers)]
        self._sync_controls()

    def _sync_controls(self) -> None:
        import ipywidgets as widgets

        for name in self.layers:
            if name not in self.toggles:
                cb = widgets.Checkbox(value=self.visible[name], description=LAYER_TITLES[name], indent=False)
                cb.observe(lambda ch, n=name: self.show(n, ch["new"]), names="value")
                self.toggles[name] = cb
            elif self.toggles[name].value != self.visible[name]:
                self.toggles[name].value = self.visible[name]
        self.toggle_box.children = [self.toggles[n] for n in self.layers]
        self.legend.value = legend_html({n: self.visible[n] for n in self.layers})

    def show(self, layer: str, on: bool = True) -> None:
        """Switch a layer on or off (its opacity goes to 0, the data stay loaded).

        Raises:
            SamliverError: the layer is not present.
        """
        if layer not in self.arrays:
            raise SamliverError(f"There is no {layer!r} layer here: present are {', '.join(self.layers) or 'none'}.")
        self.visible[layer] = bool(on)
        v = self._vols.get(layer)
        if v is not None:
            v.opacity = self.opacity[layer] if on else 0.0
        self._sync_controls()

    def set_opacity(self, layer: str, opacity: float) -> None:
        """Opacity (0..1) of a layer when it is shown."""
        if not 0.0 <= float(opacity) <= 1.0:
            raise SamliverError(f"Opacity must be in 0..1, got {opacity}.")
        self.opacity[layer] = float(opacity)
        if layer in self.arrays:
            self.show(layer, self.visible[layer])

    def set_layer(self, layer: str, label: np.ndarray | None) -> None:
        """Replace a layer's label volume (None removes the layer) and redraw.

        Raises:
            SamliverError: unknown layer or a shape that is not the volume's.
        """
        if label is None:
            if layer in self.arrays:
                self.arrays.pop(layer)
                self.paths.pop(layer).unlink(missing_ok=True)
                self.visible.pop(layer, None)
        else:
            new = layer not in self.arrays
            self._store(layer, label)
            if new and layer == "prediction" and "reference" in self.arrays:
                self.show("reference", False)  # a new prediction is what the user came to see
        self._reload(changed=layer)

    def message(self, text: str) -> None:
        """A line under the legend (e.g. what the prediction was made with)."""
        self.status.value = f"<span style='font-size:90%'>{text}</span>"

    def close(self) -> None:
        """Close the widget and remove its temporary files."""
        self.widget.close()
        self.nv.close()
        self._tmp.cleanup()


def show_volume(volume: Any, *, prediction: np.ndarray | None = None, reference: Any = "auto",
                label: np.ndarray | None = None, backend: str = "auto", window: str | tuple = "abdomen",
                height: int = 560, title: str | None = None):
    """The volume/3D view of a notebook or the app: NiiVue when it is there, else plotly.

    Args:
        volume: a ``CTVolume``.
        prediction, reference, label: the label layers (see :class:`VolumeViewer`).
        backend: ``"auto"`` (NiiVue if ipyniivue is installed, else plotly), ``"niivue"`` or
            ``"plotly"`` (surfaces only, no CT: for browsers without WebGL2).
        window: HU window of the CT (NiiVue only).
        height: pixels (NiiVue only).
        title: the plotly figure's title.

    Returns:
        A :class:`VolumeViewer`, or a plotly ``FigureWidget`` of the first present label
        among prediction, label, reference.

    Raises:
        SamliverError: unknown backend, or ``"niivue"`` without ipyniivue.
    """
    if backend not in BACKENDS:
        raise SamliverError(f"Unknown viewer backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend == "niivue" or (backend == "auto" and niivue_available()):
        return VolumeViewer(volume, prediction=prediction, reference=reference, label=label, window=window,
                            height=height)
    from .view3d import view_3d

    if isinstance(reference, str) and reference == "auto":
        reference = getattr(volume, "label", None)
    shown = next((a for a in (prediction, label, reference) if a is not None), None)
    if shown is None:
        raise SamliverError("Nothing to show in 3D without ipyniivue: give a prediction or a label.")
    return view_3d(shown, getattr(volume, "spacing", None), title=title)
