"""Datasets and splits: MSD Task03_Liver, LiTS, generic image/label folders; splits by
volume and by slice (the two sample protocols); a resumable, checksum-checked downloader.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import PROTOCOLS
from .download import download_file
from .util import SamliverError, atomic_write_text

# ----------------------------------------------------------------------------------------
# splits by slice (the sample protocols: config.PROTOCOLS, docs/design.md)
# ----------------------------------------------------------------------------------------
_REF_DEPTH = 128  # the protocols are defined on the 128-slice sample and scaled to other depths
_SLAB_GAP = 8  # slices left out between a slab's labelled pool and its test block (slab: z 64-71)


def liver_slices(label: np.ndarray) -> list[int]:
    """Axial indices ``z`` whose slice contains liver (label >= 1)."""
    lab = np.asarray(label)
    if lab.ndim != 3:
        raise SamliverError(f"Expected a 3D (z, y, x) label, got shape {lab.shape}.")
    return [int(z) for z in np.nonzero((lab >= 1).any(axis=(1, 2)))[0]]


def _spread(pool: Sequence[int], k: int) -> list[int]:
    """``k`` items of ``pool`` at evenly spread positions (ends included; one item: the middle)."""
    pool = list(pool)
    if k >= len(pool):
        return pool
    if k == 1:
        return [pool[len(pool) // 2]]
    idx = np.round(np.linspace(0, len(pool) - 1, k)).astype(int)
    return sorted({pool[i] for i in idx})


def protocol_split(label: np.ndarray, protocol: str = "sparse", k: int = 8,
                   split: int = 0) -> tuple[list[int], list[int]]:
    """Labelled (train) and test axial slices of a sample protocol (default sparse, K=8).

    Fixed protocols (``split`` is ignored):

    - ``sparse``: train z = round(linspace(4, 123, k)) on 128 slices (scaled to the depth), test
      = every other slice. K = 1 takes the middle (z = 64): linspace's one point is its first
      end, a slice at the edge of the liver, which is not the slice anyone would annotate alone.
    - ``slab``: pool z in [0, 64) with liver, k spread evenly over it; test z in [72, 128)
      (scaled to the depth).

    Protocols drawn from the seed ``split`` (``numpy.random.default_rng(split)``; the draw does
    not depend on ``k``, so every K of one split uses the same blocks / offset):

    - ``slab-random``: over the liver's z-range (first to last slice with liver, ``n`` slices),
      a labelled block of ``L = round(n / 3)`` slices and a test block of ``L`` slices,
      separated by a gap of 8 slices (scaled to the depth, at least 1) that is neither
      labelled nor tested, so a test slice is never the direct neighbour of a labelled one. The
      order (labelled block above or below) is a coin flip and the pair is placed at a uniform
      offset in the z-range. The k labelled slices are spread evenly over the liver slices of
      the labelled block (as in ``slab``); every slice of the test block is tested.
    - ``sparse-random``: k slices evenly spaced over the liver slices (step ``s = m / k`` for
      ``m`` liver slices) starting at a random offset ``u * s``, ``u`` uniform in [0, 1); test =
      every other slice of the volume, as in ``sparse``: the question is still "annotate K
      slices, segment all the rest", and the neighbours of a labelled slice are part of the
      rest a user needs (leakage to unseen anatomy is what the slab protocols measure).

    Both lists are sorted and disjoint.

    Args:
        label: the (z, y, x) reference label.
        protocol: one of :data:`PROTOCOLS`.
        k: labelled slices (>= 1).
        split: the seed of a random protocol's draw (>= 0).

    Returns:
        ``(train, test)`` slice indices.

    Raises:
        SamliverError: a label that is not 3D, an unknown protocol, a negative split, or a K
            that does not fit the protocol's labelled pool.
    """
    lab = np.asarray(label)
    if lab.ndim != 3:
        raise SamliverError(f"protocol_split expects a 3D (z, y, x) label, got shape {lab.shape}.")
    if k < 1:
        raise SamliverError(f"protocol_split needs k >= 1, got {k}.")
    if protocol not in PROTOCOLS:
        raise SamliverError(f"Unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    if split < 0:
        raise SamliverError(f"The split seed must be >= 0, got {split}.")
    depth = lab.shape[0]
    s = depth / _REF_DEPTH
    if protocol == "sparse":
        z = np.round(np.linspace(4 * s, 123 * s, k) if k > 1 else [63.5 * s]).astype(int)
        train = sorted({int(v) for v in np.clip(z, 0, depth - 1)})
        test = [z for z in range(depth) if z not in set(train)]
        return train, test
    if protocol == "slab":
        pool_end, test_start = int(round(64 * s)), int(round(72 * s))
        pool = [z for z in liver_slices(lab) if z < pool_end]
        if not pool:
            raise SamliverError(f"slab protocol: no liver in slices [0, {pool_end}) of this volume.")
        if k > len(pool):
            raise SamliverError(
                f"slab protocol: k={k} but only {len(pool)} slices in [0, {pool_end}) contain liver: "
                "choose a smaller K.")
        return _spread(pool, k), list(range(test_start, depth))
    liver = liver_slices(lab)
    if not liver:
        raise SamliverError(f"{protocol} protocol: the label has no liver (no voxel >= 1).")
    rng = np.random.default_rng(split)
    if protocol == "sparse-random":
        if k > len(liver):
            raise SamliverError(f"sparse-random protocol: k={k} but only {len(liver)} slices contain "
                                "liver: choose a smaller K.")
        step = len(liver) / k
        idx = np.floor(rng.uniform(0, 1) * step + step * np.arange(k)).astype(int)
        train = sorted({liver[i] for i in np.clip(idx, 0, len(liver) - 1)})
        return train, [z for z in range(depth) if z not in set(train)]
    # slab-random
    first, n = liver[0], liver[-1] - liver[0] + 1
    length, gap = int(round(n / 3)), max(1, int(round(_SLAB_GAP * s)))
    if length < 1 or 2 * length + gap > n:
        raise SamliverError(f"slab-random protocol: the liver spans {n} slices, too few for two "
                            f"blocks of {max(length, 1)} and a gap of {gap}: use sparse-random.")
    labelled_first = bool(rng.integers(2))
    offset = first + int(rng.integers(0, n - (2 * length + gap) + 1))
    lo, hi = (offset, offset + length + gap) if labelled_first else (offset + length + gap, offset)
    pool = [z for z in liver if lo <= z < lo + length]
    if k > len(pool):
        raise SamliverError(f"slab-random protocol: k={k} but split {split}'s labelled block "
                            f"(z {lo}-{lo + length - 1}) has only {len(pool)} liver slices: "
                            "choose a smaller K.")
    return _spread(pool, k), list(range(hi, hi + length))


def select_label_slices(label: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """``k`` axial slices spread evenly over the slices that contain liver (sorted).

    seed 0 takes the centred grid (one slice in the middle of each of ``k`` equal runs);
    other seeds shift the grid by a random fraction of a run, deterministically.
    """
    pool = liver_slices(label)
    if not pool:
        raise SamliverError("select_label_slices: the label has no liver (no voxel >= 1).")
    if k >= len(pool):
        return pool
    if k < 1:
        raise SamliverError(f"select_label_slices needs k >= 1, got {k}.")
    step = len(pool) / k
    offset = 0.5 * step if seed == 0 else float(np.random.default_rng(seed).uniform(0, step))
    idx = np.clip(np.floor(offset + step * np.arange(k)).astype(int), 0, len(pool) - 1)
    return sorted({pool[i] for i in idx})


SLICE_MODES = ("all", "liver")


def slices_to_encode(label: np.ndarray | None, depth: int, mode: str = "all", margin: int = 0) -> list[int]:
    """Axial slices of a volume to encode: every slice, or the liver's z-range widened by ``margin``.

    Args:
        label: the volume's (z, y, x) label (needed for ``"liver"``).
        depth: number of slices of the volume.
        mode: ``"all"`` (default) or ``"liver"`` (from the first to the last slice with liver,
            plus ``margin`` slices each side, clipped to the volume).
        margin: slices added each side of the liver range (default 0).

    Returns:
        Sorted slice indices (empty for ``"liver"`` when the label has no liver).

    Raises:
        SamliverError: an unknown mode, a negative margin, or ``"liver"`` without a label.
    """
    if mode not in SLICE_MODES:
        raise SamliverError(f"Unknown slice selection {mode!r}; use one of {', '.join(SLICE_MODES)}.")
    if margin < 0:
        raise SamliverError(f"The liver margin must be >= 0 slices, got {margin}.")
    if mode == "all":
        return list(range(int(depth)))
    if label is None:
        raise SamliverError("Encoding only liver slices needs the label: use --slices all for "
                            "unlabelled volumes.")
    liver = liver_slices(label)
    if not liver:
        return []
    return list(range(max(0, liver[0] - margin), min(int(depth), liver[-1] + margin + 1)))


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` ordered items.

    The shares of ranks ``0..world_size-1`` are disjoint, cover ``0..n-1`` and differ in size
    by at most one. Contiguous (not strided) so that a rank touches only the few volumes its
    slices belong to.

    Raises:
        SamliverError: a rank outside ``0..world_size-1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamliverError(f"Rank {rank} is not in 0..{world_size - 1}.")
    return n * rank // world_size, n * (rank + 1) // world_size


# ----------------------------------------------------------------------------------------
# dataset indexes
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One image/label pair of a dataset (label None for unlabelled test images)."""

    case_id: str
    image: Path
    label: Path | None = None

    def load(self):
        """The case as a :class:`samliver.io.CTVolume`."""
        from .io import load_volume

        return load_volume(self.image, self.label)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _nifti_files(folder: Path, recursive: bool = False) -> list[Path]:
    """NIfTI files in ``folder`` (not sidecars, not macOS ``._`` resource files)."""
    found = folder.rglob("*.nii*") if recursive else folder.glob("*.nii*")
    return sorted(p for p in found if p.name.lower().endswith((".nii", ".nii.gz"))
                  and not p.name.startswith("."))


