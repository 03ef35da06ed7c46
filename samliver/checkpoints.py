"""Head checkpoints: one file holding the trained head and what it was trained for.

A checkpoint stores the head kind and options, the training config, and the identity of the
encoder whose embeddings it was trained on (model name, weights id, embedding shape, HU
window). ``model_info`` derives that identity from the model and the embeddings, so no caller
builds it by hand; loading a head for another model or embedding shape fails with a clear error.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import DEFAULT_WINDOW
from .heads import build_head
from .util import SamliverError, atomic_path, get_device

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings
    from .models import SamModel

CHECKPOINT_FORMAT = "samliver-head-1"


def model_info(model: SamModel, embeddings: VolumeEmbeddings | None = None, *, window: Any = None) -> dict:
    """The encoder identity a checkpoint records: model name, weights id and HU window.

    Args:
        model: the ``SamModel`` whose embeddings the head is trained on.
        embeddings: the ``VolumeEmbeddings`` used (its window wins), or None.
        window: the HU window when there are no embeddings (default: the model's default).

    Returns:
        ``{"model_name", "weights_id", "window"}``.
    """
    from .config import DEFAULT_WINDOW

    win = getattr(embeddings, "window", None) or window or DEFAULT_WINDOW
    return {"model_name": model.name, "weights_id": getattr(model, "weights_id", None), "window": win}


def save_checkpoint(path: str | Path, head: torch.nn.Module, *, config: Any,
                    model_info: dict | None = None, history: dict | None = None,
                    optimizer: Any = None, scheduler: Any = None, step: int = 0) -> Path:
    """Write a head checkpoint atomically (state, kind, options, config, model identity).

    Args:
        path: the checkpoint file to write.
        head: the trained :class:`samliver.heads.Head`.
        config: the ``TrainConfig`` it was trained with.
        model_info: the encoder identity, from :func:`model_info` (never built by hand).
        history: training curves and timings.
        optimizer: optimiser whose state is stored to resume training.
        scheduler: learning-rate scheduler stored with it.
        step: the training step reached.

    Returns:
        ``path``.
    """
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
        "window": info.get("window", DEFAULT_WINDOW),
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


def read_checkpoint(path: str | Path) -> dict:
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


def check_compatible(ckpt: dict, *, model: SamModel | None = None, embedding_shape: tuple | None = None,
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


def head_options(ckpt: dict) -> dict:
    """The head options stored in a checkpoint, completed for older checkpoints."""
    opts = dict(ckpt["head_options"])
    if ckpt["head_kind"] == "cnn" and "full_res" not in opts:
        # checkpoints from before the full-resolution block became the default have none
        opts["full_res"] = any(k.startswith("up.full.") for k in ckpt["state_dict"])
    return opts


def load_head(path: str | Path, model: SamModel | None = None, *, device: str | None = None,
              embedding_shape: tuple | None = None) -> torch.nn.Module:
    """Load a trained head; refuses a checkpoint made for another model or embedding shape.

    Args:
        path: a checkpoint written by :func:`save_checkpoint` (``samliver train``).
        model: the model the head will run on; checked against the checkpoint's model name,
            weights and embedding shape (and the source of the ``autosam`` decoder).
        device: where to put the head (default: the best available).
        embedding_shape: ``(C, h, w)`` to check when no model is given.

    Returns:
        The head in eval mode, with ``checkpoint_info`` set.

    Raises:
        SamliverError: a missing or unreadable file, not a samliver checkpoint, or one trained
            for another model, weights or embedding shape.
    """
    ckpt = read_checkpoint(path)
    check_compatible(ckpt, model=model, embedding_shape=embedding_shape, source=str(path))
    opts = head_options(ckpt)
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


def load_head_checked(path: str | Path, model: SamModel, device: str | None = None) -> Any:
    """:func:`load_head`, with a damaged checkpoint as a one-line error.

    A checkpoint whose weights do not fit its declared head kind (edited, or mixed up) makes
    torch raise mid-load; the user can only replace the file, so say that.
    """
    try:
        return load_head(path, model, device=device)
    except SamliverError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SamliverError(f"Head checkpoint {path} does not match its own head kind or shape "
                            f"({first}). Retrain it with `samliver train`.") from err
