import numpy as np
import pytest

from samliver.io import CTVolume
from samliver.visualization import (
    CLASS_COLORS,
    CLASS_NAMES,
    class_cmap,
    legend_handles,
    overlay_rgb,
    overview_figure,
)


def test_classes_fixed():
    assert CLASS_NAMES == {0: "background", 1: "liver", 2: "tumour"}
    assert set(CLASS_COLORS) == {1, 2} and CLASS_COLORS[1] != CLASS_COLORS[2]
    cmap = class_cmap()
    assert cmap(0)[3] == 0 and cmap(2)[:3] == pytest.approx(CLASS_COLORS[2])
    assert [h.get_label() for h in legend_handles()] == ["liver", "tumour"]


def test_overlay_rgb():
    img = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0], lab[3, 3] = 1, 2
    rgb = overlay_rgb(img, lab, alpha=0.5)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[1, 1], [img[1, 1]] * 3)  # background untouched
    np.testing.assert_allclose(rgb[0, 0], 0.5 * img[0, 0] + 0.5 * np.array(CLASS_COLORS[1]), atol=1e-6)
    np.testing.assert_allclose(rgb[3, 3], 0.5 * img[3, 3] + 0.5 * np.array(CLASS_COLORS[2]), atol=1e-6)
    assert overlay_rgb(img, None).shape == (4, 4, 3)
    with pytest.raises(ValueError):
        overlay_rgb(img, lab[:2])


def test_overview_figure_phantom_mm(tmp_path, phantom):
    fig = overview_figure(phantom, tmp_path / "ov.png")
    assert (tmp_path / "ov.png").stat().st_size > 10_000
    axes = fig.axes
    assert [a.get_title().split()[0] for a in axes] == ["axial", "coronal", "sagittal"]
    assert axes[0].get_xlabel() == "x (mm)" and axes[1].get_ylabel() == "z (mm)"
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "tumour"]
    # axial slice goes through the largest tumour cross-section
    z_best = int(np.argmax((phantom.label == 2).sum(axis=(1, 2))))
    assert axes[0].get_title() == f"axial (z = {z_best})"


def test_overview_figure_unknown_spacing(sample_volume):
    fig = overview_figure(sample_volume)
    assert fig.axes[0].get_xlabel() == "x (voxels)"
    assert "voxels" in fig._suptitle.get_text()


def test_overview_without_label(small_phantom):
    vol = CTVolume(hu=small_phantom.hu)
    fig = overview_figure(vol, index=(1, 2, 3))
    assert not fig.legends and fig.axes[2].get_title() == "sagittal (x = 3)"


def test_figure_builders_return_figures(tmp_path):
    """Each builder returns a Figure (no pyplot state); save_figure writes it atomically."""
    from matplotlib.figure import Figure

    from samliver.io import CTVolume
    from samliver.visualization import comparison_figure, label_efficiency_figure, prompt_figure, save_figure, training_curves_figure

    hu = np.full((3, 16, 16), -100.0, np.float32)
    lab = np.zeros((3, 16, 16), np.uint8)
    lab[:, 4:12, 4:12] = 1
    figs = [
        prompt_figure(hu[1], lab[1] > 0, box=(4, 4, 12, 12), points=[(8, 8)], labels=[1]),
        comparison_figure(CTVolume(hu=hu, label=lab), lab, [0, 2]),
        training_curves_figure({"step": [0, 1, 2], "loss": [1.0, 0.8, 0.5], "val_step": [3],
                                "val_liver": [0.9], "val_tumour": [0.5], "val_on": "train"}),
        label_efficiency_figure([{"protocol": "sparse", "method": "cnn", "k": 2, "liver_dice": 0.9,
                                  "liver_dice_sd": 0.01, "tumour_dice": 0.5, "tumour_dice_sd": 0.0}]),
    ]
    for i, fig in enumerate(figs):
        assert isinstance(fig, Figure)
        assert save_figure(fig, tmp_path / f"f{i}.png").stat().st_size > 0
