"""Train prompt-free heads on cached (frozen-encoder) embeddings.

Loss: cross-entropy (tumour class up-weighted) + soft Dice over liver and tumour, each
computed over the whole batch as one region (the metric is global Dice). AdamW with a linear
warm-up then cosine decay. Augmentation that works with a cache: flips / 90-degree rotations
applied to embedding, label and image together (``augment="flip"`` or ``"flip+rot"``), and/or
cached embeddings of augmented images (``augmented_views``: rotation, scale, shift, HU gain;
encoded once through the embedding cache) passed as extra samples (``training_tensors``). A validation
split (held-out labelled slices; the training slices themselves when fewer than 5 are
labelled) drives early stopping; the best state is kept and written to a checkpoint that
stores the head kind/options, the config, and the model name, weights id and embedding shape,
so that loading it for another model fails with a clear error. A non-finite loss stops
training safely, keeping the last good state and checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .heads import build_head
from .util import SamliverError, atomic_path, fast_mode, get_device, torch_threads

CHECKPOINT_FORMAT = "samliver-head-1"
IGNORE = 255  # label value that the loss skips (unconfident pseudo-labels)
# autosam: swept on the sample (sparse K = 8, 120 steps): tumour Dice 0.62 / 0.74 / 0.83 / 0.85
# at 5e-5 / 2e-4 / 1e-3 / 3e-3. The decoder starts from SAM's single-mask output, far from
# three classes, so it needs a head-like rate, not a fine-tuning one (README).
DEFAULT_LR = {"linear": 3e-3, "cnn": 1e-3, "vit": 5e-4, "autosam": 3e-3}


@dataclass
class TrainConfig:
    """Training settings; defaults are the recipe measured on the sample (see README)."""

    kind: str = "cnn"
    steps: int = 300
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR[kind]
    weight_decay: float = 1e-2
    warmup: int = 20
    tumour_weight: float = 3.0  # CE weight of the tumour class (background 1, liver 1)
    dice_weight: float = 1.0
    augment: str = "flip"  # none | flip | flip+rot
    val_fraction: float = 0.2
    eval_every: int = 25
    patience: int = 4  # evaluations without improvement before stopping
    seed: int = 0
    head_options: dict = field(default_factory=dict)
    device: str | None = None
    # Speed options (the model is the same; see docs/training_speed.md for what each is worth).
    channels_last: bool = False  # NHWC activations: oneDNN's faster conv layout on a CPU
    bf16: bool | None = False  # bfloat16 autocast; None: on where the CPU has it natively
    threads: int | None = None  # torch intra-op threads while training (None: leave as is)

    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR.get(self.kind, 1e-3))


@dataclass
class TrainResult:
    head: torch.nn.Module
    history: dict
    checkpoint: Path | None = None


# ----------------------------------------------------------------------------- data


def slice_tensors(volume: Any, embeddings: Any, slices: list[int], *, window: str | None = None,
                  need_label: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Embeddings, labels and images of ``slices`` in the model-input frame.

    Returns ``(emb (N,C,h,w) float32, labels (N,S,S) int64 or None, images (N,S,S) float32)``.
    """
    from .preprocess import window_to_unit

    if need_label and volume.label is None:
        raise SamliverError(
            f"{getattr(volume, 'source', 'The volume')} has no label: training needs labelled "
            "slices. Pass a label file (load_volume(path, label_path=...)).")
    window = window or getattr(embeddings, "window", "abdomen")
    tf = embeddings.transform
    emb = np.asarray(embeddings.stack(list(slices)), dtype=np.float32)
    images = np.stack([tf.apply_image(window_to_unit(volume.hu[z], window)) for z in slices])
    labels = None
    if volume.label is not None:
        labels = np.stack([tf.label_to_input(volume.label[z]) for z in slices]).astype(np.int64)
    return emb, labels, images.astype(np.float32)


