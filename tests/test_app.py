"""The Voila app's logic without a browser: loading, bad input, a head on the whole volume."""

from __future__ import annotations

import numpy as np
import pytest

from samliver import app as app_mod
from samliver.app import App


@pytest.fixture(scope="module")
def tiny_model():
    from samliver.models import get_model

    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture()
def app(tiny_model, tmp_path):
    from samliver.training import TrainConfig

    return App(model=tiny_model, out_dir=str(tmp_path / "app"), background=False,
               config=TrainConfig(kind="linear", steps=6, val_fraction=0.0, eval_every=6, warmup=0))


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory, small_phantom):
    from samliver.io import save_volume_nifti

    folder = tmp_path_factory.mktemp("ct")
    return str(save_volume_nifti(small_phantom.hu, folder / "phantom.nii.gz", spacing=small_phantom.spacing))


def test_notebook_is_package_data_and_command_line():
    nb = app_mod.notebook_path()
    assert nb.is_file() and "build_app" in nb.read_text()
    cmd = app_mod.voila_command(port=9999)
    assert "voila" in cmd and "--port=9999" in cmd and "--Voila.ip=127.0.0.1" in cmd


def test_main_prints_the_voila_command(capsys):
    assert app_mod.main(["--port", "8123", "--print-command"]) == 0
    assert "--port=8123" in capsys.readouterr().out


def test_bad_input_is_a_message_not_a_traceback(app, tmp_path):
    assert app.load("") is False and "⚠" in app.status.value
    assert app.load(str(tmp_path / "missing.nii.gz")) is False and "⚠" in app.status.value
    notct = tmp_path / "notes.nii.gz"
    notct.write_bytes(b"this is not a CT")
    assert app.load(str(notct)) is False and "⚠" in app.status.value
    assert app.load_bytes("report.pdf", b"%PDF") is False and "not a CT file" in app.status.value
    app.source_dd.value = "upload"
    assert app.load_from_ui() is False and "upload" in app.status.value
    assert app.run_head("outputs/head.pt") is None and "Load a CT first" in app.status.value


def test_load_browse_segment_and_missing_head(app, phantom_file, tmp_path):
    app.source_dd.value = "path"
    app.path_text.value = phantom_file
    assert app.load_from_ui() is True, app.status.value
    assert "shape (16, 64, 64)" in app.summary.value
    assert app.browser is not None and app.segmenter is not None
    assert "No label to overlay" in app.overlay_note.value  # this CT came without a reference
    assert app.run_head(str(tmp_path / "nope.pt")) is None
    assert "not found" in app.status.value and "label a volume" in app.status.value


def test_run_head_shows_progress_burden_viewer_and_download(app, phantom_file, tiny_model, tmp_path):
    import torch

    from samliver.checkpoints import save_checkpoint
    from samliver.heads import build_head
    from samliver.training import TrainConfig

    head = build_head("linear", model=tiny_model)
    with torch.no_grad():  # a zeroed head (all background): this test is about the plumbing
        for p in head.parameters():
            p.zero_()
    path = save_checkpoint(tmp_path / "head.pt", head, config=TrainConfig(kind="linear"),
                           model_info={"model_name": "tiny", "weights_id": tiny_model.weights_id,
                                       "window": "abdomen"})
    assert app.load(phantom_file)
    label = app.run_head(str(path), slices=[7, 8])
    assert label is not None, app.status.value
    assert label.shape == (16, 64, 64) and label.dtype == np.uint8
    assert "tumour burden" in app.burden_html.value and "saved head head.pt" in app.burden_html.value
    assert "data:application/octet-stream;base64," in app.download.value
    # measured, not guessed: the note reports the time it took and what came from the cache
    assert "segmented 2 slices in" in app.head_status.value and "about" not in app.head_status.value
    assert app.head_progress.bar_style == "success" and not app.b_head.disabled
    assert len(app.view3d_box.children) == 1
    # the browse tab says that it now shows a prediction
    assert app.overlay_choice.value == "prediction" and "head's prediction" in app.overlay_note.value
    assert "overlay: head prediction" in app.browser.title


def test_label_a_volume_in_the_app_train_then_download_label_and_head(app, phantom_file, small_phantom):
    from test_widgets import BoxPredictor

    from samliver.viewer import VolumeViewer

    assert app.load(phantom_file)
    w = app.annotator
    w.session._predictor = BoxPredictor()
    for z in (5, 10):
        w.slider.value = z
        ys, xs = np.nonzero(small_phantom.label[z] >= 1)
        w.on_box(xs.min(), ys.min(), xs.max(), ys.max())
        w.b_accept.click()
    assert sorted(w.session.confirmed) == [5, 10]
    w.b_train.click()
    assert w.session.prediction is not None, w.status.value
    assert app.prediction is not None and "2 confirmed slices" in app.prediction_source
    assert "Dice" not in w.train_summary.value  # no reference with this CT
    if isinstance(app.viewer, VolumeViewer):
        assert "prediction" in app.viewer.layers
    w.b_save_all.click()
    assert app.seg_download.value.count("data:application/octet-stream;base64,") == 2, w.status.value
    assert "your label (NIfTI)" in app.seg_download.value and "the head" in app.seg_download.value


def test_sample_in_the_app_overlays_the_reference_and_says_so(app):
    assert app.load("sample"), app.status.value
    assert app.overlay_choice.value == "reference" and "reference label" in app.overlay_note.value
