"""Data-parallel head training with PyTorch's own engine (``torchrun``, ``torch.distributed``, DDP).

The same code runs as one process (no ``torchrun``: world size 1, no process group), on
several processes of one machine (``torchrun --nproc-per-node N``) and on a cluster
(``torchrun`` under SLURM): the rank and world size come from the environment ``torchrun``
sets. NCCL on GPUs, gloo on CPUs.

Training streams its data: :class:`SliceDataset` reads one slice per item, the embedding
memory-mapped from the embedding cache and the label/image from per-volume memory-mapped
arrays, so no process ever holds the dataset's embeddings in memory.

Same result on 1 and N processes (with a fixed seed): every step uses the same *global*
batch (``DistributedSampler`` gives rank ``r`` the items ``r, r + N, ...`` of one shuffled
order, ``batch_size / N`` per rank), augmentation is drawn per item from (seed, epoch,
item), and :func:`global_seg_loss` reduces the loss's sums across ranks (cross-entropy
numerator and denominator, the soft-Dice intersections and sums) so that the DDP gradient is
the gradient of the one-process loss on the whole batch, not an average of per-rank losses
(the batch-global Dice does not split into a mean over ranks). What remains is floating-point
summation order, and dropout masks, which are drawn per rank (the ``cnn`` head's 0.1
channel dropout; heads without dropout agree to float precision).
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoints import (
    check_compatible,
    head_options,
    read_checkpoint,
    save_checkpoint,
)
from .heads import build_head
from .losses import IGNORE
from .training import TrainConfig, TrainResult, lr_factor, optimizer_step, restore_optimizer
from .training_data import augment_batch
from .util import SamliverError

# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes checkpoints and prints summaries)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def dist_env() -> DistEnv:
    """The rank and world size ``torchrun`` (or SLURM via ``torchrun``) put in the environment.

    Without ``torchrun`` (no ``WORLD_SIZE``): one process, rank 0 of 1.

    Raises:
        SamliverError: ``RANK`` / ``WORLD_SIZE`` that are not whole numbers or out of range.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise SamliverError(f"RANK / WORLD_SIZE / LOCAL_RANK are not whole numbers ({err}): "
                            "start the command with torchrun, or unset them.") from err
    if world < 1 or not 0 <= rank < world:
        raise SamliverError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}.")
    return DistEnv(rank, world, local_rank, max(1, local_world))


def init_distributed(device: str | None = None) -> tuple[DistEnv, str]:
    """Join the process group ``torchrun`` set up (if any) and pick this rank's device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). On CUDA each rank takes
            GPU ``LOCAL_RANK``.

    Returns:
        ``(env, device)``; the process group exists when ``env.world_size > 1`` (NCCL on
        CUDA, gloo on CPU).
    """
    import torch.distributed as dist

    env = dist_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise SamliverError("--device cuda was asked for but no GPU is visible: use --device cpu.")
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if env.distributed and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return env, str(device)


def close_distributed() -> None:
    """Leave the process group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    import torch.distributed as dist

    if not _group_on():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if _group_on():
        dist.barrier()


def cpu_threads_per_rank(env: DistEnv) -> int:
    """Intra-op threads for one rank on a CPU: the machine's cores shared by its local ranks."""
    return max(1, (os.cpu_count() or 1) // env.local_world_size)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- streaming data


@dataclass(frozen=True)
class SliceItem:
    """One labelled training slice on disk.

    Attributes:
        folder: the volume's embedding cache folder (``VolumeEmbeddings.path``).
        z: the slice index (its embedding is ``folder/z<zzzz>.npy``).
        inputs: path stem of the volume's per-slice arrays: ``<stem>.labels.npy`` (uint8) and
            ``<stem>.images.npy`` (float16), ``(n, S, S)`` in the model-input frame.
        row: this slice's row in those arrays.
    """

    folder: str
    z: int
    inputs: str
    row: int


class SliceDataset(torch.utils.data.Dataset):
    """Labelled slices read one at a time from disk: ``(embedding, label, image)`` tensors.

    Nothing is loaded up front: each item memory-maps its embedding file (checked against its
    CRC-32) and one row of the volume's label/image arrays, and copies only that slice. Peak
    memory is therefore one batch, whatever the dataset's size.

    Args:
        items: the slices (:class:`SliceItem`), in a fixed order (the same on every rank).
        augment: ``"none"``, ``"flip"`` or ``"flip+rot"`` (as :class:`TrainConfig`).
        seed: augmentation seed; item ``i`` in epoch ``e`` is augmented from (seed, e, i),
            whichever rank reads it.
    """

    def __init__(self, items: Sequence[SliceItem], augment: str = "none", seed: int = 0) -> None:
        self.items = list(items)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from .embeddings import read_embedding

        item = self.items[int(i)]
        emb = torch.from_numpy(np.array(read_embedding(item.folder, item.z), dtype=np.float32))
        labels = np.load(item.inputs + ".labels.npy", mmap_mode="r")
        images = np.load(item.inputs + ".images.npy", mmap_mode="r")
        y = torch.from_numpy(np.array(labels[item.row], dtype=np.int64))
        im = torch.from_numpy(np.array(images[item.row], dtype=np.float32))[None]
        del labels, images  # unmap now: resident pages of the maps count as this process's memory
        if self.augment != "none":
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2**63))
            x, yy, ii = augment_batch(emb[None], y[None], im[None], self.augment, gen)
            emb, y, im = x[0], yy[0], ii[0]
        return emb, y, im


