"""The offline 3D view: meshes from labels, plotly figures in the class colours, backends."""

from __future__ import annotations

import numpy as np
import pytest

from samliver.util import SamliverError
from samliver.view3d import label_meshes, plotly_figure, view_3d
from samliver.visualization import CLASS_COLORS


def test_label_meshes_in_mm_inside_the_volume(phantom):
    meshes = label_meshes(phantom.label, phantom.spacing)
    assert set(meshes) == {1, 2}
    extent = np.asarray(phantom.shape) * np.asarray(phantom.spacing)
    for verts, faces in meshes.values():
        assert verts.shape[1] == 3 and faces.shape[1] == 3 and faces.max() < len(verts)
        assert verts.min() >= -1.0 and (verts.max(axis=0) <= extent + 1.0).all()
    # tumour surfaces lie inside the liver's bounding box
    lv, tv = meshes[1][0], meshes[2][0]
    assert (tv.min(0) >= lv.min(0) - 1).all() and (tv.max(0) <= lv.max(0) + 1).all()


def test_decimation_caps_faces(phantom):
    full = label_meshes(phantom.label, classes=(1,), max_faces=10**9)[1][1]
    light = label_meshes(phantom.label, classes=(1,), max_faces=3000)[1][1]
    assert len(light) <= 3000 < len(full)


def test_plotly_figure_colours_names_units(phantom):
    fig = plotly_figure(phantom.label, phantom.spacing, widget=False)
    names = [t.name for t in fig.data]
    assert names == ["liver", "tumour"]
    r, g, b = (int(round(255 * c)) for c in CLASS_COLORS[2])
    assert fig.data[1].color == f"rgb({r},{g},{b})" and fig.data[0].opacity < 1
    assert fig.layout.scene.xaxis.title.text == "x (mm)" and fig.layout.title.text
    none = plotly_figure(phantom.label, None, widget=False)
    assert none.layout.scene.zaxis.title.text == "z (voxels)"


def test_widget_backend_and_empty_label(phantom):
    w = view_3d(phantom.label, phantom.spacing)
    assert type(w).__name__ == "FigureWidget" and len(w.data) == 2
    empty = view_3d(np.zeros((8, 16, 16), np.uint8), widget=False)
    assert len(empty.data) == 0 and "no liver" in empty.layout.title.text


def test_bad_backend_and_missing_itkwidgets(phantom):
    with pytest.raises(SamliverError, match="Unknown 3D backend"):
        view_3d(phantom.label, backend="vtk")
    try:
        import itkwidgets  # noqa: F401
    except ImportError:
        with pytest.raises(SamliverError, match="pip install itkwidgets"):
            view_3d(phantom.label, backend="itkwidgets")
    with pytest.raises(SamliverError, match="3D label"):
        label_meshes(phantom.label[0])
