"""Training on synthetic embeddings: learns, checkpoints load/resume/refuse, NaN stops safely."""

import numpy as np
import pytest
import torch

from samliver import training, training_data
from samliver.checkpoints import load_head
from samliver.cli import train as train_cli
from samliver.heads import predict_logits
from samliver.losses import IGNORE, seg_loss
from samliver.training import TrainConfig, train_head
from samliver.util import SamliverError, parse_slice_spec


def _synthetic(n=6, seed=0, dim=16, grid=16, size=32):
    """Labels with a 'liver' disc and a 'tumour' blob; embeddings = noisy one-hot at grid size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels, embs, images = [], [], []
    for _ in range(n):
        cy, cx = rng.uniform(10, 22, 2)
        lab = np.zeros((size, size), np.int64)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 1
        ty, tx = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
        lab[(yy - ty) ** 2 + (xx - tx) ** 2 < 9] = 2
        onehot = np.eye(3)[lab].transpose(2, 0, 1)
        small = onehot.reshape(3, grid, size // grid, grid, size // grid).mean((2, 4))
        emb = rng.normal(0, 0.3, (dim, grid, grid))
        emb[:3] += 2 * small
        labels.append(lab), embs.append(emb), images.append(lab / 2.0)
    return (np.asarray(embs, np.float32), np.asarray(labels), np.asarray(images, np.float32))


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("kind", ["linear", "cnn"])
def test_training_learns(kind):
    emb, lab, img = _synthetic()
    # The cnn head refines at half its frame, as the default recipe does (3x cheaper per step).
    cfg = TrainConfig(kind=kind, steps=80, batch_size=4, val_fraction=0, eval_every=40, lr=1e-2
                      if kind == "linear" else 3e-3, head_options={"refine_size": 16} if kind == "cnn" else {})
    res = train_head(emb, lab, images=img, config=cfg, progress=False)
    prob = predict_logits(res.head, emb, img)
    pred = prob.argmax(1)
    assert prob.shape == (6, 3, 32, 32)
    assert _dice(pred >= 1, lab >= 1) > 0.8
    assert res.history["val_on"] == "train" and len(res.history["loss"]) == 80


def test_validation_split_and_early_stop():
    emb, lab, img = _synthetic(n=10)
    cfg = TrainConfig(kind="linear", steps=200, batch_size=4, val_fraction=0.2, eval_every=5,
                      patience=2, lr=1e-6)  # a tiny LR: validation cannot improve -> early stop
    res = train_head(emb, lab, images=img, config=cfg, progress=False)
    assert res.history["n_val"] == 2 and res.history["n_train"] == 8
    assert res.history["stopped"].startswith("early stop")


def test_checkpoint_roundtrip_resume_and_refusal(tmp_path):
    emb, lab, img = _synthetic()
    ckpt = tmp_path / "head.pt"
    cfg = TrainConfig(kind="cnn", steps=10, batch_size=2, val_fraction=0, eval_every=5)
    info = {"model_name": "fake", "weights_id": "abc123"}
    res = train_head(emb, lab, images=img, config=cfg, model_info=info, checkpoint=ckpt,
                     progress=False, curves_path=tmp_path / "curves.png")
    assert ckpt.exists() and (tmp_path / "curves.png").stat().st_size > 1000
    head = load_head(ckpt, embedding_shape=(16, 16, 16))
    a = predict_logits(head, emb, img)
    b = predict_logits(res.head, emb, img)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert head.checkpoint_info["model_name"] == "fake"
    # resume continues from the stored step
    cfg2 = TrainConfig(kind="cnn", steps=15, batch_size=2, val_fraction=0, eval_every=5)
    res2 = train_head(emb, lab, images=img, config=cfg2, resume=ckpt, progress=False)
    assert res2.history["step"][-1] == 14 and res2.history["step"][0] == 0
    # another model's embedding shape is refused with a clear message
    with pytest.raises(SamliverError, match="another model"):
        load_head(ckpt, embedding_shape=(256, 64, 64))

    class Other:
        name, embed_dim, embed_hw, weights_id = "litemedsam", 256, (64, 64), "zzz"

    with pytest.raises(SamliverError, match="fake"):
        load_head(ckpt, model=Other())
    with pytest.raises(SamliverError, match="not found"):
        load_head(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SamliverError):
        load_head(tmp_path / "junk.pt")


def test_old_cnn_checkpoint_without_full_res_block_loads(tmp_path):
    """Checkpoints from before full_res became the default (no option, no weights) still load."""
    import torch

    from samliver.checkpoints import save_checkpoint
    from samliver.heads import build_head

    old = build_head("cnn", embed_dim=16, out_size=64, embed_hw=16, full_res=False)
    path = save_checkpoint(tmp_path / "old.pt", old, config=TrainConfig(kind="cnn"))
    ckpt = torch.load(path, weights_only=False)
    ckpt["head_options"].pop("full_res")
    torch.save(ckpt, path)
    head = load_head(path)
    assert head.up.full is None
    assert build_head("cnn", embed_dim=16, out_size=64, embed_hw=16).up.full is not None


def test_nan_loss_stops_and_keeps_last_good(tmp_path, monkeypatch):
    emb, lab, img = _synthetic()
    calls = {"n": 0}

    def flaky(logits, target, *a, **k):
        calls["n"] += 1
        loss = seg_loss(logits, target, *a, **k)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(training, "seg_loss", flaky)
    ckpt = tmp_path / "head.pt"
    cfg = TrainConfig(kind="cnn", steps=40, batch_size=2, val_fraction=0, eval_every=5)
    res = train_head(emb, lab, images=img, config=cfg, checkpoint=ckpt, progress=False)
    assert res.history["stopped"].startswith("non-finite loss at step 12")
    assert all(torch.isfinite(p).all() for p in res.head.parameters())
    head = load_head(ckpt)
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_speed_options_train_restore_threads_and_checkpoint_loads(tmp_path):
    """channels_last + bf16 autocast + a thread count: finite loss, loadable checkpoint, the
    caller's thread count restored, and a contiguous head whose predictions match the file."""
    emb, lab, img = _synthetic()
    threads = torch.get_num_threads()
    ckpt = tmp_path / "fast.pt"
    cfg = TrainConfig(kind="cnn", steps=6, batch_size=2, val_fraction=0, eval_every=3,
                      channels_last=True, bf16=True, threads=1,
                      head_options={"refine_size": 16})  # refinement at S/2, as the demo's
    res = train_head(emb, lab, images=img, config=cfg, checkpoint=ckpt, progress=False)
    assert torch.get_num_threads() == threads
    assert len(res.history["loss"]) == 6 and np.isfinite(res.history["loss"]).all()
    assert all(p.is_contiguous() for p in res.head.parameters())
    head = load_head(ckpt)
    assert head.checkpoint_info["config"]["channels_last"] is True
    assert head.up.refine_size == 16 and head.up.full is not None
    np.testing.assert_allclose(predict_logits(head, emb, img), predict_logits(res.head, emb, img),
                               atol=1e-5)


