"""The NiiVue viewer without a browser: files in the volume's geometry, layers, toggles, legend."""

from __future__ import annotations

import numpy as np
import pytest

from samliver.util import SamliverError
from samliver.viewer import (
    LAYERS,
    VolumeViewer,
    label_colormap,
    layer_rgb,
    legend_html,
    show_volume,
)
from samliver.visualization import CLASS_COLORS

pytest.importorskip("ipyniivue")


def test_colours_follow_the_class_colours_and_the_reference_is_lighter():
    for cls in (1, 2):
        assert layer_rgb("prediction", cls) == tuple(int(round(255 * c)) for c in CLASS_COLORS[cls])
        assert sum(layer_rgb("reference", cls)) > sum(layer_rgb("prediction", cls))
    cmap = label_colormap("prediction")
    assert cmap["A"][0] == 0 and cmap["I"] == [0, 1, 2] and cmap["labels"][1:] == ["liver", "tumour"]
    html = legend_html({"prediction": True, "reference": False})
    assert "head prediction" in html and "reference label</b> (hidden)" in html and "liver" in html


def test_viewer_writes_ct_and_labels_in_one_geometry(small_phantom):
    import nibabel as nib

    v = VolumeViewer(small_phantom, prediction=small_phantom.label)
    try:
        ct, pred = nib.load(str(v.ct_path)), nib.load(str(v.paths["prediction"]))
        assert ct.shape == pred.shape == small_phantom.shape[::-1]
        assert np.allclose(ct.affine, pred.affine)
        assert np.array_equal(np.asarray(pred.dataobj).transpose(2, 1, 0), small_phantom.label)
        assert abs(float(np.asarray(ct.dataobj).mean()) - float(small_phantom.hu.mean())) < 1.0
        # CT below, then the layers bottom to top; the reference starts hidden under a prediction
        assert [vol.name for vol in v.nv.volumes] == ["CT", "reference", "prediction"]
        assert v.visible == {"reference": False, "prediction": True}
        assert v.nv.volumes[1].opacity == 0.0 and v.nv.volumes[2].opacity > 0
        assert v.nv.volumes[2].colormap_label is not None
        assert v.nv.layout.width  # NiiVue's canvas is 0 px wide in a flex box without a width
    finally:
        v.close()
    assert not v.ct_path.exists()  # the temporary files go with the viewer


def test_a_new_prediction_hides_the_reference(small_phantom):
    v = VolumeViewer(small_phantom)
    assert v.visible == {"reference": True}
    v.set_layer("prediction", small_phantom.label)
    assert v.visible == {"reference": False, "prediction": True} and v.nv.volumes[1].opacity == 0.0
    assert v.toggles["reference"].value is False
    v.show("reference", True)
    v.set_layer("prediction", small_phantom.label)  # a newer prediction leaves the user's choice alone
    assert v.visible["reference"] is True
    v.close()


def test_layers_toggle_replace_and_remove(small_phantom):
    v = VolumeViewer(small_phantom, reference=None)
    assert v.layers == [] and "no label layer" in v.legend.value
    v.set_layer("prediction", small_phantom.label)
    ct_volume = v.nv.volumes[0]
    first = v.paths["prediction"]
    v.toggles["prediction"].value = False  # the checkbox, as a user would
    assert v.nv.volumes[1].opacity == 0.0 and "(hidden)" in v.legend.value
    v.show("prediction", True)
    assert v.toggles["prediction"].value is True and v.nv.volumes[1].opacity > 0
    empty = np.zeros_like(small_phantom.label)
    v.set_layer("prediction", empty)
    assert v.nv.volumes[0] is ct_volume  # the CT is not sent again
    assert v.paths["prediction"] != first and not first.exists()
    v.set_layer("label", small_phantom.label)
    assert [vol.name for vol in v.nv.volumes] == ["CT", "prediction", "label"]
    v.set_layer("prediction", None)
    assert v.layers == ["label"] and list(v.toggles) == ["prediction", "label"]
    assert len(v.toggle_box.children) == 1
    with pytest.raises(SamliverError, match="shape"):
        v.set_layer("label", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(SamliverError, match="Unknown layer"):
        v.set_layer("overlay", empty)
    with pytest.raises(SamliverError, match="no 'reference' layer"):
        v.show("reference")
    v.close()


def test_non_nifti_volume_gets_an_int16_ct_file(small_phantom):
    import nibabel as nib

    from samliver.io import CTVolume

    vol = CTVolume(hu=small_phantom.hu, spacing=(2.0, 1.0, 1.0), label=small_phantom.label)
    v = VolumeViewer(vol)
    try:
        img = nib.load(str(v.ct_path))
        assert img.get_data_dtype() == np.int16 and np.allclose(np.abs(np.diag(img.affine))[:3], (1, 1, 2))
        assert np.allclose(img.affine, nib.load(str(v.paths["reference"])).affine)
    finally:
        v.close()


def test_nifti_source_is_shown_as_it_is(sample_volume):
    v = VolumeViewer(sample_volume)
    try:
        assert str(v.ct_path) == sample_volume.meta["source_path"] and v.layers == ["reference"]
    finally:
        v.close()


def test_show_volume_backends(small_phantom, monkeypatch):
    v = show_volume(small_phantom, prediction=small_phantom.label)
    assert isinstance(v, VolumeViewer)
    v.close()
    fig = show_volume(small_phantom, backend="plotly")  # the reference, as surfaces
    assert type(fig).__name__ == "FigureWidget" and len(fig.data) >= 1
    monkeypatch.setattr("samliver.viewer.niivue_available", lambda: False)
    assert type(show_volume(small_phantom, prediction=small_phantom.label)).__name__ == "FigureWidget"
    with pytest.raises(SamliverError, match="Unknown viewer backend"):
        show_volume(small_phantom, backend="vtk")
    with pytest.raises(SamliverError, match="Nothing to show"):
        show_volume(small_phantom, reference=None)
    assert set(LAYERS) == {"reference", "prediction", "label"}