def _numeric_key(case: Case) -> tuple:
    nums = re.findall(r"\d+", case.case_id)
    return (int(nums[-1]) if nums else -1, case.case_id)


def index_msd(root: str | os.PathLike) -> list[Case]:
    """Cases of an MSD task folder (e.g. ``Task03_Liver``) from its ``dataset.json``.

    Training pairs come from ``training``; ``test`` images are added with label None.
    """
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.exists():
        raise SamliverError(
            f"{meta_file} not found: {root} is not an MSD task folder (expected dataset.json, "
            "imagesTr/, labelsTr/)."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise SamliverError(f"{meta_file} is not valid JSON ({err}).") from err
    cases = []
    for item in meta.get("training", []):
        image, label = root / item["image"], root / item["label"]
        # dataset.json lists "./imagesTr/x.nii.gz"; macOS archives add "._x" files we skip
        if not image.exists():
            raise SamliverError(f"{image} (listed in {meta_file}) is missing. Re-extract the archive.")
        if not label.exists():
            raise SamliverError(f"{label} (listed in {meta_file}) is missing. Re-extract the archive.")
        cases.append(Case(_nifti_stem(image), image, label))
    for item in meta.get("test", []):
        image = root / (item if isinstance(item, str) else item["image"])
        if image.exists():
            cases.append(Case(_nifti_stem(image), image, None))
    return sorted(cases, key=_numeric_key)


def index_lits(root: str | os.PathLike) -> list[Case]:
    """Cases of a LiTS folder: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` (searched recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise SamliverError(f"LiTS folder {root} does not exist.")
    volumes: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for p in _nifti_files(root, recursive=True):
        m = re.fullmatch(r"(volume|segmentation)-(\d+)\.nii(\.gz)?", p.name)
        if m:
            (volumes if m.group(1) == "volume" else labels)[m.group(2)] = p
    if not volumes:
        raise SamliverError(f"No volume-N.nii files found under {root}. See data_scripts/GET_LITS.md.")
    cases = [Case(f"volume-{n}", volumes[n], labels.get(n)) for n in volumes]
    return sorted(cases, key=_numeric_key)


def index_pairs(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    *,
    label_suffix: str = "",
) -> list[Case]:
    """Generic folder of image/label NIfTI pairs matched by file name.

    ``label_dir`` None: labels are looked for beside the images as ``<stem><label_suffix>``
    (e.g. ``label_suffix="_label"``). Images without a label get label None.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise SamliverError(f"Image folder {image_dir} does not exist.")
    label_dir = Path(label_dir) if label_dir is not None else image_dir
    if not label_dir.is_dir():
        raise SamliverError(f"Label folder {label_dir} does not exist.")
    if label_dir == image_dir and not label_suffix:
        raise SamliverError("index_pairs: give label_dir or a label_suffix to tell labels from images.")
    label_files = {_nifti_stem(p): p for p in _nifti_files(label_dir)}
    cases = []
    for img in _nifti_files(image_dir):
        stem = _nifti_stem(img)
        if label_suffix and stem.endswith(label_suffix):
            continue
        cases.append(Case(stem, img, label_files.get(stem + label_suffix)))
    if not cases:
        raise SamliverError(f"No NIfTI images (.nii, .nii.gz) in {image_dir}.")
    return sorted(cases, key=_numeric_key)


def index_dataset(root: str | os.PathLike) -> list[Case]:
    """Index a folder that is an MSD task, a LiTS folder or an ``images/`` + ``labels/`` pair folder."""
    root = Path(root)
    if (root / "dataset.json").exists():
        return index_msd(root)
    if root.is_dir() and any(root.rglob("volume-*.nii*")):
        return index_lits(root)
    for img, lab in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / img).is_dir() and (root / lab).is_dir():
            return index_pairs(root / img, root / lab)
    raise SamliverError(
        f"{root}: not an MSD task (dataset.json), a LiTS folder (volume-N.nii) or a folder with "
        "images/ and labels/."
    )