def augmented_views(volume: Any, slices: list[int], *, n_views: int = 2, seed: int = 0,
                    max_rotate: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
                    max_shift: float = 0.05, hu_scale: tuple[float, float] = (0.9, 1.1),
                    hu_shift: float = 20.0) -> Any:
    """``n_views`` randomly transformed copies of each labelled slice, as a small CTVolume.

    Augmentations a frozen encoder has to see rather than have applied to its embedding:
    rotation (default up to +-15 degrees), scaling (0.85-1.15), shift (5 % of the size) and an
    HU gain/offset (0.9-1.1, +-20 HU). Image linear, label nearest; outside fills with the
    slice's minimum HU (air). Deterministic for a seed, so its embeddings hit the cache the
    next time. Order: view 0 of every slice, then view 1, ...
    """
    from scipy import ndimage

    from .io import CTVolume

    if volume.label is None:
        raise SamliverError("Augmented views need a labelled volume.")
    rng = np.random.default_rng(seed)
    hu_out, lab_out = [], []
    for _ in range(int(n_views)):
        for z in slices:
            hu, lab = volume.hu[z].astype(np.float32), volume.label[z]
            angle = np.deg2rad(rng.uniform(-max_rotate, max_rotate))
            s = rng.uniform(*scale)
            shift = rng.uniform(-max_shift, max_shift, 2) * np.array(hu.shape)
            # output -> input mapping about the centre: x_in = R(-a)/s (x_out - c - t) + c
            c = (np.array(hu.shape) - 1) / 2
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / s
            offset = c - rot @ (c + shift)
            hu_out.append(ndimage.affine_transform(hu, rot, offset, order=1, mode="constant",
                                                   cval=float(hu.min()))
                          * rng.uniform(*hu_scale) + rng.uniform(-hu_shift, hu_shift))
            lab_out.append(ndimage.affine_transform(lab, rot, offset, order=0, mode="constant",
                                                    cval=0))
    return CTVolume(hu=np.stack(hu_out).astype(np.float32), label=np.stack(lab_out).astype(np.uint8),
                    source=f"{getattr(volume, 'source', 'volume')} (augmented views, seed {seed})")


def view_tensors(volume: Any, model: Any, slices: list[int], *, n_views: int = 2, seed: int = 0,
                 window: str = "abdomen", progress: bool = False) -> tuple:
    """Embeddings, labels and images of ``augmented_views`` (encoded once, then from the cache).

    Returns the same ``(emb, labels, images)`` triple as ``slice_tensors``; append it to the
    labelled slices' tensors to train on real and augmented views together.
    """
    from .embeddings import embed_volume

    views = augmented_views(volume, slices, n_views=n_views, seed=seed)
    embs = embed_volume(views, model, window=window, progress=progress)
    return slice_tensors(views, embs, list(range(views.hu.shape[0])), window=window)


def training_tensors(volume: Any, embeddings: Any, slices: list[int], *, model: Any = None,
                     views: int = 0, seed: int = 0, progress: bool = False) -> tuple:
    """``slice_tensors`` of the labelled ``slices`` followed by ``views`` cached augmented views
    of each (default 0; needs ``model`` to encode them)."""
    tensors = slice_tensors(volume, embeddings, slices)
    if not views:
        return tensors
    extra = view_tensors(volume, model, slices, n_views=views, seed=seed,
                         window=getattr(embeddings, "window", "abdomen"), progress=progress)
    return tuple(np.concatenate([a, b]) for a, b in zip(tensors, extra))


