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

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .checkpoints import check_compatible, head_options, read_checkpoint, save_checkpoint
from .checkpoints import model_info as describe_model
from .config import DEFAULT_LR, RECIPES
from .evaluation import dice
from .heads import build_head, head_fine_features, predict_logits
from .losses import IGNORE, seg_loss
from .postprocess import postprocess
from .training_data import augment_batch
from .util import SamliverError, fast_mode, get_device, torch_threads

if TYPE_CHECKING:  # pragma: no cover
    from .models import SamModel


@dataclass
class TrainConfig:
    """Training settings; defaults are the recipe measured on the sample (see docs/results.md)."""

    kind: str = "cnn"
    steps: int = 300
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR[kind]
    weight_decay: float = 1e-2
    warmup: int = 20
    tumour_weight: float = 3.0  # CE weight of the tumour class (background 1, liver 1)
    dice_weight: float = 1.0
    tversky_weight: float = 0.0  # focal Tversky term on the tumour class (losses.focal_tversky)
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


def recipe(name: str = "default", *, fast: bool | None = None, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a named recipe (``config.RECIPES``), the one way to get a recipe.

    Args:
        name: ``"default"`` (the demo's and the annotation loop's head) or a head kind
            (``"linear"``, ``"cnn"``, ``"vit"``, ``"autosam"``).
        fast: use the recipe's ``fast`` variant (default: when ``SAMLIVER_FAST`` is set).
        **overrides: ``TrainConfig`` fields to change; ``steps=None`` keeps the recipe's.

    Returns:
        A new ``TrainConfig``.

    Raises:
        SamliverError: an unknown recipe name or field.
    """
    if name not in RECIPES:
        raise SamliverError(f"Unknown training recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    fields = {k: copy.deepcopy(v) for k, v in RECIPES[name].items() if k != "fast"}
    if fast_mode() if fast is None else fast:
        fields.update(copy.deepcopy(RECIPES[name].get("fast", {})))
    fields.update({k: v for k, v in overrides.items() if not (k == "steps" and v is None)})
    try:
        return TrainConfig(**fields)
    except TypeError as err:
        raise SamliverError(f"Bad training setting for recipe {name!r}: {err}.") from err


@dataclass
class TrainResult:
    head: torch.nn.Module
    history: dict
    checkpoint: Path | None = None


def _val_scores(head, emb, labels, images, device, fine=None) -> tuple[float, float]:
    pred = predict_logits(head, emb, images, device=device, fine=fine).argmax(1)
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then cosine
    decay to 5 % at ``total`` (shared by ``train_head`` and the data-parallel loop)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


GRAD_CLIP = 5.0
"""Gradient-norm bound of every head update: keeps a few-slice batch with a huge loss from
throwing the head far off."""


def optimizer_step(loss: torch.Tensor, optimizer: Any, scheduler: Any, params: list) -> None:
    """One update of the head: back-propagate ``loss``, clip the gradient norm, step both.

    Shared by the single-process loop and the data-parallel one (``samliver.distributed``), so
    they update the head the same way.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    scheduler.step()


def restore_optimizer(ckpt: dict, optimizer: Any, scheduler: Any) -> int:
    """Load the optimizer and scheduler states a head checkpoint holds (when it has them).

    Args:
        ckpt: a checkpoint read by :func:`samliver.checkpoints.read_checkpoint`.
        optimizer: the run's optimizer; scheduler: its learning-rate scheduler.

    Returns:
        The step the checkpointed run had reached (where a resumed run continues).
    """
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    return int(ckpt.get("step", 0))


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
               config: TrainConfig | None = None, model: SamModel | None = None,
               model_info: dict | None = None, checkpoint: str | Path | None = None,
               resume: str | Path | None = None, progress: bool = True,
               curves_path: str | Path | None = None,
               val_data: tuple | None = None,
               callback: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               fine: np.ndarray | None = None) -> TrainResult:
    """Train a head on embeddings ``(N,C,h,w)`` and labels ``(N,S,S)`` (model-input frame).

    ``images`` ``(N,S,S)`` in [0,1] feed heads with an image skip; ``fine`` ``(N,F,h',w')``
    (``embed_fine_features(...).stack(slices)``) feeds a ``cnn`` head with ``fine_features``
    and gets the same flips / rotations as the embedding. ``val_data`` =
    ``(emb, labels, images[, fine])`` overrides the automatic hold-out. ``checkpoint`` is written at
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
                           callback=callback, should_stop=should_stop, fine=fine)


def _checked_data(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings as float32 (N,C,h,w) and labels as int64 (N,S,S), refused when unusable."""
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if emb.ndim != 4 or labels.ndim != 3 or len(emb) != len(labels):
        raise SamliverError(f"Expected embeddings (N,C,h,w) and labels (N,S,S); got "
                            f"{emb.shape} and {labels.shape}.")
    if len(emb) == 0:
        raise SamliverError("No labelled slices to train on.")
    if not np.isfinite(emb).all():
        raise SamliverError("The embeddings contain NaN/inf: recompute the embedding cache.")
    return emb, labels