def write_slice_inputs(stem: str | os.PathLike, labels: np.ndarray, images: np.ndarray) -> None:
    """Write a volume's training labels (uint8) and images (float16) for :class:`SliceDataset`.

    Args:
        stem: path stem; ``<stem>.labels.npy`` and ``<stem>.images.npy`` are written atomically.
        labels: ``(n, S, S)`` class labels in the model-input frame.
        images: ``(n, S, S)`` windowed images in [0, 1] in the model-input frame.
    """
    from .util import atomic_path

    stem = str(stem)
    with atomic_path(stem + ".images.npy", suffix=".npy") as tmp:
        np.save(tmp, np.asarray(images, np.float16))
    # labels second: SliceDataset users check for the labels file, so it marks a complete pair
    with atomic_path(stem + ".labels.npy", suffix=".npy") as tmp:
        np.save(tmp, np.asarray(labels, np.uint8))


# ----------------------------------------------------------------------------- loss


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over ranks; the gradient is summed back over ranks the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def global_seg_loss(logits: torch.Tensor, target: torch.Tensor, tumour_weight: float = 3.0,
                    dice_weight: float = 1.0) -> torch.Tensor:
    """``losses.seg_loss`` over the global batch of all ranks, as this rank's share.

    The loss's sums are added up across ranks (an all-reduce whose backward
    all-reduces the gradients back to every rank's logits), so that after DDP averages the gradients
    over N ranks they equal the gradient of ``seg_loss`` on the whole global batch. In one
    process it is ``seg_loss`` itself (same formula, to float precision).

    Args:
        logits: this rank's ``(b, C, S, S)`` logits.
        target: this rank's ``(b, S, S)`` labels (``IGNORE`` pixels count nowhere).
        tumour_weight: cross-entropy weight of class 2.
        dice_weight: weight of the soft-Dice term.

    Returns:
        A scalar whose gradient, averaged over ranks, is the global loss's gradient.
    """
    world = torch.distributed.get_world_size() if _group_on() else 1
    n = logits.shape[1]
    w = torch.ones(n, device=logits.device)
    if n > 2:
        w[2] = tumour_weight
    valid = target != IGNORE
    clean = torch.where(valid, target, torch.zeros_like(target))
    logits = logits.float()
    ce_sum = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, reduction="sum")
    prob = logits.softmax(1) * valid[:, None].float()
    regions = [(prob[:, 1:].sum(1), (clean >= 1).float() * valid.float())]
    if n > 2:
        regions.append((prob[:, 2], (clean == 2).float() * valid.float()))
    sums = torch.stack([t for p, g in regions for t in ((p * g).sum(), p.sum(), g.sum())])
    ce_den = (w[clean] * valid.float()).sum().detach()
    if world > 1:
        sums = _AllReduceSum.apply(sums)
        torch.distributed.all_reduce(ce_den)
    # DDP divides gradients by N: scale this rank's share of the (global) CE by N to undo it,
    # and the replicated Dice term is already summed back over ranks by all_reduce's backward.
    ce = world * ce_sum / ce_den if float(ce_den) > 0 else logits.sum() * 0.0
    dice_terms = [1 - (2 * sums[3 * j] + 1) / (sums[3 * j + 1] + sums[3 * j + 2] + 1)
                  for j in range(len(regions))]
    return ce + dice_weight * torch.stack(dice_terms).mean()


# ----------------------------------------------------------------------------- training loop


def global_batch(batch_size: int, n_items: int, world_size: int) -> int:
    """The global batch: ``batch_size`` capped at the dataset, a multiple of the world size.

    Raises:
        SamliverError: fewer items than ranks.
    """
    b = min(int(batch_size), int(n_items)) // world_size * world_size
    if b < world_size:
        raise SamliverError(f"{n_items} training slices cannot be shared by {world_size} processes "
                            "with at least one slice each: label more slices or use fewer processes.")
    return b


