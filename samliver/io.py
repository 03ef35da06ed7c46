"""CT volumes in and label volumes out: NIfTI, DICOM series and the sample's .mrc.

Every loader returns a :class:`CTVolume` whose arrays are ``(z, y, x)`` with axis 0 axial,
in one display orientation: columns run to the patient's left, rows to posterior, slices
from head to feet (NIfTI axis codes ``L, P, I``). ``imshow`` then shows axial slices in the
radiological convention and coronal/sagittal slices with the head at the top. The source
geometry is kept in ``meta`` so :func:`save_label_nifti` writes a label that lines up with
the original scan in any viewer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .util import SamliverError, atomic_path

# Canonical orientation of our (x, y, z) = (col, row, slice) axes, in nibabel's RAS+ world.
CANONICAL_AXCODES = ("L", "P", "I")
# Sidecar written next to a NIfTI file to record facts the header cannot (e.g. "spacing unknown").
SIDECAR_SUFFIX = ".samliver.json"
LABEL_VALUES = (0, 1, 2)
# Values a CT in Hounsfield units can hold: 16-bit storage after rescale (signed min, unsigned
# max). Anything beyond is not HU (a wrong file, or raw values without rescale).
HU_RANGE = (-32768, 65535)


@dataclass
class CTVolume:
    """A CT scan as plain arrays.

    Attributes:
        hu: float32 ``(z, y, x)`` Hounsfield units, axis 0 axial.
        spacing: ``(z, y, x)`` voxel size in mm, or ``None`` when the source does not record it.
        affine: 4x4 mapping ``(z, y, x, 1)`` voxel indices to world mm, or ``None`` if unknown.
        label: uint8 ``(z, y, x)`` with 0 background, 1 liver, 2 tumour, or ``None``.
        source: where it was read from.
        meta: what the writer needs to put a label back into the source geometry.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    label: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
_SWAP_XZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _xyz_to_zyx_affine(affine_xyz: np.ndarray) -> np.ndarray:
    """Affine for ``(z, y, x)`` indices from one for ``(x, y, z)`` indices."""
    return np.asarray(affine_xyz, dtype=np.float64) @ _SWAP_XZ


def _zyx_to_xyz_affine(affine_zyx: np.ndarray) -> np.ndarray:
    return np.asarray(affine_zyx, dtype=np.float64) @ _SWAP_XZ


