"""The Predictor: SAM code paths with the tiny random model, the real path with LiteMedSAM."""

import numpy as np
import pytest

from samliver.cli.segment import main as segment_main
from samliver.decoder_backends import openvino_installed
from samliver.embeddings import embed_volume
from samliver.models import get_model
from samliver.prompt_based_segmentation import Predictor
from samliver.util import SamliverError


@pytest.fixture(autouse=True)
def _auto_decoder(monkeypatch):
    """This module tests what "auto" picks: undo the suite-wide SAMLIVER_DECODER of conftest."""
    monkeypatch.delenv("SAMLIVER_DECODER", raising=False)


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

    import samliver.decoder_backends

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    # A fresh home has no OpenVINO decoder export: torch decodes the one box here (the test is
    # about the command's outputs; a trace would cost 5-20 s).
    monkeypatch.setattr(samliver.decoder_backends, "openvino_installed", lambda: False)
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


# -- the shared-image decoder (samliver.decoder_backends) ------------------------------------


def _close(a, b, rel=1e-4):
    """Float32-rounding agreement: logits within rel x their scale; masks differ at most where |logit| is tiny."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1.0)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * scale, np.abs(a - b).max()
    flipped = (a > 0) != (b > 0)
    assert np.all(np.abs(b[flipped]) <= rel * scale)


@pytest.fixture(scope="module")
def tiny_pair(tiny, small_phantom):
    """The same slice in a shared-decoder and a reference-decoder predictor."""
    shared, reference = Predictor(tiny, decoder="shared"), Predictor(tiny, decoder="reference")
    for p in (shared, reference):
        p.set_image(small_phantom.hu[8])
    return shared, reference


def test_default_decoder_is_shared_for_sam_decoders(tiny):
    assert Predictor(tiny).decoder == "shared"
    assert Predictor(tiny, decoder="reference").decoder == "reference"
    with pytest.raises(SamliverError, match="Unknown decoder"):
        Predictor(tiny, decoder="onnx")


@pytest.mark.parametrize("kwargs", [
    {"box": [10, 12, 40, 44]},
    {"box": [0, 0, 64, 64], "multimask_output": True},
    {"boxes": [[5, 5, 30, 30], [20, 20, 60, 60], [0, 0, 10, 10], [3, 40, 50, 63], [1, 1, 63, 63]]},
    {"points": [[20, 30], [40, 10]], "point_labels": [1, 0]},
    {"points": [[20, 30]], "multimask_output": True},
    {"boxes": [[5, 5, 30, 30], [20, 20, 60, 60]], "points": [[[10, 10]], [[30, 30]]], "point_labels": [[1], [0]]},
], ids=["box", "box-multimask", "5-boxes", "points", "point-multimask", "boxes-with-points"])
def test_shared_decoder_matches_reference(tiny_pair, kwargs):
    shared, reference = tiny_pair
    got = shared.predict(return_logits=True, **kwargs)
    want = reference.predict(return_logits=True, **kwargs)
    assert shared._slice_cache is not None  # really went through the shared decoder
    for g, w in zip(got, want):
        _close(g, w)


def test_shared_batch_equals_one_at_a_time(tiny_pair):
    shared, _ = tiny_pair
    boxes = np.array([[5, 5, 30, 30], [20, 20, 60, 60], [0, 0, 10, 10], [3, 40, 50, 63], [1, 1, 63, 63], [9, 9, 19, 29]])
    batch = shared.predict(boxes=boxes, return_logits=True)  # 6 > CHUNK: split into chunks inside
    for i, b in enumerate(boxes):
        one = shared.predict(box=b, return_logits=True)
        for g, w in zip(one, batch):
            _close(g, w[i])


def test_mask_input_takes_the_reference_path(tiny_pair):
    shared, reference = tiny_pair
    low = reference.predict(box=[5, 5, 50, 40])[2]
    got = shared.predict(box=[5, 5, 50, 40], mask_input=low, return_logits=True)
    want = reference.predict(box=[5, 5, 50, 40], mask_input=low, return_logits=True)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)  # the very same code path


def test_shared_decoder_follows_slice_changes(tiny, small_phantom):
    shared, reference = Predictor(tiny, decoder="shared"), Predictor(tiny, decoder="reference")
    box = [10, 12, 40, 44]
    shared.set_image(small_phantom.hu[8])
    first = shared.predict(box=box, return_logits=True)[0]
    for z in (3, 12):
        shared.set_image(small_phantom.hu[z])  # must drop the prepared slice
        reference.set_image(small_phantom.hu[z])
        got = shared.predict(box=box, return_logits=True)[0]
        _close(got, reference.predict(box=box, return_logits=True)[0])
        assert not np.allclose(got, first)


def test_shared_decoder_follows_weight_updates(small_phantom):
    """Positional projections are cached per model: an in-place weight update must refresh them."""
    import torch

    with pytest.warns(UserWarning):
        model = get_model("tiny", device="cpu")  # a private copy: its weights are changed below
    shared, reference = Predictor(model, decoder="shared"), Predictor(model, decoder="reference")
    for p in (shared, reference):
        p.set_image(small_phantom.hu[8])
    box = [10, 12, 40, 44]
    before = shared.predict(box=box, return_logits=True)[0]
    attn = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    with torch.no_grad():
        attn.k_proj.weight.mul_(3.0)
    shared.set_image(small_phantom.hu[8])
    got = shared.predict(box=box, return_logits=True)[0]
    _close(got, reference.predict(box=box, return_logits=True)[0])
    assert not np.allclose(got, before)


def test_unsupported_decoder_falls_back_or_is_refused(tiny, small_phantom):
    import dataclasses

    from segment_anything.modeling import MaskDecoder

    class OtherDecoder(MaskDecoder):  # e.g. an HQ-SAM-like decoder with its own forward
        pass

    other = OtherDecoder.__new__(OtherDecoder)
    other.__dict__.update(tiny.mask_decoder.__dict__)
    model = dataclasses.replace(tiny, mask_decoder=other)
    p = Predictor(model)
    assert p.decoder == "reference"
    p.set_image(small_phantom.hu[8])
    assert p.predict(box=[10, 12, 40, 44])[0].shape == (1, 64, 64)
    with pytest.raises(SamliverError, match="reference"):
        Predictor(model, decoder="shared")


def test_shared_decoder_module_matches_sam_decoder(tiny):
    """SharedImageDecoder against segment_anything's MaskDecoder on random embeddings, batched."""
    import torch

    from samliver.decoder_backends import SharedImageDecoder

    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 256, 64, 64, generator=gen)
    pe = tiny.prompt_encoder.get_dense_pe()
    boxes = torch.tensor([[10.0, 20, 120, 140], [50, 60, 200, 220], [0, 0, 255, 255]])
    dec = SharedImageDecoder(tiny.prompt_encoder, tiny.mask_decoder)
    with torch.inference_mode():
        sparse, dense = tiny.prompt_encoder(points=None, boxes=boxes, masks=None)
        cache = dec.prepare_slice(feats, pe)
        for multimask in (False, True):
            want = tiny.mask_decoder(feats, pe, sparse, dense, multimask)
            got = dec.decode(cache, sparse, multimask_output=multimask, chunk=2)
            for g, w in zip(got, want):
                _close(g.numpy(), w.numpy())


