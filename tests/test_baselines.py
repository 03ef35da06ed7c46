"""UNet / SimCLR-UNet baselines on a tiny synthetic volume (fast, CPU)."""

import numpy as np
import pytest
import torch

from samliver.baselines import (
    BASELINE_METHODS,
    UNet,
    nt_xent,
    predict_unet,
    pretrain_simclr,
    run_baseline,
    run_unet_baseline,
    train_unet,
)
from samliver.io import CTVolume
from samliver.util import SamliverError


def test_unet_shapes_any_size():
    net = UNet()
    assert net(torch.rand(2, 1, 30, 44)).shape == (2, 3, 30, 44)


def test_unet_learns_and_simclr_initialises(disc_volume):
    vol = disc_volume()
    unit = np.clip((vol.hu + 160) / 400, 0, 1)
    net = train_unet(unit[:4], vol.label[:4], steps=60, batch_size=4, lr=5e-3)
    pred = predict_unet(net, unit[4:])
    assert pred.shape == (4, 32, 32) and pred.dtype == np.uint8
    gt = vol.label[4:] >= 1
    assert 2 * ((pred >= 1) & gt).sum() / ((pred >= 1).sum() + gt.sum()) > 0.7
    enc = pretrain_simclr(unit, steps=3, batch_size=4, crop=24)
    fresh = UNet().encoder.state_dict()
    assert set(enc) == set(fresh)
    assert any(not torch.equal(enc[k], fresh[k]) for k in enc)
    net2 = train_unet(unit[:2], vol.label[:2], steps=2, encoder_state=enc)
    assert isinstance(net2, UNet)


def test_run_baseline_records_and_errors(disc_volume):
    vol = disc_volume()
    out = run_unet_baseline(vol, [0, 3], [4, 5, 6], ssl=True, steps=3, ssl_steps=2)
    assert out["method"] == "ssl" and 0 <= out["liver_dice"] <= 1 and out["pred"].shape == (3, 32, 32)
    with pytest.raises(SamliverError):
        run_unet_baseline(CTVolume(hu=vol.hu), [0], [1])
    with pytest.raises(SamliverError):
        train_unet(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))


def test_thread_option_is_scoped_and_deterministic(disc_volume):
    """threads= applies while training only; a seed gives the same network twice."""
    vol = disc_volume()
    unit = np.clip((vol.hu + 160) / 400, 0, 1)
    before = torch.get_num_threads()
    a = train_unet(unit[:2], vol.label[:2], steps=3, batch_size=2, threads=1, seed=4)
    b = train_unet(unit[:2], vol.label[:2], steps=3, batch_size=2, threads=1, seed=4)
    assert torch.get_num_threads() == before
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    enc = pretrain_simclr(unit, steps=2, batch_size=4, crop=24, threads=1)
    assert torch.get_num_threads() == before and set(enc) == set(UNet().encoder.state_dict())


def test_unet_is_monai_basicunet_of_the_old_size():
    """The library network (MONAI BasicUNet), about as big as the hand-written UNet it replaced."""
    from monai.networks.nets import BasicUNet

    net = UNet()
    assert isinstance(net.net, BasicUNet)
    assert 0.3e6 < sum(p.numel() for p in net.parameters()) < 1e6
    feats = net.encode(torch.rand(1, 1, 32, 32))
    assert feats[-1].shape[1] == net.feat_dim


def test_nt_xent_equals_lightly():
    """The SimCLR loss is lightly's NT-Xent: the same value on the same embeddings."""
    lightly_loss = pytest.importorskip("lightly.loss")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    for t in (0.1, 0.2, 0.5):
        want = lightly_loss.NTXentLoss(temperature=t)(a, b)
        assert torch.allclose(nt_xent(a, b, t), want, atol=1e-5)


def test_run_baseline_names_and_unknown(disc_volume):
    assert BASELINE_METHODS[:2] == ("unet", "ssl") and "nnunet" in BASELINE_METHODS
    out = run_baseline("unet", disc_volume(), [0, 3], [4, 5], steps=2, threads=1)
    assert out["method"].startswith("unet") and out["pred"].shape == (2, 32, 32)
    with pytest.raises(SamliverError, match="Unknown baseline"):
        run_baseline("nope", disc_volume(), [0], [1])