def _spacing_from_affine(affine_zyx: np.ndarray) -> tuple[float, float, float]:
    zooms = np.sqrt((np.asarray(affine_zyx)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(v) for v in zooms)  # type: ignore[return-value]


def default_affine_zyx(spacing: tuple[float, float, float] | None) -> np.ndarray:
    """Affine for arrays already in the canonical orientation (unit voxels if spacing unknown)."""
    sz, sy, sx = spacing if spacing is not None else (1.0, 1.0, 1.0)
    affine_xyz = np.diag([-sx, -sy, -sz, 1.0])  # L, P, I in RAS+ world
    return _xyz_to_zyx_affine(affine_xyz)


def _check_exists(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise SamliverError(f"{what.capitalize()} {path} does not exist. Check the path.")


def _squeeze_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim > 3:
        extra = data.shape[3:]
        if all(n == 1 for n in extra):
            data = data.reshape(data.shape[:3])
    if data.ndim != 3 or min(data.shape) < 1:
        raise SamliverError(
            f"{path} holds {data.ndim}-D data of shape {tuple(data.shape)}; samliver needs one 3D "
            "CT volume. Pass a single 3D scan (split 4D series first)."
        )
    return data


def _to_canonical(data_xyz: np.ndarray, affine_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient ``(x, y, z)`` data to :data:`CANONICAL_AXCODES`; return data, affine and the transform."""
    from nibabel import orientations as ornt_mod

    src = ornt_mod.io_orientation(affine_xyz)
    target = ornt_mod.axcodes2ornt(CANONICAL_AXCODES)
    transform = ornt_mod.ornt_transform(src, target)
    data = ornt_mod.apply_orientation(data_xyz, transform)
    affine = affine_xyz @ ornt_mod.inv_ornt_aff(transform, data_xyz.shape)
    return np.ascontiguousarray(data), affine, transform


def _read_sidecar(path: Path) -> dict:
    side = path.with_name(path.name + SIDECAR_SUFFIX)
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise SamliverError(f"Sidecar {side} is unreadable ({err}). Delete it and fetch again.") from err


# ----------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------
def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _read_nifti(path: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a NIfTI file into canonical ``(z, y, x)`` data, its zyx affine and the writer's meta."""
    import nibabel as nib

    _check_exists(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated/corrupt files
        raise SamliverError(
            f"{path} is not a readable NIfTI file ({type(err).__name__}: {err}). The file may be "
            "truncated or corrupt: download or export it again."
        ) from err
    data = _squeeze_3d(np.asarray(data), path)
    source_affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(source_affine)) or abs(np.linalg.det(source_affine[:3, :3])) < 1e-12:
        raise SamliverError(f"{path} has an invalid affine (singular or not finite). Fix its header.")
    canon, affine_xyz, transform = _to_canonical(data, source_affine)
    zyx = np.ascontiguousarray(canon.transpose(2, 1, 0))
    if dtype is not None:
        zyx = zyx.astype(dtype, copy=False)
    hdr = img.header
    meta = {
        "format": "nifti",
        "source_path": str(path),
        "source_shape": tuple(int(n) for n in data.shape),
        "source_affine": source_affine,
        "to_canonical": transform,
        "qform": (img.get_qform(), int(hdr["qform_code"])),
        "sform": (img.get_sform(), int(hdr["sform_code"])),
        "xyzt_units": hdr.get_xyzt_units(),
    }
    return zyx, _xyz_to_zyx_affine(affine_xyz), meta


# ----------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------
def _dicom_files(folder: Path) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        found.append((file, ds))
    return found


def _series_of_file(path: Path) -> str:
    """The SeriesInstanceUID of one ``.dcm`` file (a path to a file selects its series)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad files
        raise SamliverError(f"{path} is not a readable DICOM file ({type(err).__name__}). Pass the "
                            "series folder or another slice of it.") from err
    return str(getattr(ds, "SeriesInstanceUID", "unknown"))


def list_dicom_series(folder: str | os.PathLike) -> dict[str, int]:
    """SeriesInstanceUID -> number of image slices found under ``folder``."""
    out: dict[str, int] = {}
    for _, ds in _dicom_files(Path(folder)):
        uid = str(getattr(ds, "SeriesInstanceUID", "unknown"))
        out[uid] = out.get(uid, 0) + 1
    return out


# Slice positions may differ from an even spacing by this much (mm) plus 1 % of the step:
# DICOM stores positions as decimal strings, rounded by the exporter.
_POSITION_TOLERANCE_MM = 0.01


def _pixel_spacing(ds, file: Path) -> tuple[float, float]:
    """Row and column spacing (mm) of a DICOM slice; a clear error when the tag is missing."""
    value = getattr(ds, "PixelSpacing", None)
    try:
        dr, dc = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SamliverError(
            f"{file} has no valid PixelSpacing tag, so pixel sizes (mm) are unknown. Re-export the "
            "series with PixelSpacing, or convert it to NIfTI with the spacing you know."
        ) from None
    if not (dr > 0 and dc > 0 and np.isfinite(dr) and np.isfinite(dc)):
        raise SamliverError(f"{file} has PixelSpacing {dr}, {dc}; it must be positive. Fix the export.")
    return dr, dc


def _check_series_geometry(items: list, series_uid: str, folder: Path) -> tuple:
    """Sort a series' slices along their normal and check the stack is a regular grid.

    Refuses, naming the problem: differing orientations, positions off the slice normal
    (gantry tilt), two slices at one position, and uneven steps (a missing file, varying
    thickness). samliver never resamples silently: a wrong spacing would make every position,
    exported label and mL volume wrong.

    Returns:
        ``(iop, positions, normal, items)`` with ``items``/``positions`` sorted along the normal.
    """
    def floats(ds, tag: str, n: int, file: Path) -> np.ndarray:
        try:
            out = np.array([float(v) for v in getattr(ds, tag)], dtype=np.float64)
        except (TypeError, ValueError):
            out = np.zeros(0)
        if out.shape != (n,) or not np.all(np.isfinite(out)):
            raise SamliverError(f"{file} has an invalid {tag} tag; fix or re-export the series.")
        return out

    iops = [floats(ds, "ImageOrientationPatient", 6, f) for f, ds in items]
    iop = iops[0]
    for (file, _), other in zip(items, iops):
        if not np.allclose(other, iop, atol=1e-4):
            raise SamliverError(
                f"Series {series_uid} in {folder} mixes slice orientations ({file.name} differs): "
                "export one series with a single orientation.")
    normal = np.cross(iop[:3], iop[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise SamliverError(f"Series {series_uid} in {folder} has an invalid ImageOrientationPatient "
                            f"{iop.tolist()}; fix the export.")
    positions = [floats(ds, "ImagePositionPatient", 3, f) for f, ds in items]
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    items = [items[i] for i in order]
    positions = [positions[i] for i in order]
    if len(positions) < 2:
        return iop, positions, normal, items
    proj = np.array([p @ normal for p in positions])
    steps = np.diff(proj)
    names = [f.name for f, _ in items]
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        i = int(same[0])
        raise SamliverError(
            f"Series {series_uid} in {folder}: {names[i]} and {names[i + 1]} lie at the same position "
            f"({proj[i]:.2f} mm); the folder may hold duplicates or two acquisitions. Keep one file "
            "per slice position.")
    offsets = np.diff(np.array(positions), axis=0)
    off_normal = np.linalg.norm(offsets - np.outer(steps, normal), axis=1)
    if np.any(off_normal > _POSITION_TOLERANCE_MM + 0.01 * steps):
        raise SamliverError(
            f"Series {series_uid} in {folder}: slice positions do not follow the slice normal (gantry "
            f"tilt of up to {np.degrees(np.arctan2(off_normal.max(), steps.min())):.1f} deg). samliver "
            "reads only untilted stacks: correct the tilt (e.g. dcm2niix) and load the NIfTI.")
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > _POSITION_TOLERANCE_MM + 0.01 * step)
    if uneven.size:
        i = int(uneven[0])
        raise SamliverError(
            f"Series {series_uid} in {folder} has uneven slice spacing: {steps[i]:.3f} mm between "
            f"{names[i]} ({proj[i]:.2f} mm) and {names[i + 1]} ({proj[i + 1]:.2f} mm), where the "
            f"usual step is {step:.3f} mm (a missing or extra file?). Load the complete series, or "
            "resample it to even spacing (e.g. dcm2niix) and load the NIfTI.")
    return iop, positions, normal, items


def _read_dicom(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import pydicom

    _check_exists(folder, "folder")
    files = _dicom_files(folder)
    if not files:
        raise SamliverError(
            f"No DICOM image slices (with ImagePositionPatient) found in {folder}. "
            "Point samliver at the folder that holds one CT series."
        )
    series: dict[str, list] = {}
    for file, ds in files:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "unknown")), []).append((file, ds))
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in sorted(series.items()))
            raise SamliverError(
                f"{folder} holds {len(series)} DICOM series: {listing}. Choose one with "
                "series_uid=... (CLI: --series-uid UID, or pass one of its .dcm files)."
            )
        series_uid = next(iter(series))
    if series_uid not in series:
        raise SamliverError(
            f"Series {series_uid} is not in {folder}; found: {', '.join(sorted(series))}. "
            "Pass one of these to --series-uid."
        )
    items = series[series_uid]
    iop, positions, normal, items = _check_series_geometry(items, series_uid, folder)
    row_cos, col_cos = iop[:3], iop[3:]  # direction of increasing column / row index
    dr, dc = _pixel_spacing(items[0][1], items[0][0])
    slices = []
    for file, _ in items:
        try:
            ds = pydicom.dcmread(str(file))
            arr = ds.pixel_array
        except Exception as err:
            raise SamliverError(f"Cannot read pixel data of {file} ({type(err).__name__}: {err}). "
                                "The file may be truncated or compressed with a codec pydicom lacks: "
                                "export it again (uncompressed).") from err
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        if arr.ndim != 2:
            raise SamliverError(f"{file} holds {arr.ndim}-D pixel data; expected one 2D slice.")
        slices.append(arr.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise SamliverError(f"Slices of series {series_uid} in {folder} differ in size: {sorted(shapes)}. "
                            "Export one series whose slices share one size.")
    hu = np.stack(slices)  # (z, y, x) in sorted order
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = normal * float(getattr(items[0][1], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_cos * dr
    lps[:3, 2] = row_cos * dc
    lps[:3, 3] = positions[0]
    ras_zyx = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM world is LPS, ours is RAS (NIfTI)
    canon, affine_xyz, transform = _to_canonical(hu.transpose(2, 1, 0), _zyx_to_xyz_affine(ras_zyx))
    meta = {
        "format": "dicom",
        "source_path": str(folder),
        "series_uid": series_uid,
        "n_files": len(items),
        "to_canonical": transform,
    }
    return np.ascontiguousarray(canon.transpose(2, 1, 0)), _xyz_to_zyx_affine(affine_xyz), meta


# ----------------------------------------------------------------------------------------
# MRC
# ----------------------------------------------------------------------------------------
def read_mrc(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None, dict]:
    import mrcfile

    _check_exists(path)
    try:
        with mrcfile.open(str(path), permissive=True) as mrc:
            if mrc.data is None:
                raise ValueError("no data block")
            data = np.array(mrc.data)
            vs = mrc.voxel_size
            voxel = (float(vs.z), float(vs.y), float(vs.x))
    except SamliverError:
        raise
    except Exception as err:
        raise SamliverError(f"{path} is not a readable MRC file ({err}). Fetch it again.") from err
    data = _squeeze_3d(data, path)
    # MRC stores sections first, so the array is already (z, y, x); 0 voxel size = unknown.
    spacing = voxel if all(v > 0 for v in voxel) else None
    return data, spacing, {"format": "mrc", "source_path": str(path)}


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def _unit_voxels_unknown_units(meta: dict, spacing: tuple) -> bool:
    """True for a NIfTI whose voxels are exactly 1 with no spatial unit: spacing never recorded.

    This is what a writer produces when it does not know the spacing (e.g. our own files
    uploaded without their sidecar); calling it 1 mm would make every mL figure up.
    """
    unit = (meta.get("xyzt_units") or (None,))[0]
    return unit in (None, "unknown") and np.allclose(spacing, 1.0, atol=1e-6)


def _read_any(path: Path, series_uid: str | None, dtype) -> tuple[np.ndarray, tuple | None, np.ndarray | None, dict]:
    """Data ``(z, y, x)``, spacing, zyx affine and meta for any supported source."""
    if not path.exists():
        raise SamliverError(f"{path} does not exist. Check the path (NIfTI file, DICOM folder or .mrc).")
    if path.is_dir() or path.suffix.lower() == ".dcm":
        folder = path if path.is_dir() else path.parent
        if series_uid is None and not path.is_dir():
            series_uid = _series_of_file(path)
        data, affine, meta = _read_dicom(folder, series_uid)
        data = data if dtype is None else data.astype(dtype, copy=False)
        return data, _spacing_from_affine(affine), affine, meta
    if _is_nifti(path):
        data, affine, meta = _read_nifti(path, dtype=dtype)
        side = _read_sidecar(path)
        spacing = _spacing_from_affine(affine)
        if ("spacing" in side and side["spacing"] is None) or _unit_voxels_unknown_units(meta, spacing):
            # the file carries unit voxels only because NIfTI needs some affine
            spacing, affine = None, None
        meta["sidecar"] = side
        return data, spacing, affine, meta
    if path.suffix.lower() in (".mrc", ".map", ".rec"):
        data, spacing, meta = read_mrc(path)
        affine = default_affine_zyx(spacing) if spacing is not None else None
        data = data if dtype is None else data.astype(dtype, copy=False)
        return data, spacing, affine, meta
    raise SamliverError(
        f"{path}: unsupported file type. samliver reads NIfTI (.nii, .nii.gz), a DICOM series "
        "folder and .mrc."
    )


def check_label(label: np.ndarray, where: str = "label") -> np.ndarray:
    """Return ``label`` as uint8 after checking its values are in {0, 1, 2}."""
    arr = np.asarray(label)
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded, atol=1e-3):
            raise SamliverError(
                f"{where} holds non-integer values; a label must hold 0 (background), 1 (liver), "
                "2 (tumour)."
            )
        arr = rounded
    values = np.unique(arr)
    bad = [int(v) if float(v).is_integer() else v for v in values.tolist() if v not in LABEL_VALUES]
    if bad:
        raise SamliverError(
            f"{where} holds values {bad[:10]} outside {{0, 1, 2}} (0 background, 1 liver, "
            "2 tumour). Remap the label first (e.g. merge other organs into 0)."
        )
    return arr.astype(np.uint8)


def load_volume(
    path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    series_uid: str | None = None,
) -> CTVolume:
    """Load a CT volume from a NIfTI file, a DICOM series folder or an .mrc file.

    Args:
        path: a ``.nii``/``.nii.gz`` file (reoriented so axis 0 is axial), a DICOM series
            folder or one ``.dcm`` file of the series, or an ``.mrc`` file.
        label_path: optional label volume (same formats) with values 0/1/2 and the same shape
            and geometry.
        series_uid: which DICOM series to read when the folder holds several.

    Returns:
        A :class:`CTVolume` in HU (float32, ``(z, y, x)``), with ``label`` when one was given.

    Raises:
        SamliverError: an unreadable or unsupported file, values that are not HU (NaN, outside
            the 16-bit range), an irregular DICOM series, or a label of another shape, geometry
            or value set. The message says what to do.
    """
    path = Path(path).expanduser()
    hu, spacing, affine, meta = _read_any(path, series_uid, np.float32)
    if not np.all(np.isfinite(hu)):
        raise SamliverError(f"{path} holds NaN or infinite values. Check the export.")
    lo, hi = float(hu.min()), float(hu.max())
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        raise SamliverError(
            f"{path} holds values {lo:.4g}..{hi:.4g}, outside the Hounsfield range a CT can hold "
            f"({HU_RANGE[0]}..{HU_RANGE[1]}): it is not a CT in HU (wrong file, or missing rescale "
            "slope/intercept). Convert it to HU first.")
    label = None
    if label_path is not None:
        label_path = Path(label_path).expanduser()
        lab, _, lab_affine, _ = _read_any(label_path, None, None)
        if lab.shape != hu.shape:
            raise SamliverError(
                f"Label {label_path} has shape {lab.shape} (z, y, x) but image {path} has "
                f"{hu.shape}. Pass the label that belongs to this image."
            )
        if affine is not None and lab_affine is not None and not np.allclose(affine, lab_affine, atol=1e-2):
            raise SamliverError(
                f"Label {label_path} and image {path} have different geometry (affines differ). "
                "Pass the label that belongs to this image."
            )
        label = check_label(lab, where=f"Label {label_path}")
    return CTVolume(hu=hu, spacing=spacing, affine=affine, label=label, source=str(path), meta=meta)


def nifti_affine(volume: CTVolume) -> np.ndarray:
    """The NIfTI (x, y, z)-index affine of a volume whose source is not NIfTI (DICOM, MRC, arrays).

    Its world affine when it has one, else unit (or spacing-sized) voxels in L, P, I: the
    geometry :func:`save_label_nifti` writes such a volume's labels in, so a CT written with it
    lines up with them in any viewer.

    Args:
        volume: the volume.

    Returns:
        A 4x4 float64 affine for data transposed to (x, y, z).
    """
    if volume.affine is not None:
        return _zyx_to_xyz_affine(np.asarray(volume.affine, dtype=np.float64))
    return _zyx_to_xyz_affine(default_affine_zyx(volume.spacing))


def save_label_nifti(label_zyx: np.ndarray, volume: CTVolume, path: str | os.PathLike) -> Path:
    """Write a ``(z, y, x)`` label as uint8 NIfTI in ``volume``'s source geometry (atomically).

    NIfTI sources get back their exact shape, axis order, affine and q/s-form; other sources
    get the world affine of the volume (unit voxels when it has none).

    Args:
        label_zyx: labels 0 background, 1 liver, 2 tumour, shaped like ``volume.hu``.
        volume: the volume the label belongs to (its geometry is written).
        path: the output, ending in ``.nii`` or ``.nii.gz``.

    Returns:
        ``path``.

    Raises:
        SamliverError: another extension, or a label of the wrong shape or values.
    """
    import nibabel as nib
    from nibabel import orientations as ornt_mod

    path = Path(path)
    if not _is_nifti(path):
        raise SamliverError(f"{path}: label output must end in .nii or .nii.gz.")
    label = np.asarray(label_zyx)
    if label.shape != volume.shape:
        raise SamliverError(
            f"Label shape {label.shape} does not match the volume {volume.source} shape {volume.shape}."
        )
    label = check_label(label, where="The label to save")
    data = label.transpose(2, 1, 0)
    meta = volume.meta or {}
    if meta.get("format") == "nifti" and "to_canonical" in meta:
        target = ornt_mod.axcodes2ornt(CANONICAL_AXCODES)
        src = ornt_mod.io_orientation(meta["source_affine"])
        back = ornt_mod.ornt_transform(target, src)
        data = ornt_mod.apply_orientation(data, back)
        if tuple(data.shape) != tuple(meta["source_shape"]):
            raise SamliverError(f"Internal error: label back-orientation gave shape {data.shape}.")
        img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), meta["source_affine"])
        qform, qcode = meta["qform"]
        sform, scode = meta["sform"]
        img.set_qform(qform, code=qcode)
        img.set_sform(sform, code=scode)
        img.header.set_xyzt_units(*meta["xyzt_units"])
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), nifti_affine(volume))
        # unknown spacing stays unknown: unit voxels without a unit, as load_volume reads back
        img.header.set_xyzt_units("mm" if volume.spacing is not None else "unknown")
    img.header.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_volume_nifti(
    hu_zyx: np.ndarray,
    path: str | os.PathLike,
    *,
    spacing: tuple[float, float, float] | None = None,
    label: bool = False,
) -> Path:
    """Write canonical ``(z, y, x)`` data to NIfTI (atomically) so :func:`load_volume` returns it as is.

    ``spacing`` None: unit voxels, and a sidecar records that the spacing is unknown.
    ``label``: store as uint8 (values checked) instead of float32.
    """
    import nibabel as nib

    path = Path(path)
    arr = check_label(hu_zyx, where=str(path)) if label else np.asarray(hu_zyx, dtype=np.float32)
    if arr.ndim != 3:
        raise SamliverError(f"save_volume_nifti needs 3D data, got shape {arr.shape}.")
    img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)),
                          _zyx_to_xyz_affine(default_affine_zyx(spacing)))
    img.header.set_xyzt_units("mm" if spacing is not None else "unknown")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    side = path.with_name(path.name + SIDECAR_SUFFIX)
    from .util import atomic_write_text

    atomic_write_text(side, json.dumps({"spacing": list(spacing) if spacing else None}, indent=2))
    return path


# ----------------------------------------------------------------------------------------
# summaries and `samliver info`
# ----------------------------------------------------------------------------------------
def count_lesions(label: np.ndarray) -> int:
    """Number of tumour (label 2) components in 3D, 26-connected."""
    from scipy import ndimage

    _, n = ndimage.label(np.asarray(label) == 2, structure=np.ones((3, 3, 3), dtype=bool))
    return int(n)


def summarise_volume(volume: CTVolume) -> dict:
    """Shape, spacing, HU range and, with a label, voxels per class and 3D lesion count."""
    hu = volume.hu
    out: dict = {
        "source": volume.source,
        "shape_zyx": list(volume.shape),
        "spacing_zyx_mm": list(volume.spacing) if volume.spacing is not None else None,
        "units": "mm" if volume.spacing is not None else "voxels (spacing unknown)",
        "hu_min": float(hu.min()),
        "hu_max": float(hu.max()),
        "hu_mean": float(hu.mean()),
    }
    if volume.label is not None:
        lab = volume.label
        counts = np.bincount(lab.ravel(), minlength=3)
        out["labels_present"] = [int(v) for v in np.nonzero(counts)[0]]
        out["voxels"] = {"background": int(counts[0]), "liver": int(counts[1]), "tumour": int(counts[2])}
        out["liver_incl_tumour_voxels"] = int(counts[1] + counts[2])
        out["lesions_3d"] = count_lesions(lab)
        if volume.spacing is not None:
            ml = float(np.prod(volume.spacing)) / 1000.0
            out["volume_ml"] = {
                "liver_incl_tumour": round(float(counts[1] + counts[2]) * ml, 2),
                "tumour": round(float(counts[2]) * ml, 2),
            }
    return out


def format_summary(summary: dict) -> str:
    """Human-readable lines for :func:`summarise_volume`'s dict."""
    lines = [f"source:   {summary['source']}", f"shape:    {tuple(summary['shape_zyx'])} (z, y, x)"]
    sp = summary["spacing_zyx_mm"]
    lines.append("spacing:  unknown (sizes in voxels)" if sp is None else
                 f"spacing:  {tuple(round(v, 3) for v in sp)} mm (z, y, x)")
    lines.append(f"HU range: [{summary['hu_min']:.1f}, {summary['hu_max']:.1f}], mean {summary['hu_mean']:.1f}")
    if "voxels" in summary:
        v = summary["voxels"]
        lines.append(f"labels:   {summary['labels_present']} (0 background, 1 liver, 2 tumour)")
        lines.append(f"liver:    {summary['liver_incl_tumour_voxels']} voxels incl. tumour "
                     f"({v['liver']} liver-only)")
        lines.append(f"tumour:   {v['tumour']} voxels in {summary['lesions_3d']} lesion(s) (3D components)")
        if "volume_ml" in summary:
            ml = summary["volume_ml"]
            lines.append(f"volumes:  liver {ml['liver_incl_tumour']} mL, tumour {ml['tumour']} mL")
    return "\n".join(lines)
