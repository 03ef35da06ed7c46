"""``samliver predict VOLUME --head CKPT``: segment a whole volume with a trained head."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoints import load_head_checked, read_checkpoint
from ..inference import predict_volume
from ..io import save_label_nifti
from ..postprocess import MIN_LESION_VOXELS, format_burden, tumour_burden
from ..util import SamliverError, check_number, check_output_path
from . import options


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
    p = argparse.ArgumentParser(prog="samliver predict", description=main.__doc__)
    options.add_volume(p, label=False)
    p.add_argument("--head", required=True, help="head checkpoint from `samliver train`")
    p.add_argument("-o", "--output",
                   help="output label NIfTI (default: <stem>_samliver.nii.gz beside the volume; "
                        "./outputs/sample_samliver.nii.gz for 'sample'). Never written over the "
                        "input; an existing file only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    options.add_model(p, default=None)
    p.add_argument("--no-postprocess", action="store_true")
    p.add_argument("--min-lesion-size", type=int, default=MIN_LESION_VOXELS,
                   help=f"drop predicted lesions smaller than this many voxels (default "
                        f"{MIN_LESION_VOXELS}; 0 keeps all)")
    options.add_json(p, "the tumour burden")
    args = p.parse_args(argv)

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
    volume = options.load_volume(args)
    # The model the head was trained for, unless --model says otherwise.
    model = options.load_model(args, name=args.model or ckpt.get("model_name"))
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
