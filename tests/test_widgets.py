"""Widgets without a browser: the plain methods, and the matplotlib events wired to them."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent

from samliver.widgets import SegmentWidget, SliceBrowser, box_from_click, new_figure


class BoxPredictor:
    """Stand-in for the SAM predictor: the mask is the dark-or-bright region inside the box."""

    def __init__(self, hu):
        self.hu, self.calls = hu, []

    def set_embedding(self, emb, original_hw, model_name=None):
        self.hw = tuple(original_hw)

    def set_slice(self, embeddings, z):  # what propagate_mask calls
        self.set_embedding(embeddings[z], embeddings.original_hw)

    def predict(self, points=None, point_labels=None, box=None, multimask_output=False, **_):
        self.calls.append((points, point_labels, box, multimask_output))
        mask = np.zeros(self.hw, bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0:y1 + 1, x0:x1 + 1] = True
        k = 3 if multimask_output else 1
        return np.stack([mask] * k), np.linspace(0.5, 0.9, k), None  # the best mask last


class FakeEmbeddings:
    original_hw = (64, 64)
    window = (-160.0, 240.0)

    def __contains__(self, z):
        return True

    def __getitem__(self, z):
        return np.zeros((256, 64, 64), np.float16)


@pytest.fixture()
def seg(small_phantom, tiny_model):
    w = SegmentWidget(small_phantom, tiny_model, embeddings=FakeEmbeddings(), slices=list(range(16)), z=8)
    w._predictor = BoxPredictor(small_phantom.hu)
    return w


@pytest.fixture(scope="module")
def tiny_model():
    from samliver.models import get_model

    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


def _press_release(w, xy0, xy1, button=1):
    w.fig.canvas.draw()
    p0 = w.ax.transData.transform(xy0)
    p1 = w.ax.transData.transform(xy1)
    MouseEvent("button_press_event", w.fig.canvas, *p0, button=button)._process()
    MouseEvent("motion_notify_event", w.fig.canvas, *p1, button=button)._process()
    MouseEvent("button_release_event", w.fig.canvas, *p1, button=button)._process()


def test_new_figure_is_an_ipympl_widget_without_data_url_sync():
    fig = new_figure()
    assert type(fig.canvas).__name__ == "Canvas"
    assert fig.canvas.syncing_data_url is False


def test_slice_browser_slider_window_overlay_and_views(phantom):
    b = SliceBrowser(phantom)
    z = int(np.argmax((phantom.label == 2).sum(axis=(1, 2))))
    b.slider.value = z  # the widget path, as a user moving the slider
    assert b.index == z and f"axial slice {z}" in b.status.value
    with_overlay = b.rgb()
    b.overlay_cb.value = False
    assert not np.allclose(with_overlay, b.rgb())
    b.overlay_cb.value = True
    b.opacity.value = 0.9
    assert not np.allclose(with_overlay, b.rgb())
    before = b.rgb()
    b.window_dd.value = "bone"
    assert not np.allclose(before, b.rgb())
    b.axis_tb.value = "coronal"
    assert b.rgb().shape[:2] == (phantom.shape[0], phantom.shape[2])
    assert b.slider.max == phantom.shape[1] - 1
    b.axis_tb.value = "sagittal"
    assert b.rgb().shape[:2] == (phantom.shape[0], phantom.shape[1])
    assert "mm" in b.ax.get_xlabel() and "liver" in b.legend.value and "tumour" in b.legend.value


def test_slice_browser_bad_input_is_a_message(phantom):
    b = SliceBrowser(phantom.hu)  # a bare array: no label, spacing unknown
    b.set_index(10_000)
    assert b.status.value.startswith("⚠") and "outside" in b.status.value
    b.set_window("nonsense")
    assert "Unknown HU window" in b.status.value
    assert b.overlay_cb.disabled and "voxels" in b.ax.get_xlabel()


def test_box_from_click_finds_the_lesion_not_the_liver(phantom):
    from scipy import ndimage

    z = int(np.argmax((phantom.label == 2).sum(axis=(1, 2))))
    comps, _ = ndimage.label(phantom.label[z] == 2)
    ys, xs = np.nonzero(comps == 1)
    x0, y0, x1, y1 = box_from_click(phantom.hu[z], float(np.median(xs)), float(np.median(ys)))
    assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
    liver = np.nonzero(phantom.label[z] >= 1)
    assert (x1 - x0) < (liver[1].max() - liver[1].min())


def test_box_drag_on_canvas_segments_and_reports_latency(seg):
    _press_release(seg, (10, 12), (40, 30))
    assert seg.box == (10, 12, 40, 30)
    assert seg.mask is not None and seg.mask.sum() == 31 * 19
    assert seg.latency.value.startswith("decoder:") and "ms" in seg.latency.value and "-" not in seg.latency.value
    assert "mask:" in seg.status.value


def test_click_outside_and_empty_box_are_messages(seg):
    seg.on_click(-20, 5)
    assert seg.status.value.startswith("⚠") and "outside the image" in seg.status.value
    seg.on_box(10, 10, 10.5, 30)
    assert "box is empty" in seg.status.value and seg.box is None
    seg.on_box(-50, -50, -10, -10)  # entirely outside the image
    assert "box is empty" in seg.status.value


def test_lone_click_with_box_trained_model_seeds_a_box(seg, small_phantom):
    seg.box_trained = True
    z = seg.z
    ys, xs = np.nonzero(small_phantom.label[z] >= 1)
    seg.on_click(float(np.median(xs)), float(np.median(ys)), positive=True)
    assert seg.box is not None and seg.mask is not None and seg.mask.any()
    assert "seeded" in seg.status.value
    seg.reset()
    seg.on_click(10, 10, positive=False)
    assert "box-trained" in seg.status.value and seg.box is None


def test_points_go_straight_to_sam_models(seg):
    seg.box_trained = False
    _press_release(seg, (20, 20), (20, 20))  # a click: press and release at the same place
    points, labels, box, _ = seg._predictor.calls[-1]
    assert box is None and labels.tolist() == [1] and np.allclose(points, [[20, 20]], atol=0.6)
    _press_release(seg, (25, 22), (25, 22), button=3)  # right click = negative
    assert seg._predictor.calls[-1][1].tolist() == [1, 0]


def test_multimask_undo_reset_accept_propagate_save(seg, small_phantom, tmp_path):
    from samliver.io import load_volume

    seg.on_box(10, 10, 30, 30)
    seg.multimask.value = True
    assert len(seg.masks) == 3 and len(seg.mask_choice.options) == 3
    assert seg.choice == 2 and seg.mask_choice.value == 2  # the highest predicted IoU is preselected
    seg.mask_choice.value = 0
    assert seg.choice == 0
    seg.on_box(12, 12, 20, 20)
    seg.undo()
    assert seg.box == (10, 10, 30, 30)
    seg.undo()
    assert seg.box is None and seg.mask is None
    seg.undo()
    assert "Nothing to undo" in seg.status.value
    seg.accept()
    assert "No mask to accept" in seg.status.value
    seg.on_box(10, 10, 30, 30)
    seg.target.value = 2
    n = seg.accept()
    assert n == 21 * 21 and (seg.label[8] == 2).sum() == n and "accepted" in seg.status.value
    seg.on_box(5, 5, 40, 40)
    seg.accept(cls=1)  # liver does not overwrite accepted tumour
    assert (seg.label[8] == 2).sum() == n
    seg.on_box(10, 10, 20, 20)
    done = seg.propagate(cls=1, max_slices=2)
    assert done == [6, 7, 8, 9, 10] and (seg.label[6] == 1).any() and seg.z == 8
    out = seg.save(str(tmp_path / "label.nii.gz"))
    back = load_volume(out)
    assert np.array_equal(back.hu.astype(np.uint8), seg.label)
    seg.save(str(tmp_path / "label.txt"))
    assert "must end in .nii" in seg.status.value
    seg.reset()
    assert seg.box is None and seg.points == []


def test_segment_widget_with_the_tiny_sam_model_runs_end_to_end(small_phantom, tiny_model):
    # real Predictor and encoder code path (random weights: only shapes are meaningful)
    w = SegmentWidget(small_phantom, tiny_model, slices=[8], z=8)
    mask = w.on_box(8, 8, 40, 40)
    assert not w.status.value.startswith("⚠ Unexpected"), w.status.value
    assert mask is not None and mask.shape == small_phantom.shape[1:] and mask.dtype == bool
    assert w.latency_ms is not None


def test_missing_slices_are_encoded_into_the_given_cache(small_phantom, tiny_model, tmp_path):
    from samliver.embeddings import embed_volume

    emb = embed_volume(small_phantom, tiny_model, slices=[8], progress=False, cache_root=tmp_path)
    w = SegmentWidget(small_phantom, tiny_model, embeddings=emb, slices=[8, 9], z=8)
    w.on_box(8, 8, 40, 40)
    assert w.encode_s is None and "encoder" not in w.latency.value  # slice 8 came from the cache
    assert 9 not in emb
    w.slider.value = 9
    w.on_box(8, 8, 40, 40)
    assert not w.status.value.startswith("⚠ Unexpected"), w.status.value
    assert w.encode_s is not None and "encoder" in w.latency.value
    assert 9 in emb and w.embeddings is emb  # same cache folder, same object


@pytest.mark.slow
def test_litemedsam_widget_on_cached_sample_embeddings(sample_volume):
    from scipy import ndimage

    from samliver.embeddings import embed_volume
    from samliver.models import get_model

    model = get_model("litemedsam", device="cpu")
    z = int(np.argmax((sample_volume.label >= 1).sum(axis=(1, 2))))
    slices = list(range(z - 2, z + 3))
    emb = embed_volume(sample_volume, model, slices=slices, progress=False)
    w = SegmentWidget(sample_volume, model, embeddings=emb, slices=slices, z=z)
    assert w.box_trained

    def dice(a, b):
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    liver = sample_volume.label[z] >= 1
    ys, xs = np.nonzero(liver)
    mask = w.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    assert dice(mask, liver) > 0.8, w.status.value
    assert w.latency_ms is not None and w.encode_s is None and "mask:" in w.status.value
    w.multimask.value = True
    assert len(w.masks) == 3 and len(w.mask_choice.options) == 3
    w.multimask.value = False
    w.reset()
    # a lone click on a lesion: litemedsam is box-trained, so the click seeds a box
    comps, n = ndimage.label(sample_volume.label[z] == 2)
    big = comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:]))
    ty, tx = (float(np.median(a)) for a in np.nonzero(big))
    mask = w.on_click(tx, ty)
    assert "seeded" in w.status.value and w.box is not None
    assert dice(mask, big) > 0.5, (dice(mask, big), w.box)
    w.undo()
    assert w.box is None and w.mask is None
    w.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    done = w.propagate(cls=1, max_slices=2)
    assert done == slices, (done, w.status.value)
    got = w.label[slices] >= 1
    assert dice(got, sample_volume.label[slices] >= 1) > 0.8 and "propagated liver to 5 slices" in w.status.value


def test_notebook_figures_have_titles_axes_and_legends(phantom):
    from samliver.visualization import hu_histogram_figure, prediction_figure, window_figure, zero_shot_figure

    figs = [hu_histogram_figure(phantom), window_figure(phantom, 16), prediction_figure(phantom, phantom.label, [10, 16]),
            zero_shot_figure([{"mode": "box", "liver_dice": 0.9, "tumour_dice": None},
                              {"mode": "point", "liver_dice": 0.2, "tumour_dice": 0.05}])]
    for fig in figs:
        ax = fig.axes[0]
        assert (ax.get_title() or fig._suptitle is not None) and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None or fig.legends or len(fig.axes) > 1