def test_time_box_to_mask_reports_every_variant(tiny):
    from samliver.prompt_based_segmentation import time_box_to_mask

    emb = np.random.default_rng(0).normal(size=(256, 64, 64)).astype(np.float32)
    out = time_box_to_mask(tiny, emb, [[10, 10, 100, 120], [30, 40, 200, 250]], repeats=1, num_threads=1, clock="cpu")
    for key in ("reference_single", "reference_batched", "shared_single", "shared_batched", "shared_prepare",
                "shared_first_box", "speedup_single", "speedup_batched", "default_single", "default_batched"):
        assert out[key] > 0, key
    assert out["default_backend"] == Predictor(tiny).backend
    assert out["default_mask_dice_mean"] >= out["default_mask_dice_min"] > 0.9
    assert out["boxes"] == 2 and out["threads"] == 1 and out["clock"] == "cpu"
    assert out["mask_dice_min"] > 0.99 and out["max_abs_logit_diff"] < 1e-3
    with pytest.raises(SamliverError, match="box"):
        time_box_to_mask(tiny, emb, np.zeros((0, 4)))


@pytest.mark.slow
def test_litemedsam_shared_decoder_matches_reference_on_real_slices(sample_volume):
    """Tight GT liver boxes on real slices: the shared decoder gives SAM's masks, single and batched."""
    from samliver.evaluation import dice
    from samliver.prompts import box_from_mask

    model = get_model("litemedsam")
    zs = [60, 80, 100]
    emb = embed_volume(sample_volume, model, slices=zs, progress=False)
    shared, reference = Predictor(model, decoder="shared"), Predictor(model, decoder="reference")
    for z in zs:
        box = np.asarray(box_from_mask(sample_volume.label[z] >= 1), float)
        boxes = np.array([box, box + [-3, -3, 3, 3], box + [4, 2, -4, -2]])
        for p in (shared, reference):
            p.set_slice(emb, z)
        for kwargs in ({"box": box}, {"boxes": boxes}, {"box": box, "multimask_output": True}):
            got = shared.predict(return_logits=True, **kwargs)
            want = reference.predict(return_logits=True, **kwargs)
            for g, w in zip(got, want):
                _close(g, w)
            assert dice(got[0] > 0, want[0] > 0) >= 0.999


