"""The shared-image decoder's OpenVINO graph against the torch shared decoder (tiny random model)."""

import numpy as np
import pytest

from samliver.decoder_backends import OpenVINODecoder, SharedImageDecoder, openvino_installed
from samliver.models import get_model


@pytest.fixture(autouse=True)
def _auto_decoder(monkeypatch):
    """This module tests what "auto" picks: undo the suite-wide SAMLIVER_DECODER of conftest."""
    monkeypatch.delenv("SAMLIVER_DECODER", raising=False)

pytestmark = pytest.mark.skipif(not openvino_installed(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def slice_and_prompts(tiny):
    import torch

    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 256, 64, 64, generator=gen)
    shared = SharedImageDecoder(tiny.prompt_encoder, tiny.mask_decoder)
    boxes = torch.tensor([[10.0, 20, 120, 140], [50, 60, 200, 220], [0, 0, 255, 255]])
    points = (torch.tensor([[[30.0, 40], [100, 90], [10, 200]]]), torch.tensor([[1, 0, 1]]))
    with torch.inference_mode():
        cache = shared.prepare_slice(feats, tiny.prompt_encoder.get_dense_pe())
        box_sparse = tiny.prompt_encoder(points=None, boxes=boxes, masks=None)[0]
        point_sparse = tiny.prompt_encoder(points=points, boxes=None, masks=None)[0]
    return shared, cache, box_sparse, point_sparse


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One export folder for the module: each graph is traced once (a trace takes 5-20 s)."""
    return tmp_path_factory.mktemp("decoder-openvino")


def _close(a, b, rel=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * max(np.abs(b).max(), 1.0), np.abs(a - b).max()


def test_fp32_graph_matches_torch(slice_and_prompts, folder):
    """One graph serves any number of prompt tokens (boxes: 2, points: 3 + padding) and batches."""
    shared, cache, box_sparse, point_sparse = slice_and_prompts
    engine = OpenVINODecoder(shared, precision="fp32", threads=1, folder=folder)
    for sparse in (box_sparse, point_sparse, box_sparse[1:2]):
        got = engine.decode(cache, sparse)
        want = shared.decode(cache, sparse)
        for g, w in zip(got, want):
            _close(g.numpy(), w.numpy())


@pytest.mark.slow
def test_fp32_multimask_graph_matches_torch(slice_and_prompts, folder):
    shared, cache, box_sparse, point_sparse = slice_and_prompts
    engine = OpenVINODecoder(shared, precision="fp32", threads=1, folder=folder)
    for sparse in (box_sparse, point_sparse):
        got = engine.decode(cache, sparse, multimask_output=True)
        want = shared.decode(cache, sparse, multimask_output=True)
        for g, w in zip(got, want):
            _close(g.numpy(), w.numpy())


def test_batch_equals_one_at_a_time(slice_and_prompts, folder):
    shared, cache, box_sparse, _ = slice_and_prompts
    engine = OpenVINODecoder(shared, precision="bf16", threads=1, folder=folder)
    low, iou = engine.decode(cache, box_sparse)
    for i in range(len(box_sparse)):
        one_low, one_iou = engine.decode(cache, box_sparse[i : i + 1])
        assert np.array_equal(one_low.numpy(), low[i : i + 1].numpy())
        assert np.array_equal(one_iou.numpy(), iou[i : i + 1].numpy())


def test_bf16_graph_is_close_to_torch(slice_and_prompts, folder):
    shared, cache, box_sparse, _ = slice_and_prompts
    got, _ = OpenVINODecoder(shared, precision="bf16", threads=1, folder=folder).decode(cache, box_sparse)
    want, _ = shared.decode(cache, box_sparse)
    g, w = got.numpy().ravel(), want.numpy().ravel()
    assert np.corrcoef(g, w)[0, 1] > 0.999
    assert np.mean((g > 0) == (w > 0)) > 0.99


def test_export_is_reused(slice_and_prompts, folder, monkeypatch):
    import openvino as ov

    shared, cache, box_sparse, _ = slice_and_prompts
    OpenVINODecoder(shared, precision="fp32", threads=1, folder=folder).decode(cache, box_sparse[:1])
    assert (folder / "decoder-single" / "decoder.xml").is_file()

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again although the export is cached")

    monkeypatch.setattr(ov, "convert_model", no_trace)
    again = OpenVINODecoder(shared, precision="fp32", threads=1, folder=folder)
    _close(again.decode(cache, box_sparse[:1])[0].numpy(), shared.decode(cache, box_sparse[:1])[0].numpy())


@pytest.mark.slow
def test_export_follows_weight_updates(tiny, slice_and_prompts):
    """A changed weight is baked into a new graph (the cached export's key no longer matches); a
    parameter object swapped in is used from the next slice on."""
    import torch

    shared, cache, box_sparse, _ = slice_and_prompts
    # No export folder: graphs come from this process's memo of traces, which must hold the
    # weights they were traced with.
    again = OpenVINODecoder(shared, precision="fp32", threads=1)
    again.decode(cache, box_sparse[:1])
    mlp = shared.decoder.output_hypernetworks_mlps[0].layers[-1]
    saved = mlp.weight
    try:
        with torch.no_grad():
            mlp.weight.mul_(-1.0)
        got = again.decode(cache, box_sparse[:1])[0]
        _close(got.numpy(), shared.decode(cache, box_sparse[:1])[0].numpy())
        with torch.no_grad():
            mlp.weight.mul_(-1.0)  # back in place: the graph of the negated weights must not follow
        mlp.weight = torch.nn.Parameter(saved.detach() * -1.0)
        with torch.inference_mode():
            feats = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(6))
            fresh = shared.prepare_slice(feats, tiny.prompt_encoder.get_dense_pe())
        _close(again.decode(fresh, box_sparse[:1])[0].numpy(), shared.decode(fresh, box_sparse[:1])[0].numpy())
    finally:
        mlp.weight = saved


def test_unknown_precision_is_refused(slice_and_prompts):
    with pytest.raises(ValueError, match="precision"):
        OpenVINODecoder(slice_and_prompts[0], precision="int8")


def test_a_new_folder_reuses_this_process_trace(slice_and_prompts, folder, tmp_path, monkeypatch):
    """A fresh export folder (say a new $SAMLIVER_HOME) gets the graph traced earlier in the process."""
    import openvino as ov

    shared, cache, box_sparse, _ = slice_and_prompts
    OpenVINODecoder(shared, precision="fp32", threads=1, folder=folder).decode(cache, box_sparse[:1])

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again although this process traced the graph")

    monkeypatch.setattr(ov, "convert_model", no_trace)
    engine = OpenVINODecoder(shared, precision="bf16", threads=1, folder=tmp_path / "fresh")
    got, want = engine.decode(cache, box_sparse)[0], shared.decode(cache, box_sparse)[0]
    assert np.mean((got.numpy() > 0) == (want.numpy() > 0)) > 0.99
    assert (tmp_path / "fresh" / "decoder-single" / "decoder.xml").is_file()  # and saved there
