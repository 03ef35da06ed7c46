"""nnU-Net (``nnunetv2``, 2D configuration) as a baseline on the same labelled slices as the heads.

nnU-Net does everything itself, as it would for any user of it: the labelled slices are written
as a raw nnU-Net dataset (one 2D case per slice, raw Hounsfield units, channel ``CT``), then
nnU-Net's own fingerprint extraction, experiment planning and preprocessing (``2d``
configuration) run, its ``nnUNetTrainer`` trains on every case (fold ``all``), and its
``nnUNetPredictor`` segments the test slices. The only change to nnU-Net's recipe is the
training budget: nnU-Net's default is 1000 epochs x 250 iterations, days on a CPU, so the
number of epochs and iterations per epoch are arguments (see ``docs/baselines.md`` for Dice
against budget on the sample).

All nnU-Net folders live in a temporary folder, and nnU-Net's environment variables
(``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``, ...) are set only for the call.
``nnunetv2`` is an optional dependency: ``pip install 'samliver[baselines]'``.
"""

from __future__ import annotations

import contextlib
import io as _stdio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .evaluation import label_dice
from .util import SamliverError, fast_mode, get_device, torch_threads

if TYPE_CHECKING:  # pragma: no cover
    from .io import CTVolume

NNUNET_EPOCHS = {"full": 50, "fast": 2}
"""Default nnU-Net epoch budget (full run, ``SAMLIVER_FAST`` run); see ``docs/baselines.md``."""
NNUNET_ITERATIONS = 50
"""Training iterations per nnU-Net epoch (nnU-Net's own default is 250)."""

_DATASET_ID = 777
_DATASET_NAME = f"Dataset{_DATASET_ID:03d}_SamliverSlices"
_LABELS = {"background": 0, "liver": 1, "tumour": 2}


def require_nnunet() -> None:
    """Raise a one-line error unless ``nnunetv2`` can be imported.

    Raises:
        SamliverError: nnunetv2 is not installed.
    """
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:
        raise SamliverError(
            "The nnunet baseline needs nnU-Net: pip install 'samliver[baselines]'."
        ) from err


