"""nnU-Net baseline: raw dataset layout, missing-package error, and a tiny end-to-end run."""

import json
import os

import numpy as np
import pytest

from samliver import nnunet
from samliver.util import SamliverError


def test_raw_dataset_is_nnunet_layout(tmp_path, disc_volume):
    pytest.importorskip("SimpleITK")
    vol = disc_volume(n=6, size=64, spacing=(2.0, 0.8, 0.8))
    ds = nnunet.write_raw_dataset(tmp_path, vol.hu, vol.label, [0, 2], vol.spacing)
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [
        "slice_0000_0000.nii.gz", "slice_0002_0000.nii.gz"]
    import SimpleITK as sitk

    img = sitk.ReadImage(str(ds / "labelsTr" / "slice_0002.nii.gz"))
    assert sitk.GetArrayFromImage(img).shape == (1, 64, 64)
    assert np.array_equal(sitk.GetArrayFromImage(img)[0], vol.label[2])
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 2.0))


def test_missing_nnunet_is_one_line_error(monkeypatch, disc_volume):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("nnunetv2"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(SamliverError, match=r"samliver\[baselines\]"):
        nnunet.run_nnunet_baseline(disc_volume(n=6, size=64, spacing=(2.0, 0.8, 0.8)), [0], [1])


def test_env_is_scoped(tmp_path):
    before = os.environ.get("nnUNet_raw")
    with nnunet._nnunet_env(tmp_path, 1):
        assert os.environ["nnUNet_raw"] == str(tmp_path / "raw")
    assert os.environ.get("nnUNet_raw") == before


@pytest.mark.slow
def test_tiny_budget_end_to_end(monkeypatch, disc_volume):
    """nnU-Net plans, preprocesses, trains one short epoch and predicts: the run_baseline record."""
    pytest.importorskip("nnunetv2")
    from samliver.baselines import run_baseline

    monkeypatch.setattr(nnunet, "NNUNET_ITERATIONS", 3)
    vol = disc_volume(n=6, size=64, spacing=(2.0, 0.8, 0.8))
    out = run_baseline("nnunet", vol, [0, 1, 2, 3], [4, 5], budget=1, threads=1)
    assert out["method"] == "nnunet" and out["epochs"] == 1 and out["iterations"] == 3
    assert out["pred"].shape == (2, 64, 64) and out["pred"].dtype == np.uint8
    assert 0 <= out["liver_dice"] <= 1 and 0 <= out["tumour_dice"] <= 1
    assert os.environ.get("nnUNet_raw") is None or "samliver-nnunet" not in os.environ["nnUNet_raw"]
