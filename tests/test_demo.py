import json

from samliver import demo
from samliver.io import count_lesions

STAGE1 = [demo.step_fetch, demo.step_summary, demo.step_overview]


def test_demo_stage1(tmp_path, capsys, sample_volume):
    """The stage-1 steps (fetch, summary, overview); later stages test their own steps."""
    assert demo.STEPS[:3] == STAGE1
    demo.run_demo(tmp_path, steps=STAGE1)
    out = capsys.readouterr().out
    assert "shape:    (128, 128, 128)" in out and "spacing:  unknown" in out
    n = count_lesions(sample_volume.label)
    assert f"in {n} lesion(s)" in out
    png = tmp_path / "overview.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    s = summary["results"]["summary"]
    assert s["lesions_3d"] == n and s["spacing_zyx_mm"] is None
    assert s["voxels"]["tumour"] == int((sample_volume.label == 2).sum())
    assert set(summary["timings_s"]) == {"step_fetch", "step_summary", "step_overview"}


def test_demo_steps_are_pluggable(tmp_path, phantom):
    seen = []

    def step_load_phantom(ctx):
        ctx.volume = phantom

    def step_extra(ctx):
        seen.append(ctx.volume.shape)
        ctx.results["extra"] = 1

    ctx = demo.run_demo(tmp_path, steps=[step_load_phantom, demo.step_summary, step_extra])
    assert seen == [(32, 128, 128)] and ctx.results["summary"]["lesions_3d"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["extra"] == 1


def test_zero_shot_step_is_cached(tmp_path, monkeypatch, phantom):
    """The zero-shot baseline rows are cached: a warm demo does not recompute them."""
    import numpy as np

    from samliver import zero_shot

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    calls = []

    def fake(volume, model, slices, modes=None, **kw):
        calls.append(list(slices))
        return [{"mode": "box", "liver_dice": np.float64(0.9), "tumour_dice": None}]

    monkeypatch.setattr(zero_shot, "evaluate_zero_shot", fake)

    class Model:
        name, weights_id = "fake", "abc"

    for _ in range(2):
        ctx = demo.DemoContext(out_dir=tmp_path, volume=phantom)
        ctx.results.update(model=Model(), embeddings=None, split={"test": [1, 2, 3]})
        demo.step_zero_shot(ctx)
        assert ctx.results["zero_shot"][0]["liver_dice"] == 0.9
    assert calls == [[1, 3]]  # every second test slice, computed once
