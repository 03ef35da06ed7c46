"""Tests for samliver.evaluation: LiTS overlap metrics, MONAI surface distances (checked by
hand and against a brute-force scipy distance-transform reference), lesion detection and
the volume / aggregate helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from samliver import evaluation as ev
from samliver.io import count_lesions
from samliver.util import SamliverError


# ----------------------------------------------------------------------------------------
# overlap and volume metrics
# ----------------------------------------------------------------------------------------
def _box(shape, *slices):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slices)] = True
    return m


def test_overlap_metrics_by_hand():
    gt = _box((4, 10, 10), slice(0, 2), slice(0, 5), slice(0, 5))  # 50 voxels
    pred = _box((4, 10, 10), slice(0, 2), slice(0, 5), slice(0, 10))  # 100, overlap 50
    assert ev.dice(pred, gt) == pytest.approx(2 * 50 / 150)
    assert ev.jaccard(pred, gt) == pytest.approx(0.5)
    assert ev.voe(pred, gt) == pytest.approx(0.5)
    assert ev.rvd(pred, gt) == pytest.approx(1.0)  # over-segmentation: positive
    assert ev.rvd(gt, pred) == pytest.approx(-0.5)
    # Labels are cast to bool: any non-zero value is foreground.
    assert ev.dice(pred.astype(np.uint8) * 2, gt) == ev.dice(pred, gt)
    assert all(type(f(pred, gt)) is float for f in (ev.dice, ev.jaccard, ev.voe, ev.rvd))


def test_overlap_empty_conventions():
    empty, some = np.zeros((3, 3), bool), _box((3, 3), slice(0, 1), slice(0, 1))
    assert ev.dice(empty, empty) == 1.0 and ev.jaccard(empty, empty) == 1.0
    assert ev.voe(empty, empty) == 0.0 and ev.rvd(empty, empty) == 0.0
    assert ev.dice(some, empty) == 0.0 and ev.dice(empty, some) == 0.0
    assert ev.voe(some, empty) == 1.0
    assert math.isnan(ev.rvd(some, empty))  # gt empty, pred not: undefined
    assert ev.rvd(empty, some) == -1.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(SamliverError, match=r"\(2, 3\).*\(3, 2\)"):
        ev.dice(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(SamliverError, match=r"\(4, 8, 8\).*\(4, 8, 9\)"):
        ev.evaluate_volume(np.zeros((4, 8, 8), np.uint8), np.zeros((4, 8, 9), np.uint8))


# ----------------------------------------------------------------------------------------
# surface distances: hand-computed cases
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_parallel_planes_offset_by_k(k):
    # Two full one-voxel-thick planes: every voxel is surface, its nearest neighbour on the
    # other surface is straight across, so every distance is exactly k.
    a = _box((12, 6, 7), slice(2, 3))
    b = _box((12, 6, 7), slice(2 + k, 3 + k))
    assert ev.assd(a, b) == pytest.approx(k)
    assert ev.msd(a, b) == pytest.approx(k)
    assert ev.hd95(a, b) == pytest.approx(k)
    # Anisotropic spacing scales the distance along z only.
    assert ev.assd(a, b, spacing=(2.5, 0.8, 0.8)) == pytest.approx(2.5 * k, rel=1e-6)
    assert ev.msd(a, b, spacing=(2.5, 0.8, 0.8)) == pytest.approx(2.5 * k, rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cubes_offset_by_k_hausdorff(axis):
    k = 3
    a = _box((20, 20, 20), slice(5, 11), slice(5, 11), slice(5, 11))
    b = np.roll(a, k, axis=axis)
    assert ev.msd(a, b) == pytest.approx(k)
    sp = [1.0, 1.0, 1.0]
    sp[axis] = 2.0
    assert ev.msd(a, b, spacing=sp) == pytest.approx(2.0 * k, rel=1e-6)
    # Spacing along another axis leaves this offset's Hausdorff distance alone.
    sp2 = [1.0, 1.0, 1.0]
    sp2[(axis + 1) % 3] = 2.0
    assert ev.msd(a, b, spacing=sp2) == pytest.approx(k, rel=1e-6)
    assert 0 < ev.assd(a, b) < k


def test_single_voxels_anisotropic():
    a = _box((9, 9, 9), slice(1, 2), slice(1, 2), slice(1, 2))
    b = _box((9, 9, 9), slice(2, 3), slice(3, 4), slice(3, 4))  # offset (1, 2, 2)
    assert ev.msd(a, b) == pytest.approx(3.0)
    assert ev.assd(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(4 + 4 + 4), rel=1e-6)
    assert ev.hd95(a, b, spacing=(4.0, 0.5, 0.5)) == pytest.approx(math.sqrt(16 + 1 + 1), rel=1e-6)


def test_identical_masks_zero_distance():
    m = _box((10, 10, 10), slice(2, 7), slice(3, 8), slice(1, 9))
    assert ev.assd(m, m) == 0.0 and ev.msd(m, m) == 0.0 and ev.hd95(m, m) == 0.0


def test_distance_empty_conventions():
    empty = np.zeros((6, 6, 6), bool)
    some = _box((6, 6, 6), slice(1, 3), slice(1, 3), slice(1, 3))
    for f in (ev.assd, ev.msd, ev.hd95):
        assert f(empty, empty) == 0.0
        assert math.isnan(f(some, empty)) and math.isnan(f(empty, some))
    with pytest.raises(SamliverError, match="empty"):
        ev.surface_distances(some, empty)


def test_crop_does_not_change_distances():
    # The masks are cropped to their union's bounding box (+1 voxel) before MONAI runs; a
    # mask touching the array border must keep its border surface, and a translation inside
    # a bigger background must change nothing.
    a = _box((30, 30, 30), slice(0, 6), slice(0, 4), slice(10, 14))  # touches z = 0, y = 0
    b = _box((30, 30, 30), slice(3, 9), slice(2, 8), slice(12, 20))
    ref = _brute_force(a, b, None)  # on the full arrays, no crop
    got = ev._distance_metrics(a, b)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-5)
    c = _box((40, 40, 40), slice(5, 9), slice(7, 12), slice(3, 6))
    d = _box((40, 40, 40), slice(6, 12), slice(5, 9), slice(4, 10))
    shifted = ev._distance_metrics(np.roll(c, (20, 15, 25), (0, 1, 2)), np.roll(d, (20, 15, 25), (0, 1, 2)))
    assert shifted == pytest.approx(ev._distance_metrics(c, d))


# ----------------------------------------------------------------------------------------
# surface distances: against brute force (scipy EDT) and MONAI's public metrics
# ----------------------------------------------------------------------------------------
def _surface(m: np.ndarray) -> np.ndarray:
    # Same surface definition as MONAI: voxels a cross-shaped erosion removes (border = 0).
    return m & ~ndimage.binary_erosion(m)


def _brute_force(a: np.ndarray, b: np.ndarray, spacing) -> dict:
    sa, sb = _surface(a), _surface(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return {
        "assd": float(np.concatenate([d_ab, d_ba]).mean()),
        "msd": float(max(d_ab.max(), d_ba.max())),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
    }


def _random_mask(rng: np.random.Generator, shape) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 2.5))
    m = noise > np.quantile(noise, rng.uniform(0.6, 0.95))
    if not m.any():
        m[tuple(s // 2 for s in shape)] = True
    return m


def test_surface_distances_match_brute_force_on_random_masks():
    rng = np.random.default_rng(1234)
    for i in range(30):
        shape = tuple(int(s) for s in rng.integers(8, 22, size=3))
        a, b = _random_mask(rng, shape), _random_mask(rng, shape)
        spacing = None if i % 2 == 0 else tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
        ref = _brute_force(a, b, spacing)
        got = ev._distance_metrics(a, b, spacing)
        for key in ("assd", "msd", "hd95"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), (i, key, spacing)
        # The single-metric functions agree with the shared computation.
        assert ev.assd(a, b, spacing) == got["assd"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation notice
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_matches_monai_public_metrics_with_one_hot_layout():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(7)
    for _ in range(5):
        a, b = _random_mask(rng, (14, 16, 12)), _random_mask(rng, (14, 16, 12))
        sp = tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
        # MONAI's public metrics take one-hot (B, C, *spatial); one foreground channel.
        ta, tb = torch.from_numpy(a[None, None].astype(np.float32)), torch.from_numpy(b[None, None].astype(np.float32))
        kw = dict(include_background=True, spacing=sp)
        want = {
            "assd": float(compute_average_surface_distance(ta, tb, symmetric=True, **kw)[0, 0]),
            "msd": float(compute_hausdorff_distance(ta, tb, percentile=None, **kw)[0, 0]),
            "hd95": float(compute_hausdorff_distance(ta, tb, percentile=95, **kw)[0, 0]),
        }
        got = ev._distance_metrics(a, b, sp)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key


def test_2d_masks_and_spacing_handling():
    a = _box((10, 12), slice(2, 3))
    b = _box((10, 12), slice(5, 6))
    assert ev.assd(a, b) == pytest.approx(3.0)
    assert ev.assd(a, b, spacing=(0.5, 2.0)) == pytest.approx(1.5)
    # A (z, y, x) volume spacing with one axial slice uses the in-plane (y, x) part.
    assert ev.assd(a, b, spacing=(5.0, 0.5, 2.0)) == pytest.approx(1.5)
    assert ev.assd(a, b, spacing=0.5) == pytest.approx(1.5)  # one number: isotropic
    with pytest.raises(SamliverError, match="Spacing"):
        ev.assd(a, b, spacing=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(SamliverError, match="Spacing"):
        ev.msd(np.stack([a, a]), np.stack([b, b]), spacing=(1.0, 1.0))
    with pytest.raises(SamliverError, match="Spacing"):
        ev.hd95(a, b, spacing=(0.0, 1.0))


# ----------------------------------------------------------------------------------------
# lesion detection
# ----------------------------------------------------------------------------------------
def test_lesion_detection_constructed_cases():
    shape = (20, 40, 40)
    gt = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    gt[2:6, 2:8, 2:8] = True          # A: detected (prediction slightly larger)
    pred[2:6, 2:8, 2:9] = True
    gt[10:14, 2:6, 2:6] = True        # B: missed (nothing predicted there)
    gt[2:6, 20:24, 20:24] = True      # C and D: two lesions one voxel apart ...
    gt[2:6, 20:24, 25:29] = True
    pred[2:6, 20:24, 20:29] = True    # ... merged by one prediction: IoU 16*4/(36*4) < 0.5 each
    pred[15:18, 30:34, 30:34] = True  # E: false positive
    r = ev.lesion_detection(pred, gt)
    assert r == {"n_gt": 4, "n_pred": 3, "tp": 1, "fp": 2, "fn": 3,
                 "precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 4),
                 "f1": pytest.approx(2 / 7)}
    assert r["n_gt"] == count_lesions(gt.astype(np.uint8) * 2)
    assert all(type(r[k]) is int for k in ("n_gt", "n_pred", "tp", "fp", "fn"))
    assert all(type(r[k]) is float for k in ("precision", "recall", "f1"))


def test_lesion_detection_iou_threshold_is_strict():
    gt = _box((4, 4, 8), slice(0, 2), slice(0, 2), slice(0, 2))  # 8 voxels
    pred = gt.copy()
    pred[0:2, 0:2, 2:4] = True  # 16 voxels: IoU exactly 0.5 -> not detected
    assert ev.lesion_detection(pred, gt)["tp"] == 0
    pred[1, 1, 3] = False  # 15 voxels: IoU 8/15 > 0.5 -> detected
    assert ev.lesion_detection(pred, gt)["tp"] == 1
    assert ev.lesion_detection(pred, gt, iou_threshold=0.6)["tp"] == 0


def test_lesion_detection_connectivity_and_empty_conventions():
    gt = np.zeros((5, 5, 5), bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True  # corner-touching: one lesion in 26-connectivity
    assert ev.lesion_detection(gt, gt)["n_gt"] == 1 == count_lesions(gt.astype(np.uint8) * 2)
    assert ev.lesion_detection(gt, gt, connectivity=1)["n_gt"] == 2
    empty = np.zeros_like(gt)
    r = ev.lesion_detection(empty, empty)
    assert (r["n_gt"], r["n_pred"], r["precision"], r["recall"], r["f1"]) == (0, 0, 1.0, 1.0, 1.0)
    r = ev.lesion_detection(gt, empty)  # predictions only
    assert (r["precision"], r["recall"], r["f1"], r["fp"]) == (0.0, 1.0, 0.0, 1)
    r = ev.lesion_detection(empty, gt)  # all missed
    assert (r["precision"], r["recall"], r["f1"], r["fn"]) == (1.0, 0.0, 0.0, 1)


# ----------------------------------------------------------------------------------------
# whole volumes, aggregates
# ----------------------------------------------------------------------------------------
def _label_pair():
    gt = np.zeros((8, 32, 32), np.uint8)
    gt[1:7, 4:28, 4:28] = 1
    gt[2:5, 8:14, 8:14] = 2
    gt[3:6, 18:24, 18:24] = 2
    pred = gt.copy()
    pred[1:7, 4:28, 27] = 0          # liver slightly under-segmented
    pred[3:6, 18:24, 18:24] = 1      # second lesion missed (still liver)
    return pred, gt


def test_evaluate_volume_keys_values_and_liver_includes_tumour():
    pred, gt = _label_pair()
    r = ev.evaluate_volume(pred, gt)
    assert r["distance_unit"] == "voxels"
    assert r["liver_dice"] == pytest.approx(ev.dice(pred >= 1, gt >= 1))
    assert r["tumour_dice"] == pytest.approx(ev.dice(pred == 2, gt == 2))
    assert r["liver_voe"] == pytest.approx(1 - r["liver_jaccard"])
    assert r["liver_rvd"] < 0
    assert r["liver_msd"] == pytest.approx(1.0)
    assert r["liver_n_gt_voxels"] == int((gt >= 1).sum())
    assert (r["tumour_n_gt"], r["tumour_n_pred"], r["tumour_tp"]) == (2, 1, 1)
    assert r["tumour_recall"] == 0.5 and r["tumour_precision"] == 1.0
    for k in ("liver_assd", "liver_hd95", "tumour_assd", "tumour_msd", "tumour_hd95", "tumour_f1"):
        assert k in r
    # Plain Python values only (samliver.demo prints them in a table).
    for k, v in r.items():
        assert type(v) in ((str,) if k == "distance_unit" else (float, int)), k
    # Spacing switches the unit and scales distances.
    r_mm = ev.evaluate_volume(pred, gt, spacing=(2.0, 0.5, 0.5))
    assert r_mm["distance_unit"] == "mm"
    assert r_mm["liver_msd"] == pytest.approx(0.5)
    assert r_mm["liver_dice"] == r["liver_dice"]


def test_evaluate_volume_2d_and_empty_classes():
    pred, gt = _label_pair()
    r = ev.evaluate_volume(pred[3], gt[3], spacing=(2.0, 0.5, 0.5))
    assert r["distance_unit"] == "mm" and 0 < r["liver_dice"] < 1
    # No tumour anywhere: perfect tumour scores by convention, distances 0.
    liver_only = (gt >= 1).astype(np.uint8)
    r = ev.evaluate_volume(liver_only, liver_only)
    assert (r["tumour_dice"], r["tumour_assd"], r["tumour_rvd"], r["tumour_f1"]) == (1.0, 0.0, 0.0, 1.0)
    # Tumour predicted but absent: Dice 0, distances nan, all false positives.
    r = ev.evaluate_volume(pred, liver_only)
    assert r["tumour_dice"] == 0.0 and math.isnan(r["tumour_hd95"]) and math.isnan(r["tumour_rvd"])
    assert r["tumour_precision"] == 0.0
    r = ev.evaluate_volume(pred, gt, classes=(1,), distances=False)
    assert "tumour_dice" not in r and "liver_assd" not in r and "liver_dice" in r
    with pytest.raises(SamliverError, match="2D"):
        ev.evaluate_volume(np.zeros(5, np.uint8), np.zeros(5, np.uint8))


def test_evaluate_volume_on_the_sample(sample_volume):
    gt = sample_volume.label
    r = ev.evaluate_volume(gt, gt, spacing=sample_volume.spacing)
    assert r["distance_unit"] == "voxels"  # the sample's spacing is unknown
    assert r["liver_dice"] == 1.0 and r["liver_assd"] == 0.0 and r["tumour_hd95"] == 0.0
    assert r["tumour_n_gt"] == count_lesions(gt) == r["tumour_tp"]
    # One liver voxel layer removed on every side: the real liver against the brute force.
    pred = gt.copy()
    liver = gt >= 1
    pred[liver & ~ndimage.binary_erosion(liver)] = 0
    r = ev.evaluate_volume(pred, gt)
    assert 0.9 < r["liver_dice"] < 1.0 and r["liver_msd"] >= 1.0
    ref = _brute_force(pred >= 1, liver, None)
    for key in ref:
        assert r[f"liver_{key}"] == pytest.approx(ref[key], rel=1e-5)


def test_global_vs_per_case_dice():
    big = _box((10, 10, 10), slice(0, 10), slice(0, 10), slice(0, 1))  # 100 voxels, perfect
    small_gt = _box((10, 10, 10), slice(0, 10), slice(0, 1), slice(0, 1))  # 10 voxels, missed
    pairs = [(big, big), (np.zeros_like(small_gt), small_gt)]
    assert ev.per_case_dice(pairs) == pytest.approx(0.5)
    assert ev.global_dice(pairs) == pytest.approx(200 / 210)
    assert ev.global_dice([(np.zeros(3), np.zeros(3))]) == 1.0
    assert math.isnan(ev.per_case_dice([]))
    assert ev.global_dice(iter(pairs)) == ev.global_dice(pairs)  # any iterable


def test_summarise_nanmean_and_counts():
    rows = [
        {"tumour_dice": 0.5, "tumour_assd": 2.0, "tumour_n_gt": 2, "distance_unit": "voxels"},
        {"tumour_dice": 0.0, "tumour_assd": math.nan, "tumour_n_gt": 1, "distance_unit": "voxels"},
        {"tumour_dice": 1.0, "tumour_assd": 4.0, "tumour_n_gt": 0, "distance_unit": "voxels"},
    ]
    s = ev.summarise(rows)
    assert s["n_cases"] == 3
    assert s["tumour_dice"] == pytest.approx(0.5)
    assert s["tumour_assd"] == pytest.approx(3.0) and s["tumour_assd_n_nan"] == 1
    assert "tumour_dice_n_nan" not in s
    assert s["tumour_n_gt"] == pytest.approx(1.0)
    assert s["distance_unit"] == "voxels"
    assert math.isnan(ev.summarise([{"x": math.nan}])["x"])
