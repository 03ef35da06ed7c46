"""``samliver bench`` in quick mode on the tiny random model: the table and the JSON (no timing asserts)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from samliver import bench
from samliver.cli import bench as bench_cli

# The names scripts read (the speed issue's contract) and the per-backend rows of the quick run.
EXPECTED = {
    "peak_fp32_gflops", "encoder_bare_s_per_slice", "encoder_default_s_per_slice",
    "encoder_fastest_s_per_slice", "encoder_fastest_mask_dice_vs_fp32", "decoder_box_ms",
    "encoder_gflop_per_slice", "decoder_gflop_per_box", "encoder_bare_agreement",
    "backend_default_s_per_slice", "backend_default_x_bare", "backend_default_pct_peak",
    "backend_default_max_abs_diff", "backend_default_mask_dice_vs_fp32", "backend_torch_fp32_s_per_slice",
    "cache_hit_ms", "cache_hit_embed_volume_ms", "decoder_batched_box_ms", "peak_rss",
}


def test_quick_bench_writes_table_and_json(tmp_path, capsys, monkeypatch):
    # A default decoder other than the exact one, so the bench also times the exact decoder and
    # compares masks (SAM's own decoder here: no compiled graph to build in a test).
    monkeypatch.setenv("SAMLIVER_DECODER", "reference")
    out = tmp_path / "out" / "bench.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny's random-weights warning
        rc = bench_cli.main(["--quick", "--model", "tiny", "--volume", "phantom", "--prompts", "3", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("| name | value | unit | note |")
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and all(set(r) == {"name", "value", "unit"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert EXPECTED <= set(by_name)
    assert len(by_name) == len(rows)  # every name once
    assert by_name["encoder_bare_s_per_slice"]["unit"] == "s/slice" and by_name["decoder_box_ms"]["unit"] == "ms"
    for name in EXPECTED:
        assert math.isfinite(by_name[name]["value"]) and by_name[name]["value"] >= 0, name
        assert f"| {name} |" in table
    assert by_name["backend_default_max_abs_diff"]["value"] < 0.05  # float16 cache of an exact backend
    assert by_name["encoder_fastest_mask_dice_vs_fp32"]["value"] >= 0.99  # the contract of "fastest"
    assert "head_train_demo_s" not in by_name  # quick mode skips head training
    assert "head_train_autosam_s" not in by_name
    assert by_name["decoder_box_exact_ms"]["value"] > 0
    assert by_name["decoder_mask_dice_vs_exact"]["value"] > 0.999  # SAM's decoder == the shared one
    assert list(out.parent.iterdir()) == [out]  # atomic write leaves no temp file


def test_bench_rejects_bad_arguments(tmp_path):
    from samliver.util import SamliverError

    with pytest.raises(SamliverError, match="--slices must be at least 1"):
        bench_cli.main(["--model", "tiny", "--volume", "phantom", "--slices", "0", "--no-int8", "--out", str(tmp_path / "b.json")])


def test_format_table_handles_missing_values():
    text = bench.format_table([{"name": "a", "value": None, "unit": "s", "note": "failed"},
                               {"name": "b", "value": 1234567.0, "unit": "B", "note": ""}])
    assert "| a | n/a | s | failed |" in text and "| b | 1234567 | B |  |" in text


def test_head_train_rows_time_each_recipe(monkeypatch):
    timed = []

    def fake_time_demo_recipe(config=None, *, embeddings=None):
        timed.append(config.kind)
        return {"seconds": 12.5, "ms_per_step": 100.0, "steps": config.steps, "liver_dice": 0.96,
                "tumour_dice": 0.84, "threads": 2}

    monkeypatch.setattr(bench, "time_demo_recipe", fake_time_demo_recipe)
    rows = bench.head_train_rows()
    assert [r[0] for r in rows] == ["head_train_demo_s", "head_train_autosam_s"]
    assert timed == ["cnn", "autosam"]
    name, value, unit, note = rows[1]
    assert (value, unit) == (12.5, "s")
    assert "autosam recipe" in note and "liver 0.960 / tumour 0.840" in note
