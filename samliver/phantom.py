"""A synthetic abdominal CT phantom with a liver and hypodense lesions, for fast tests.

Beside the real sample case, never instead of it. HU values follow contrast-enhanced
portal-venous CT: air -1000, fat -100, soft tissue/muscle +40, liver +60, lesions about
+25 (hypodense), bone +700, Gaussian noise of 10 HU. The arrays use samliver's display
orientation (see :mod:`samliver.io`): the liver sits on the patient's right = image left.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .io import CTVolume, default_affine_zyx
from .util import SamliverError

HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "liver": 60.0, "lesion": 25.0, "bone": 700.0}


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_phantom(
    shape: tuple[int, int, int] = (32, 128, 128),
    n_lesions: int = 3,
    seed: int = 0,
    spacing: tuple[float, float, float] | None = (2.5, 0.8, 0.8),
    noise_hu: float = 10.0,
) -> CTVolume:
    """Return a phantom ``CTVolume`` ``(z, y, x)`` with label 0/1/2 (default 32x128x128, 3 lesions).

    Lesions are separate ellipsoids (wider in-plane) fully inside the liver, so the label has exactly
    ``n_lesions`` 3D tumour components. Deterministic for a ``seed``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise SamliverError(f"make_phantom needs a 3D shape with every side >= 8, got {shape}.")
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    # normalised coordinates in [-1, 1] per axis
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    hu = np.full(shape, HU["air"], dtype=np.float32)
    body = _ellipsoid((yy, xx), (0.05, 0.0), (0.78, 0.92)) & (np.abs(zz) <= 1.0)
    inner = _ellipsoid((yy, xx), (0.05, 0.0), (0.70, 0.84))
    hu[body] = HU["fat"]
    hu[inner] = HU["soft_tissue"]
    spine = _ellipsoid((yy, xx), (0.55, 0.0), (0.12, 0.10))
    hu[spine & inner] = HU["bone"]
    kidney = _ellipsoid((yy, xx), (0.35, 0.42), (0.14, 0.10)) & (zz > 0.0)
    hu[kidney & inner] = 150.0  # enhancing kidney on the patient's left
    # liver: ellipsoid on the patient's right (image left), tapering towards the feet
    liver_c = (-0.1, -0.05, -0.38)
    liver_r = (0.85, 0.45, 0.40)
    liver = _ellipsoid((zz, yy, xx), liver_c, liver_r) & inner
    if liver.sum() == 0:
        raise SamliverError(f"make_phantom: shape {shape} too small for a liver.")
    hu[liver] = HU["liver"]
    label = liver.astype(np.uint8)

    # lesions: spheres in voxel units, placed by rejection so they stay inside and apart
    from scipy import ndimage

    # in-plane radii are larger than the through-plane one (slices are thicker than pixels)
    f = float(np.clip(min(ny, nx) / nz / 2.0, 1.0, 3.0))
    depth = ndimage.distance_transform_edt(liver, sampling=(1.0, 1.0 / f, 1.0 / f))
    lesions = np.zeros(shape, dtype=bool)
    zi, yi, xi = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    placed = 0
    r_max = max(2.0, min(shape) / 6.0)
    for _ in range(500 * max(1, n_lesions)):
        if placed >= n_lesions:
            break
        r = float(rng.uniform(max(1.0, 0.5 * r_max), r_max))
        cand = np.argwhere(depth > r + 1.0)
        if len(cand) == 0:
            r_max = max(1.0, r_max * 0.8)
            continue
        c = cand[rng.integers(len(cand))]
        sphere = (zi - c[0]) ** 2 + ((yi - c[1]) / f) ** 2 + ((xi - c[2]) / f) ** 2 <= r * r
        grown = ndimage.binary_dilation(lesions, structure=np.ones((3, 3, 3), bool), iterations=2) if lesions.any() else lesions
        if (sphere & grown).any():
            continue
        lesions |= sphere
        placed += 1
    if placed < n_lesions:
        raise SamliverError(f"make_phantom could place only {placed} of {n_lesions} lesions in shape {shape}.")
    hu[lesions] = HU["lesion"]
    label[lesions] = 2
    # mild partial-volume blur, then scanner noise
    hu = ndimage.gaussian_filter(hu, sigma=0.7).astype(np.float32)
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    spacing_t = tuple(float(s) for s in spacing) if spacing is not None else None
    affine = default_affine_zyx(spacing_t) if spacing_t is not None else None
    return CTVolume(hu=hu, spacing=spacing_t, affine=affine, label=label,
                    source=f"phantom(shape={shape}, n_lesions={n_lesions}, seed={seed})",
                    meta={"format": "phantom", "seed": seed})


def write_phantom_dataset(
    root: str | os.PathLike,
    volumes: int = 4,
    shape: tuple[int, int, int] = (32, 128, 128),
    n_lesions: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``volumes`` phantom cases as an MSD task folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``).

    The layout is MSD Task03_Liver's (``liver_<i>.nii.gz`` pairs, a ``dataset.json`` listing
    them), so :func:`samliver.datasets.index_dataset` and every dataset command read it like
    the real 27 GB download. Case ``i`` is ``make_phantom(shape, n_lesions, seed=seed + i)``.
    Files are written atomically; an existing folder is refused unless it is empty.

    Args:
        root: the task folder to create.
        volumes: number of cases (>= 1).
        shape: ``(z, y, x)`` of every case (default 32x128x128).
        n_lesions: lesions per case (default 2).
        seed: seed of case 0 (case ``i`` uses ``seed + i``).

    Returns:
        The task folder.

    Raises:
        SamliverError: fewer than one volume, or ``root`` exists and is not empty.
    """
    from .io import save_volume_nifti
    from .util import atomic_write_text

    if int(volumes) < 1:
        raise SamliverError(f"A phantom dataset needs at least one volume, got {volumes}.")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SamliverError(f"{root} exists and is not an empty folder: choose a new folder.")
    training = []
    for i in range(int(volumes)):
        vol = make_phantom(shape, n_lesions=n_lesions, seed=seed + i)
        name = f"liver_{i}.nii.gz"
        save_volume_nifti(vol.hu, root / "imagesTr" / name, spacing=vol.spacing)
        save_volume_nifti(vol.label, root / "labelsTr" / name, spacing=vol.spacing, label=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "PhantomLiver",
        "description": f"samliver synthetic phantoms, shape {list(shape)}, {n_lesions} lesions, seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2))
    return root