# -- the OpenVINO decoder, the default's choices, the composed resize ------------------------

needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def openvino_pair(tiny, small_phantom):
    """The same slice in an OpenVINO float32 predictor and a reference-decoder predictor."""
    fast, reference = Predictor(tiny, decoder="openvino", precision="fp32"), Predictor(tiny, decoder="reference")
    for p in (fast, reference):
        p.set_image(small_phantom.hu[8])
    return fast, reference


@needs_openvino
@pytest.mark.parametrize("kwargs", [
    {"box": [10, 12, 40, 44]},
    {"boxes": [[5, 5, 30, 30], [20, 20, 60, 60], [0, 0, 10, 10], [3, 40, 50, 63], [1, 1, 63, 63]]},
    {"points": [[20, 30], [40, 10]], "point_labels": [1, 0]},
    {"boxes": [[5, 5, 30, 30], [20, 20, 60, 60]], "points": [[[10, 10]], [[30, 30]]], "point_labels": [[1], [0]]},
    {"box": [0, 0, 64, 64], "multimask_output": True},
], ids=["box", "5-boxes", "points", "boxes-with-points", "box-multimask"])
def test_openvino_decoder_matches_reference(openvino_pair, kwargs):
    fast, reference = openvino_pair
    got = fast.predict(return_logits=True, **kwargs)
    want = reference.predict(return_logits=True, **kwargs)
    assert fast.backend == "openvino-fp32" and fast._openvino._requests  # really ran OpenVINO
    for g, w in zip(got, want):
        _close(g, w)


@needs_openvino
def test_openvino_batch_equals_one_at_a_time(openvino_pair):
    fast, _ = openvino_pair
    boxes = np.array([[5, 5, 30, 30], [20, 20, 60, 60], [3, 40, 50, 63]])
    batch = fast.predict(boxes=boxes, return_logits=True)
    for i, b in enumerate(boxes):
        for g, w in zip(fast.predict(box=b, return_logits=True), batch):
            _close(g, w[i], rel=1e-6)  # one inference per prompt either way; the resize may round differently


def test_decoder_choices(tiny, monkeypatch):
    import samliver.decoder_backends as backends

    if openvino_installed():
        assert Predictor(tiny).backend.startswith("openvino-")
        assert Predictor(tiny, precision="fp32").backend == "openvino-fp32"
    assert Predictor(tiny, decoder="shared").backend == "torch-shared"
    assert Predictor(tiny, decoder="reference").backend == "torch-reference"
    with pytest.raises(SamliverError, match="bf16"):
        Predictor(tiny, decoder="shared", precision="bf16")
    with pytest.raises(SamliverError, match="precision"):
        Predictor(tiny, precision="int4")
    # Without OpenVINO: torch decodes under "auto", and "openvino" says what is missing.
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    assert Predictor(tiny).backend == "torch-shared"
    with pytest.raises(SamliverError, match="openvino"):
        Predictor(tiny, decoder="openvino")


