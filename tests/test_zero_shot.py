"""Zero-shot evaluation: every mode's plumbing with the tiny model, the real figures with LiteMedSAM."""

import json

import pytest

from samliver.cli.zero_shot import main as zero_shot_main
from samliver.models import get_model
from samliver.util import SamliverError
from samliver.zero_shot import MODES, evaluate_zero_shot, format_table


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


def test_all_modes_on_the_phantom(tiny, small_phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    slices = [z for z in range(small_phantom.shape[0]) if (small_phantom.label[z] == 2).any()][:3]
    rows = evaluate_zero_shot(small_phantom, tiny, slices, progress=False, clicks=2)
    assert [r["mode"] for r in rows] == list(MODES)
    by = {r["mode"]: r for r in rows}
    assert by["liver_box"]["tumour_dice"] is None and by["lesion_boxes"]["liver_dice"] is None
    assert by["lesion_points"]["liver_dice"] is None
    for mode in ("corrective_clicks", "propagation_3d"):
        assert by[mode]["liver_dice"] is not None and by[mode]["tumour_dice"] is not None
    for r in rows:
        for key in ("liver_dice", "tumour_dice"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0
        assert r["n_prompts"] > 0 and r["n_slices"] == len(slices)
    # Corrective clicks add prompts beyond the boxes (a random model is never right).
    assert by["corrective_clicks"]["n_prompts"] > by["lesion_boxes"]["n_prompts"]
    assert "| liver_box |" in format_table(rows)


def test_bad_input(tiny, small_phantom):
    from samliver.io import CTVolume

    with pytest.raises(SamliverError, match="label"):
        evaluate_zero_shot(CTVolume(hu=small_phantom.hu), tiny, [3], progress=False)
    with pytest.raises(SamliverError, match="mode"):
        evaluate_zero_shot(small_phantom, tiny, [3], modes=["magic"], progress=False)
    with pytest.raises(SamliverError, match="Slices"):
        evaluate_zero_shot(small_phantom, tiny, [99], progress=False)


def test_cli_json(capsys, tmp_path, monkeypatch):
    from samliver.sample import fetch_sample

    info = fetch_sample()  # the real case's NIfTI files; tiny's embeddings go to a temporary cache
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    out = tmp_path / "zs.json"
    with pytest.warns(UserWarning):
        zero_shot_main([str(info["image"]), "--label", str(info["label"]), "--model", "tiny",
                        "--slices", "90-91", "--modes", "liver_box,lesion_boxes", "--json", "-o", str(out)])
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["liver_box", "lesion_boxes"]
    assert {"mode", "liver_dice", "tumour_dice"} <= set(rows[0])
    assert rows[0]["tumour_dice"] is None and rows[1]["liver_dice"] is None
    assert json.loads(out.read_text()) == rows


@pytest.mark.slow
def test_litemedsam_box_prompts_on_real_slices(sample_volume):
    """The real path on four slab test slices with lesions: boxes work, a lone point does not."""
    model = get_model("litemedsam")
    rows = evaluate_zero_shot(sample_volume, model, [88, 96, 104, 112],
                              modes=["liver_box", "lesion_boxes", "lesion_points"], progress=False)
    by = {r["mode"]: r for r in rows}
    assert by["liver_box"]["liver_dice"] > 0.88
    assert by["lesion_boxes"]["tumour_dice"] > 0.7
    assert by["lesion_points"]["tumour_dice"] < 0.5  # LiteMedSAM is box-trained
