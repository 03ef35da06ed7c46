"""The embedding cache: keys, reuse, lazy float16 loading, recovery from stale or corrupt files.

Runs the ``tiny`` random model (SAM code path) on the small phantom, each test with its own
cache folder; one ``slow`` test embeds two real sample slices with LiteMedSAM.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from samliver.embeddings import (
    VolumeEmbeddings,
    cache_key,
    clear_cache,
    embed_volume,
    open_embeddings,
)
from samliver.models import get_model
from samliver.util import SamliverError, parse_slice_spec


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return get_model("tiny", device="cpu")


@pytest.fixture
def counted(tiny, monkeypatch):
    """The tiny model with ``encode`` wrapped to record how many slices each call encodes."""
    calls: list[int] = []
    real = tiny.encode

    def encode(batch):
        calls.append(int(batch.shape[0]))
        return real(batch)

    monkeypatch.setattr(tiny, "encode", encode)
    return tiny, calls


def test_embed_shapes_dtype_and_metadata(small_phantom, counted, tmp_path):
    model, calls = counted
    emb = embed_volume(small_phantom, model, slices=[3, 1, 3], batch_size=4, progress=False, cache_root=tmp_path)
    assert isinstance(emb, VolumeEmbeddings)
    assert emb.slices == [1, 3] and len(emb) == 2 and calls == [2]
    assert emb.model_name == "tiny" and emb.weights_id == model.weights_id
    assert emb.window == (-160.0, 240.0) and emb.original_hw == (64, 64)
    assert emb.transform.target == 256 and emb.transform.input_hw == (256, 256)
    arr = emb[1]
    assert arr.dtype == np.float16 and arr.shape == (256, 64, 64) and isinstance(arr, np.memmap)
    stack = emb.stack()
    assert stack.dtype == np.float32 and stack.shape == (2, 256, 64, 64)
    # float16 cache agrees with a direct float32 encode to float16 precision
    import torch

    from samliver.preprocess import window_to_unit

    direct = model.encode(torch.stack([model.prepare(window_to_unit(small_phantom.hu[3], "abdomen"))]))[0].numpy()
    np.testing.assert_allclose(stack[1], direct, atol=2e-3 * max(1.0, np.abs(direct).max()))
    assert emb.stack([]).shape == (0, 256, 64, 64)
    with pytest.raises(SamliverError, match=r"Slice 5 has no valid cached embedding.*slices=\[5\]"):
        emb[5]


def test_cache_hit_reuses_and_only_requested_slices_are_computed(small_phantom, counted, tmp_path):
    model, calls = counted
    embed_volume(small_phantom, model, slices=[0, 1, 2, 3, 4], batch_size=2, progress=False, cache_root=tmp_path)
    assert calls == [2, 2, 1]  # batches of 2
    calls.clear()
    again = embed_volume(small_phantom, model, slices=[1, 3], progress=False, cache_root=tmp_path)
    assert calls == [] and again.slices == [1, 3]
    more = embed_volume(small_phantom, model, slices=[3, 4, 5, 6], batch_size=8, progress=False, cache_root=tmp_path)
    assert calls == [2] and more.slices == [3, 4, 5, 6]  # only 5 and 6 were missing
    assert more.available() == [0, 1, 2, 3, 4, 5, 6]
    opened = open_embeddings(small_phantom, model, cache_root=tmp_path)
    assert opened.slices == [0, 1, 2, 3, 4, 5, 6] and 7 not in opened


def test_changed_window_model_or_volume_gives_a_different_key(small_phantom, tiny, tmp_path):
    import dataclasses

    base = cache_key(small_phantom, tiny, "abdomen")
    assert cache_key(small_phantom, tiny, (-160, 240)) == base  # a name and its values are the same window
    assert cache_key(small_phantom, tiny, "liver")["window"] != base["window"]
    other_weights = dataclasses.replace(tiny, weights_id="0" * 64)
    assert cache_key(small_phantom, other_weights)["weights"] != base["weights"]
    other_model = dataclasses.replace(tiny, name="other", preprocessing="minmax")
    k = cache_key(small_phantom, other_model)
    assert k["model"] == "other" and k["preprocessing"] != base["preprocessing"]
    hu = small_phantom.hu.copy()
    hu[0, 0, 0] += 1
    assert cache_key(hu, tiny)["volume_sha256"] != base["volume_sha256"]
    a = embed_volume(small_phantom, tiny, slices=[2], window="abdomen", progress=False, cache_root=tmp_path)
    b = embed_volume(small_phantom, tiny, slices=[2], window="liver", progress=False, cache_root=tmp_path)
    assert a.path != b.path and not np.array_equal(a[2], b[2])
    assert json.loads((a.path / "key.json").read_text()) == a.key


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape", "wrong_dtype"])
def test_corrupt_slice_file_is_recomputed(small_phantom, counted, tmp_path, damage):
    model, calls = counted
    emb = embed_volume(small_phantom, model, slices=[4, 5], progress=False, cache_root=tmp_path)
    good = np.array(emb[4])
    f = emb.slice_path(4)
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "garbage":
        f.write_bytes(b"\x00not a numpy file" * 100)
    elif damage == "wrong_shape":
        np.save(f, np.zeros((256, 32, 32), np.float16))
    else:
        np.save(f, np.zeros((256, 64, 64), np.float32))
    assert 4 not in emb
    calls.clear()
    again = embed_volume(small_phantom, model, slices=[4, 5], progress=False, cache_root=tmp_path)
    assert calls == [1]  # slice 4 only
    np.testing.assert_array_equal(np.asarray(again[4]), good)


def test_key_mismatch_drops_and_recomputes(small_phantom, counted, tmp_path):
    model, calls = counted
    emb = embed_volume(small_phantom, model, slices=[7], progress=False, cache_root=tmp_path)
    key_file = emb.path / "key.json"
    stored = json.loads(key_file.read_text())
    stored["window"] = [0.0, 1.0]  # as if another key had been written into this folder
    key_file.write_text(json.dumps(stored))
    calls.clear()
    again = embed_volume(small_phantom, model, slices=[7], progress=False, cache_root=tmp_path)
    assert calls == [1] and json.loads(key_file.read_text()) == again.key
    key_file.write_text("{not json")  # a corrupt key file is treated the same way
    calls.clear()
    embed_volume(small_phantom, model, slices=[7], progress=False, cache_root=tmp_path)
    assert calls == [1]


def test_writes_are_atomic_and_leave_no_temp_files(small_phantom, tiny, tmp_path, monkeypatch):
    emb = embed_volume(small_phantom, tiny, slices=[0, 1], progress=False, cache_root=tmp_path)
    names = sorted(p.name for p in emb.path.iterdir())
    assert names == ["key.json", "z0000.crc32", "z0000.npy", "z0001.crc32", "z0001.npy"]
    # an encoder failure mid-volume keeps the finished slices and writes nothing partial
    real = tiny.encode
    n = {"calls": 0}

    def flaky(batch):
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("boom")
        return real(batch)

    monkeypatch.setattr(tiny, "encode", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        embed_volume(small_phantom, tiny, slices=[2, 3], batch_size=1, progress=False, cache_root=tmp_path)
    assert sorted(p.name for p in emb.path.glob("*.npy")) == ["z0000.npy", "z0001.npy", "z0002.npy"]
    assert not [p for p in emb.path.iterdir() if p.name.startswith(".")]


def test_bad_input(small_phantom, tiny, tmp_path):
    with pytest.raises(SamliverError, match="outside the volume"):
        embed_volume(small_phantom, tiny, slices=[99], progress=False, cache_root=tmp_path)
    with pytest.raises(SamliverError, match="Unknown window"):
        embed_volume(small_phantom, tiny, slices=[0], window="brain?", progress=False, cache_root=tmp_path)
    with pytest.raises(SamliverError, match="empty"):
        embed_volume(small_phantom, tiny, slices=[0], window=(10, 10), progress=False, cache_root=tmp_path)
    with pytest.raises(SamliverError, match=r"\(z, y, x\)"):
        embed_volume(np.zeros((4, 4)), tiny, progress=False, cache_root=tmp_path)


def test_clear_cache_and_slice_spec(small_phantom, tiny, tmp_path):
    embed_volume(small_phantom, tiny, slices=[0], progress=False, cache_root=tmp_path)
    clear_cache("tiny", cache_root=tmp_path)
    assert not (tmp_path / "tiny").exists()
    assert parse_slice_spec(None, 10) is None and parse_slice_spec("all", 10) is None
    assert parse_slice_spec("7-9,1,3", 10) == [1, 3, 7, 8, 9]
    with pytest.raises(SamliverError, match="outside"):
        parse_slice_spec("8-12", 10)
    with pytest.raises(SamliverError, match="Cannot read"):
        parse_slice_spec("a-b", 10)


def test_progress_bar_runs(small_phantom, tiny, tmp_path, capsys):
    embed_volume(small_phantom, tiny, slices=[0], progress=True, cache_root=tmp_path)
    assert "encoding (tiny)" in capsys.readouterr().err


@pytest.mark.slow
def test_litemedsam_cache_on_real_sample(sample_volume, tmp_path):
    from samliver.prompt_based_segmentation import Predictor

    model = get_model("litemedsam", device="cpu")
    emb = embed_volume(sample_volume, model, slices=[64, 70], progress=False, cache_root=tmp_path)
    assert emb.slices == [64, 70] and emb.original_hw == (128, 128)
    predictor = Predictor(model)
    predictor.set_slice(emb, 64)
    gt = sample_volume.label[64] > 0
    ys, xs = np.nonzero(gt)
    masks, _, _ = predictor.predict(box=[xs.min(), ys.min(), xs.max(), ys.max()])
    dice = 2 * (masks[0] & gt).sum() / (masks[0].sum() + gt.sum())
    assert dice > 0.8  # LiteMedSAM with a tight liver box (docs/results.md: 0.930 over the slab)


@pytest.mark.slow
def test_fine_features_cached_beside_the_embeddings(sample_volume, tmp_path, monkeypatch, tiny):
    import samliver.embeddings as embeddings
    from samliver.embeddings import embed_fine_features
    from samliver.util import SamliverError

    model = get_model("litemedsam", device="cpu")
    fine = embed_fine_features(sample_volume, model, slices=[64, 65], cache_root=tmp_path)
    assert fine.slices == [64, 65] and fine.stack([64, 65]).shape == (2, 128, 128, 128)
    assert np.isfinite(fine.stack([64])).all() and fine.stack([64]).std() > 0
    calls = []
    real = embeddings.fine_stage
    monkeypatch.setattr(embeddings, "fine_stage", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = embed_fine_features(sample_volume, model, slices=[65, 64], cache_root=tmp_path)
    np.testing.assert_array_equal(again.stack([64]), fine.stack([64]))
    assert len(calls) <= 1  # the shape probe only: both slices came from the cache
    emb = embed_volume(sample_volume, model, slices=[64], progress=False, cache_root=tmp_path)
    assert emb.path != fine.path  # their own key: the two caches never mix
    with pytest.raises(SamliverError):
        embed_fine_features(sample_volume, tiny, slices=[0], cache_root=tmp_path)