@needs_openvino
def test_openvino_failure_falls_back_to_torch(tiny, small_phantom, monkeypatch):
    from samliver.decoder_backends import OpenVINODecoder

    def broken(self, *args, **kwargs):
        raise RuntimeError("no engine\nsecond line")

    monkeypatch.setattr(OpenVINODecoder, "decode", broken)
    auto, shared = Predictor(tiny), Predictor(tiny, decoder="shared")
    for p in (auto, shared):
        p.set_image(small_phantom.hu[8])
    with pytest.warns(RuntimeWarning, match="no engine"):
        got = auto.predict(box=[10, 12, 40, 44], return_logits=True)
    assert auto.backend == "torch-shared"
    for g, w in zip(got, shared.predict(box=[10, 12, 40, 44], return_logits=True)):
        assert np.array_equal(g, w)
    strict = Predictor(tiny, decoder="openvino")
    strict.set_image(small_phantom.hu[8])
    with pytest.raises(SamliverError, match="OpenVINO decoder failed"):
        strict.predict(box=[10, 12, 40, 44])


def test_composed_resize_matches_sam_postprocessing(tiny):
    """Low-res 256 -> 1024 frame -> crop -> slice size as one matrix per axis (SAM ViT models)."""
    import torch

    from samliver.preprocess import SliceTransform

    p = Predictor(tiny, decoder="shared")
    low = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 10
    for hw in [(128, 128), (96, 128), (200, 150), (1200, 900)]:
        p.transform = SliceTransform(hw, target=1024)
        got, want = p._to_original(low), p.transform.mask_to_original(low)
        _close(got.numpy(), want.numpy(), rel=1e-5)
    p.transform = SliceTransform((64, 64), target=256)  # low-res grid = frame: SAM's own path
    assert torch.equal(p._to_original(low), p.transform.mask_to_original(low))


@pytest.mark.slow
def test_litemedsam_default_decoder_agrees_with_reference_on_real_slices(sample_volume):
    """The default decoder (OpenVINO, bf16 where native) on tight + jittered GT boxes: mask Dice vs
    SAM's decoder >= 0.995 on average (docs/decoder_speed.md: 0.9984-0.9989 mean, 0.9944 min)."""
    from samliver.evaluation import dice
    from samliver.prompts import box_from_mask

    model = get_model("litemedsam")
    zs = [60, 80, 100]
    emb = embed_volume(sample_volume, model, slices=zs, progress=False)
    default, reference = Predictor(model), Predictor(model, decoder="reference")
    scores = []
    for z in zs:
        box = np.asarray(box_from_mask(sample_volume.label[z] >= 1), float)
        rng = np.random.default_rng(z)
        boxes = np.array([box] + [box + rng.integers(-4, 5, 4) for _ in range(9)], float)
        for p in (default, reference):
            p.set_slice(emb, z)
        got, want = default.predict(boxes=boxes)[0], reference.predict(boxes=boxes)[0]
        scores += [dice(g[0], w[0]) for g, w in zip(got, want)]
    assert np.mean(scores) >= 0.995 and np.min(scores) >= 0.99, (np.mean(scores), np.min(scores))


def test_decoder_environment_switch(tiny, monkeypatch):
    monkeypatch.setenv("SAMLIVER_DECODER", "reference")
    assert Predictor(tiny).decoder == "reference"
    assert Predictor(tiny, decoder="shared").decoder == "shared"  # an explicit choice wins
    monkeypatch.setenv("SAMLIVER_DECODER", "fastest")
    with pytest.raises(SamliverError, match="SAMLIVER_DECODER"):
        Predictor(tiny)
    monkeypatch.delenv("SAMLIVER_DECODER")
    expected = "openvino" if openvino_installed() else "torch-shared"
    assert Predictor(tiny).backend.startswith(expected)