def _augment(x: torch.Tensor, y: torch.Tensor, im: torch.Tensor | None, mode: str,
             gen: torch.Generator) -> tuple:
    """Same random flip / rot90 for embedding, label and image of each sample."""
    if mode == "none":
        return x, y, im
    xs, ys, ims = [], [], []
    for i in range(x.shape[0]):
        a, b = x[i], y[i]
        c = im[i] if im is not None else None
        if torch.rand(1, generator=gen).item() < 0.5:
            a, b = a.flip(-1), b.flip(-1)
            c = c.flip(-1) if c is not None else None
        if "rot" in mode:
            k = int(torch.randint(0, 4, (1,), generator=gen).item())
            if k:
                a, b = torch.rot90(a, k, (-2, -1)), torch.rot90(b, k, (-2, -1))
                c = torch.rot90(c, k, (-2, -1)) if c is not None else None
        xs.append(a), ys.append(b), ims.append(c)
    return torch.stack(xs), torch.stack(ys), (torch.stack(ims) if im is not None else None)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, tumour_weight: float = 3.0,
             dice_weight: float = 1.0) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice (liver = classes >= 1, tumour = class 2), batch-global.

    Pixels labelled ``IGNORE`` (255; e.g. unconfident pseudo-labels) count in neither term.
    """
    n = logits.shape[1]
    w = torch.ones(n, device=logits.device)
    if n > 2:
        w[2] = tumour_weight
    ce = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    if not torch.isfinite(ce):  # every pixel ignored
        ce = logits.sum() * 0.0
    valid = (target != IGNORE).float()
    target = torch.where(target == IGNORE, torch.zeros_like(target), target)
    prob = logits.float().softmax(1) * valid[:, None]
    dice_terms = []
    regions = [(prob[:, 1:].sum(1), (target >= 1).float() * valid)]
    if n > 2:
        regions.append((prob[:, 2], (target == 2).float() * valid))
    for p, g in regions:
        inter = (p * g).sum()
        dice_terms.append(1 - (2 * inter + 1) / (p.sum() + g.sum() + 1))
    return ce + dice_weight * torch.stack(dice_terms).mean()


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return float(2 * np.logical_and(pred, gt).sum() / s) if s else 1.0


@torch.no_grad()
def predict_logits(head: torch.nn.Module, emb: np.ndarray | torch.Tensor,
                   images: np.ndarray | torch.Tensor | None = None, *, batch_size: int = 8,
                   device: str | None = None, out_size: int | None = None,
                   tta: bool = False) -> np.ndarray:
    """Class probabilities ``(N, n_classes, S, S)`` float32 for embeddings (and images).

    ``tta`` (default False) averages with the left-right flipped input (flip the embedding and
    image, flip the prediction back), the flip the heads are trained with.
    """
    device = device or next(head.parameters()).device
    head.eval()
    outs = []
    for i in range(0, len(emb), batch_size):
        x = torch.as_tensor(np.asarray(emb[i:i + batch_size], dtype=np.float32), device=device)
        im = None
        if images is not None and getattr(head, "uses_image", False):
            im = torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32),
                                 device=device)[:, None]
        p = head(x, image=im).float().softmax(1)
        if tta:
            flipped = head(x.flip(-1), image=im.flip(-1) if im is not None else None)
            p = 0.5 * (p + flipped.float().softmax(1).flip(-1))
        if out_size and p.shape[-1] != out_size:
            p = F.interpolate(p, size=(out_size, out_size), mode="bilinear", align_corners=False)
        outs.append(p.cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))


def _val_scores(head, emb, labels, images, device) -> tuple[float, float]:
    pred = predict_logits(head, emb, images, device=device).argmax(1)
    liver = _dice(pred >= 1, labels >= 1)
    tumour = _dice(pred == 2, labels == 2) if (labels == 2).any() else float("nan")
    return liver, tumour


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, head: torch.nn.Module, *, config: TrainConfig,
                    model_info: dict | None = None, history: dict | None = None,
                    optimizer: Any = None, scheduler: Any = None, step: int = 0) -> Path:
    """Write a head checkpoint atomically (state, kind, options, config, model identity)."""
    info = dict(model_info or {})
    payload = {
        "format": CHECKPOINT_FORMAT,
        "head_kind": head.kind,
        "head_options": dict(head.options),
        "n_classes": head.n_classes,
        "embed_dim": head.embed_dim,
        "embed_hw": head.embed_hw,
        "out_size": head.out_size,
        "embedding_shape": [head.embed_dim, head.embed_hw, head.embed_hw],
        "model_name": info.get("model_name"),
        "weights_id": info.get("weights_id"),
        "window": info.get("window", "abdomen"),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "history": history or {},
    }
    path = Path(path)
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SamliverError(f"Head checkpoint {path} not found: train one with `samliver train`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise SamliverError(f"{path} is not a readable head checkpoint ({err}).") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SamliverError(f"{path} is not a samliver head checkpoint (made by `samliver train`).")
    return ckpt


def check_compatible(ckpt: dict, *, model: Any = None, embedding_shape: tuple | None = None,
                     source: str = "checkpoint") -> None:
    """Raise ``SamliverError`` if a checkpoint was trained for another model / embedding shape."""
    if model is not None:
        shape = (int(model.embed_dim), *map(int, model.embed_hw))
        if tuple(ckpt["embedding_shape"]) != shape:
            raise SamliverError(
                f"{source} was trained on embeddings of shape {tuple(ckpt['embedding_shape'])} "
                f"({ckpt.get('model_name')}) but model {model.name!r} gives {shape}: use "
                f"--model {ckpt.get('model_name')} or retrain the head for {model.name}.")
        if ckpt.get("model_name") and ckpt["model_name"] != model.name:
            raise SamliverError(
                f"{source} was trained for model {ckpt['model_name']!r}, not {model.name!r}: "
                f"use --model {ckpt['model_name']} or retrain the head.")
        wid = getattr(model, "weights_id", None)
        if ckpt.get("weights_id") and wid and ckpt["weights_id"] != wid:
            raise SamliverError(
                f"{source} was trained on {ckpt['model_name']} weights {ckpt['weights_id'][:12]}, "
                f"but the loaded weights are {wid[:12]}: load the same checkpoint or retrain.")
    if embedding_shape is not None and tuple(ckpt["embedding_shape"]) != tuple(embedding_shape):
        raise SamliverError(
            f"{source} expects embeddings of shape {tuple(ckpt['embedding_shape'])}, got "
            f"{tuple(embedding_shape)}: the head was trained for another model.")


def _head_options(ckpt: dict) -> dict:
    """The head options stored in a checkpoint, completed for older checkpoints."""
    opts = dict(ckpt["head_options"])
    if ckpt["head_kind"] == "cnn" and "full_res" not in opts:
        # checkpoints from before the full-resolution block became the default have none
        opts["full_res"] = any(k.startswith("up.full.") for k in ckpt["state_dict"])
    return opts


def load_head(path: str | Path, model: Any = None, *, device: str | None = None,
              embedding_shape: tuple | None = None) -> torch.nn.Module:
    """Load a trained head; refuses a checkpoint made for another model or embedding shape."""
    ckpt = _read_checkpoint(path)
    check_compatible(ckpt, model=model, embedding_shape=embedding_shape, source=str(path))
    opts = _head_options(ckpt)
    opts["out_size"] = ckpt["out_size"]
    opts["embed_hw"] = ckpt["embed_hw"]
    if ckpt["head_kind"] == "autosam" and model is None:
        # No model to copy the decoder from: build a random one of the checkpoint's shape (the
        # state dict then overwrites every weight), e.g. to inspect a head without the model.
        sd = ckpt["state_dict"]
        opts["decoder_depth"] = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
        opts["decoder_mlp_dim"] = int(sd["transformer.layers.0.mlp.lin1.weight"].shape[0])
    head = build_head(ckpt["head_kind"], embed_dim=ckpt["embed_dim"], n_classes=ckpt["n_classes"],
                      model=model if ckpt["head_kind"] == "autosam" else None, **opts)
    head.load_state_dict(ckpt["state_dict"])
    head.checkpoint_info = {k: ckpt.get(k) for k in ("model_name", "weights_id", "window",
                                                      "embedding_shape", "config", "history")}
    return head.to(get_device(device)).eval()


# ----------------------------------------------------------------------------- training


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_val = int(round(n * fraction))
    if n < 5 or n_val < 1:
        return list(range(n)), []
    # Evenly spaced hold-out (slices are ordered in z): validation covers the whole range.
    val = sorted(set(np.linspace(0, n - 1, n_val + 2)[1:-1].round().astype(int).tolist()))
    return [i for i in range(n) if i not in val], val


def bf16_native(device: str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX512-BF16 / AMX; CUDA: Ampere+).

    Elsewhere bf16 autocast is emulated and slower than float32, so ``TrainConfig(bf16=None)``
    turns it on only where this is True.
    """
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    from .backends import native_bf16

    return native_bf16()  # one CPU check for the encoder backends and training