def split_by_volume(
    cases: Sequence,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list]:
    """Shuffle ``cases`` with ``seed`` and split into ``train``/``val``/``test`` (defaults 80/0/20).

    Deterministic for a seed; every case lands in exactly one part; test gets at least one
    case when ``test_fraction > 0``.
    """
    cases = list(cases)
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise SamliverError(f"Bad split fractions test={test_fraction}, val={val_fraction}.")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = int(round(len(cases) * test_fraction))
    n_val = int(round(len(cases) * val_fraction))
    if test_fraction > 0:
        n_test = max(1, n_test)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_test + n_val >= len(cases):
        raise SamliverError(f"Only {len(cases)} cases: too few for this split.")
    test = [cases[i] for i in order[:n_test]]
    val = [cases[i] for i in order[n_test:n_test + n_val]]
    train = [cases[i] for i in order[n_test + n_val:]]
    return {"train": train, "val": val, "test": test}


# ----------------------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------------------
# The official MSD Task03_Liver archive (mirror used by MONAI's DecathlonDataset) and its
# published MD5; the original Google Drive release is the same tar.
MSD_LIVER_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task03_Liver.tar"
MSD_LIVER_MD5 = "a90ec6c4aa7f6a3d087205e23d4e6397"


def _safe_extract(archive: Path, out_dir: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            root = out_dir.resolve()
            for member in tar.getmembers():
                target = (out_dir / member.name).resolve()
                if root not in target.parents and target != root:
                    raise SamliverError(f"{archive}: unsafe path {member.name!r} in the archive.")
                if member.issym() or member.islnk():
                    raise SamliverError(f"{archive}: links are not allowed in the archive ({member.name}).")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and patched 3.8+)
                tar.extractall(out_dir, filter="data")
            else:  # pragma: no cover
                tar.extractall(out_dir)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SamliverError(f"{archive} is not a readable tar archive ({err}). Delete it and download again.") from err