def _slice_dim(emb: np.ndarray, opts: dict) -> int:
    """Channels of one slice's embedding: a 2.5D head's input stacks ``2 context + 1`` slices."""
    return emb.shape[1] // (2 * int(opts.get("context", 0) or 0) + 1)


def _start_head(config: TrainConfig, emb: np.ndarray, labels: np.ndarray, model: SamModel | None,
                resume: str | Path | None) -> tuple[Any, TrainConfig, dict | None]:
    """A fresh head for ``config``, or the one (and the config) a checkpoint to resume holds."""
    resume_ckpt = read_checkpoint(resume) if resume else None
    if resume_ckpt is not None:
        shape = (_slice_dim(emb, head_options(resume_ckpt)),) + tuple(emb.shape[2:])
        check_compatible(resume_ckpt, model=model, embedding_shape=shape, source=str(resume))
        config = TrainConfig(**{**resume_ckpt["config"], "steps": config.steps})
        opts = dict(head_options(resume_ckpt), out_size=resume_ckpt["out_size"])
        head = build_head(config.kind, embed_dim=_slice_dim(emb, opts), model=model, **opts)
        head.load_state_dict(resume_ckpt["state_dict"])
    else:
        opts = dict(config.head_options)
        if model is None:
            opts.setdefault("out_size", labels.shape[-1])
            opts.setdefault("embed_hw", emb.shape[-1])
        head = build_head(config.kind, embed_dim=_slice_dim(emb, opts), model=model, **opts)
    if labels.shape[-1] != head.out_size:
        raise SamliverError(f"Labels are {labels.shape[-1]}px but the head outputs "
                            f"{head.out_size}px: give labels in the model-input frame.")
    return head, config, resume_ckpt


def _validation(emb: np.ndarray, labels: np.ndarray, images: np.ndarray | None, config: TrainConfig,
                val_data: tuple | None, fine: np.ndarray | None = None) -> tuple[list[int], list[int], tuple, str]:
    """Training indices, held-out indices, the validation ``(emb, labels, images, fine)`` and what it is.

    ``val_data`` given: validate on it, train on everything. Else an evenly spaced hold-out of
    ``config.val_fraction`` (none below 5 slices: then the training slices validate).
    """
    if val_data is not None:
        return list(range(len(emb))), [], (tuple(val_data) + (None,))[:4], "given"
    tr_idx, va_idx = _split(len(emb), config.val_fraction, config.seed)
    src = va_idx or tr_idx
    val = (emb[src], labels[src], images[src] if images is not None else None,
           fine[src] if fine is not None else None)
    return tr_idx, va_idx, val, "held-out" if va_idx else "train"