def test_training_is_deterministic_for_a_seed_with_speed_options():
    emb, lab, img = _synthetic()
    cfg = TrainConfig(kind="cnn", steps=5, batch_size=2, val_fraction=0, eval_every=5,
                      channels_last=True, threads=1, seed=3)
    a = train_head(emb, lab, images=img, config=cfg, progress=False)
    b = train_head(emb, lab, images=img, config=cfg, progress=False)
    assert a.history["loss"] == b.history["loss"]
    for pa, pb in zip(a.head.parameters(), b.head.parameters()):
        assert torch.equal(pa, pb)


def test_bf16_auto_follows_the_hardware(monkeypatch):
    """bf16=None autocasts only where bfloat16 is native; True / False force it."""
    monkeypatch.setattr(training, "bf16_native", lambda device="cpu": False)
    with training._autocast(None, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with training._autocast(True, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(training, "bf16_native", lambda device="cpu": True)
    with training._autocast(None, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with training._autocast(False, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_recipes_come_from_one_place(monkeypatch):
    """Named recipes (config.RECIPES) become TrainConfigs in one function, FAST scaling included."""
    from samliver.config import RECIPES

    cfg = training.recipe("default", fast=False)
    spec = RECIPES["default"]
    assert (cfg.kind, cfg.steps, cfg.batch_size, cfg.lr) == (spec["kind"], spec["steps"], spec["batch_size"], spec["lr"])
    assert cfg.head_options == {"refine_size": 128}
    assert training.recipe("default", fast=True).steps == spec["fast"]["steps"] < cfg.steps
    monkeypatch.setenv("SAMLIVER_FAST", "1")
    assert training.recipe("cnn").steps == RECIPES["cnn"]["fast"]["steps"]
    assert training.recipe("cnn", steps=7, seed=3).steps == 7
    assert training.recipe("cnn", steps=None).steps == RECIPES["cnn"]["fast"]["steps"]
    cfg.head_options["refine_size"] = 1  # a copy: the table itself never changes
    assert RECIPES["default"]["head_options"] == {"refine_size": 128}
    loop_fast = training.recipe("loop", fast=True)  # a variant may change more than the steps
    assert (loop_fast.kind, loop_fast.steps) == ("linear", 30) and training.recipe("loop", fast=False).kind == "cnn"
    with pytest.raises(SamliverError, match="Unknown training recipe"):
        training.recipe("resnet")
    with pytest.raises(SamliverError, match="Bad training setting"):
        training.recipe("cnn", colour="red")


def test_demo_trains_the_default_recipe(monkeypatch, tmp_path):
    """The demo trains with the ``default`` recipe (the one timed in docs/training_speed.md)."""
    from samliver import demo

    cfg = training.recipe("default", fast=False)
    seen = {}

    def fake_train(x, y, *, config, **kw):
        seen["config"] = config
        raise RuntimeError("stop after the config is chosen")

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    monkeypatch.setattr(training, "train_head", fake_train)
    monkeypatch.setattr(training_data, "slice_tensors", lambda *a, **k: (None, None, None))

    class Model:
        name, weights_id = "fake", "abc"

    ctx = demo.DemoContext(out_dir=tmp_path, volume=type("V", (), {"hu": np.zeros((2, 4, 4)),
                                                                   "label": np.zeros((2, 4, 4))})())
    ctx.results.update(model=Model(), embeddings=type("E", (), {"window": "abdomen"})(),
                       split={"train": [0]})
    with pytest.raises(RuntimeError, match="stop"):
        demo.step_train_head(ctx)
    assert seen["config"] == cfg


def test_bad_inputs():
    emb, lab, img = _synthetic()
    with pytest.raises(SamliverError):
        train_head(emb[:0], lab[:0], config=TrainConfig(kind="linear", steps=1), progress=False)
    bad = emb.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(SamliverError, match="NaN"):
        train_head(bad, lab, images=img, config=TrainConfig(kind="linear", steps=1), progress=False)
    with pytest.raises(SamliverError, match="image"):
        train_head(emb, lab, config=TrainConfig(kind="cnn", steps=1), progress=False)


def test_parse_slices():
    assert parse_slice_spec("3,20,41") == [3, 20, 41]
    assert parse_slice_spec("50-53,1") == [1, 50, 51, 52, 53]
    assert parse_slice_spec(None) is None
    with pytest.raises(SamliverError):
        parse_slice_spec("a-b")


def test_train_cli_with_tiny_model(tmp_path, monkeypatch):
    """`samliver train` end to end on a phantom file (tiny RANDOM model: plumbing only)."""
    from samliver.io import save_volume_nifti
    from samliver.phantom import make_phantom

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    vol = make_phantom(shape=(8, 32, 32), n_lesions=1)
    img = save_volume_nifti(vol.hu, tmp_path / "ct.nii.gz", spacing=vol.spacing)
    lab = save_volume_nifti(vol.label, tmp_path / "lab.nii.gz", spacing=vol.spacing, label=True)
    out = tmp_path / "head.pt"
    with pytest.warns(UserWarning):
        rc = train_cli.main([str(img), "--label", str(lab), "--model", "tiny", "--head", "linear",
                            "--train-slices", "2,5", "--steps", "3", "-o", str(out)])
    assert rc == 0 and out.exists() and out.with_suffix(".curves.png").exists()
    with pytest.raises(SamliverError, match="outside"):
        train_cli.main([str(img), "--label", str(lab), "--model", "tiny", "--train-slices", "40"])
    with pytest.raises(SamliverError, match="no label"):
        train_cli.main([str(img), "--model", "tiny", "--train-slices", "1"])
    with pytest.raises(SamliverError, match="autosam"):
        train_cli.main([str(img), "--label", str(lab), "--model", "tiny", "--head", "cnn",
                       "--train-slices", "2,5", "--train-parts", "tokens"])
    out2 = tmp_path / "autosam.pt"
    with pytest.warns(UserWarning):
        train_cli.main([str(img), "--label", str(lab), "--model", "tiny", "--head", "autosam",
                       "--train-slices", "2,5", "--steps", "2", "--train-parts", "tokens",
                       "-o", str(out2)])
    head = load_head(out2)
    trainable = [p.requires_grad for p in head.transformer.parameters()]
    assert head.train_parts == "tokens" and trainable and not any(trainable)


@pytest.mark.slow
def test_cnn_head_on_real_sample_slices():
    """A few real LiteMedSAM embeddings of the sample: a short training already finds the liver."""
    from samliver.embeddings import embed_volume
    from samliver.models import get_model
    from samliver.sample import fetch_sample, load_sample

    fetch_sample()
    vol = load_sample()
    model = get_model("litemedsam", device="cpu")
    train, test = [40, 60], [50]
    emb = embed_volume(vol, model, slices=train + test, progress=False)
    x, y, im = training_data.slice_tensors(vol, emb, train)
    assert x.shape == (2, 256, 64, 64) and y.shape == (2, 256, 256) and im.shape == (2, 256, 256)
    cfg = training.recipe("default", steps=40, batch_size=2, fast=False)  # the head users train
    res = train_head(x, y, images=im, config=cfg, model=model, progress=False)
    xt, _, imt = training_data.slice_tensors(vol, emb, test)
    prob = emb.transform.mask_to_original(predict_logits(res.head, xt, imt))
    pred = prob.argmax(1)
    gt = vol.label[test]
    assert _dice(pred >= 1, gt >= 1) > 0.7


def test_pseudo_labels_ignore_unconfident_pixels():
    probs = np.zeros((2, 3, 4, 4), np.float32)
    probs[:, 1] = 0.95  # confident liver ...
    probs[:, 0] = 0.05
    probs[1, :, 0, 0] = [0.3, 0.4, 0.3]  # ... except one unsure pixel
    lab = training.pseudo_labels(probs, threshold=0.9)
    assert lab.dtype == np.int64 and lab[1, 0, 0] == IGNORE
    assert (lab[0] == 1).all() and (lab[1][lab[1] != IGNORE] == 1).all()


def test_self_train_adds_pseudo_labelled_slices():
    emb, lab, img = _synthetic(n=8)
    cfg = TrainConfig(kind="linear", steps=30, batch_size=4, val_fraction=0, eval_every=15, lr=1e-2)
    res = training.self_train(emb[:2], lab[:2], (emb[2:], img[2:]), images=img[:2], config=cfg,
                              rounds=1, threshold=0.5, progress=False)
    # 2 labelled slices repeated 3x + 6 pseudo-labelled ones; validated on the labelled two
    assert res.history["n_train"] == 12 and res.history["val_on"] == "given"
    assert 0 <= res.history["pseudo_ignored"] < 1
    pred = predict_logits(res.head, emb[2:], img[2:]).argmax(1)
    assert _dice(pred >= 1, lab[2:] >= 1) > 0.5
    same = training.self_train(emb[:2], lab[:2], (emb[:0], img[:0]), images=img[:2], config=cfg,
                               progress=False)
    assert "pseudo_ignored" not in same.history  # nothing unlabelled: plain training


def test_train_head_with_context_and_tversky(tmp_path):
    """A 2.5D head trains on stacked embeddings, and its checkpoint rebuilds it with the context."""
    import numpy as np

    from samliver.checkpoints import load_head
    from samliver.training import TrainConfig, train_head

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 3 * 8, 64, 64)).astype(np.float32)  # context 1: 3 slices of 8 channels
    labels = rng.integers(0, 3, size=(4, 256, 256))
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=2, val_fraction=0.0, tversky_weight=1.0,
                      head_options={"context": 1, "use_image": False, "width": 16})
    res = train_head(emb, labels, config=cfg, progress=False, checkpoint=tmp_path / "h.pt")
    assert res.head.embed_dim == 8 and res.head.context == 1
    back = load_head(tmp_path / "h.pt", device="cpu")
    assert back.context == 1
