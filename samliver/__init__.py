"""samliver: liver and liver-tumour CT segmentation with the Segment Anything Model.

The names a notebook needs, in one place::

    import samliver as sl

    volume = sl.load_sample()                       # or sl.load_volume("ct.nii.gz", "label.nii.gz")
    model = sl.get_model()                          # LiteMedSAM on the best backend here
    emb = sl.embed_volume(volume, model)            # cached frozen-encoder embeddings
    x, y, img = sl.slice_tensors(volume, emb, [40, 60, 80])
    head = sl.train_head(x, y, images=img, config=sl.recipe("default"), model=model).head
    label = sl.predict_volume(volume, model, head, embeddings=emb)
    print(sl.evaluate_volume(label, volume.label))

Names are imported on first use, so ``import samliver`` (and ``samliver --help``) does not load
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    # data
    "CTVolume": "io", "load_volume": "io", "save_label_nifti": "io",
    "load_sample": "sample", "fetch_sample": "sample", "load_volume_arg": "sample",
    "make_phantom": "phantom",
    "protocol_split": "datasets",
    # defaults and errors
    "DEFAULT_MODEL": "config", "DEFAULT_WINDOW": "config", "HEAD_KINDS": "config",
    "SamliverError": "util", "notebook_setup": "util",
    # model
    "SamModel": "models", "get_model": "models",
    "VolumeEmbeddings": "embeddings", "embed_volume": "embeddings",
    # prompting
    "Predictor": "prompt_based_segmentation",
    "box_from_mask": "prompts",
    "propagate_box": "multi_dimensional_segmentation",
    # learning
    "Head": "heads", "build_head": "heads",
    "SegLoss": "losses",
    "TrainConfig": "training", "recipe": "training", "train_head": "training",
    "slice_tensors": "training_data",
    "load_head": "checkpoints", "save_checkpoint": "checkpoints", "model_info": "checkpoints",
    # use
    "predict_volume": "inference", "postprocess": "postprocess", "tumour_burden": "postprocess",
    "dice": "evaluation", "label_dice": "evaluation", "evaluate_volume": "evaluation",
    "evaluate_zero_shot": "zero_shot",
    # front
    "overview_figure": "visualization", "save_figure": "visualization",
    "Session": "annotate",
    "browse": "widgets", "segment": "widgets", "annotate": "widgets",
    "SliceBrowser": "widgets", "SegmentWidget": "widgets", "AnnotateWidget": "widgets",
    "show_volume": "viewer", "VolumeViewer": "viewer",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'samliver' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .annotate import Session
    from .checkpoints import load_head, model_info, save_checkpoint
    from .config import DEFAULT_MODEL, DEFAULT_WINDOW, HEAD_KINDS
    from .datasets import protocol_split
    from .embeddings import VolumeEmbeddings, embed_volume
    from .evaluation import dice, evaluate_volume, label_dice
    from .heads import Head, build_head
    from .inference import predict_volume
    from .io import CTVolume, load_volume, save_label_nifti
    from .losses import SegLoss
    from .models import SamModel, get_model
    from .multi_dimensional_segmentation import propagate_box
    from .phantom import make_phantom
    from .postprocess import postprocess, tumour_burden
    from .prompt_based_segmentation import Predictor
    from .prompts import box_from_mask
    from .sample import fetch_sample, load_sample, load_volume_arg
    from .training import TrainConfig, recipe, train_head
    from .training_data import slice_tensors
    from .util import SamliverError, notebook_setup
    from .viewer import VolumeViewer, show_volume
    from .visualization import overview_figure, save_figure
    from .widgets import AnnotateWidget, SegmentWidget, SliceBrowser, annotate, browse, segment
    from .zero_shot import evaluate_zero_shot
