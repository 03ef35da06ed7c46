"""Baselines for the few-label comparison, all on the same labelled slices as the heads.

- ``unet``: a small 2D UNet (MONAI's ``BasicUNet``) trained from scratch in image space (windowed HU in [0, 1] at the
  slice's own resolution) with augmentation (flips, 90-degree rotations, intensity jitter,
  noise).
- ``ssl``: the same UNet whose encoder was first pre-trained with **SimCLR** (NT-Xent
  contrastive loss between two augmented crops of the same slice) on the volume's unlabelled
  slices, then fine-tuned exactly like ``unet``.
- ``nnunet``: nnU-Net's own 2D configuration, planned, preprocessed, trained and applied by
  ``nnunetv2`` itself (``samliver.nnunet``; optional extra ``samliver[baselines]``).
- ``zeroshot``: prompted SAM with prompts simulated from the ground truth, from the engine's
  ``samliver.zero_shot.evaluate_zero_shot`` (an upper-bound-ish reference: it sees the truth).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import DEFAULT_WINDOW
from .evaluation import label_dice
from .losses import seg_loss
from .util import SamliverError, get_device, torch_threads

if TYPE_CHECKING:  # pragma: no cover
    from .io import CTVolume


class UNet(nn.Module):
    """MONAI's ``BasicUNet`` (2D, 5 levels, 16-16-32-64-128 channels, ~0.5 M parameters).

    A library network rather than a hand-written one (``docs/baselines.md`` compares the two):
    1 input channel, ``n_classes`` logits, any input size (padded to a multiple of 16 inside).
    ``encoder`` / :meth:`encode` expose MONAI's down path for the SimCLR pre-training.
    """

    def __init__(self, n_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        w = width
        self.net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=n_classes,
                             features=(w, w, 2 * w, 4 * w, 8 * w, w))
        self.feat_dim = 8 * w

    @property
    def encoder(self) -> nn.ModuleList:
        """MONAI's down path (``conv_0``, ``down_1`` ... ``down_4``), the modules SimCLR trains."""
        n = self.net
        return nn.ModuleList([n.conv_0, n.down_1, n.down_2, n.down_3, n.down_4])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every encoder level, finest first (``x`` padded to a multiple of 16)."""
        x = _pad16(x)
        feats = []
        for blk in self.encoder:
            x = blk(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.net(_pad16(x))[..., :h, :w]


def _pad16(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last two axes to a multiple of 16, the UNet's four halvings."""
    ph, pw = (-x.shape[-2]) % 16, (-x.shape[-1]) % 16
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent loss between two views' embeddings ``(n, d)`` (row i of each a pair).

    The same value as ``lightly.loss.NTXentLoss(temperature)(z0, z1)`` (a test checks it), kept
    here so the ``ssl`` baseline needs no optional package.
    """
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _augment_images(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
                    intensity: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for i in range(x.shape[0]):
        a = x[i]
        b = y[i] if y is not None else None
        if torch.rand(1, generator=gen).item() < 0.5:
            a = a.flip(-1)
            b = b.flip(-1) if b is not None else None
        k = int(torch.randint(0, 4, (1,), generator=gen).item())
        if k:
            a = torch.rot90(a, k, (-2, -1))
            b = torch.rot90(b, k, (-2, -1)) if b is not None else None
        if intensity:
            scale = 0.85 + 0.3 * torch.rand(1, generator=gen).item()
            shift = 0.1 * (torch.rand(1, generator=gen).item() - 0.5)
            a = (a * scale + shift + 0.02 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
        xs.append(a)
        ys.append(b)
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)


def train_unet(images: np.ndarray, labels: np.ndarray, *, steps: int = 300, batch_size: int = 8,
               lr: float = 2e-3, seed: int = 0, encoder_state: dict | None = None,
               device: str | None = None, progress: bool = False,
               tumour_weight: float = 3.0, threads: int | None = None) -> UNet:
    """Train the UNet on ``images`` (N,H,W) in [0,1] and ``labels`` (N,H,W) (0/1/2).

    ``encoder_state`` (from :func:`pretrain_simclr`) initialises the encoder (the SSL baseline).
    ``threads`` sets torch's thread count while training (``None``: unchanged), as
    ``TrainConfig.threads`` does for the heads.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if len(images) == 0:
        raise SamliverError("No labelled slices for the UNet baseline.")
    with torch_threads(threads):
        return _train_unet(images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           encoder_state=encoder_state, device=device, progress=progress,
                           tumour_weight=tumour_weight)