def train_head_ddp(dataset: SliceDataset, *, config: TrainConfig | None = None, model: Any = None,
                   model_info: dict | None = None, checkpoint: str | os.PathLike | None = None,
                   resume: str | os.PathLike | None = None, device: str = "cpu",
                   env: DistEnv | None = None, workers: int = 0, progress: bool = True,
                   on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a head on a streamed :class:`SliceDataset`, data-parallel over the process group.

    Every rank runs this with the same arguments. The recipe is :class:`TrainConfig`'s (AdamW,
    warm-up + cosine ``lr_factor``, flips, gradient clipping at 5) for ``config.steps`` steps of
    ``config.batch_size`` slices in total per step (split over the ranks); there is no
    hold-out early stopping (evaluate on held-out volumes instead). Rank 0 writes
    ``checkpoint`` (the usual head checkpoint, optimizer and scheduler included) every
    ``config.eval_every`` steps and at the end; ``resume`` continues one, on every rank, at
    the step it stopped (the data order and augmentation are a function of the step, so a
    resumed run continues the same sequence).

    Args:
        dataset: the training slices (same order on every rank).
        config: training settings (default ``TrainConfig()``).
        model: the ``SamModel`` the embeddings come from (sizes; autosam's decoder).
        model_info: encoder identity for the checkpoint (``checkpoints.model_info``).
        checkpoint: where rank 0 writes the head checkpoint (None: nowhere).
        resume: a checkpoint of this run to continue from.
        device: this rank's device (from :func:`init_distributed`).
        env: this rank (default :func:`dist_env`).
        workers: DataLoader worker processes per rank (0: read in the training process).
        progress: a progress bar on rank 0.
        on_step: called as ``on_step(step, loss)`` after every step (e.g. to record memory).

    Returns:
        The trained head (unwrapped, eval mode) and its history (``loss`` is the global
        batch's loss, identical on every rank).

    Raises:
        SamliverError: an empty dataset, a batch smaller than the world, or a checkpoint for
            another model.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    env = env or dist_env()
    config = copy.deepcopy(config or TrainConfig())
    if len(dataset) == 0:
        raise SamliverError("No labelled slices to train on.")
    resume_ckpt = read_checkpoint(resume) if resume else None
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP checks and syncs)
    if resume_ckpt is not None:
        check_compatible(resume_ckpt, model=model, source=str(resume))
        config = TrainConfig(**{**resume_ckpt["config"], "steps": config.steps})
        opts = dict(head_options(resume_ckpt), out_size=resume_ckpt["out_size"])
        head = build_head(config.kind, embed_dim=resume_ckpt["embed_dim"], model=model, **opts)
        head.load_state_dict(resume_ckpt["state_dict"])
    else:
        head = build_head(config.kind, model=model, **dict(config.head_options))
    head.to(device)
    net = head
    if env.distributed:
        on_gpu = str(device).startswith("cuda")
        net = DistributedDataParallel(head, device_ids=[torch.device(device).index] if on_gpu else None)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    total = max(1, config.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.warmup, total))
    history: dict = {"step": [], "loss": [], "val_step": [], "val_liver": [], "val_tumour": [],
                     "val_on": "none", "n_train": len(dataset), "n_val": 0, "stopped": "steps",
                     "best_step": 0, "best_score": -1.0, "world_size": env.world_size}
    start = 0
    if resume_ckpt is not None:
        start = restore_optimizer(resume_ckpt, opt, sched)
        history.update({k: v for k, v in resume_ckpt.get("history", {}).items()
                        if k in ("step", "loss")})
    batch = global_batch(config.batch_size, len(dataset), env.world_size)
    per_rank = batch // env.world_size
    per_epoch = len(dataset) // batch  # whole global batches only: the same on every rank
    dataset.augment, dataset.seed = config.augment, config.seed
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=config.seed, drop_last=False)
    uses_image = bool(getattr(head, "uses_image", False))

    def save(step: int) -> None:
        if checkpoint and env.is_main:
            save_checkpoint(checkpoint, head, config=config, model_info=model_info,
                            history=history, optimizer=opt, scheduler=sched, step=step)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.kind} x{env.world_size}",
               disable=not (progress and env.is_main), leave=False)
    t0 = time.time()
    step = start
    while step < config.steps:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        # this rank's share of the epoch's order, whole global batches only, from the batch
        # the run stopped at (resume)
        order = list(iter(sampler))[skip * per_rank: per_epoch * per_rank]
        loader = DataLoader(dataset, batch_size=per_rank, sampler=order, num_workers=workers,
                            drop_last=True, pin_memory=str(device).startswith("cuda"))
        for x, y, im in loader:
            net.train()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            im = im.to(device, non_blocking=True) if uses_image else None
            logits = net(x, image=im)
            loss = global_seg_loss(logits, y, config.tumour_weight, config.dice_weight)
            reported = loss.detach().clone()
            if env.distributed:
                torch.distributed.all_reduce(reported)
                reported /= env.world_size
            if not torch.isfinite(reported):
                history["stopped"] = f"non-finite loss at step {step}"
                break
            optimizer_step(loss, opt, sched, params)
            history["step"].append(step)
            history["loss"].append(float(reported))
            step += 1
            bar.update(1)
            if on_step is not None:
                on_step(step, float(reported))
            if step % config.eval_every == 0 and step < config.steps:
                save(step)
            if step >= config.steps:
                break
        if history["stopped"] != "steps":
            break
    bar.close()
    history["seconds"] = time.time() - t0
    history["best_step"] = step
    save(step)
    barrier()  # nobody reads the checkpoint before rank 0 has written it
    head.eval()
    return TrainResult(head=head, history=history,
                       checkpoint=Path(checkpoint) if checkpoint else None)

