"""The annotation loop (Session) and the simulated annotator, with the tiny random model.

The tiny model has random weights, so SAM's masks are meaningless here: tests that need a
sensible label write the phantom's reference into the session's label after accepting.
"""

from __future__ import annotations

import json
import threading
import types

import numpy as np
import pytest

from samliver.annotate import CONFIRMED, PREDICTED, UNLABELLED, Session, annotation_train_config
from samliver.prompts import box_from_mask
from samliver.training import TrainConfig
from samliver.util import SamliverError

# The cheapest head and two steps: these tests check the loop's logic, not the head's quality.
FAST = dict(kind="linear", steps=2, batch_size=2, warmup=1, val_fraction=0.0, eval_every=2)


@pytest.fixture(scope="module")
def tiny_model():
    from samliver.models import get_model

    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private cache for the module's embeddings."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture()
def session(small_phantom, tiny_model, home, monkeypatch):
    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    return Session(small_phantom, tiny_model, config=TrainConfig(**FAST))


def _label(s: Session, z: int, truth: np.ndarray) -> None:
    """Box the liver on z, accept, then replace the random model's mask by the truth."""
    s.prompt_box(box_from_mask(truth[z] >= 1), z=z, cls=1)
    if s.candidate is not None and s.candidate.any():
        s.accept()
    else:
        s.confirm(z, empty=True)
    s.label[z] = truth[z]


def _trained(s: Session, truth: np.ndarray, zs=(4, 8, 11)) -> Session:
    for z in zs:
        _label(s, z, truth)
    s.train()
    s.predict()
    return s


def test_prompts_are_kept_per_slice_and_class(session, small_phantom):
    z = 8
    box = box_from_mask(small_phantom.label[z] >= 1)
    session.prompt_box(box, z=z, cls=1)
    assert session.candidate is not None and session.candidate.shape == small_phantom.hu.shape[1:]
    session.set_class(2)
    assert session.candidate is None  # the liver candidate is not the tumour's
    session.prompt_click(30, 30, positive=True)
    assert session.prompts(z, 1)["points"] == []  # the click did not extend the liver prompt
    assert session.prompts(z, 2)["points"] == [(30.0, 30.0, 1)]
    assert session.prompts(z, 1)["box"] is not None
    session.set_class(1)
    assert session.candidate is not None
    session.clear_prompts()
    assert session.candidate is None and session.prompts()["box"] is None


def test_bad_prompts_are_one_line_errors(session):
    with pytest.raises(SamliverError, match="box is empty"):
        session.prompt_box((10, 10, 10.5, 30))
    with pytest.raises(SamliverError, match="outside the image"):
        session.prompt_click(500, 3)
    with pytest.raises(SamliverError, match="outside"):
        session.set_slice(99)
    with pytest.raises(SamliverError, match="Class"):
        session.set_class(3)
    with pytest.raises(SamliverError, match="No liver mask"):
        session.accept()


def test_multimask_choose_and_undo_prompt(session):
    session.set_multimask(True)
    session.prompt_box((5, 5, 40, 40), z=3)
    assert session.candidates.shape[0] == 3 and len(session.scores) == 3
    session.choose_mask(2)
    assert session.choice == 2
    with pytest.raises(SamliverError, match="no mask 4"):
        session.choose_mask(3)
    session.prompt_box((8, 8, 30, 30))
    assert session.undo_prompt() and session.prompts()["box"] == (5.0, 5.0, 40.0, 40.0)
    assert session.undo_prompt() and session.candidate is None
    assert not session.undo_prompt()


def test_accept_confirm_clear_undo(session, small_phantom):
    truth = small_phantom.label
    assert (session.slice_states() == UNLABELLED).all()
    session.prompt_box((5, 5, 50, 50), z=5, cls=1)
    n = session.accept()
    assert n == int((session.label[5] >= 1).sum()) > 0
    assert session.confirmed == {5} and session.slice_states()[5] == CONFIRMED
    with pytest.raises(SamliverError, match="no prediction"):
        session.confirm(6)
    session.confirm(6, empty=True)
    assert session.confirmed == {5, 6}
    session.clear_slice(5)
    assert session.confirmed == {6} and not session.label[5].any()
    assert session.undo() and session.confirmed == {5, 6} and session.label[5].sum() == n
    assert session.undo() and session.confirmed == {5}
    assert session.undo() and session.confirmed == set() and not session.label.any()
    assert not session.undo()
    actions = [r["action"] for r in session.log]
    assert actions[:3] == ["prompt_box", "accept", "confirm"] and "undo" in actions
    del truth


