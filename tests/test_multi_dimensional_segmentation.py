"""3D propagation: the loop's logic with an oracle predictor, the real path with LiteMedSAM."""

import numpy as np
import pytest

from samliver.multi_dimensional_segmentation import propagate_box, propagate_mask
from samliver.util import SamliverError


class _Emb:
    """Stands in for VolumeEmbeddings: every slice is 'cached'."""

    def __init__(self, shape):
        self.key = {"volume_shape": list(shape)}
        self.original_hw = shape[1:]
        self.window = (-160.0, 240.0)

    def __contains__(self, z):
        return True


class _Oracle:
    """Returns the reference object cut to the prompt box: the loop's logic without a model."""

    def __init__(self, truth):
        self.truth, self.z, self.boxes = truth, None, []
        self.model = None

    def set_slice(self, emb, z):
        self.z = z

    def predict(self, box=None, **kwargs):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        self.boxes.append((self.z, (x0, y0, x1, y1)))
        m = np.zeros_like(self.truth[self.z])
        m[y0:y1, x0:x1] = self.truth[self.z][y0:y1, x0:x1]
        return m[None], np.ones(1), None


def _blob(depth=20, z0=4, z1=15):
    truth = np.zeros((depth, 40, 40), bool)
    for z in range(z0, z1 + 1):
        r = 3 + min(z - z0, z1 - z)  # grows then shrinks, like an organ
        truth[z, 20 - r:20 + r, 18 - r:18 + r] = True
    return truth


def test_propagation_follows_the_object_and_stops_when_empty():
    truth = _blob()
    pred = _Oracle(truth)
    z = 9
    ys, xs = np.nonzero(truth[z])
    out, done = propagate_box(pred, _Emb(truth.shape), z, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert done == list(range(4, 16))
    assert np.array_equal(out, truth)  # the margin lets each slice's box cover the next, larger slice


def test_bounds_max_slices_and_margin():
    truth = _blob()
    emb = _Emb(truth.shape)
    out, done = propagate_mask(_Oracle(truth), emb, 9, truth[9], bounds=(7, 12))
    assert done == list(range(7, 13)) and not out[:7].any() and not out[13:].any()
    out, done = propagate_mask(_Oracle(truth), emb, 9, truth[9], max_slices=2)
    assert done == [7, 8, 9, 10, 11]
    pred = _Oracle(truth)
    propagate_mask(pred, emb, 9, truth[9], margin=0, max_slices=1)
    ys, xs = np.nonzero(truth[9])
    assert pred.boxes[0][1] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_bad_start():
    truth = _blob()
    emb = _Emb(truth.shape)
    with pytest.raises(SamliverError, match="empty"):
        propagate_mask(_Oracle(truth), emb, 1, truth[1])
    with pytest.raises(SamliverError, match="shape"):
        propagate_mask(_Oracle(truth), emb, 9, truth[9, :20])
    with pytest.raises(SamliverError, match="outside"):
        propagate_mask(_Oracle(truth), emb, 30, truth[9])
    out, done = propagate_box(_Oracle(truth), emb, 1, [2, 2, 10, 10])  # a box around nothing
    assert done == [] and not out.any()


def test_missing_embeddings_need_the_volume(small_phantom, tmp_path):
    from samliver.embeddings import embed_volume
    from samliver.models import get_model
    from samliver.prompt_based_segmentation import Predictor

    with pytest.warns(UserWarning):
        tiny = get_model("tiny", device="cpu")
    emb = embed_volume(small_phantom, tiny, slices=[8], progress=False, cache_root=tmp_path)
    p = Predictor(tiny)
    m = np.zeros(small_phantom.shape[1:], bool)
    m[20:40, 20:40] = True
    with pytest.raises(SamliverError, match="volume"):
        propagate_mask(p, emb, 8, m, max_slices=1)
    out, done = propagate_mask(p, emb, 8, m, volume=small_phantom, max_slices=1, min_area=0)
    assert out.shape == small_phantom.shape and done == [7, 8, 9]
    assert 7 in emb and 9 in emb  # encoded on the way, into the same cache


@pytest.mark.slow
def test_litemedsam_liver_propagation_on_real_slices(sample_volume):
    from samliver.embeddings import embed_volume
    from samliver.evaluation import dice
    from samliver.models import get_model
    from samliver.prompt_based_segmentation import Predictor
    from samliver.prompts import box_from_mask

    model = get_model("litemedsam")
    zs = list(range(78, 83))
    emb = embed_volume(sample_volume, model, slices=zs, progress=False)
    gt = sample_volume.label >= 1
    out, done = propagate_box(Predictor(model), emb, 80, box_from_mask(gt[80]), bounds=(78, 82))
    assert done == zs
    assert dice(out[78:83], gt[78:83]) > 0.85


class _Greedy(_Oracle):
    """Returns every object inside the box (SAM's failure mode: it fills the box it is given)."""

    def predict(self, box=None, **kwargs):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        m = np.zeros_like(self.truth[self.z])
        m[y0:y1, x0:x1] = self.truth[self.z][y0:y1, x0:x1]
        return m[None], np.ones(1), None


def test_leak_guards_keep_propagation_on_the_organ():
    depth = 20
    liver = np.zeros((depth, 40, 40), bool)
    liver[:, 12:24, 8:20] = True
    bowel = np.zeros_like(liver)
    bowel[10:, 12:24, 20:32] = True  # touches the liver from slice 10 on
    hu = np.where(liver, 100.0, np.where(bowel, -40.0, -1000.0)).astype(np.float32)
    emb = _Emb(liver.shape)
    unguarded, _ = propagate_mask(_Greedy(liver | bowel), emb, 5, liver[5], volume=hu,
                                  min_iou=None, max_shift=None, hu_band=None)
    assert (unguarded & bowel).sum() > 100  # the leak the guards are for
    guarded, done = propagate_mask(_Greedy(liver | bowel), emb, 5, liver[5], volume=hu)
    assert done == list(range(depth)) and not (guarded & bowel).any()
    assert (liver & ~guarded).sum() <= 4 * depth  # the opening may round the square's corners


def test_iou_stop_ends_a_jump_to_another_object():
    liver = np.zeros((20, 40, 40), bool)
    liver[:12, 12:24, 8:20] = True  # the liver ends at slice 11 ...
    bowel = np.zeros_like(liver)
    bowel[12:, 12:24, 18:36] = True  # ... where a bowel loop overlaps its box
    emb = _Emb(liver.shape)
    _, done = propagate_mask(_Greedy(liver | bowel), emb, 5, liver[5], max_shift=None, hu_band=None,
                             min_iou=None)
    assert max(done) == 19  # unguarded, it walks on through the bowel
    _, done = propagate_mask(_Greedy(liver | bowel), emb, 5, liver[5], max_shift=None, hu_band=None)
    assert done == list(range(12))