def _train_unet(images: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int,
                lr: float, seed: int, encoder_state: dict | None, device: str | None,
                progress: bool, tumour_weight: float) -> UNet:
    device = get_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = UNet().to(device)
    if encoder_state is not None:
        net.encoder.load_state_dict(encoder_state)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps),
                                                pct_start=0.1)
    x_all = torch.from_numpy(images)[:, None]
    y_all = torch.from_numpy(labels)
    bs = min(batch_size, len(images))
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="unet", disable=not progress, leave=False):
        net.train()
        idx = torch.randperm(len(images), generator=gen)[:bs]
        x, y = _augment_images(x_all[idx], y_all[idx], gen)
        loss = seg_loss(net(x.to(device)), y.to(device), tumour_weight)
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def predict_unet(net: UNet, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Arg-max labels (N,H,W) uint8 for ``images`` (N,H,W) in [0,1]."""
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[i:i + batch_size], np.float32), device=device)[:, None]
        out.append(net(x).argmax(1).cpu().numpy().astype(np.uint8))
    return np.concatenate(out)


def _random_crop_resize(x: torch.Tensor, gen: torch.Generator, out: int) -> torch.Tensor:
    """SimCLR view: random resized crop (30-100% area), flip/rot, intensity jitter, noise."""
    views = []
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        area = 0.3 + 0.7 * torch.rand(1, generator=gen).item()
        ch, cw = max(8, int(h * area ** 0.5)), max(8, int(w * area ** 0.5))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen).item())
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen).item())
        crop = x[i:i + 1, :, y0:y0 + ch, x0:x0 + cw]
        views.append(F.interpolate(crop, size=(out, out), mode="bilinear", align_corners=False)[0])
    v, _ = _augment_images(torch.stack(views), None, gen)
    return v


def pretrain_simclr(images: np.ndarray, *, steps: int = 150, batch_size: int = 16,
                    temperature: float = 0.2, lr: float = 1e-3, crop: int = 96, seed: int = 0,
                    device: str | None = None, progress: bool = False,
                    threads: int | None = None) -> dict:
    """SimCLR pre-training of the UNet encoder on unlabelled slices; returns its state dict.

    ``threads`` sets torch's thread count while training (``None``: unchanged).
    """
    images = np.asarray(images, np.float32)
    if len(images) < 2:
        raise SamliverError("SimCLR needs at least 2 unlabelled slices.")
    with torch_threads(threads):
        return _pretrain_simclr(images, steps=steps, batch_size=batch_size,
                                temperature=temperature, lr=lr, crop=crop, seed=seed,
                                device=device, progress=progress)


def _pretrain_simclr(images: np.ndarray, *, steps: int, batch_size: int, temperature: float,
                     lr: float, crop: int, seed: int, device: str | None,
                     progress: bool) -> dict:
    device = get_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    net = UNet().to(device)
    proj = nn.Sequential(nn.Linear(net.feat_dim, 128), nn.GELU(), nn.Linear(128, 64)).to(device)
    opt = torch.optim.AdamW(list(net.encoder.parameters()) + list(proj.parameters()), lr=lr,
                            weight_decay=1e-4)
    x_all = torch.from_numpy(images)[:, None]
    bs = min(batch_size, len(images))
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="simclr", disable=not progress, leave=False):
        idx = torch.randperm(len(images), generator=gen)[:bs]
        x = x_all[idx]
        v = torch.cat([_random_crop_resize(x, gen, crop), _random_crop_resize(x, gen, crop)])
        z = proj(net.encode(v.to(device))[-1].mean((-2, -1)))
        loss = nt_xent(z[:bs], z[bs:], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return copy.deepcopy(net.encoder.state_dict())




def run_unet_baseline(volume: CTVolume, train_slices: list[int], test_slices: list[int], *,
                      ssl: bool = False, steps: int = 300, ssl_steps: int = 150, seed: int = 0,
                      window: str = DEFAULT_WINDOW, device: str | None = None,
                      unlabelled_slices: list[int] | None = None,
                      postprocess_pred: bool = True, threads: int | None = None,
                      lr: float = 2e-3) -> dict:
    """Train (optionally SimCLR-pre-trained) UNet on ``train_slices``; global Dice on ``test_slices``.

    ``unlabelled_slices`` for SimCLR default to every slice not in ``train_slices``.
    ``postprocess_pred`` (default True) applies the same ``inference.postprocess`` as the heads
    get, so the comparison is like for like. ``threads`` (torch threads while training) and
    ``lr`` (the UNet's peak one-cycle rate) go to :func:`train_unet` / :func:`pretrain_simclr`.
    Returns ``{method, liver_dice, tumour_dice, pred (test labels)}``.
    """
    from .preprocess import window_to_unit

    if volume.label is None:
        raise SamliverError(f"{volume.source}: the baselines need a labelled volume.")
    unit = window_to_unit(volume.hu, window).astype(np.float32)
    enc = None
    if ssl:
        pool = unlabelled_slices
        if pool is None:
            pool = [z for z in range(unit.shape[0]) if z not in set(train_slices)]
        enc = pretrain_simclr(unit[pool], steps=ssl_steps, seed=seed, device=device,
                              threads=threads)
    net = train_unet(unit[train_slices], volume.label[train_slices], steps=steps, seed=seed,
                     encoder_state=enc, device=device, threads=threads, lr=lr)
    pred = predict_unet(net, unit[test_slices])
    if postprocess_pred:
        from .postprocess import postprocess

        pred = postprocess(pred)
    gt = volume.label[test_slices]
    return {"method": "ssl" if ssl else "unet", **label_dice(pred, gt), "pred": pred}


BASELINE_METHODS = ("unet", "ssl", "nnunet")
"""Image-space baselines :func:`run_baseline` trains on the heads' labelled slices; ``method`` names
in experiment records start with one of these. ``nnunet`` needs ``pip install 'samliver[baselines]'``."""


def run_baseline(method: str, volume: CTVolume, train_slices: list[int], test_slices: list[int], *,
                 seed: int = 0, steps: int | None = None, threads: int | None = None,
                 budget: int | None = None) -> dict:
    """Train baseline ``method`` on ``train_slices`` of ``volume`` and score it on ``test_slices``.

    The one entry point the experiment calls for every image-space baseline, so a new baseline
    is one more branch here and one more name in :data:`BASELINE_METHODS`.

    Args:
        method: one of :data:`BASELINE_METHODS`.
        volume: a labelled volume.
        train_slices: the labelled slices (the same ones the heads get).
        test_slices: the slices scored.
        seed: random seed.
        steps: UNet / SSL training steps (None: the method's default, shortened under
            ``SAMLIVER_FAST``); nnU-Net ignores it (its budget is ``budget``).
        threads: torch threads while training (None: unchanged).
        budget: nnU-Net's epochs of ``samliver.nnunet.NNUNET_ITERATIONS`` iterations (None:
            ``samliver.nnunet.NNUNET_EPOCHS``, shortened under ``SAMLIVER_FAST``).

    Returns:
        ``{method, liver_dice, tumour_dice, pred}`` with ``pred`` the post-processed test labels
        (nnU-Net adds ``epochs``, ``iterations`` and ``seconds``).

    Raises:
        SamliverError: an unknown method, or ``nnunet`` without nnunetv2 installed.
    """
    from .config import UNET_STEPS
    from .util import fast_mode

    if method in ("unet", "ssl"):
        n = steps or UNET_STEPS["fast" if fast_mode() else "full"]
        return run_unet_baseline(volume, train_slices, test_slices, ssl=(method == "ssl"), seed=seed,
                                 steps=n, ssl_steps=max(20, n // 2), threads=threads)
    if method == "nnunet":
        from .nnunet import run_nnunet_baseline

        return run_nnunet_baseline(volume, train_slices, test_slices, epochs=budget, seed=seed,
                                   threads=threads)
    raise SamliverError(f"Unknown baseline {method!r}: choose from {', '.join(BASELINE_METHODS)}.")
