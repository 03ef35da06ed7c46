"""Whole-volume segmentation with a trained head, post-processing and tumour burden.

``predict_volume`` embeds (cached) every slice, runs the head, maps class probabilities back
to the original slice geometry and takes the arg-max; ``postprocess`` keeps the largest 3D
liver component and only the tumour voxels inside it; ``tumour_burden`` counts lesions (3D
components) and measures volumes in mL when the voxel spacing is known, else in voxels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .postprocess import MIN_LESION_VOXELS, format_burden, postprocess, tumour_burden
from .util import SamliverError

def predict_probabilities(volume: Any, model: Any, head: Any, *, embeddings: Any = None,
                          slices: list[int] | None = None, batch_size: int = 8,
                          progress: bool = True, tta: bool = False) -> tuple[list[int], np.ndarray]:
    """Per-slice class probabilities in the original geometry: ``(zs, probs (N,C,H,W) float32)``."""
    from .embeddings import embed_volume
    from .heads import predict_logits
    from .training_data import slice_tensors

    zs = list(range(volume.hu.shape[0])) if slices is None else [int(z) for z in slices]
    window = (getattr(head, "checkpoint_info", None) or {}).get("window") or "abdomen"
    if embeddings is None:
        embeddings = embed_volume(volume, model, slices=zs, window=window, progress=progress)
    tf = embeddings.transform
    out = []
    for i in range(0, len(zs), 32):
        chunk = zs[i:i + 32]
        emb, _, images = slice_tensors(volume, embeddings, chunk, need_label=False)
        if emb.shape[1:] != (head.embed_dim, head.embed_hw, head.embed_hw):
            raise SamliverError(
                f"The head expects embeddings {(head.embed_dim, head.embed_hw, head.embed_hw)} but "
                f"the model gives {emb.shape[1:]}: it was trained for another model.")
        probs = predict_logits(head, emb, images, batch_size=batch_size, tta=tta)
        out.append(np.asarray(tf.mask_to_original(probs.astype(np.float32)), np.float32))
    return zs, np.concatenate(out) if out else np.zeros((0,), np.float32)


def predict_volume(volume: Any, model: Any, head: Any, *, embeddings: Any = None,
                   slices: list[int] | None = None, postprocess_label: bool = True,
                   batch_size: int = 8, progress: bool = True, tta: bool = False,
                   min_lesion_size: int | None = None) -> np.ndarray:
    """Label volume ``(z,y,x)`` uint8 (0 background, 1 liver, 2 tumour) from a trained head.

    ``slices`` (default all) are predicted; other slices stay 0. ``embeddings`` reuses a
    ``VolumeEmbeddings`` (else ``embed_volume`` computes / loads the cache).
    ``postprocess_label`` (default True) applies :func:`postprocess`; ``tta`` (default False)
    averages with the left-right flipped input. ``min_lesion_size`` (voxels, default
    :data:`MIN_LESION_VOXELS`) goes to :func:`postprocess`.

    With a subset of ``slices``, post-processing sees only the predicted slices, stacked in
    order: the empty slices between them (e.g. the labelled ones) would otherwise cut the liver
    into slabs and "largest 3D component" would drop all but one slab.
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


def default_output(volume_arg: str) -> Path:
    """Where ``predict`` writes without ``-o``: beside the volume, ``<stem>_samliver.nii.gz``.

    The sample case (``sample``) writes to ``./outputs/``. A DICOM folder writes beside the
    folder; a ``.dcm`` file beside its series folder.
    """
    if volume_arg == "sample":
        return Path("outputs") / "sample_samliver.nii.gz"
    src = Path(volume_arg).expanduser()
    if src.suffix.lower() == ".dcm":
        src = src.parent
    if src.is_dir():
        return src.parent / f"{src.resolve().name}_samliver.nii.gz"
    stem = src.name.split(".")[0] or src.name
    return src.parent / f"{stem}_samliver.nii.gz"


def main(argv: list[str] | None = None) -> int:
    """``samliver predict VOLUME --head CKPT [-o mask.nii.gz]``: segment a whole volume."""
    from .io import SERIES_UID_HELP
    from .util import check_number, check_output_path

    p = argparse.ArgumentParser(prog="samliver predict", description=main.__doc__)
    p.add_argument("volume", help="CT volume: NIfTI, DICOM folder, .mrc or 'sample'")
    p.add_argument("--head", required=True, help="head checkpoint from `samliver train`")
    p.add_argument("-o", "--output",
                   help="output label NIfTI (default: <stem>_samliver.nii.gz beside the volume; "
                        "./outputs/sample_samliver.nii.gz for 'sample'). Never written over the "
                        "input; an existing file only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--series-uid", help=SERIES_UID_HELP)
    p.add_argument("--model", help="model name (default: the one the head was trained for)")
    p.add_argument("--checkpoint", help="model weights file (SAM / MedSAM)")
    p.add_argument("--no-postprocess", action="store_true")
    p.add_argument("--min-lesion-size", type=int, default=MIN_LESION_VOXELS,
                   help=f"drop predicted lesions smaller than this many voxels (default "
                        f"{MIN_LESION_VOXELS}; 0 keeps all)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the tumour burden as JSON")
    args = p.parse_args(argv)

    from .io import load_volume_arg, save_label_nifti
    from .models import get_model
    from .checkpoints import load_head_checked, read_checkpoint

    # Everything that can be refused is refused before the model loads and slices encode.
    check_number("--min-lesion-size", args.min_lesion_size, minimum=0)
    out = check_output_path(args.output or default_output(args.volume),
                            inputs=(args.volume, args.head, args.checkpoint),
                            overwrite=args.overwrite, what="output")
    try:
        ckpt = read_checkpoint(args.head)
    except SamliverError as err:
        hint = "" if "samliver train" in str(err) else " Give a head written by `samliver train`."
        raise SamliverError(f"{err}{hint}") from err
    volume = load_volume_arg(args.volume, series_uid=args.series_uid)
    name = args.model or ckpt.get("model_name") or "litemedsam"
    model = get_model(name, checkpoint=args.checkpoint, device=args.device)
    head = load_head_checked(args.head, model, device=args.device)
    label = predict_volume(volume, model, head, postprocess_label=not args.no_postprocess,
                           min_lesion_size=args.min_lesion_size)
    path = save_label_nifti(label, volume, out)
    burden = tumour_burden(label, volume.spacing)
    if args.json:
        print(json.dumps({"output": str(path), **burden}))
    else:
        print(f"wrote {path}\n{format_burden(burden)}")
    return 0