def _autocast(bf16: bool | None, device: str) -> Any:
    """A bfloat16 autocast context (``None``: only where native), else a no-op context."""
    on = bf16_native(device) if bf16 is None else bool(bf16)
    dev = torch.device(device).type
    if not on or dev not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(dev, dtype=torch.bfloat16)


def train_head(emb: np.ndarray, labels: np.ndarray, *, images: np.ndarray | None = None,
               config: TrainConfig | None = None, model: Any = None,
               model_info: dict | None = None, checkpoint: str | Path | None = None,
               resume: str | Path | None = None, progress: bool = True,
               curves_path: str | Path | None = None,
               val_data: tuple | None = None) -> TrainResult:
    """Train a head on embeddings ``(N,C,h,w)`` and labels ``(N,S,S)`` (model-input frame).

    ``images`` ``(N,S,S)`` in [0,1] feed heads with an image skip. ``val_data`` =
    ``(emb, labels, images)`` overrides the automatic hold-out. ``checkpoint`` is written at
    every improvement (best state) and at the end; ``resume`` continues from a checkpoint
    (same data and config). ``config.threads`` sets torch's thread count for the run.
    Returns the best head (eval mode) and the history.
    """
    with torch_threads((config or TrainConfig()).threads):
        return _train_head(emb, labels, images=images, config=config, model=model,
                           model_info=model_info, checkpoint=checkpoint, resume=resume,
                           progress=progress, curves_path=curves_path, val_data=val_data)


