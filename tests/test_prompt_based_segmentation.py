"""The Predictor: SAM code paths with the tiny random model, the real path with LiteMedSAM."""

import numpy as np
import pytest

from samliver.embeddings import embed_volume
from samliver.models import get_model
from samliver.prompt_based_segmentation import Predictor
from samliver.prompt_based_segmentation import main as segment_main
from samliver.util import SamliverError


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_predictor(tiny, small_phantom):
    p = Predictor(tiny)
    p.set_image(small_phantom.hu[8])
    return p


def test_set_image_and_embedding_agree(tiny, small_phantom, tmp_path):
    emb = embed_volume(small_phantom, tiny, slices=[8], progress=False, cache_root=tmp_path)
    a, b = Predictor(tiny), Predictor(tiny)
    a.set_image(small_phantom.hu[8])
    b.set_slice(emb, 8)
    box = np.array([10, 12, 40, 44])
    la = a.predict(box=box, return_logits=True)[0]
    lb = b.predict(box=box, return_logits=True)[0]
    # The cache stores float16: the logits agree to float16 precision, not bit for bit.
    assert la.shape == lb.shape == (1, 64, 64)
    assert np.allclose(la, lb, atol=0.05 * (np.abs(la).max() + 1))


def test_prompt_kinds_and_shapes(tiny_predictor):
    p = tiny_predictor
    masks, scores, low = p.predict(points=[[20, 30], [40, 10]], point_labels=[1, 0])
    assert masks.shape == (1, 64, 64) and masks.dtype == bool and scores.shape == (1,)
    assert low.shape == (1, 256, 256)
    masks, scores, low = p.predict(box=[5, 5, 50, 40], multimask_output=True)
    assert masks.shape == (3, 64, 64) and scores.shape == (3,)
    masks, scores, low = p.predict(boxes=[[5, 5, 30, 30], [20, 20, 60, 60], [0, 0, 10, 10]])
    assert masks.shape == (3, 1, 64, 64) and scores.shape == (3, 1) and low.shape == (3, 1, 256, 256)
    masks2, _, _ = p.predict(box=[5, 5, 50, 40], mask_input=low[0])
    assert masks2.shape == (1, 64, 64)
    # Several boxes give the same masks as one box at a time.
    one, _, _ = p.predict(box=[20, 20, 60, 60])
    assert np.array_equal(one[0], masks[1, 0])


@pytest.mark.parametrize("kwargs, match", [
    ({"box": [30, 10, 20, 40]}, "inverted"),
    ({"box": [10, 10, 10, 40]}, "empty"),
    ({"box": [100, 100, 120, 120]}, "outside"),
    ({"points": [[70, 5]]}, "outside"),
    ({"points": [[5, 5], [6, 6]], "point_labels": [1]}, "label"),
    ({}, "No prompt"),
    ({"box": [1, 1, 9, 9], "mask_input": np.zeros((1, 64, 64))}, "mask_input"),
])
def test_bad_prompts(tiny_predictor, kwargs, match):
    with pytest.raises(SamliverError, match=match):
        tiny_predictor.predict(**kwargs)


def test_no_image_and_wrong_embedding(tiny):
    p = Predictor(tiny)
    with pytest.raises(SamliverError, match="No image"):
        p.predict(box=[1, 1, 5, 5])
    with pytest.raises(SamliverError, match="model"):
        p.set_embedding(np.zeros((256, 64, 64), np.float16), (64, 64), model_name="litemedsam")
    with pytest.raises(SamliverError, match="does not fit"):
        p.set_embedding(np.zeros((256, 32, 32), np.float16), (64, 64))


def test_embeddings_of_another_model_are_refused(tiny, small_phantom, tmp_path):
    emb = embed_volume(small_phantom, tiny, slices=[3], progress=False, cache_root=tmp_path)
    emb.model_name = "litemedsam"  # as if the cache came from LiteMedSAM
    with pytest.raises(SamliverError, match="do not match"):
        Predictor(tiny).set_slice(emb, 3)


def test_segment_cli_writes_nifti_and_png(tmp_path, monkeypatch):
    import nibabel as nib

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    from samliver.io import save_volume_nifti
    from samliver.phantom import make_phantom

    vol = make_phantom((8, 48, 48), n_lesions=1, seed=2)
    src = save_volume_nifti(vol.hu, tmp_path / "ct.nii.gz", spacing=vol.spacing)
    out = tmp_path / "mask.nii.gz"
    with pytest.warns(UserWarning):
        segment_main([str(src), "--slice", "4", "--box", "5", "5", "40", "40", "--model", "tiny", "-o", str(out)])
    assert out.is_file() and (tmp_path / "mask.png").is_file()
    assert nib.load(str(out)).shape == nib.load(str(src)).shape
    with pytest.raises(SamliverError, match="outside"):
        segment_main([str(src), "--slice", "99", "--box", "5", "5", "40", "40", "--model", "tiny", "-o", str(out),
                     "--overwrite"])


@pytest.mark.slow
def test_litemedsam_liver_box_on_real_slices(sample_volume):
    """The real path: a tight liver box on three real slices gives a good liver mask."""
    from samliver.evaluation import dice
    from samliver.prompts import box_from_mask

    model = get_model("litemedsam")
    zs = [60, 80, 100]
    emb = embed_volume(sample_volume, model, slices=zs, progress=False)
    p = Predictor(model)
    for z in zs:
        gt = sample_volume.label[z] >= 1
        p.set_slice(emb, z)
        masks, scores, _ = p.predict(box=box_from_mask(gt))
        assert masks.shape == (1, *gt.shape)
        assert dice(masks[0], gt) > 0.85, z
