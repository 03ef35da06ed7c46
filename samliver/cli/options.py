"""Option groups shared by the commands, so each is declared, parsed and checked in one place.

Every command that reads a CT takes the volume the same way (a path, a DICOM folder or file,
an ``.mrc`` file, or ``sample`` for the LiTS sample case) with ``--label`` and ``--series-uid``;
every command that encodes slices takes ``--model/--checkpoint/--device``; every command that
windows HU takes ``--window``. ``--backend``/``--precision`` are global (``samliver.cli``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..config import DEFAULT_MODEL, DEFAULT_WINDOW
from ..models import MODEL_NAMES
from ..sample import SERIES_UID_HELP

if TYPE_CHECKING:  # pragma: no cover
    from ..io import CTVolume
    from ..models import SamModel

VOLUME_HELP = ("CT volume: a NIfTI file, a DICOM folder (or one .dcm file of the series), an .mrc "
               "file, or 'sample' for the LiTS sample case")


def add_volume(parser: argparse.ArgumentParser, *, optional: bool = False, label: bool = True) -> None:
    """``VOLUME`` (``sample`` when ``optional`` and omitted), ``--label``, ``--series-uid``."""
    if optional:
        parser.add_argument("volume", nargs="?", default="sample", help=VOLUME_HELP + " (default: sample)")
    else:
        parser.add_argument("volume", help=VOLUME_HELP)
    if label:
        parser.add_argument("--label", help="label volume for VOLUME (0 background, 1 liver, 2 tumour)")
    parser.add_argument("--series-uid", help=SERIES_UID_HELP)


def load_volume(args: argparse.Namespace) -> "CTVolume":
    """The volume named by :func:`add_volume`'s options (series UID and label included)."""
    from ..sample import load_volume_arg

    return load_volume_arg(args.volume, getattr(args, "label", None), series_uid=args.series_uid)


def add_dataset(parser: argparse.ArgumentParser) -> None:
    """``DATASET``: a folder of labelled volumes (:func:`samliver.datasets.index_dataset`'s layouts)."""
    parser.add_argument("dataset", help="MSD task folder (dataset.json, imagesTr/, labelsTr/), LiTS "
                                        "folder (volume-N.nii, segmentation-N.nii) or images/ + labels/ folder")


def add_model(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL) -> None:
    """``--model`` (default LiteMedSAM, or None: decided by the command), ``--checkpoint``, ``--device``."""
    shown = f" (default {default})" if default else ""
    parser.add_argument("--model", default=default, metavar="MODEL",
                        help=f"SAM model: {', '.join(MODEL_NAMES)}{shown}")
    parser.add_argument("--checkpoint", help="model weights file (default: the model's own, "
                                             "downloaded by `samliver download-checkpoint MODEL`)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")


def load_model(args: argparse.Namespace, name: str | None = None) -> "SamModel":
    """The model named by :func:`add_model`'s options (``name`` overrides ``--model``)."""
    from ..models import get_model

    return get_model(name or args.model or DEFAULT_MODEL, checkpoint=args.checkpoint, device=args.device)


def add_window(parser: argparse.ArgumentParser) -> None:
    """``--window NAME`` or ``--window=LO,HI`` (HU), checked when parsed."""
    from ..preprocess import parse_window_arg

    # A bad window raises SamliverError (not ValueError), so argparse lets our one-line message
    # through instead of replacing it with its usage text.
    parser.add_argument("--window", default=DEFAULT_WINDOW, type=parse_window_arg,
                        help=f"HU window name or lo,hi, e.g. --window=-160,240 (default {DEFAULT_WINDOW})")


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: machine-readable output on stdout."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")

