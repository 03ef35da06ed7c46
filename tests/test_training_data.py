"""Training tensors: cached embeddings of slices, augmented views, batch augmentation."""

import numpy as np
import pytest
import torch

from samliver import training_data
from samliver.util import SamliverError


def test_augment_is_consistent():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = x[:, 0].long()
    im = x[:, :1]
    for _ in range(10):
        a, b, c = training_data.augment_batch(x, y, im, "flip+rot", gen)
        assert torch.equal(a[:, 0].long(), b) and torch.equal(c[:, 0], a[:, 0])


def test_augmented_views_keep_image_and_label_aligned(small_phantom):
    from samliver.io import CTVolume

    vol = small_phantom
    views = training_data.augmented_views(vol, [3, 8], n_views=3, seed=0)
    assert views.hu.shape == (6, *vol.hu.shape[1:]) and views.label.shape == views.hu.shape
    assert set(np.unique(views.label)) <= {0, 1, 2}
    again = training_data.augmented_views(vol, [3, 8], n_views=3, seed=0)
    assert np.array_equal(views.hu, again.hu) and np.array_equal(views.label, again.label)
    other = training_data.augmented_views(vol, [3, 8], n_views=3, seed=1)
    assert not np.array_equal(views.hu, other.hu)
    # A bright square labelled 1 on air: after the same transform the label still covers it.
    hu = np.full((1, 64, 64), -1000, np.float32)
    lab = np.zeros((1, 64, 64), np.uint8)
    hu[0, 20:44, 16:40], lab[0, 20:44, 16:40] = 200, 1
    sq = training_data.augmented_views(CTVolume(hu=hu, label=lab), [0], n_views=4, seed=2)
    for h, lb in zip(sq.hu, sq.label):
        assert lb.any() and not np.array_equal(lb, lab[0])  # moved, not lost
        assert (h[lb == 1] > -400).mean() > 0.95 and (h[lb == 0] < -400).mean() > 0.95
    with pytest.raises(SamliverError, match="labelled"):
        training_data.augmented_views(CTVolume(hu=hu), [0])


def test_view_tensors_are_cached(small_phantom, tmp_path, monkeypatch):
    """Augmented views go through the embedding cache (tiny RANDOM model: plumbing only)."""
    from samliver.models import get_model

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    with pytest.warns(UserWarning):
        model = get_model("tiny", device="cpu")
    emb, lab, im = training_data.view_tensors(small_phantom, model, [3, 8], n_views=2, seed=0)
    assert len(emb) == len(lab) == len(im) == 4 and lab.shape[-1] == model.image_size

    def _no_encoding(*a, **k):
        raise AssertionError("views should come from the cache the second time")

    monkeypatch.setattr(model, "encode", _no_encoding)
    emb2, lab2, _ = training_data.view_tensors(small_phantom, model, [3, 8], n_views=2, seed=0)
    assert np.allclose(emb, emb2) and np.array_equal(lab, lab2)


def test_context_slices_repeat_the_edge_slice():
    assert training_data.context_slices([0, 5, 9], depth=10, context=2) == [
        [0, 0, 0, 1, 2], [3, 4, 5, 6, 7], [7, 8, 9, 9, 9]]
    assert training_data.context_slices([4], depth=10) == [[4]]


class _FakeEmbeddings:
    """Per-slice embeddings whose values are the slice index (no model needed)."""

    def __init__(self, zs):
        self.zs = set(zs)

    def __contains__(self, z):
        return z in self.zs

    def __getitem__(self, z):
        return np.full((2, 4, 4), float(z), np.float16)


def test_context_embeddings_stack_neighbours_and_refuse_missing_ones():
    emb = training_data.context_embeddings(_FakeEmbeddings(range(6)), [0, 3], depth=6, context=1)
    assert emb.shape == (2, 6, 4, 4) and emb.dtype == np.float32
    assert emb[0, ::2, 0, 0].tolist() == [0, 0, 1] and emb[1, ::2, 0, 0].tolist() == [2, 3, 4]
    with pytest.raises(SamliverError, match="no cached embedding"):
        training_data.context_embeddings(_FakeEmbeddings([3]), [3], depth=6, context=1)


def test_fine_tensors_only_for_recipes_that_read_them(small_phantom):
    from samliver.training_data import fine_tensors
    from samliver.util import SamliverError

    assert fine_tensors(small_phantom, None, None, [0, 1], {"refine_size": 128}) is None
    assert fine_tensors(small_phantom, None, None, [0, 1], None) is None
    with pytest.raises(SamliverError, match="fine_features"):
        fine_tensors(small_phantom, None, None, [0, 1], {"fine_features": 128}, views=2)