def _train_head(emb: np.ndarray, labels: np.ndarray, *, images: np.ndarray | None,
                config: TrainConfig | None, model: Any, model_info: dict | None,
                checkpoint: str | Path | None, resume: str | Path | None, progress: bool,
                curves_path: str | Path | None, val_data: tuple | None) -> TrainResult:
    config = copy.deepcopy(config or TrainConfig())
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if emb.ndim != 4 or labels.ndim != 3 or len(emb) != len(labels):
        raise SamliverError(f"Expected embeddings (N,C,h,w) and labels (N,S,S); got "
                            f"{emb.shape} and {labels.shape}.")
    if len(emb) == 0:
        raise SamliverError("No labelled slices to train on.")
    if not np.isfinite(emb).all():
        raise SamliverError("The embeddings contain NaN/inf: recompute the embedding cache.")
    device = get_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    resume_ckpt = _read_checkpoint(resume) if resume else None
    if resume_ckpt is not None:
        check_compatible(resume_ckpt, model=model, embedding_shape=emb.shape[1:], source=str(resume))
        config = TrainConfig(**{**resume_ckpt["config"], "steps": config.steps})
        opts = dict(_head_options(resume_ckpt), out_size=resume_ckpt["out_size"])
        head = build_head(config.kind, embed_dim=emb.shape[1], model=model, **opts)
        head.load_state_dict(resume_ckpt["state_dict"])
    else:
        opts = dict(config.head_options)
        if model is None:
            opts.setdefault("out_size", labels.shape[-1])
            opts.setdefault("embed_hw", emb.shape[-1])
        head = build_head(config.kind, embed_dim=emb.shape[1], model=model, **opts)
    if labels.shape[-1] != head.out_size:
        raise SamliverError(f"Labels are {labels.shape[-1]}px but the head outputs "
                            f"{head.out_size}px: give labels in the model-input frame.")
    head.to(device)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    head.to(memory_format=fmt)
    amp = _autocast(config.bf16, device)
    uses_image = bool(getattr(head, "uses_image", False))
    if uses_image and images is None:
        raise SamliverError("This head uses the slice image: pass images= (or use_image=False).")

    if val_data is not None:
        tr_idx, va_idx = list(range(len(emb))), []
        v_emb, v_lab, v_img = val_data
        val_on = "given"
    else:
        tr_idx, va_idx = _split(len(emb), config.val_fraction, config.seed)
        src = va_idx or tr_idx
        v_emb, v_lab = emb[src], labels[src]
        v_img = images[src] if images is not None else None
        val_on = "held-out" if va_idx else "train"
    x_all = torch.from_numpy(emb[tr_idx])
    y_all = torch.from_numpy(labels[tr_idx])
    im_all = torch.from_numpy(np.asarray(images, np.float32)[tr_idx])[:, None] if uses_image else None

    params = [p for p in head.parameters() if p.requires_grad]
    lr = config.learning_rate()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    total = max(1, config.steps)

    def _lr_lambda(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, total - config.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda)
    history: dict = {"step": [], "loss": [], "val_step": [], "val_liver": [], "val_tumour": [],
                     "val_on": val_on, "n_train": len(tr_idx), "n_val": len(va_idx),
                     "stopped": "steps", "best_step": 0, "best_score": -1.0}
    start = 0
    if resume_ckpt is not None:
        if resume_ckpt.get("optimizer"):
            opt.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt.get("scheduler"):
            sched.load_state_dict(resume_ckpt["scheduler"])
        start = int(resume_ckpt.get("step", 0))
        history.update({k: v for k, v in resume_ckpt.get("history", {}).items() if k in history})
    best_state = copy.deepcopy(head.state_dict())
    last_good = best_state
    bad_evals = 0
    n = len(tr_idx)
    bs = min(config.batch_size, n) if n else 1
    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), desc=f"train {config.kind}", disable=not progress,
               leave=False)
    t0 = time.time()
    for step in bar:
        head.train()
        idx = torch.randperm(n, generator=gen)[:bs]
        x, y = x_all[idx], y_all[idx]
        im = im_all[idx] if im_all is not None else None
        x, y, im = _augment(x, y, im, config.augment, gen)
        x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
        im = im.to(device).contiguous(memory_format=fmt) if im is not None else None
        with amp:
            logits = head(x, image=im)
        loss = seg_loss(logits.float(), y, config.tumour_weight, config.dice_weight)
        if not torch.isfinite(loss):
            history["stopped"] = f"non-finite loss at step {step}"
            head.load_state_dict(last_good)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        last_good = {k: v.detach().clone() for k, v in head.state_dict().items()}
        history["step"].append(step)
        history["loss"].append(float(loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            liver, tumour = _val_scores(head, v_emb, v_lab, v_img, device)
            score = liver if math.isnan(tumour) else 0.5 * (liver + tumour)
            history["val_step"].append(step + 1)
            history["val_liver"].append(liver)
            history["val_tumour"].append(tumour)
            if score > history["best_score"]:
                history["best_score"], history["best_step"] = score, step + 1
                best_state = copy.deepcopy(head.state_dict())
                bad_evals = 0
                if checkpoint:
                    save_checkpoint(checkpoint, head, config=config, model_info=model_info,
                                    history=history, optimizer=opt, scheduler=sched, step=step + 1)
            else:
                bad_evals += 1
                if val_on != "train" and bad_evals >= config.patience:
                    history["stopped"] = f"early stop at step {step + 1}"
                    break
    bar.close()
    history["seconds"] = time.time() - t0
    if history["best_score"] >= 0:
        head.load_state_dict(best_state)
    if checkpoint and history["stopped"].startswith("non-finite") and not Path(checkpoint).exists():
        save_checkpoint(checkpoint, head, config=config, model_info=model_info, history=history)
    elif checkpoint and not history["stopped"].startswith("non-finite"):
        save_checkpoint(checkpoint, head, config=config, model_info=model_info, history=history,
                        optimizer=opt, scheduler=sched, step=history["step"][-1] + 1
                        if history["step"] else start)
    if curves_path:
        plot_curves(history, curves_path)
    head.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(head=head, history=history, checkpoint=Path(checkpoint) if checkpoint else None)


def time_demo_recipe(config: TrainConfig | None = None, *, embeddings: Any = None) -> dict:
    """Train the demo's head on the sample's demo split and score it, timed (for benchmarks).

    ``config`` defaults to the demo recipe (``demo.demo_train_config()``). The sample and the
    LiteMedSAM embeddings of every slice come from the caches (the first call encodes them,
    which is not timed). Test Dice as the demo reports it: the other 120 slices, post-processed,
    global over the stack.

    Returns:
        ``{"seconds", "ms_per_step", "steps", "liver_dice", "tumour_dice", "threads"}``.
    """
    from .datasets import protocol_split
    from .demo import DEMO_K, demo_train_config
    from .embeddings import embed_volume
    from .inference import postprocess, predict_volume
    from .models import get_model
    from .sample import fetch_sample, load_sample

    fetch_sample()
    volume = load_sample()
    model = get_model("litemedsam")
    embeddings = embeddings or embed_volume(volume, model, progress=False)
    train, test = protocol_split(volume.label, protocol="sparse", k=DEMO_K)
    config = config or demo_train_config()
    x, y, images = slice_tensors(volume, embeddings, train)
    res = train_head(x, y, images=images, config=config, model=model, progress=False)
    raw = predict_volume(volume, model, res.head, embeddings=embeddings, slices=test,
                         postprocess_label=False, progress=False)
    pred, gt = postprocess(raw[test]), volume.label[test]
    n = max(1, len(res.history["step"]))
    return {"seconds": res.history["seconds"], "ms_per_step": 1e3 * res.history["seconds"] / n,
            "steps": n, "liver_dice": _dice(pred >= 1, gt >= 1),
            "tumour_dice": _dice(pred == 2, gt == 2),
            "threads": config.threads or torch.get_num_threads()}


def pseudo_labels(probs: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Pseudo-labels ``(N,S,S)`` int64 from class probabilities ``(N,C,S,S)`` of a stack of slices.

    The argmax, cleaned like a prediction (largest 3D liver component, tumours inside it; the
    stack is treated as a volume in its given order), with pixels whose top probability is below
    ``threshold`` (default 0.9) set to ``IGNORE`` so the loss skips them.
    """
    from .inference import postprocess

    probs = np.asarray(probs, np.float32)
    labels = postprocess(probs.argmax(1).astype(np.uint8)).astype(np.int64)
    labels[probs.max(1) < threshold] = IGNORE
    return labels


def self_train(emb: np.ndarray, labels: np.ndarray, unlabelled: tuple[np.ndarray, np.ndarray | None],
               *, images: np.ndarray | None = None, config: TrainConfig | None = None,
               rounds: int = 1, threshold: float = 0.9, first: TrainResult | None = None,
               **train_kwargs: Any) -> TrainResult:
    """Few-label training plus ``rounds`` (default 1) of pseudo-label self-training.

    ``unlabelled`` = ``(emb, images)`` of the volume's slices nobody annotated (in "annotate a
    few slices, segment the rest" these are the very slices to segment: it is transductive).
    Each round predicts them with the current head, keeps confident pixels (``pseudo_labels``,
    default threshold 0.9) and trains a fresh head on the labelled slices (repeated so that they
    are about half of the samples) plus the pseudo-labelled ones, validating on the labelled
    slices. ``first`` reuses an already trained head for round 0. Other keyword arguments go
    to ``train_head``. Measured on the sample (README): slab K = 8 +0.02 liver and tumour Dice.
    """
    config = config or TrainConfig()
    res = first or train_head(emb, labels, images=images, config=config, **train_kwargs)
    u_emb, u_img = unlabelled
    if len(u_emb) == 0:
        return res
    rep = max(1, len(u_emb) // max(1, len(emb)))
    for _ in range(int(rounds)):
        probs = predict_logits(res.head, u_emb, u_img, device=config.device)
        pseudo = pseudo_labels(probs, threshold)
        x = np.concatenate([np.repeat(emb, rep, 0), u_emb])
        y = np.concatenate([np.repeat(labels, rep, 0), pseudo])
        im = None if images is None else np.concatenate([np.repeat(images, rep, 0), u_img])
        res = train_head(x, y, images=im, config=config, val_data=(emb, labels, images),
                         **train_kwargs)
        res.history["pseudo_ignored"] = float((pseudo == IGNORE).mean())
    return res


def plot_curves(history: dict, path: str | Path) -> Path:
    """Loss (smoothed) and validation Dice against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss = np.asarray(history.get("loss", []), float)
    if loss.size:
        k = max(1, loss.size // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a.plot(history["step"][: smooth.size], smooth)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    b.plot(history.get("val_step", []), history.get("val_liver", []), "o-", label="liver")
    b.plot(history.get("val_step", []), history.get("val_tumour", []), "s-", label="tumour")
    b.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title={"train": "Dice on the training slices", "held-out": "validation Dice (held-out slices)"}
          .get(history.get("val_on"), "validation Dice"))
    b.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def parse_slices(text: str | None) -> list[int] | None:
    """``"3,20,41"`` / ``"50-90"`` / ``"1,5-8"`` -> sorted slice list (ranges inclusive)."""
    if not text:
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
        except ValueError as err:
            raise SamliverError(f"Bad slice list {text!r}: use e.g. 3,20,41 or 50-90.") from err
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    """``samliver train [VOLUME] [--label L] --head cnn --k 8 --protocol sparse -o head.pt``."""
    from .io import SERIES_UID_HELP

    p = argparse.ArgumentParser(prog="samliver train", description=main.__doc__)
    p.add_argument("volume", nargs="?", help="CT volume (default: the sample case)")
    p.add_argument("--label", help="label file for VOLUME")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--checkpoint", help="model weights file (SAM / MedSAM)")
    p.add_argument("--head", default="cnn", choices=["linear", "cnn", "vit", "autosam"])
    p.add_argument("--k", type=int, default=8, help="number of labelled slices (default 8)")
    p.add_argument("--protocol", default="sparse", choices=["sparse", "slab"])
    p.add_argument("--train-slices", help="explicit labelled slices, e.g. 3,20,41 or 10-20")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--augment", default="flip", choices=["none", "flip", "flip+rot"])
    p.add_argument("--train-parts", default=None, choices=["all", "tokens", "transformer"],
                   help="autosam only: which decoder parts learn (default all)")
    p.add_argument("--views", type=int, default=0,
                   help="cached augmented views per labelled slice (rotate/scale/shift/HU; default 0)")
    p.add_argument("--self-train", type=int, default=0, metavar="ROUNDS",
                   help="pseudo-label self-training rounds on the volume's other slices (default "
                        "0; encodes every slice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--series-uid", help=SERIES_UID_HELP)
    p.add_argument("-o", "--output", default="outputs/head.pt",
                   help="head checkpoint (default outputs/head.pt; never one of the inputs)")
    args = p.parse_args(argv)
    # Checked before loading anything: a bad flag should not cost a volume's embeddings.
    if args.train_parts and args.head != "autosam":
        raise SamliverError(f"--train-parts applies to the autosam head, not {args.head!r}.")
    from .util import check_number, check_output_path

    check_number("--k", args.k, minimum=1)
    check_number("--steps", args.steps, minimum=1)
    check_number("--lr", args.lr, positive=True, maximum=10)
    check_number("--views", args.views, minimum=0)
    check_number("--self-train", args.self_train, minimum=0)
    check_number("--seed", args.seed, minimum=0)
    out = check_output_path(args.output, inputs=(args.volume, args.label, args.checkpoint),
                            overwrite=True, what="-o")
    check_output_path(out.with_suffix(".curves.png"), inputs=(args.volume, args.label),
                      overwrite=True, what="curves")

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    from .datasets import protocol_split
    from .embeddings import embed_volume
    from .models import get_model

    from .io import load_volume_arg

    volume = load_volume_arg(args.volume, args.label, series_uid=args.series_uid)
    if volume.label is None:
        raise SamliverError(f"{args.volume} has no label: pass --label with the annotation file.")
    train = parse_slices(args.train_slices)
    if train == []:
        raise SamliverError(f"--train-slices {args.train_slices!r} names no slices: write ranges "
                            "low-high, e.g. 10-20.")
    if train is None:
        train, _ = protocol_split(volume.label, protocol=args.protocol, k=args.k)
        if len(train) < args.k:
            raise SamliverError(f"K={args.k} is larger than the {len(train)} labelled slices "
                                "available for this protocol: choose a smaller --k.")
    bad = [z for z in train if not 0 <= z < volume.hu.shape[0]]
    if bad:
        raise SamliverError(f"Slices {bad} are outside the volume (0..{volume.hu.shape[0] - 1}).")
    model = get_model(args.model, checkpoint=args.checkpoint, device=args.device)
    embs = embed_volume(volume, model, slices=train)
    emb, labels, images = training_tensors(volume, embs, train, model=model, views=args.views,
                                           seed=args.seed, progress=True)
    steps = args.steps if args.steps is not None else (60 if fast_mode() else 300)
    config = TrainConfig(kind=args.head, steps=steps, lr=args.lr, augment=args.augment,
                         seed=args.seed, device=args.device,
                         head_options={"train_parts": args.train_parts} if args.train_parts else {})
    info = {"model_name": model.name, "weights_id": model.weights_id, "window": embs.window}
    kwargs = dict(config=config, model=model, model_info=info, checkpoint=out,
                  curves_path=out.with_suffix(".curves.png"))
    if args.self_train:
        rest = [z for z in range(volume.hu.shape[0]) if z not in set(train)]
        u_emb, _, u_img = slice_tensors(volume, embed_volume(volume, model, slices=rest), rest,
                                        need_label=False)
        res = self_train(emb, labels, (u_emb, u_img), images=images, rounds=args.self_train,
                         **kwargs)
    else:
        res = train_head(emb, labels, images=images, **kwargs)
    print(json.dumps({"checkpoint": str(out), "train_slices": train,
                      "best_step": res.history["best_step"], "stopped": res.history["stopped"],
                      "val_on": res.history["val_on"], "val_score": res.history["best_score"],
                      "seconds": round(res.history["seconds"], 1)}))
    return 0
