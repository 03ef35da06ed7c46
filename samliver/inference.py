"""Whole-volume segmentation with a trained head, post-processing and tumour burden.

``predict_volume`` embeds (cached) every slice, runs the head, maps class probabilities back
to the original slice geometry and takes the arg-max; ``postprocess`` keeps the largest 3D
liver component and only the tumour voxels inside it; ``tumour_burden`` counts lesions (3D
components) and measures volumes in mL when the voxel spacing is known, else in voxels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .config import DEFAULT_WINDOW
from .postprocess import MIN_LESION_VOXELS, postprocess
from .util import SamliverError

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings
    from .heads import Head
    from .io import CTVolume
    from .models import SamModel


def predict_probabilities(volume: CTVolume, model: SamModel, head: Head, *, embeddings: VolumeEmbeddings | None = None,
                          slices: list[int] | None = None, batch_size: int = 8,
                          progress: bool = True, tta: bool | None = None) -> tuple[list[int], np.ndarray]:
    """Per-slice class probabilities in the original geometry: ``(zs, probs (N,C,H,W) float32)``.

    A 2.5D head (``context`` > 0) gets each slice's neighbours too (encoded when missing from
    the cache). ``tta`` None (default) takes the head's own ``tta`` option (False unless it was
    built with ``tta=True``). A head with ``fine_features`` also reads the encoder's finer stage
    (``embed_fine_features``, cached beside the embeddings).
    """
    from .embeddings import embed_fine_features, embed_volume
    from .heads import head_context, head_fine_features, predict_logits
    from .training_data import slice_tensors

    zs = list(range(volume.hu.shape[0])) if slices is None else [int(z) for z in slices]
    window = (getattr(head, "checkpoint_info", None) or {}).get("window") or DEFAULT_WINDOW
    context = head_context(head)
    tta = bool(getattr(head, "tta", False)) if tta is None else bool(tta)
    # A 2.5D head also reads the neighbours of every slice it predicts: encode those missing.
    depth = volume.hu.shape[0]
    need = sorted({min(max(z + d, 0), depth - 1) for z in zs for d in range(-context, context + 1)})
    if embeddings is None:
        embeddings = embed_volume(volume, model, slices=need, window=window, progress=progress)
    elif context and any(z not in embeddings for z in need):
        embeddings = embed_volume(volume, model, slices=need, window=embeddings.window,
                                  progress=progress)
    tf = embeddings.transform
    fine = (embed_fine_features(volume, model, slices=zs, window=embeddings.window, progress=progress)
            if head_fine_features(head) else None)
    out = []
    step = 32 // (2 * context + 1) or 1  # the stacked embeddings are (2c+1)x larger
    for i in range(0, len(zs), step):
        chunk = zs[i:i + step]
        emb, _, images = slice_tensors(volume, embeddings, chunk, need_label=False, context=context)
        if emb.shape[1:] != ((2 * context + 1) * head.embed_dim, head.embed_hw, head.embed_hw):
            raise SamliverError(
                f"The head expects embeddings {(head.embed_dim, head.embed_hw, head.embed_hw)} but "
                f"the model gives {emb.shape[1:]}: it was trained for another model.")
        probs = predict_logits(head, emb, images, batch_size=batch_size, tta=tta,
                               fine=fine.stack(chunk) if fine is not None else None)
        out.append(np.asarray(tf.mask_to_original(probs.astype(np.float32)), np.float32))
    return zs, np.concatenate(out) if out else np.zeros((0,), np.float32)


def predict_volume(volume: CTVolume, model: SamModel, head: Head, *, embeddings: VolumeEmbeddings | None = None,
                   slices: list[int] | None = None, postprocess_label: bool = True,
                   batch_size: int = 8, progress: bool = True, tta: bool | None = None,
                   min_lesion_size: int | None = None) -> np.ndarray:
    """Label volume ``(z,y,x)`` uint8 (0 background, 1 liver, 2 tumour) from a trained head.

    ``slices`` (default all) are predicted; other slices stay 0. ``embeddings`` reuses a
    ``VolumeEmbeddings`` (else ``embed_volume`` computes / loads the cache).
    ``postprocess_label`` (default True) applies :func:`postprocess`; ``tta`` averages with the
    left-right flipped input (default None: the head's own ``tta`` option, else False). ``min_lesion_size`` (voxels, default
    :data:`MIN_LESION_VOXELS`) goes to :func:`postprocess`.

    With a subset of ``slices``, post-processing sees only the predicted slices, stacked in
    order: the empty slices between them (e.g. the labelled ones) would otherwise cut the liver
    into slabs and "largest 3D component" would drop all but one slab.

    Args:
        volume: the CT volume to segment.
        model: the model the head was trained for.
        head: a trained head (:func:`samliver.load_head` or ``train_head(...).head``).
        embeddings: cached embeddings to reuse (default: from the cache, computed if missing).
        slices: axial slices to predict (default all).
        postprocess_label: apply :func:`samliver.postprocess.postprocess`.
        batch_size: slices per forward pass.
        progress: show progress bars.
        tta: average with the left-right flipped input (None: the head's option).
        min_lesion_size: smallest lesion kept, in voxels.

    Returns:
        The label volume, shaped like ``volume.hu``.

    Raises:
        SamliverError: the head was trained for another model's embeddings.
    """
    if slices is not None:
        slices = sorted({int(z) for z in slices})
    zs, probs = predict_probabilities(volume, model, head, embeddings=embeddings, slices=slices,
                                      batch_size=batch_size, progress=progress, tta=tta)
    label = np.zeros(volume.hu.shape, np.uint8)
    if not len(zs):
        return label
    label[zs] = probs.argmax(1).astype(np.uint8)
    if postprocess_label:
        label[zs] = postprocess(label[zs], min_lesion_size=MIN_LESION_VOXELS if min_lesion_size
                                is None else min_lesion_size)
    return label
