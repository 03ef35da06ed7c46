"""3D view of liver and tumour surfaces that works offline in JupyterLab 4 and Voila.

Default backend ``"plotly"``: marching-cubes meshes (scikit-image) of the label classes in a
plotly ``FigureWidget`` (its JavaScript ships inside the Python packages plotly + anywidget,
so nothing is fetched at run time). Optional backend ``"itkwidgets"`` for users online:
itkwidgets 1.0 loads its viewer from CDNs at run time, so it shows nothing offline.
"""

from __future__ import annotations

import numpy as np

from .util import SamliverError
from .visualization import CLASS_COLORS, CLASS_NAMES

BACKENDS = ("plotly", "itkwidgets")


def label_meshes(
    label: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    *,
    classes: tuple[int, ...] = (1, 2),
    max_faces: int = 30000,
    smooth: float = 1.0,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Surface mesh per class: ``{cls: (verts (V, 3) as (z, y, x) in mm or voxels, faces (F, 3))}``.

    Class 1 (liver) is the whole organ (label >= 1) so tumours sit inside it. Meshes are
    decimated by raising marching cubes' ``step_size`` until at most ``max_faces`` (default
    30000) faces remain, which keeps the widget light. ``smooth`` (voxels, default 1.0) is a
    Gaussian applied before meshing; classes absent from ``label`` are skipped.
    """
    from scipy import ndimage
    from skimage.measure import marching_cubes

    lab = np.asarray(label)
    if lab.ndim != 3:
        raise SamliverError(f"label_meshes needs a 3D label volume (z, y, x), got shape {lab.shape}.")
    sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    meshes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for cls in classes:
        mask = lab >= 1 if cls == 1 else lab == cls
        if mask.sum() < 8:
            continue
        # Pad so surfaces touching the volume border are closed.
        field = np.pad(mask.astype(np.float32), 2)
        if smooth > 0:
            field = ndimage.gaussian_filter(field, smooth)
        level = 0.5 if field.max() > 0.5 else float(field.max()) / 2
        step = 1
        while True:
            verts, faces, _, _ = marching_cubes(field, level=level, spacing=sp, step_size=step)
            if len(faces) <= max_faces or step >= 8:
                break
            step += 1
        verts = verts - 2 * np.asarray(sp)  # undo the padding
        meshes[cls] = (verts.astype(np.float32), faces.astype(np.int32))
    return meshes


def _rgb(cls: int) -> str:
    r, g, b = (int(round(255 * c)) for c in CLASS_COLORS[cls])
    return f"rgb({r},{g},{b})"


def plotly_figure(
    label: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    *,
    widget: bool = True,
    title: str | None = None,
    max_faces: int = 30000,
    liver_opacity: float = 0.25,
):
    """Plotly figure of liver (translucent) and tumour (opaque) surfaces in the class colours.

    ``widget=True`` (default) returns a ``go.FigureWidget`` (interactive in JupyterLab and
    Voila, needs ``anywidget``); ``widget=False`` a plain ``go.Figure`` (e.g. for ``write_html``).
    Axes are in mm when ``spacing`` is known, else in voxels.
    """
    import plotly.graph_objects as go

    meshes = label_meshes(label, spacing, max_faces=max_faces)
    unit = "voxels" if spacing is None else "mm"
    traces = []
    for cls, (verts, faces) in meshes.items():
        z, y, x = verts.T
        traces.append(go.Mesh3d(
            x=x, y=y, z=z, i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
            color=_rgb(cls), opacity=liver_opacity if cls == 1 else 1.0,
            name=CLASS_NAMES[cls], showlegend=True, flatshading=False,
            lighting={"ambient": 0.5, "diffuse": 0.8, "specular": 0.2},
        ))
    n_faces = sum(len(f) for _, f in meshes.values())
    if title is None:
        title = "3D view: liver and tumour surfaces" if meshes else "3D view: no liver or tumour in the label"
    layout = go.Layout(
        title={"text": title},
        scene={
            "xaxis": {"title": {"text": f"x ({unit})"}},
            "yaxis": {"title": {"text": f"y ({unit})"}},
            "zaxis": {"title": {"text": f"z ({unit})"}},
            "aspectmode": "data",
        },
        legend={"title": {"text": "class"}},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        height=480,
        meta={"n_faces": n_faces},
    )
    if widget:
        try:
            return go.FigureWidget(data=traces, layout=layout)
        except ImportError as err:
            raise SamliverError(
                "The interactive 3D view needs anywidget: `pip install anywidget` "
                "(or call view_3d(..., widget=False) for a static plotly figure)."
            ) from err
    return go.Figure(data=traces, layout=layout)


def view_3d(
    label: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    *,
    backend: str = "plotly",
    image: np.ndarray | None = None,
    widget: bool = True,
    title: str | None = None,
    max_faces: int = 30000,
):
    """The 3D view of a label volume (0 background, 1 liver, 2 tumour).

    backend: ``"plotly"`` (default, offline) or ``"itkwidgets"`` (optional, needs the package
    and an internet connection: its viewer loads from CDNs). ``image`` (HU, z, y, x) is shown
    under the labels by itkwidgets only.
    """
    if backend == "plotly":
        return plotly_figure(label, spacing, widget=widget, title=title, max_faces=max_faces)
    if backend == "itkwidgets":
        try:
            from itkwidgets import view  # type: ignore[import-not-found]
        except ImportError as err:
            raise SamliverError(
                "The itkwidgets backend is optional and not installed: `pip install itkwidgets` "
                "(it needs an internet connection at run time; the default backend='plotly' works offline)."
            ) from err
        kwargs = {"label_image": np.asarray(label, np.uint8)}
        if image is not None:
            kwargs["image"] = np.asarray(image, np.float32)
        return view(**kwargs)
    raise SamliverError(f"Unknown 3D backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
