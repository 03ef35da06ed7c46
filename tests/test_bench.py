"""``samliver bench`` in quick mode on the tiny random model: the table and the JSON (no timing asserts)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from samliver import bench

EXPECTED = {
    "encoder_naive", "encoder_samliver", "speedup_naive_over_samliver", "cache_hit_load",
    "cache_hit_embed_volume", "box_to_mask_median", "box_to_mask_p90", "peak_rss",
    "embedding_max_abs_diff_samliver", "liver_box_dice_naive", "liver_box_dice_samliver",
}


def test_quick_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "out" / "bench.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny's random-weights warning
        rc = bench.main(["--quick", "--model", "tiny", "--volume", "phantom", "--prompts", "3", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("| name | value | unit | note |")
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and all(set(r) == {"name", "value", "unit"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert EXPECTED <= set(by_name)
    assert by_name["encoder_naive"]["unit"] == "s/slice" and by_name["box_to_mask_median"]["unit"] == "ms"
    for name in EXPECTED:
        assert math.isfinite(by_name[name]["value"]) and by_name[name]["value"] >= 0, name
        assert f"| {name} |" in table
    assert by_name["embedding_max_abs_diff_samliver"]["value"] < 0.05  # float16 cache of the same encoder
    assert not any(r["name"].startswith("variant_") for r in rows)  # quick mode skips the variants
    assert list(out.parent.iterdir()) == [out]  # atomic write leaves no temp file


def test_bench_rejects_bad_arguments(tmp_path):
    from samliver.util import SamliverError

    with pytest.raises(SamliverError, match="at least 1"):
        bench.main(["--model", "tiny", "--volume", "phantom", "--slices", "0", "--no-variants", "--out", str(tmp_path / "b.json")])


def test_format_table_handles_missing_values():
    text = bench.format_table([{"name": "a", "value": None, "unit": "s", "note": "failed"},
                               {"name": "b", "value": 1234567.0, "unit": "B", "note": ""}])
    assert "| a | n/a | s | failed |" in text and "| b | 1234567 | B |  |" in text
