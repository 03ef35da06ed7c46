"""The embedding cache: one frozen-encoder embedding per slice, computed once, read lazily.

Layout: ``$SAMLIVER_HOME/embeddings/<model>/<key hash>/`` holding ``key.json`` (the full key)
and one ``z<zzzz>.npy`` float16 (256, 64, 64) file per slice (2 MiB). The key is the model
name, its weights SHA-256, the preprocessing parameters (model input size and normalisation,
HU window) and the SHA-256 of the volume's HU data, so a changed window, model, checkpoint or
volume never reuses stale embeddings. Every file is written atomically (temp file + rename),
so concurrent writers and crashes leave either a whole slice or none. On load the stored key
is compared with the requested one and each slice file's header (dtype, shape) and size are
checked; anything that does not match is recomputed, never used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .config import DEFAULT_WINDOW
from .util import SamliverError, atomic_path, atomic_write_text, cache_dir, check_slices, sha256_array

CACHE_FORMAT = 2  # bump when the on-disk layout or preprocessing code changes meaning
_EMB_SHAPE = (256, 64, 64)
FINE_STAGE = "layers.0"  # the encoder stage embed_fine_features caches
_FINE_SHAPES: dict[tuple, tuple] = {}  # (model name, input size) -> one slice's fine-feature shape


def _hu_of(volume) -> np.ndarray:
    hu = getattr(volume, "hu", volume)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise SamliverError(f"Expected a CT volume (z, y, x); got an array of shape {hu.shape}.")
    return hu


def _resolve_window(window) -> tuple[float, float]:
    from .preprocess import WINDOWS

    if isinstance(window, str):
        if window not in WINDOWS:
            raise SamliverError(f"Unknown window {window!r}; choose one of {', '.join(WINDOWS)} or give (lo, hi) in HU.")
        lo, hi = WINDOWS[window]
    else:
        try:
            lo, hi = (float(v) for v in window)
        except (TypeError, ValueError) as err:
            raise SamliverError(f"A window is a name or (lo, hi) in HU, got {window!r}.") from err
    if not hi > lo:
        raise SamliverError(f"Window {window!r} is empty: hi must be above lo.")
    return float(lo), float(hi)


def cache_key(volume, model, window=DEFAULT_WINDOW) -> dict:
    """The cache key for ``volume`` encoded by ``model`` with HU ``window`` (a plain dict)."""
    hu = _hu_of(volume)
    lo, hi = _resolve_window(window)
    return {
        "format": CACHE_FORMAT,
        "model": model.name,
        "weights": model.weights_id,
        "preprocessing": model.preprocessing_params(),
        "backend": model.backend,
        "precision": model.precision,
        "window": [lo, hi],
        "volume_sha256": sha256_array(hu),
        "volume_shape": list(hu.shape),
    }


def _key_hash(key: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class VolumeEmbeddings:
    """Cached embeddings of one volume: ``emb[z]`` -> float16 (256, 64, 64), memory-mapped.

    Attributes: model_name, weights_id, window (lo, hi), original_hw, slices (the requested,
    computed z list), computed (those the last embed_volume call encoded), transform (the model's SliceTransform for this slice size), key, path.
    """

    def __init__(self, path: Path, key: dict, slices: list[int], original_hw: tuple[int, int], image_size: int,
                 shape: tuple[int, int, int] | None = None):
        from .preprocess import SliceTransform

        self.shape = tuple(shape) if shape is not None else _EMB_SHAPE  # one slice's array
        self.path = Path(path)
        self.key = key
        self.model_name: str = key["model"]
        self.weights_id: str = key["weights"]
        self.window: tuple[float, float] = tuple(key["window"])  # type: ignore[assignment]
        self.original_hw = tuple(int(v) for v in original_hw)
        self.slices = sorted(int(z) for z in slices)
        self.computed: list[int] = []  # slices the last embed_volume call encoded (the rest were cached)
        self.image_size = int(image_size)
        self.transform = SliceTransform(self.original_hw, target=self.image_size)

    def slice_path(self, z: int) -> Path:
        return self.path / f"z{int(z):04d}.npy"

    def available(self) -> list[int]:
        """All slices of this volume/key present on disk (including ones not requested)."""
        return sorted(int(p.stem[1:]) for p in self.path.glob("z*.npy"))

    def __contains__(self, z: int) -> bool:
        return _read_slice(self.slice_path(z), self.shape) is not None

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, z: int) -> np.ndarray:
        arr = _read_slice(self.slice_path(z), self.shape)
        if arr is None:
            raise SamliverError(
                f"Slice {z} has no valid cached embedding in {self.path}: "
                f"run embed_volume(volume, model, slices=[{z}]) first."
            )
        return arr

    def stack(self, zs=None) -> np.ndarray:
        """float32 (N, 256, 64, 64) (``(N, *self.shape)``) for slices ``zs`` (default: ``self.slices``)."""
        zs = self.slices if zs is None else list(zs)
        if not zs:
            return np.zeros((0, *self.shape), np.float32)
        return np.stack([np.asarray(self[z], dtype=np.float32) for z in zs])

    def __repr__(self) -> str:
        return (
            f"VolumeEmbeddings(model={self.model_name!r}, slices={len(self.slices)}, "
            f"window={self.window}, original_hw={self.original_hw}, path='{self.path}')"
        )


def _checksum_path(path: Path) -> Path:
    return path.with_suffix(".crc32")


def _crc(arr: np.ndarray) -> str:
    import zlib

    return f"{zlib.crc32(np.ascontiguousarray(arr).view(np.uint8)):08x}"


def _read_slice(path: Path, shape: tuple = _EMB_SHAPE) -> np.ndarray | None:
    """Memory-map one slice file; None when it is missing, truncated, of the wrong dtype/shape,
    or its body does not match the CRC-32 recorded when it was written.

    The CRC (about 1 ms per 2 MiB slice) catches a file whose header is valid but whose body was
    overwritten or damaged (NaN, zeros, another slice); such an entry is recomputed, never used.
    Entries without a checksum file (an interrupted write, or an older samliver) count as missing.
    """
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        expected = _checksum_path(path).read_text().strip()
    except (ValueError, OSError, EOFError):
        return None
    if arr.dtype != np.float16 or arr.shape != tuple(shape):
        return None
    if _crc(arr) != expected:
        return None
    return arr


def _write_slice(path: Path, emb: np.ndarray, shape: tuple = _EMB_SHAPE) -> None:
    """Write one slice embedding and then its CRC-32 (both atomically); refuses non-finite values."""
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    if emb.shape != tuple(shape):
        raise SamliverError(f"Encoder returned an embedding of shape {emb.shape}, expected {tuple(shape)}.")
    if not np.all(np.isfinite(emb)):
        raise SamliverError(
            f"The encoder returned NaN or infinite values for {path.name} (overflow in float16, or "
            "broken weights); nothing was cached. Check the model checkpoint and --device.")
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, emb)
    # written second: a crash in between leaves a slice without a checksum, which is recomputed
    atomic_write_text(_checksum_path(path), _crc(emb))


def _prepare_cache_folder(root: Path, key: dict) -> Path:
    folder = root / key["model"] / _key_hash(key)
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    stored = None
    if key_file.exists():
        try:
            stored = json.loads(key_file.read_text())
        except (OSError, ValueError):
            stored = None
    if stored != key:
        # A folder whose key does not match (corrupt key file, or a hash collision): its slices
        # cannot be trusted, so drop them before writing the key we are about to fill it for.
        # A key file that is absent is not a mismatch: several processes (ranks of
        # `embed-dataset`) may create the same folder at once, and one must not delete the
        # slices another has just written before the key appeared.
        if key_file.exists():
            for old in folder.glob("z*.npy"):
                old.unlink(missing_ok=True)
        atomic_write_text(key_file, json.dumps(key, indent=1, sort_keys=True))
    return folder


def embed_volume(
    volume,
    model,
    slices=None,
    window=DEFAULT_WINDOW,
    batch_size: int | None = None,
    progress: bool = True,
    cache_root: str | os.PathLike | None = None,
    on_batch=None,
) -> VolumeEmbeddings:
    """Encode ``slices`` of ``volume`` (a CTVolume or (z, y, x) HU array) with ``model``, through the cache.

    Defaults: all slices, the ``"abdomen"`` window (-160, 240 HU), :func:`default_batch_size`
    slices per encoder call, a tqdm progress bar, cache under ``$SAMLIVER_HOME/embeddings``.
    Only slices without a valid cached embedding are computed, through ``model.encode`` (its
    backend and precision, :mod:`samliver.backends`; CPU threads from ``model.num_threads``),
    each written as soon as its batch is done. ``on_batch`` (optional) is called with the
    number of slices after each encoded batch (a caller's own progress bar).
    """
    import torch
    from tqdm.auto import tqdm

    from .preprocess import window_to_unit

    hu = _hu_of(volume)
    zs = check_slices(slices, hu.shape[0])
    key = cache_key(hu, model, window)
    root = Path(cache_root) if cache_root is not None else cache_dir("embeddings")
    folder = _prepare_cache_folder(root, key)
    result = VolumeEmbeddings(folder, key, zs, hu.shape[1:], model.image_size)
    todo = [z for z in zs if _read_slice(result.slice_path(z)) is None]
    result.computed = list(todo)
    if not todo:
        return result
    lo, hi = key["window"]
    batch_size = default_batch_size(model) if batch_size is None else max(1, int(batch_size))
    with tqdm(total=len(todo), desc=f"encoding ({model.name})", unit="slice", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = torch.stack([model.prepare(window_to_unit(hu[z], (lo, hi))) for z in chunk])
            out = model.encode(batch).cpu().numpy()
            for z, emb in zip(chunk, out):
                _write_slice(result.slice_path(z), emb)
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(len(chunk))
    return result


def fine_stage(model, batch):
    """The first-stage output of a TinyViT encoder (LiteMedSAM) for ``batch`` (B, 3, S, S).

    Runs ``patch_embed`` and ``layers[0]`` only (the rest of the encoder is not needed) with
    torch in float32, whatever ``model.backend`` is: returns (B, C, S/2, S/2) float32 on the CPU
    (LiteMedSAM: 128 x 128 x 128).

    Raises:
        SamliverError: the encoder has no TinyViT stages (SAM's ViT works on one 64 x 64 grid).
    """
    import torch

    enc = model.image_encoder
    if not (hasattr(enc, "patch_embed") and hasattr(enc, "layers")):
        raise SamliverError(f"{model.name}'s encoder has no finer stage than its embedding grid: "
                            "fine features need a TinyViT encoder (litemedsam).")
    dtype = next(enc.parameters()).dtype
    with torch.no_grad():
        x = enc.layers[0](enc.patch_embed(batch.to(next(enc.parameters()).device, dtype)))
    if x.ndim == 3:  # TinyViT stages return tokens (B, H*W, C), row-major over the grid
        b, n, c = x.shape
        side = int(round(n ** 0.5))
        x = x.reshape(b, side, side, c).permute(0, 3, 1, 2)
    return x.float().cpu()


def embed_fine_features(volume, model, slices=None, window=DEFAULT_WINDOW, progress: bool = False,
                        cache_root: str | os.PathLike | None = None) -> VolumeEmbeddings:
    """The encoder's first-stage features of ``slices`` (default all), through their own cache.

    What a ``cnn`` head with ``fine_features`` reads beside the embedding: LiteMedSAM's TinyViT
    ``layers.0`` output, float16 (128, 128, 128) per slice, 4 MiB (twice the embedding). Cached
    like the embeddings (same checks), beside them under ``embeddings/<model>/``, with the
    embedding's cache key plus ``"stage"``, so the two never mix. Computed with torch
    (:func:`fine_stage`), the same preprocessing as :func:`embed_volume`.

    Returns:
        A :class:`VolumeEmbeddings` whose slices are the features (``.shape`` (C, h, w)).

    Raises:
        SamliverError: the model's encoder has no finer stage (SAM ViT).
    """
    import torch
    from tqdm.auto import tqdm

    from .preprocess import window_to_unit

    hu = _hu_of(volume)
    zs = check_slices(slices, hu.shape[0])
    key = dict(cache_key(hu, model, window), stage=FINE_STAGE, backend="torch", precision="fp32")
    root = Path(cache_root) if cache_root is not None else cache_dir("embeddings")
    folder = _prepare_cache_folder(root, key)
    lo, hi = key["window"]
    # The stage's shape depends only on the architecture and input size: probe it once per
    # model kind, not on every call (inference asks for cached features on every prediction).
    arch = (model.name, model.image_size)
    if arch not in _FINE_SHAPES:
        probe = fine_stage(model, torch.zeros(1, 3, model.image_size, model.image_size))
        _FINE_SHAPES[arch] = tuple(probe.shape[1:])
    shape = _FINE_SHAPES[arch]
    result = VolumeEmbeddings(folder, key, zs, hu.shape[1:], model.image_size, shape=shape)
    todo = [z for z in zs if z not in result]
    result.computed = list(todo)
    for z in tqdm(todo, desc=f"fine features ({model.name})", unit="slice", disable=not progress):
        x = fine_stage(model, model.prepare(window_to_unit(hu[z], (lo, hi)))[None])
        _write_slice(result.slice_path(z), x[0].numpy(), shape)
    return result


def read_embedding(folder: str | os.PathLike, z: int) -> np.ndarray:
    """Slice ``z``'s cached embedding in cache folder ``folder`` (a ``VolumeEmbeddings.path``).

    Memory-mapped float16 (256, 64, 64), checked like every cached read (header, size, CRC-32):
    what a streaming reader needs without rebuilding the volume's cache key.

    Raises:
        SamliverError: the slice is missing or damaged (encode it again).
    """
    path = Path(folder) / f"z{int(z):04d}.npy"
    arr = _read_slice(path)
    if arr is None:
        raise SamliverError(f"{path} is missing or damaged: run `samliver embed-dataset` (or "
                            "embed_volume) again to recompute it.")
    return arr


def default_batch_size(model) -> int:
    """Slices per encoder call: 1 on a CPU with torch, 4 with OpenVINO, 16 on a GPU.

    Why: on a CPU a bigger torch batch only makes every activation bigger (batch 4 measured
    0.67x the speed of batch 1); OpenVINO encodes the slices of one call concurrently, one per
    stream (``backends.OpenVINOEncoder``: 1.13x per slice on 2 cores), and 4 keeps the progress
    bar moving; a GPU needs the batch to fill its cores.
    """
    if str(model.device).split(":")[0] != "cpu":
        return 16
    return 4 if getattr(model, "backend", "torch") == "openvino" else 1


def open_embeddings(volume, model, window=DEFAULT_WINDOW, cache_root: str | os.PathLike | None = None) -> VolumeEmbeddings:
    """The cached embeddings of ``volume`` without computing anything (``slices`` = those on disk)."""
    hu = _hu_of(volume)
    key = cache_key(hu, model, window)
    root = Path(cache_root) if cache_root is not None else cache_dir("embeddings")
    folder = _prepare_cache_folder(root, key)
    result = VolumeEmbeddings(folder, key, [], hu.shape[1:], model.image_size)
    result.slices = [z for z in result.available() if z in result]
    return result


def clear_cache(model_name: str | None = None, cache_root: str | os.PathLike | None = None) -> None:
    """Delete cached embeddings (all, or one model's)."""
    root = Path(cache_root) if cache_root is not None else cache_dir("embeddings")
    target = root / model_name if model_name else root
    if target.exists():
        shutil.rmtree(target)
