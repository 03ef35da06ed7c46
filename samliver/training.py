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
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoints import check_compatible, head_options, read_checkpoint, save_checkpoint
from .evaluation import dice
from .heads import build_head, predict_logits
from .losses import IGNORE, seg_loss
from .postprocess import postprocess
from .training_data import augment_batch, slice_tensors, training_tensors
from .util import SamliverError, atomic_path, fast_mode, get_device, torch_threads

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


def _val_scores(head, emb, labels, images, device) -> tuple[float, float]:
    pred = predict_logits(head, emb, images, device=device).argmax(1)
    liver = dice(pred >= 1, labels >= 1)
    tumour = dice(pred == 2, labels == 2) if (labels == 2).any() else float("nan")
    return liver, tumour


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
               val_data: tuple | None = None,
               callback: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train a head on embeddings ``(N,C,h,w)`` and labels ``(N,S,S)`` (model-input frame).

    ``images`` ``(N,S,S)`` in [0,1] feed heads with an image skip. ``val_data`` =
    ``(emb, labels, images)`` overrides the automatic hold-out. ``checkpoint`` is written at
    every improvement (best state) and at the end; ``resume`` continues from a checkpoint
    (same data and config). ``config.threads`` sets torch's thread count for the run.
    ``callback(step, total, loss)`` is called after every step (a UI's progress bar);
    ``should_stop()`` is polled before every step, and True ends training with
    ``history["stopped"] == "cancelled"`` (the head is then the last state, not a finished one).
    Returns the best head (eval mode) and the history.
    """
    with torch_threads((config or TrainConfig()).threads):
        return _train_head(emb, labels, images=images, config=config, model=model,
                           model_info=model_info, checkpoint=checkpoint, resume=resume,
                           progress=progress, curves_path=curves_path, val_data=val_data,
                           callback=callback, should_stop=should_stop)


def _train_head(emb: np.ndarray, labels: np.ndarray, *, images: np.ndarray | None,
                config: TrainConfig | None, model: Any, model_info: dict | None,
                checkpoint: str | Path | None, resume: str | Path | None, progress: bool,
                curves_path: str | Path | None, val_data: tuple | None,
                callback: Callable[[int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> TrainResult:
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

    resume_ckpt = read_checkpoint(resume) if resume else None
    if resume_ckpt is not None:
        check_compatible(resume_ckpt, model=model, embedding_shape=emb.shape[1:], source=str(resume))
        config = TrainConfig(**{**resume_ckpt["config"], "steps": config.steps})
        opts = dict(head_options(resume_ckpt), out_size=resume_ckpt["out_size"])
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
        if should_stop is not None and should_stop():
            history["stopped"] = "cancelled"
            break
        head.train()
        idx = torch.randperm(n, generator=gen)[:bs]
        x, y = x_all[idx], y_all[idx]
        im = im_all[idx] if im_all is not None else None
        x, y, im = augment_batch(x, y, im, config.augment, gen)
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
        if callback is not None:
            callback(step + 1, config.steps, history["loss"][-1])
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
    from .inference import predict_volume
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
            "steps": n, "liver_dice": dice(pred >= 1, gt >= 1),
            "tumour_dice": dice(pred == 2, gt == 2),
            "threads": config.threads or torch.get_num_threads()}


def pseudo_labels(probs: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Pseudo-labels ``(N,S,S)`` int64 from class probabilities ``(N,C,S,S)`` of a stack of slices.

    The argmax, cleaned like a prediction (largest 3D liver component, tumours inside it; the
    stack is treated as a volume in its given order), with pixels whose top probability is below
    ``threshold`` (default 0.9) set to ``IGNORE`` so the loss skips them.
    """
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