def test_train_refuses_no_slice_and_no_liver(session):
    with pytest.raises(SamliverError, match="No confirmed slice"):
        session.train()
    session.confirm(0, empty=True)
    session.confirm(1, empty=True)
    with pytest.raises(SamliverError, match="contains liver"):
        session.train()
    with pytest.raises(SamliverError, match="train"):
        session.predict()


def test_train_predict_suggest_export(session, small_phantom):
    truth = small_phantom.label
    steps = []
    for z in (4, 8, 11):
        _label(session, z, truth)
    summary = session.train(progress=lambda step, total, loss: steps.append((step, total)))
    assert summary["slices"] == [4, 8, 11] and summary["stopped"] == "steps"
    assert steps[-1] == (2, 2) and summary["steps"] == 2
    pred = session.predict(progress=lambda done, total: None)
    assert pred.shape == truth.shape and pred.dtype == np.uint8
    states = session.slice_states()
    assert states[4] == CONFIRMED and states[0] == PREDICTED
    out = session.export_label()
    for z in (4, 8, 11):  # the user's slices are exported as labelled
        assert np.array_equal(out[z], truth[z])
    for strategy in ("suggest", "even", "random"):
        picks = session.suggest(3, strategy=strategy)
        assert len(picks) == 3 == len(set(picks))
        assert not set(picks) & session.confirmed
    gap_picks = session.suggest(2)
    assert abs(gap_picks[0] - gap_picks[1]) >= 2
    scores = session.scores_vs_reference()
    assert set(scores) == {"liver_dice", "tumour_dice"}
    assert 0.0 <= scores["liver_dice"] <= 1.0
    with pytest.raises(SamliverError, match="strategy"):
        session.suggest(1, strategy="best")
    session.confirm(0)
    assert np.array_equal(session.label[0], session.export_label()[0])


def test_cancel_keeps_the_previous_head(session, small_phantom):
    _trained(session, small_phantom.label)
    head, prediction = session.head, session.prediction
    stop = threading.Event()
    stop.set()
    summary = session.train(cancel=stop)
    assert summary["stopped"] == "cancelled" and summary["steps"] == 0
    assert session.head is head and session.prediction is prediction
    calls = []
    summary = session.train(cancel=lambda: calls.append(1) or len(calls) > 1)
    assert summary["stopped"] == "cancelled" and summary["steps"] == 1 and session.head is head


def test_no_reference_loop_works_without_dice(small_phantom, tiny_model, home, monkeypatch):
    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    s = Session(small_phantom, tiny_model, reference=None, config=TrainConfig(**FAST))
    assert s.reference is None and s.scores_vs_reference() is None
    _trained(s, small_phantom.label)
    assert s.prediction is not None and s.scores_vs_reference() is None
    assert s.suggest(1)


def test_save_resume_and_mismatches(session, small_phantom, tiny_model, tmp_path):
    _trained(session, small_phantom.label)
    paths = session.save(tmp_path / "run")
    assert {"label", "confirmed", "head", "session"} <= set(paths)
    state = json.loads(paths["session"].read_text())
    assert state["confirmed"] == [4, 8, 11] and state["model"]["name"] == "tiny"
    assert state["volume"]["shape"] == list(small_phantom.hu.shape)
    assert any(r["action"] == "train" for r in state["log"])
    from samliver.io import load_volume

    saved = load_volume(paths["label"]).hu.astype(np.uint8)
    assert np.array_equal(saved, session.export_label())

    again = Session.resume(tmp_path / "run", small_phantom, tiny_model)
    assert again.confirmed == {4, 8, 11} and np.array_equal(again.label, session.label)
    assert again.head is not None and again.prediction is not None
    assert again.log[-1]["action"] == "resume"

    other = types.SimpleNamespace(hu=small_phantom.hu + 1.0)
    with pytest.raises(SamliverError, match="another volume"):
        Session.resume(tmp_path / "run", other, tiny_model)
    fake_model = types.SimpleNamespace(name="litemedsam", weights_id="abc")
    with pytest.raises(SamliverError, match="model"):
        Session.resume(tmp_path / "run", small_phantom, fake_model)
    with pytest.raises(SamliverError, match="No saved session"):
        Session.resume(tmp_path / "nowhere", small_phantom, tiny_model)