@contextlib.contextmanager
def _nnunet_env(root: Path, threads: int | None) -> Iterator[None]:
    """nnU-Net's folders under ``root`` and single-process settings, for the block only."""
    n = str(max(1, int(threads or 1)))
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        # the planner sets torch's threads from this (and restores them); _train sets 0
        "nnUNet_n_proc_DA": n,
        "nnUNet_def_n_proc": n,
        # torch.compile: nnU-Net skips it on CPU anyway; on CUDA it costs minutes for short runs
        "nnUNet_compile": "false",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _write_case(path: Path, image: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """One 2D slice as a (1, y, x) NIfTI, the axis order nnU-Net's SimpleITK reader gives back."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image[None]))
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    sitk.WriteImage(img, str(path))


def write_raw_dataset(raw_dir: Path, hu: np.ndarray, label: np.ndarray, slices: list[int],
                      spacing: tuple[float, float, float]) -> Path:
    """Write ``slices`` of a volume as an nnU-Net raw dataset of 2D cases.

    Args:
        raw_dir: nnU-Net's raw folder (``nnUNet_raw``).
        hu: ``(z, y, x)`` Hounsfield units.
        label: ``(z, y, x)`` labels 0/1/2.
        slices: the axial slices to write, one case each.
        spacing: ``(z, y, x)`` voxel size in mm.

    Returns:
        The dataset folder.
    """
    import json

    ds = raw_dir / _DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for z in slices:
        _write_case(ds / "imagesTr" / f"slice_{z:04d}_0000.nii.gz", hu[z].astype(np.float32), spacing)
        _write_case(ds / "labelsTr" / f"slice_{z:04d}.nii.gz", label[z].astype(np.uint8), spacing)
    meta = {"channel_names": {"0": "CT"}, "labels": _LABELS, "numTraining": len(slices),
            "file_ending": ".nii.gz", "name": "samliver labelled slices"}
    (ds / "dataset.json").write_text(json.dumps(meta, indent=1))
    return ds


def _plan_and_preprocess(threads: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([_DATASET_ID], num_processes=threads, check_dataset_integrity=True,
                         verbose=False, show_progress_bar=False)
    plan_experiments([_DATASET_ID])
    preprocess([_DATASET_ID], configurations=("2d",), num_processes=(threads,), verbose=False,
               show_progress_bar=False)


def _train(root: Path, epochs: int, iterations: int, device: str) -> Path:
    import json

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # data augmentation in the training process itself: no worker pool (the caller's _nnunet_env
    # restores the variable)
    os.environ["nnUNet_n_proc_DA"] = "0"
    pre = root / "preprocessed" / _DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnU-Net's own run_training passes for a fresh run
    trainer = nnUNetTrainer(plans=plans, configuration="2d", fold="all",
                            dataset_json=dataset_json, device=torch.device(device))
    # the one change to nnU-Net's recipe: its budget (the poly learning-rate schedule follows
    # num_epochs, so a short run still anneals to zero)
    trainer.num_epochs = int(epochs)
    trainer.num_iterations_per_epoch = int(iterations)
    trainer.num_val_iterations_per_epoch = max(1, int(iterations) // 5)
    trainer.save_every = 10**9
    trainer.run_training()
    return Path(trainer.output_folder_base)


def _predict(model_dir: Path, hu: np.ndarray, spacing: tuple[float, float, float],
             device: str) -> np.ndarray:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device != "cpu",
                                device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    # the test slices as one (1, z, y, x) stack: the 2D configuration predicts slice by slice
    seg = predictor.predict_single_npy_array(hu[None].astype(np.float32),
                                             {"spacing": [float(s) for s in spacing]})
    return np.asarray(seg, np.uint8)


def run_nnunet_baseline(volume: CTVolume, train_slices: list[int], test_slices: list[int], *,
                        epochs: int | None = None, iterations: int | None = None,
                        seed: int = 0, device: str | None = None, threads: int | None = None,
                        postprocess_pred: bool = True, workdir: str | Path | None = None,
                        verbose: bool = False) -> dict:
    """Train nnU-Net's 2D configuration on ``train_slices``; global Dice on ``test_slices``.

    Args:
        volume: a labelled volume.
        train_slices: the labelled slices (one nnU-Net training case each).
        test_slices: the slices scored.
        epochs: nnU-Net epochs (None: ``NNUNET_EPOCHS``, shortened under ``SAMLIVER_FAST``).
        iterations: training iterations per epoch (None: ``NNUNET_ITERATIONS``).
        seed: random seed (torch, numpy and Python's ``random``, which nnU-Net's sampling uses).
        device: torch device (None: CUDA, then MPS, then CPU).
        threads: torch threads and nnU-Net processes while running (None: 1 process, torch
            unchanged).
        postprocess_pred: apply the same ``postprocess`` every other method gets.
        workdir: keep nnU-Net's folders here (None: a temporary folder, removed afterwards).
        verbose: show nnU-Net's own console output (otherwise it is swallowed).

    Returns:
        ``{method: "nnunet", liver_dice, tumour_dice, pred, epochs, iterations, seconds}``.

    Raises:
        SamliverError: nnunetv2 missing, an unlabelled volume, or no training slices.
    """
    import random
    import time

    import torch

    require_nnunet()
    if volume.label is None:
        raise SamliverError(f"{volume.source}: the baselines need a labelled volume.")
    if not train_slices:
        raise SamliverError("No labelled slices for the nnunet baseline.")
    if epochs is None:
        epochs = NNUNET_EPOCHS["fast" if fast_mode() else "full"]
    if iterations is None:
        iterations = NNUNET_ITERATIONS
    device = get_device(device)
    if device == "mps":  # nnU-Net's MPS support is partial; CPU is the safe fallback
        device = "cpu"
    spacing = tuple(volume.spacing) if volume.spacing is not None else (1.0, 1.0, 1.0)
    t0 = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="samliver-nnunet-")))
        stack.enter_context(_nnunet_env(root, threads))
        stack.enter_context(torch_threads(threads))
        if not verbose:
            sink = stack.enter_context(_stdio.StringIO())
            stack.enter_context(contextlib.redirect_stdout(sink))
        write_raw_dataset(root / "raw", volume.hu, volume.label, list(train_slices), spacing)
        _plan_and_preprocess(max(1, int(threads or 1)))
        model_dir = _train(root, epochs, iterations, device)
        pred = _predict(model_dir, volume.hu[list(test_slices)], spacing, device)
    if postprocess_pred:
        from .postprocess import postprocess

        pred = postprocess(pred)
    gt = volume.label[list(test_slices)]
    return {"method": "nnunet", **label_dice(pred, gt), "pred": pred, "epochs": int(epochs),
            "iterations": int(iterations), "seconds": round(time.perf_counter() - t0, 1)}