def _train_head(emb: np.ndarray, labels: np.ndarray, *, images: np.ndarray | None,
                config: TrainConfig | None, model: SamModel, model_info: dict | None,
                checkpoint: str | Path | None, resume: str | Path | None, progress: bool,
                curves_path: str | Path | None, val_data: tuple | None,
                callback: Callable[[int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                fine: np.ndarray | None = None) -> TrainResult:
    config = copy.deepcopy(config or TrainConfig())
    if model_info is None and model is not None:
        model_info = describe_model(model)  # the checkpoint records what it was trained for
    emb, labels = _checked_data(emb, labels)
    device = get_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    head, config, resume_ckpt = _start_head(config, emb, labels, model, resume)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    head.to(device).to(memory_format=fmt)
    amp = _autocast(config.bf16, device)
    if head.uses_image and images is None:
        raise SamliverError("This head uses the slice image: pass images= (or use_image=False).")
    reads_fine = head_fine_features(head) > 0
    if reads_fine and (fine is None or len(fine) != len(emb)):
        raise SamliverError("This head reads the encoder's finer stage (fine_features): pass "
                            "fine= with one entry per slice (embed_fine_features(...).stack(slices)).")
    fine = np.asarray(fine, np.float32) if reads_fine else None
    tr_idx, va_idx, val, val_on = _validation(emb, labels, images, config, val_data, fine)
    fine_all = torch.from_numpy(fine[tr_idx]) if fine is not None else None
    x_all = torch.from_numpy(emb[tr_idx])
    y_all = torch.from_numpy(labels[tr_idx])
    im_all = torch.from_numpy(np.asarray(images, np.float32)[tr_idx])[:, None] if head.uses_image else None

    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    total = max(1, config.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.warmup, total))
    history: dict = {"step": [], "loss": [], "val_step": [], "val_liver": [], "val_tumour": [],
                     "val_on": val_on, "n_train": len(tr_idx), "n_val": len(va_idx),
                     "stopped": "steps", "best_step": 0, "best_score": -1.0}
    start = 0
    if resume_ckpt is not None:
        start = restore_optimizer(resume_ckpt, opt, sched)
        history.update({k: v for k, v in resume_ckpt.get("history", {}).items() if k in history})
    best_state = last_good = copy.deepcopy(head.state_dict())
    bad_evals = 0
    n = len(tr_idx)
    bs = min(config.batch_size, n) if n else 1

    def save(step: int | None = None) -> None:
        with_state = {} if step is None else {"optimizer": opt, "scheduler": sched, "step": step}
        save_checkpoint(checkpoint, head, config=config, model_info=model_info, history=history, **with_state)

    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), desc=f"train {config.kind}", disable=not progress, leave=False)
    t0 = time.time()
    for step in bar:
        if should_stop is not None and should_stop():
            history["stopped"] = "cancelled"
            break
        head.train()
        idx = torch.randperm(n, generator=gen)[:bs]
        draws = gen.get_state()  # the fine features replay the same flips / rotations
        x, y, im = augment_batch(x_all[idx], y_all[idx], im_all[idx] if im_all is not None else None,
                                 config.augment, gen)
        extra = {}
        if fine_all is not None:
            replay = torch.Generator().manual_seed(0)
            replay.set_state(draws)
            extra["fine"] = augment_batch(fine_all[idx], y_all[idx], None, config.augment,
                                          replay)[0].to(device).contiguous(memory_format=fmt)
        x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
        im = im.to(device).contiguous(memory_format=fmt) if im is not None else None
        with amp:
            logits = head(x, image=im, **extra)
        loss = seg_loss(logits.float(), y, config.tumour_weight, config.dice_weight,
                        tversky_weight=config.tversky_weight)
        if not torch.isfinite(loss):
            history["stopped"] = f"non-finite loss at step {step}"
            head.load_state_dict(last_good)
            break
        optimizer_step(loss, opt, sched, params)
        last_good = {k: v.detach().clone() for k, v in head.state_dict().items()}
        history["step"].append(step)
        history["loss"].append(float(loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(step + 1, config.steps, history["loss"][-1])
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            liver, tumour = _val_scores(head, *val[:3], device, fine=val[3])
            score = liver if math.isnan(tumour) else 0.5 * (liver + tumour)
            history["val_step"].append(step + 1)
            history["val_liver"].append(liver)
            history["val_tumour"].append(tumour)
            if score > history["best_score"]:
                history["best_score"], history["best_step"] = score, step + 1
                best_state = copy.deepcopy(head.state_dict())
                bad_evals = 0
                if checkpoint:
                    save(step + 1)
            else:
                bad_evals += 1
                if val_on != "train" and bad_evals >= config.patience:
                    history["stopped"] = f"early stop at step {step + 1}"
                    break
    bar.close()
    history["seconds"] = time.time() - t0
    if history["best_score"] >= 0:
        head.load_state_dict(best_state)
    failed = history["stopped"].startswith("non-finite")
    if checkpoint and failed and not Path(checkpoint).exists():
        save()  # the last good state, without an optimizer to resume a diverged run from
    elif checkpoint and not failed:
        save(history["step"][-1] + 1 if history["step"] else start)
    if curves_path:
        from .visualization import save_figure, training_curves_figure

        save_figure(training_curves_figure(history), curves_path, dpi=100)
    head.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(head=head, history=history, checkpoint=Path(checkpoint) if checkpoint else None)


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
    to ``train_head``. Measured on the sample (docs/results.md): slab K = 8 +0.02 liver and tumour Dice.
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


# ----------------------------------------------------------------------------- CLI