def test_save_to_unwritable_place_keeps_earlier_files(session, small_phantom, tmp_path, monkeypatch):
    _trained(session, small_phantom.label)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SamliverError, match="Cannot write"):
        session.save(blocker / "run")
    folder = tmp_path / "run"
    first = session.save(folder)
    before = {k: p.read_bytes() for k, p in first.items()}
    import samliver.checkpoints as checkpoints

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", broken)
    session.clear_slice(4)
    with pytest.raises(SamliverError, match="unchanged"):
        session.save(folder)
    # the head and session.json of the first save are whole (the label file was rewritten
    # atomically: the new, complete one or the old one, never half of either)
    assert first["head"].read_bytes() == before["head"]
    assert first["session"].read_bytes() == before["session"]
    assert not list(folder.glob("*.tmp*"))


def test_simulated_user_records_rounds(small_phantom, tiny_model, home, monkeypatch):
    from samliver.annotate_sim import format_table, simulate, start_slices

    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    assert start_slices(small_phantom.label, 3) == sorted(set(start_slices(small_phantom.label, 3)))
    recs = simulate(small_phantom, tiny_model, strategy="even", max_slices=5, per_round=1,
                    config=TrainConfig(**FAST))
    assert [r["slices"] for r in recs] == [3, 4, 5]
    for r in recs:
        assert {"strategy", "seed", "slices", "prompts", "liver_dice", "tumour_dice", "seconds"} <= set(r)
    assert recs[-1]["prompts"] >= recs[0]["prompts"] >= 3
    assert "strategy" in format_table(recs)
    with pytest.raises(SamliverError, match="reference"):
        simulate(types.SimpleNamespace(hu=small_phantom.hu, label=None), tiny_model)


def test_annotate_sim_cli(small_phantom, tmp_path, home, monkeypatch, capsys):
    from samliver.cli import main
    from samliver.io import save_volume_nifti

    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    ct, lab = tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz"
    save_volume_nifti(small_phantom.hu, ct, spacing=small_phantom.spacing)
    save_volume_nifti(small_phantom.label, lab, spacing=small_phantom.spacing, label=True)
    with pytest.warns(UserWarning):
        rc = main(["annotate-sim", str(ct), "--label", str(lab), "--model", "tiny", "--seeds", "0",
                   "--strategies", "suggest,random", "--max-slices", "4", "--steps", "2", "--head", "linear", "--json",
                   "--plot", str(tmp_path / "sim.png")])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["strategy"], r["slices"]) for r in rows] == [("suggest", 3), ("suggest", 4),
                                                           ("random", 3), ("random", 4)]
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert main(["annotate-sim", str(ct), "--strategies", "best"]) == 2
    assert main(["annotate-sim", str(ct), "--start", "5", "--max-slices", "4"]) == 2


def test_loop_recipe_is_the_fast_cnn():
    cfg = annotation_train_config(seed=3, steps=40)
    assert (cfg.kind, cfg.steps, cfg.seed, cfg.val_fraction) == ("cnn", 40, 3, 0.0)
    assert cfg.head_options.get("refine_size") == 128


def test_propagate_accepts_slices_and_undo_takes_them_back(session):
    session.prompt_box((5, 5, 50, 50), z=8, cls=1)
    done = session.propagate(max_slices=1)
    assert 8 in done and set(done) <= {7, 8, 9}
    assert session.confirmed == set(done)
    assert session.undo() and session.confirmed == set() and not session.label.any()
