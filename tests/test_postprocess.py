"""Post-processing of predicted labels and the tumour burden."""

import numpy as np
import pytest

from samliver.postprocess import format_burden, postprocess, tumour_burden
from samliver.util import SamliverError


def _label():
    lab = np.zeros((10, 40, 40), np.uint8)
    lab[2:8, 5:30, 5:30] = 1          # the liver
    lab[3:5, 10:14, 10:14] = 2        # lesion 1 (inside)
    lab[5:7, 20:25, 20:25] = 2        # lesion 2 (inside)
    lab[4, 35:38, 35:38] = 1          # a small false-positive liver island
    lab[8:10, 33:36, 2:4] = 2         # a tumour island outside the liver
    return lab


def test_postprocess_keeps_largest_liver_and_inner_tumours():
    out = postprocess(_label())
    assert out[4, 36, 36] == 0 and out[9, 34, 3] == 0
    assert out[3, 11, 11] == 2 and out[6, 22, 22] == 2 and out[2, 6, 6] == 1
    assert set(np.unique(out)) == {0, 1, 2}
    assert postprocess(np.zeros((3, 5, 5))).sum() == 0
    # a hole inside the liver is filled as liver
    lab = np.zeros((3, 20, 20), np.uint8)
    lab[:, 2:18, 2:18] = 1
    lab[1, 8:10, 8:10] = 0
    assert postprocess(lab)[1, 8, 8] == 1


def test_postprocess_min_lesion_size():
    lab = _label()
    lab[6, 8, 8] = 2  # a one-voxel speck inside the liver
    assert postprocess(lab)[6, 8, 8] == 1  # default: specks < 10 voxels become liver
    assert tumour_burden(postprocess(lab))["n_lesions"] == 2
    assert postprocess(lab, min_lesion_size=0)[6, 8, 8] == 2
    assert tumour_burden(postprocess(lab, min_lesion_size=0))["n_lesions"] == 3
    # a 40-voxel threshold drops the 32-voxel lesion too
    assert tumour_burden(postprocess(lab, min_lesion_size=40))["n_lesions"] == 1
    # in mL when the spacing is known: 32 voxels of 2 mm^3 = 0.064 mL
    out = postprocess(lab, spacing=(2.0, 1.0, 1.0), min_lesion_ml=0.07)
    assert tumour_burden(out)["n_lesions"] == 1
    with pytest.raises(SamliverError, match="label volume"):
        postprocess(np.zeros((4, 4), np.uint8))


def test_tumour_burden_voxels_and_ml():
    lab = postprocess(_label())
    b = tumour_burden(lab)
    assert b["unit"] == "voxels" and b["n_lesions"] == 2
    assert b["lesion_volumes"] == [50.0, 32.0]
    assert b["tumour_volume"] == 82.0
    assert b["liver_volume"] == (lab >= 1).sum()
    assert b["tumour_share"] == pytest.approx(82 / (lab >= 1).sum())
    m = tumour_burden(lab, spacing=(2.0, 1.0, 1.0))
    assert m["unit"] == "mL" and m["lesion_volumes"][0] == pytest.approx(0.1)
    assert "2 lesion(s)" in format_burden(b)
    assert tumour_burden(np.zeros((2, 3, 3)))["tumour_share"] == 0.0
