"""Widgets without a browser: the plain methods, the matplotlib events wired to them, and the
annotation loop's UI state (strip, outlines, progress, buttons) over a real Session."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent

from samliver.visualization import CLASS_COLORS
from samliver.widgets import (
    CANDIDATE_COLOR,
    AnnotateWidget,
    SegmentWidget,
    SliceBrowser,
    box_from_click,
    new_figure,
    slice_rgb,
    strip_html,
)


class BoxPredictor:
    """Stand-in for the SAM predictor: the mask is the box itself (deterministic, fast)."""

    def __init__(self, region=None):
        self.calls, self.region, self.z = [], region, None  # region (z, y, x): masks stay inside it

    def set_embedding(self, emb, original_hw, model_name=None):
        self.hw = tuple(original_hw)

    def set_slice(self, embeddings, z):
        self.z = z
        self.set_embedding(None, embeddings.original_hw)

    def predict(self, points=None, point_labels=None, box=None, multimask_output=False, **_):
        self.calls.append((points, point_labels, box, multimask_output))
        mask = np.zeros(self.hw, bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0:y1 + 1, x0:x1 + 1] = True
        if self.region is not None:
            mask &= self.region[self.z]
        k = 3 if multimask_output else 1
        return np.stack([mask] * k), np.linspace(0.5, 0.9, k), None  # the best mask last


@pytest.fixture(scope="module")
def tiny_model():
    from samliver.models import get_model

    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_embeddings(small_phantom, tiny_model, tmp_path_factory):
    from samliver.embeddings import embed_volume

    return embed_volume(small_phantom, tiny_model, progress=False, cache_root=tmp_path_factory.mktemp("emb"))


def _quick_config():
    from samliver.training import TrainConfig

    return TrainConfig(kind="linear", steps=6, val_fraction=0.0, eval_every=6, warmup=0)


@pytest.fixture()
def seg(small_phantom, tiny_model, tiny_embeddings):
    w = SegmentWidget(small_phantom, tiny_model, embeddings=tiny_embeddings, slices=list(range(16)), z=8,
                      background=False)
    w.session._predictor = BoxPredictor()
    return w


@pytest.fixture()
def loop(small_phantom, tiny_model, tiny_embeddings, tmp_path):
    w = AnnotateWidget(small_phantom, tiny_model, embeddings=tiny_embeddings, z=8, background=False,
                       config=_quick_config(), out_dir=str(tmp_path / "session"))
    w.session._predictor = BoxPredictor()
    return w


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


def test_box_drag_on_canvas_prompts_the_session_and_draws_the_candidate_in_its_own_colour(seg):
    _press_release(seg, (10, 12), (40, 30))
    assert seg.box == (10, 12, 40, 30) and seg.session.prompts()["box"] is not None
    assert seg.mask is not None and seg.mask.sum() == 31 * 19
    assert seg.latency.value.startswith("decoder:") and "ms" in seg.latency.value and "-" not in seg.latency.value
    assert "SAM mask:" in seg.status.value and "not accepted" in seg.ax.get_title()
    rgb = seg.current_rgb()
    magenta = np.asarray(CANDIDATE_COLOR)
    inside, outside = rgb[20, 20], rgb[50, 50]
    assert np.linalg.norm(inside - magenta) < np.linalg.norm(outside - magenta)
    assert (seg.label == 0).all()  # nothing is in the label before accept: no pre-filled widget


def test_click_outside_and_empty_box_are_messages(seg):
    seg.on_click(-20, 5)
    assert seg.status.value.startswith("⚠") and "outside the image" in seg.status.value
    seg.on_box(10, 10, 10.5, 30)
    assert "box is empty" in seg.status.value and seg.box is None
    seg.on_box(-50, -50, -10, -10)  # entirely outside the image
    assert "box is empty" in seg.status.value


def test_lone_click_with_box_trained_model_seeds_a_box(seg, small_phantom):
    seg.session.box_trained = True
    z = seg.z
    ys, xs = np.nonzero(small_phantom.label[z] >= 1)
    seg.on_click(float(np.median(xs)), float(np.median(ys)), positive=True)
    assert seg.box is not None and seg.mask is not None and seg.mask.any()
    assert "seeded" in seg.status.value
    seg.reset()
    seg.on_click(10, 10, positive=False)
    assert "box-trained" in seg.status.value and seg.box is None


def test_points_go_straight_to_sam_models(seg):
    seg.session.box_trained = False
    _press_release(seg, (20, 20), (20, 20))  # a click: press and release at the same place
    points, labels, box, _ = seg.session._predictor.calls[-1]
    assert box is None and labels.tolist() == [1] and np.allclose(points, [[20, 20]], atol=0.6)
    _press_release(seg, (25, 22), (25, 22), button=3)  # right click = negative
    assert seg.session._predictor.calls[-1][1].tolist() == [1, 0]


def test_class_switch_starts_a_tumour_prompt_and_says_so(seg):
    seg.on_box(5, 5, 40, 40)
    assert seg.cls == 1 and seg.mask is not None
    seg.target.value = 2  # the toggle, as a user would
    assert seg.session.cls == 2 and seg.mask is None  # a new (slice, tumour) prompt, liver's kept
    assert "tumour" in seg.status.value and "liver prompt on this slice is kept" in seg.status.value
    assert "switch to <i>tumour</i>" in seg.class_help.value
    seg.on_box(10, 10, 20, 20)
    assert seg.session.prompts(cls=1)["box"] == (5.0, 5.0, 40.0, 40.0)
    assert seg.accept() == 11 * 11 and (seg.label[8] == 2).sum() == 11 * 11


def test_multimask_scores_are_explained_undo_reset_accept_clear_propagate_save(seg, small_phantom, tmp_path):
    from samliver.io import load_volume

    seg.on_box(10, 10, 30, 30)
    assert seg.scores_help.value and "predicted IoU" in seg.scores_help.value
    seg.multimask.value = True
    assert len(seg.masks) == 3 and len(seg.mask_choice.options) == 3
    assert seg.session.choice == 2 and seg.mask_choice.value == 2  # the highest predicted IoU is preselected
    seg.mask_choice.value = 0
    assert seg.session.choice == 0
    seg.multimask.value = False
    seg.on_box(12, 12, 20, 20)
    seg.undo()
    assert seg.box == (10, 10, 30, 30)
    seg.undo()
    assert seg.box is None and seg.mask is None
    seg.undo()
    assert "Nothing to undo" in seg.status.value
    seg.accept()
    assert "No liver mask to accept" in seg.status.value
    seg.on_box(10, 10, 30, 30)
    seg.target.value = 2
    seg.on_box(10, 10, 30, 30)
    n = seg.accept()
    assert n == 21 * 21 and (seg.label[8] == 2).sum() == n and "accepted" in seg.status.value
    seg.target.value = 1
    seg.on_box(5, 5, 40, 40)
    seg.accept()  # liver does not overwrite accepted tumour
    assert (seg.label[8] == 2).sum() == n and 8 in seg.session.confirmed
    seg.b_clear.click()  # "clear label"
    assert not seg.label[8].any() and 8 not in seg.session.confirmed and "cleared" in seg.status.value
    seg.undo()  # no prompt left: the label change is undone
    assert (seg.label[8] == 2).sum() == n and "undone" in seg.status.value
    liver = small_phantom.label >= 1
    seg.session._predictor.region = liver  # SAM finds the liver inside the box
    ys, xs = np.nonzero(liver[8])
    seg.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    done = seg.propagate(max_slices=2)
    assert done == [6, 7, 8, 9, 10] and (seg.label[6] == 1).any() and seg.z == 8, seg.status.value
    assert "propagated liver" in seg.status.value and seg.work_label.value.startswith("done in")
    assert not seg.b_accept.disabled
    out = seg.save(str(tmp_path / "label.nii.gz"))
    back = load_volume(out)
    assert np.array_equal(back.hu.astype(np.uint8), seg.label)
    seg.save(str(tmp_path / "label.txt"))
    assert "must end in .nii" in seg.status.value


def test_buttons_are_disabled_while_a_long_action_runs(seg):
    import threading

    gate = threading.Event()
    seg.background = True
    seen = {}

    def job(tick):
        tick(1, 4, "working")
        seen["disabled"] = [b.disabled for b in seg.action_buttons]
        gate.wait(10)
        return 3

    seg._run("testing", job, lambda r: r)
    for _ in range(100):
        if "disabled" in seen:
            break
        threading.Event().wait(0.05)
    assert seg.busy and all(seen["disabled"])
    seg.on_box(10, 10, 30, 30)
    assert "Wait: another action" in seg.status.value
    assert seg.work.layout.visibility == "visible" and "testing: working" in seg.work_label.value
    gate.set()
    assert seg.wait(10) and not any(b.disabled for b in seg.action_buttons)


def test_slice_rgb_outlines_the_prediction_and_fills_the_label():
    img = np.full((20, 20), 0.5, np.float32)
    pred = np.zeros((20, 20), np.uint8)
    pred[5:15, 5:15] = 1
    rgb = slice_rgb(img, None, prediction=pred)
    assert np.allclose(rgb[5, 8], CLASS_COLORS[1]) and np.allclose(rgb[10, 10], 0.5)  # edge vs inside
    lab = pred.copy()
    rgb = slice_rgb(img, lab)
    assert not np.allclose(rgb[10, 10], 0.5)
    html = strip_html(np.array([0, 1, 2, 1]), current=2, suggested=[3])
    assert html.count("title='slice") == 4 and "slice 3: suggested" in html and "confirmed by you" in html


def test_annotate_loop_train_suggest_confirm_save(loop, small_phantom, tmp_path):
    def states():
        return loop.session.slice_states().tolist()

    loop.train()
    assert "No confirmed slice" in loop.status.value
    for z in (4, 8, 12):
        loop.slider.value = z
        ys, xs = np.nonzero(small_phantom.label[z] >= 1)
        loop.on_box(xs.min(), ys.min(), xs.max(), ys.max())
        loop.accept()
    assert sorted(loop.session.confirmed) == [4, 8, 12]
    assert loop.strip.value.count("#08519c") >= 3  # confirmed cells on the strip
    summary = loop.train()
    assert summary is not None and summary["steps"] == 6, loop.status.value
    assert loop.session.prediction is not None and set(states()) == {1, 2}
    # the summary stays on screen after training: loss, time, Dice vs the phantom's reference
    assert "final loss" in loop.train_summary.value and "Dice vs reference" in loop.train_summary.value
    assert loop.work.value == loop.work.max and loop.work.bar_style == "success"
    assert "head: liver" in loop.legend.value
    assert loop.b_cancel.disabled and not loop.b_train.disabled
    sug = loop.suggest_next()
    assert sug and loop.z == sug[0] and sug[0] not in (4, 8, 12) and "suggested slice" in loop.status.value
    assert "[predicted by the head]" in loop.ax.get_title()
    loop.confirm()
    assert loop.z in loop.session.confirmed and states()[loop.z] == 2
    assert np.array_equal(loop.label[loop.z], loop.session.export_label()[loop.z])
    paths = loop.save_session(str(tmp_path / "s"))
    assert paths is not None and {"label", "head", "session"} <= set(paths) and "saved" in loop.status.value


def test_annotate_cancel_keeps_the_previous_head(loop, small_phantom):
    ys, xs = np.nonzero(small_phantom.label[8] >= 1)
    loop.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    loop.accept()
    import threading

    loop._cancel = threading.Event()
    loop.cancel()  # nothing runs yet: a no-op apart from the message
    loop.session.config.steps = 400
    original_train = loop.session.train

    def cancelled_train(**kw):
        kw["cancel"].set()
        return original_train(**kw)

    loop.session.train = cancelled_train
    summary = loop.train()
    assert summary["stopped"] == "cancelled" and loop.session.head is None
    assert "cancelled" in loop.status.value and "cancelled" in loop.train_summary.value


def test_annotate_without_reference_shows_no_dice(small_phantom, tiny_model, tiny_embeddings):
    from samliver.annotate import Session

    s = Session(small_phantom, tiny_model, embeddings=tiny_embeddings, reference=None, config=_quick_config())
    w = AnnotateWidget(session=s, background=False)
    w.session._predictor = BoxPredictor()
    ys, xs = np.nonzero(small_phantom.label[8] >= 1)
    w.set_slice(8)
    w.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    w.accept()
    w.train()
    assert "final loss" in w.train_summary.value and "Dice" not in w.train_summary.value


def test_segment_widget_with_the_tiny_sam_model_runs_end_to_end(small_phantom, tiny_model, tiny_embeddings):
    # real Predictor code path (random weights: only shapes are meaningful)
    w = SegmentWidget(small_phantom, tiny_model, embeddings=tiny_embeddings, slices=[8], z=8)
    mask = w.on_box(8, 8, 40, 40)
    assert not w.status.value.startswith("⚠ Unexpected"), w.status.value
    assert mask is not None and mask.shape == small_phantom.shape[1:] and mask.dtype == bool
    assert w.session.latency_ms is not None


@pytest.mark.slow
def test_litemedsam_widget_on_cached_sample_embeddings(sample_volume):
    from scipy import ndimage

    from samliver.embeddings import embed_volume
    from samliver.evaluation import dice
    from samliver.models import get_model

    model = get_model("litemedsam", device="cpu")
    z = int(np.argmax((sample_volume.label >= 1).sum(axis=(1, 2))))
    slices = list(range(z - 2, z + 3))
    emb = embed_volume(sample_volume, model, slices=slices, progress=False)
    w = SegmentWidget(sample_volume, model, embeddings=emb, slices=slices, z=z, background=False)
    assert w.box_trained
    liver = sample_volume.label[z] >= 1
    ys, xs = np.nonzero(liver)
    mask = w.on_box(xs.min(), ys.min(), xs.max(), ys.max())
    assert dice(mask, liver) > 0.8, w.status.value
    w.multimask.value = True
    assert len(w.masks) == 3 and len(w.mask_choice.options) == 3
    w.multimask.value = False
    w.reset()
    # a lone click on a lesion: litemedsam is box-trained, so the click seeds a box
    comps, n = ndimage.label(sample_volume.label[z] == 2)
    big = comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:]))
    ty, tx = (float(np.median(a)) for a in np.nonzero(big))
    w.target.value = 2
    mask = w.on_click(tx, ty)
    assert "seeded" in w.status.value and w.box is not None
    assert dice(mask, big) > 0.5, (dice(mask, big), w.box)


def test_notebook_figures_have_titles_axes_and_legends(phantom):
    from samliver.visualization import (
        hu_histogram_figure,
        prediction_figure,
        window_figure,
        zero_shot_figure,
    )

    figs = [hu_histogram_figure(phantom), window_figure(phantom, 16), prediction_figure(phantom, phantom.label, [10, 16]),
            zero_shot_figure([{"mode": "box", "liver_dice": 0.9, "tumour_dice": None},
                              {"mode": "point", "liver_dice": 0.2, "tumour_dice": 0.05}])]
    for fig in figs:
        ax = fig.axes[0]
        assert (ax.get_title() or fig._suptitle is not None) and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None or fig.legends or len(fig.axes) > 1
