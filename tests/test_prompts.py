"""Prompt simulation on small synthetic masks."""

import numpy as np
import pytest

from samliver.prompts import box_from_mask, centre_point, corrective_click, lesion_boxes, lesion_components, random_points
from samliver.util import SamliverError


def _disk(h=64, w=64, cx=30, cy=20, r=6):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_box_from_mask_is_tight_and_x_first():
    m = np.zeros((40, 60), bool)
    m[5:10, 20:31] = True  # rows 5..9, columns 20..30: pixel edges 20..31, 5..10
    assert box_from_mask(m).tolist() == [20, 5, 31, 10]
    assert box_from_mask(np.zeros((8, 8), bool)) is None


def test_box_from_one_pixel_has_an_inside():
    m = np.zeros((16, 16), bool)
    m[15, 15] = True  # corner pixel: the box must stay inside the image
    x0, y0, x1, y1 = box_from_mask(m)
    assert [x0, y0, x1, y1] == [15, 15, 16, 16]
    m[15, 15], m[0, 0] = False, True
    for seed in range(20):  # jitter never yields an empty box or one outside the image
        x0, y0, x1, y1 = box_from_mask(m, jitter=3, rng=np.random.default_rng(seed))
        assert 0 <= x0 and x1 <= 16 and x1 >= x0 + 1 and 0 <= y0 and y1 <= 16 and y1 >= y0 + 1


def test_box_jitter_is_bounded_and_repeatable():
    m = _disk()
    tight = box_from_mask(m)
    a = box_from_mask(m, jitter=5, rng=np.random.default_rng(3))
    b = box_from_mask(m, jitter=5, rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, tight)
    assert np.all(np.abs(a - tight) <= 5)


def test_lesion_boxes_one_per_component():
    m = _disk(cx=15, cy=15, r=4) | _disk(cx=45, cy=40, r=5)
    m[60, 60] = True
    assert len(lesion_components(m)) == 3
    boxes = lesion_boxes(m)
    assert boxes.shape == (3, 4)
    assert lesion_boxes(m, min_size=2).shape == (2, 4)
    assert lesion_boxes(np.zeros((8, 8), bool)).shape == (0, 4)


def test_centre_point_inside_a_crescent():
    ring = _disk(r=12) & ~_disk(cx=36, r=10)  # crescent: its centroid lies outside it
    x, y = centre_point(ring)
    assert ring[int(y), int(x)]
    assert centre_point(np.zeros((4, 4), bool)) is None


def test_random_points_inside_and_distinct():
    m = _disk()
    pts = random_points(m, 10, rng=np.random.default_rng(0))
    assert pts.shape == (10, 2)
    assert all(m[int(y), int(x)] for x, y in pts)
    assert len({tuple(p) for p in pts}) == 10
    assert random_points(np.zeros((5, 5), bool), 3).shape == (0, 2)


def test_corrective_click_targets_largest_error():
    gt = _disk(r=10)
    pred = gt.copy()
    pred[:, :25] = False  # a big missed region on the left -> positive click there
    (x, y), label = corrective_click(pred, gt)
    assert label == 1 and gt[int(y), int(x)] and not pred[int(y), int(x)]
    pred2 = gt | _disk(cx=55, cy=55, r=6)  # a false positive blob -> negative click
    (x, y), label = corrective_click(pred2, gt)
    assert label == 0 and pred2[int(y), int(x)] and not gt[int(y), int(x)]
    assert corrective_click(gt, gt) is None


def test_bad_input():
    with pytest.raises(SamliverError, match="2D"):
        box_from_mask(np.zeros((2, 3, 4), bool))
    with pytest.raises(SamliverError, match="shape"):
        corrective_click(np.zeros((4, 4), bool), np.zeros((5, 5), bool))