def download_msd_liver(
    dest_dir: str | os.PathLike,
    *,
    url: str = MSD_LIVER_URL,
    sha256: str | None = None,
    md5: str | None = MSD_LIVER_MD5,
    extract: bool = True,
    keep_archive: bool = True,
    progress: bool = True,
) -> Path:
    """Download (resumable) and extract MSD ``Task03_Liver`` into ``dest_dir``; return the task folder.

    Default: the official archive checked against its published MD5 (pass ``sha256`` to use
    SHA-256 instead). Idempotent: a complete extraction (``.complete`` marker) is reused.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SamliverError(f"Cannot create {dest_dir} ({err.strerror}). Choose a writable folder.") from err
    if not os.access(dest_dir, os.W_OK):
        raise SamliverError(f"{dest_dir} is not writable. Choose a writable folder.")
    name = Path(url.split("?")[0]).name or "Task03_Liver.tar"
    task_name = re.sub(r"(\.tar(\.gz)?|\.tgz)$", "", name)
    task_dir = dest_dir / task_name
    marker = dest_dir / f".{task_name}.complete"
    if marker.exists() and (task_dir / "dataset.json").exists():
        return task_dir
    archive = download_file(url, dest_dir / name, sha256=sha256, md5=None if sha256 else md5,
                            progress=progress)
    if not extract:
        return archive
    _safe_extract(archive, dest_dir)
    if not (task_dir / "dataset.json").exists():
        raise SamliverError(f"{archive} did not contain {task_name}/dataset.json.")
    # macOS tar adds "._*" resource files beside the images; they are not NIfTI
    for junk in task_dir.rglob("._*"):
        junk.unlink()
    atomic_write_text(marker, json.dumps({"url": url, "archive": archive.name}))
    if not keep_archive:
        archive.unlink()
    return task_dir

