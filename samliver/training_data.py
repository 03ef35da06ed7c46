"""Training data for the heads: cached embeddings, labels and images of chosen slices.

Everything is in the model-input frame (the encoder's padded square). ``slice_tensors`` reads
the embedding cache; ``augmented_views`` / ``view_tensors`` add encoded, randomly transformed
copies of the labelled slices (augmentations a frozen encoder has to see);
``augment_batch`` applies flips / 90-degree rotations to embedding, label and image together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import DEFAULT_WINDOW
from .util import SamliverError

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings
    from .io import CTVolume
    from .models import SamModel


def context_slices(slices: list[int], depth: int, context: int = 0) -> list[list[int]]:
    """For each slice, the ``2 context + 1`` slices a 2.5D head reads: ``z - context .. z + context``.

    Slices past the volume's ends repeat the nearest slice inside it (edge padding).
    """
    c = int(context)
    return [[min(max(int(z) + d, 0), depth - 1) for d in range(-c, c + 1)] for z in slices]


def context_embeddings(embeddings: VolumeEmbeddings, slices: list[int], depth: int,
                       context: int = 0) -> np.ndarray:
    """Embeddings of ``slices`` with ``context`` neighbours each side stacked along the channels.

    Returns ``(N, (2 context + 1) C, h, w)`` float32, slice ``z - context`` first. Each
    embedding is read once however many stacks it appears in.

    Raises:
        SamliverError: a neighbour has no cached embedding (encode it first).
    """
    groups = context_slices(slices, depth, context)
    needed = sorted({z for g in groups for z in g})
    missing = [z for z in needed if z not in embeddings]
    if missing:
        raise SamliverError(
            f"Slices {missing[:8]} (neighbours of the requested ones: this head reads {context} "
            f"slice(s) each side) have no cached embedding: run embed_volume(volume, model, "
            f"slices=...) on them first.")
    cache = {z: np.asarray(embeddings[z], dtype=np.float32) for z in needed}
    return np.stack([np.concatenate([cache[z] for z in g]) for g in groups])


def slice_tensors(volume: CTVolume, embeddings: VolumeEmbeddings, slices: list[int], *, window: str | None = None,
                  need_label: bool = True, context: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Embeddings, labels and images of ``slices`` in the model-input frame.

    Args:
        volume: the CT volume (with its label unless ``need_label`` is False).
        embeddings: its cached embeddings, covering ``slices``.
        slices: axial slice indices.
        window: HU window for the images (default: the embeddings' window).
        need_label: raise when the volume has no label (set False for prediction).
        context: neighbouring slices each side stacked with each slice's embedding, for a
            2.5D head (``cnn`` with ``context``); default 0. The neighbours need no label.

    Returns:
        ``(emb (N,(2 context+1)C,h,w) float32, labels (N,S,S) int64 or None, images (N,S,S) float32)``.

    Raises:
        SamliverError: ``need_label`` and the volume has no label; a neighbour not cached.
    """
    from .preprocess import window_to_unit

    if need_label and volume.label is None:
        raise SamliverError(
            f"{getattr(volume, 'source', 'The volume')} has no label: training needs labelled "
            "slices. Pass a label file (load_volume(path, label_path=...)).")
    window = window or getattr(embeddings, "window", DEFAULT_WINDOW)
    tf = embeddings.transform
    if context:
        emb = context_embeddings(embeddings, list(slices), volume.hu.shape[0], context)
    else:
        emb = np.asarray(embeddings.stack(list(slices)), dtype=np.float32)
    images = np.stack([tf.apply_image(window_to_unit(volume.hu[z], window)) for z in slices])
    labels = None
    if volume.label is not None:
        labels = np.stack([tf.label_to_input(volume.label[z]) for z in slices]).astype(np.int64)
    return emb, labels, images.astype(np.float32)


def augmented_views(volume: CTVolume, slices: list[int], *, n_views: int = 2, seed: int = 0,
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


def view_tensors(volume: CTVolume, model: SamModel, slices: list[int], *, n_views: int = 2, seed: int = 0,
                 window: str = DEFAULT_WINDOW, progress: bool = False) -> tuple:
    """Embeddings, labels and images of ``augmented_views`` (encoded once, then from the cache).

    Returns the same ``(emb, labels, images)`` triple as ``slice_tensors``; append it to the
    labelled slices' tensors to train on real and augmented views together.
    """
    from .embeddings import embed_volume

    views = augmented_views(volume, slices, n_views=n_views, seed=seed)
    embs = embed_volume(views, model, window=window, progress=progress)
    return slice_tensors(views, embs, list(range(views.hu.shape[0])), window=window)


def training_tensors(volume: CTVolume, embeddings: VolumeEmbeddings, slices: list[int], *, model: SamModel | None = None,
                     views: int = 0, seed: int = 0, progress: bool = False, context: int = 0) -> tuple:
    """``slice_tensors`` of the labelled ``slices`` followed by ``views`` cached augmented views
    of each (default 0; needs ``model`` to encode them).

    ``context`` (default 0) stacks that many neighbours each side (a 2.5D head's input). An
    augmented view has no neighbours: its own embedding is repeated in their place.
    """
    tensors = slice_tensors(volume, embeddings, slices, context=context)
    if not views:
        return tensors
    extra = view_tensors(volume, model, slices, n_views=views, seed=seed,
                         window=getattr(embeddings, "window", DEFAULT_WINDOW), progress=progress)
    if context:
        extra = (np.tile(extra[0], (1, 2 * int(context) + 1, 1, 1)),) + tuple(extra[1:])
    return tuple(np.concatenate([a, b]) for a, b in zip(tensors, extra))


def fine_tensors(volume: CTVolume, model: SamModel, embeddings: VolumeEmbeddings, slices: list[int],
                 head_options: dict | None, *, views: int = 0, self_train: int = 0) -> np.ndarray | None:
    """The encoder's finer-stage features of ``slices`` for a recipe whose head reads them.

    Args:
        volume, model, embeddings: the volume, its model and its cached embeddings (their window).
        slices: the labelled slices, in the order of :func:`training_tensors`.
        head_options: the recipe's ``head_options``; without ``fine_features`` nothing is computed.
        views, self_train: the run's augmented views / self-training rounds (not supported with
            fine features yet).

    Returns:
        ``(N, C, h, w)`` float32 for ``train_head(..., fine=)``, or ``None``.

    Raises:
        SamliverError: fine features asked for together with views or self-training.
    """
    if not (head_options or {}).get("fine_features"):
        return None
    if views or self_train:
        raise SamliverError("A recipe with fine_features does not combine with augmented views or "
                            "self-training yet: drop --views / --self-train, or choose another head.")
    from .embeddings import embed_fine_features

    return np.asarray(embed_fine_features(volume, model, slices=list(slices),
                                          window=embeddings.window).stack(list(slices)), np.float32)


def augment_batch(x: torch.Tensor, y: torch.Tensor, im: torch.Tensor | None, mode: str,
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
