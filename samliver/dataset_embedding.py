"""Dataset scale: sharded encoding, streamed training and sharded evaluation over many volumes.

A dataset folder (MSD Task03_Liver, LiTS, or images/labels pairs: ``datasets.index_dataset``)
is a list of (volume, slice) items. Every function here runs the same way in one process and
in each of the N processes ``torchrun`` starts (``distributed.init_distributed``): each rank
takes a disjoint share, writes into the shared embedding cache (per-slice atomic writes, so
ranks and crashes never leave half a slice), and the results are gathered with
``all_gather_object``. A killed run is resumed by running it again: cached slices are
checked (CRC-32) and skipped.

- :func:`embed_dataset`: encode every item once (or only the liver's slices +- a margin).
- :func:`prepare_training_items`: the labelled slices of the training volumes as streamed
  :class:`distributed.SliceItem` records (embeddings encoded if missing).
- :func:`evaluate_cases`: predict held-out volumes, each rank its share, Dice gathered.
- :func:`train_on_dataset`: split by volume, prepare, train with DDP, evaluate.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import (
    Case,
    index_dataset,
    liver_slices,
    select_label_slices,
    shard_bounds,
    slices_to_encode,
    split_by_volume,
)
from .distributed import (
    DistEnv,
    SliceDataset,
    SliceItem,
    all_gather_objects,
    barrier,
    dist_env,
    peak_rss_mb,
    train_head_ddp,
    write_slice_inputs,
)
from .util import SamliverError

EMBEDDING_BYTES = 256 * 64 * 64 * 2  # one float16 (256, 64, 64) slice: 2 MiB (+128 B npy header)


def labelled_cases(root: str | os.PathLike) -> list[Case]:
    """The labelled cases of a dataset folder, in its order.

    Raises:
        SamliverError: the folder is not a dataset or has no labelled case.
    """
    cases = [c for c in index_dataset(root) if c.label is not None]
    if not cases:
        raise SamliverError(f"{root}: no labelled cases (labelsTr / segmentation files) found.")
    return cases


def index_items(cases: Sequence[Case], *, slices: str = "all", margin: int = 0,
                env: DistEnv | None = None) -> list[dict]:
    """Which slices of each case to encode, as ``[{"case_id", "zs"}]`` in case order.

    Each rank reads every N-th case (labels are needed for ``slices="liver"``) and the lists
    are gathered, so every rank ends with the same full index.

    Args:
        cases: the dataset's cases.
        slices: ``"all"`` or ``"liver"`` (``datasets.slices_to_encode``).
        margin: slices each side of the liver range for ``"liver"``.
        env: this rank (default ``distributed.dist_env()``).
    """
    env = env or dist_env()
    mine = []
    for i in range(env.rank, len(cases), env.world_size):
        vol = cases[i].load()
        mine.append((i, {"case_id": cases[i].case_id,
                         "zs": slices_to_encode(vol.label, vol.hu.shape[0], slices, margin)}))
    merged = sorted((pair for part in all_gather_objects(mine) for pair in part), key=lambda p: p[0])
    return [entry for _, entry in merged]


def embed_dataset(root: str | os.PathLike, model: Any, *, slices: str = "all", margin: int = 0,
                  window: Any = "abdomen", batch_size: int | None = None, progress: bool = True,
                  cache_root: str | os.PathLike | None = None,
                  env: DistEnv | None = None) -> dict:
    """Encode every (volume, slice) item of a dataset once, this rank its contiguous share.

    Args:
        root: the dataset folder.
        model: the encoder (``models.get_model``), on this rank's device.
        slices: ``"all"`` (default) or ``"liver"`` (liver z-range +- ``margin``).
        margin: slices each side of the liver range.
        window: HU window (as ``embed_volume``).
        batch_size: slices per encoder call (default ``embeddings.default_batch_size``).
        progress: a progress bar per rank.
        cache_root: the embedding cache (default ``$SAMLIVER_HOME/embeddings``; shared by ranks).
        env: this rank (default ``distributed.dist_env()``).

    Returns:
        ``{"items", "computed", "cached", "seconds", "world_size", "ranks": [...]}`` with totals
        over all ranks (``seconds``: the slowest rank) and per rank ``rank``, ``items``,
        ``computed``, ``cached``, ``seconds``, ``slices_per_s`` (computed slices per second).
    """
    from tqdm.auto import tqdm

    from .embeddings import embed_volume

    env = env or dist_env()
    t0 = time.perf_counter()
    cases = labelled_cases(root) if slices == "liver" else list(index_dataset(root))
    index = index_items(cases, slices=slices, margin=margin, env=env)
    flat = [(ci, z) for ci, entry in enumerate(index) for z in entry["zs"]]
    start, stop = shard_bounds(len(flat), env.rank, env.world_size)
    share: dict[int, list[int]] = {}
    for ci, z in flat[start:stop]:
        share.setdefault(ci, []).append(z)
    computed = 0
    t_enc = time.perf_counter()
    bar = tqdm(total=stop - start, desc=f"rank {env.rank} encoding ({model.name})", unit="slice",
               position=env.rank, disable=not progress, leave=True)
    for ci, zs in share.items():
        vol = cases[ci].load()
        emb = embed_volume(vol, model, slices=zs, window=window, batch_size=batch_size,
                           progress=False, cache_root=cache_root, on_batch=bar.update)
        computed += len(emb.computed)
        bar.update(len(zs) - len(emb.computed))  # the cached ones
    bar.close()
    seconds = time.perf_counter() - t0
    encode_s = time.perf_counter() - t_enc
    mine = {"rank": env.rank, "items": stop - start, "computed": computed,
            "cached": stop - start - computed, "seconds": round(seconds, 2),
            "slices_per_s": round(computed / encode_s, 3) if computed and encode_s > 0 else None,
            "volumes": len(share)}
    ranks = all_gather_objects(mine)
    return {"items": len(flat), "computed": sum(r["computed"] for r in ranks),
            "cached": sum(r["cached"] for r in ranks),
            "seconds": max(r["seconds"] for r in ranks), "world_size": env.world_size,
            "volumes": len(index), "model": model.name, "slices": slices,
            "margin": margin if slices == "liver" else None,
            "bytes_per_slice": EMBEDDING_BYTES, "ranks": ranks}


def _inputs_stem(folder: Path, label: np.ndarray, zs: list[int]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(label).tobytes())
    digest.update(repr(list(zs)).encode())
    return str(folder / f"train-{digest.hexdigest()[:16]}")


def prepare_training_items(cases: Sequence[Case], model: Any, *, k: int | None = None,
                           seed: int = 0, window: Any = "abdomen", progress: bool = True,
                           cache_root: str | os.PathLike | None = None,
                           env: DistEnv | None = None) -> list[SliceItem]:
    """The labelled training slices of ``cases`` as streamed items, the same list on every rank.

    Each rank handles every N-th case: picks its slices (all slices with liver, or ``k``
    spread over them: ``datasets.select_label_slices``), encodes the missing embeddings, and
    writes the slices' labels and images in the model-input frame beside the embeddings
    (``distributed.write_slice_inputs``; reused when present).

    Args:
        cases: labelled training cases.
        model: the encoder.
        k: labelled slices per volume (None: every slice with liver).
        seed: which ``k`` slices (``select_label_slices``'s seed).
        window: HU window.
        progress: encoder progress bars.
        cache_root: the embedding cache.
        env: this rank.

    Returns:
        :class:`distributed.SliceItem` records in case order, then slice order.
    """
    from .embeddings import embed_volume
    from .preprocess import window_to_unit

    env = env or dist_env()
    mine = []
    for i in range(env.rank, len(cases), env.world_size):
        vol = cases[i].load()
        zs = liver_slices(vol.label) if k is None else select_label_slices(vol.label, k, seed)
        if not zs:
            continue
        emb = embed_volume(vol, model, slices=zs, window=window, progress=progress,
                           cache_root=cache_root)
        stem = _inputs_stem(emb.path, vol.label, zs)
        if not Path(stem + ".labels.npy").is_file():
            tf = emb.transform
            labels = np.stack([tf.label_to_input(vol.label[z]) for z in zs])
            images = np.stack([tf.apply_image(window_to_unit(vol.hu[z], emb.window)) for z in zs])
            write_slice_inputs(stem, labels, images)
        mine.append((i, [SliceItem(str(emb.path), int(z), stem, row) for row, z in enumerate(zs)]))
    merged = sorted((pair for part in all_gather_objects(mine) for pair in part), key=lambda p: p[0])
    return [item for _, items in merged for item in items]


def evaluate_cases(cases: Sequence[Case], model: Any, head: Any, *, window: Any = "abdomen",
                   postprocess: bool = True, progress: bool = False,
                   cache_root: str | os.PathLike | None = None,
                   env: DistEnv | None = None) -> list[dict]:
    """Predict whole held-out volumes (each rank every N-th) and gather their Dice.

    Every slice is encoded through the cache with ``window`` (the one the head was trained
    with), then ``inference.predict_volume`` (post-processed unless ``postprocess`` is False).

    Returns:
        ``[{"case_id", "liver_dice", "tumour_dice", "slices"}]`` in case order, on every rank.
    """
    from .embeddings import embed_volume
    from .evaluation import dice
    from .inference import predict_volume

    env = env or dist_env()
    mine = []
    for i in range(env.rank, len(cases), env.world_size):
        vol = cases[i].load()
        emb = embed_volume(vol, model, window=window, progress=progress, cache_root=cache_root)
        pred = predict_volume(vol, model, head, embeddings=emb, postprocess_label=postprocess,
                              progress=progress)
        mine.append((i, {"case_id": cases[i].case_id,
                         "liver_dice": float(dice(pred >= 1, vol.label >= 1)),
                         "tumour_dice": float(dice(pred == 2, vol.label == 2)),
                         "slices": int(vol.hu.shape[0])}))
    merged = sorted((pair for part in all_gather_objects(mine) for pair in part), key=lambda p: p[0])
    return [row for _, row in merged]


def train_on_dataset(cases: Sequence[Case], test_cases: Sequence[Case], model: Any, *,
                     config: Any, k: int | None = None, window: Any = "abdomen",
                     checkpoint: str | os.PathLike | None = None,
                     resume: str | os.PathLike | None = None, device: str = "cpu",
                     workers: int = 0, evaluate: bool = True, progress: bool = True,
                     cache_root: str | os.PathLike | None = None,
                     env: DistEnv | None = None) -> tuple[dict, Any]:
    """Train one head on the labelled slices of ``cases`` (DDP) and score it on ``test_cases``.

    Args:
        cases: training volumes.
        test_cases: held-out volumes (evaluated whole, sharded over ranks).
        model: the encoder, on this rank's device.
        config: a ``training.TrainConfig`` (``batch_size`` is the global batch).
        k: labelled slices per training volume (None: all slices with liver).
        window: HU window.
        checkpoint: head checkpoint written by rank 0.
        resume: a checkpoint to continue.
        device: this rank's device.
        workers: DataLoader workers per rank.
        evaluate: score the test volumes (False: train only).
        progress: progress bars (rank 0's training bar, encoders).
        cache_root: the embedding cache.
        env: this rank.

    Returns:
        ``(summary, head)``: the trained head (eval mode) and a JSON-ready summary: sizes, training figures (``loss``: the last step's global loss,
        ``train_peak_rss_mb`` / ``rss_before_train_mb``: this rank's memory, ``embedding_bytes``:
        the training embeddings on disk) and, with ``evaluate``, per-case and mean test Dice.
    """
    from .checkpoints import model_info

    env = env or dist_env()
    items = prepare_training_items(cases, model, k=k, seed=config.seed, window=window,
                                   progress=progress and env.is_main, cache_root=cache_root,
                                   env=env)
    if not items:
        raise SamliverError("The training volumes contain no liver label: nothing to train on.")
    barrier()
    rss_before = peak_rss_mb()
    res = train_head_ddp(SliceDataset(items), config=config, model=model,
                         model_info=model_info(model, window=window), checkpoint=checkpoint,
                         resume=resume, device=device, env=env, workers=workers,
                         progress=progress)
    summary: dict = {
        "world_size": env.world_size, "head": config.kind, "k": k,
        "train_volumes": [c.case_id for c in cases], "test_volumes": [c.case_id for c in test_cases],
        "train_slices": len(items), "steps": len(res.history["loss"]),
        "global_batch": min(config.batch_size, len(items)) // env.world_size * env.world_size,
        "loss": round(res.history["loss"][-1], 6) if res.history["loss"] else None,
        "stopped": res.history["stopped"], "train_seconds": round(res.history["seconds"], 2),
        "rss_before_train_mb": round(rss_before, 1), "train_peak_rss_mb": round(peak_rss_mb(), 1),
        "embedding_bytes": len(items) * EMBEDDING_BYTES,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    if evaluate and test_cases:
        rows = evaluate_cases(test_cases, model, res.head, window=window, cache_root=cache_root,
                              env=env)
        summary["test"] = rows
        summary["liver_dice"] = round(float(np.mean([r["liver_dice"] for r in rows])), 6)
        summary["tumour_dice"] = round(float(np.mean([r["tumour_dice"] for r in rows])), 6)
    return summary, res.head


def split_cases(cases: Sequence[Case], *, test_fraction: float = 0.2, seed: int = 0,
                volumes: int | None = None, n_test: int | None = None) -> tuple[list[Case], list[Case]]:
    """Training and test volumes: ``datasets.split_by_volume``, then the first ``volumes``
    training and ``n_test`` test volumes (None: all).

    Raises:
        SamliverError: more training volumes asked for than the split holds.
    """
    parts = split_by_volume(cases, test_fraction=test_fraction, seed=seed)
    train, test = parts["train"], parts["test"]
    if volumes is not None:
        if volumes > len(train):
            raise SamliverError(f"{volumes} training volumes requested but only {len(train)} are "
                                f"available ({len(cases)} labelled cases, test fraction "
                                f"{test_fraction}).")
        train = train[:volumes]
    return list(train), list(test[:n_test] if n_test else test)
