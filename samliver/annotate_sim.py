"""A simulated annotator for :class:`samliver.annotate.Session`: measures the loop honestly.

The simulated user draws the tight box of each structure (the liver, each lesion) from the
reference label on the slice the strategy picks, accepts SAM's mask for each, retrains the
head, predicts the volume, and records after every round how many slices are confirmed, how
many boxes were drawn, the whole-volume liver and tumour Dice of the exported label (all
slices, confirmed ones included, as the user would export it) and the seconds of compute.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .annotate import STRATEGIES, Session
from .util import SamliverError


def start_slices(reference: np.ndarray, n: int = 3) -> list[int]:
    """``n`` slices evenly spaced inside the reference liver's z-range (its ends excluded).

    Every strategy starts from these, so strategies differ only in what they pick next.

    Args:
        reference: (z, y, x) label with liver >= 1.
        n: how many slices (default 3).

    Returns:
        Sorted slice indices.

    Raises:
        SamliverError: the reference has no liver.
    """
    rows = np.flatnonzero((np.asarray(reference) >= 1).any(axis=(1, 2)))
    if not len(rows):
        raise SamliverError("The reference label has no liver: the simulated user has nothing to box.")
    lo, hi = int(rows[0]), int(rows[-1])
    return sorted({int(round(v)) for v in np.linspace(lo, hi, int(n) + 2)[1:-1]})


def _min_box(box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Widen a box to at least 3 pixels a side (a one-pixel lesion's tight box is 1 wide)."""
    h, w = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 - x0 < 3:
        x0, x1 = max(0.0, x0 - 1), min(float(w), x1 + 1)
    if y1 - y0 < 3:
        y0, y1 = max(0.0, y0 - 1), min(float(h), y1 + 1)
    return np.array([x0, y0, x1, y1])


def label_slice(session: Session, z: int, reference: np.ndarray) -> int:
    """Play the user on slice ``z``: box the liver and each lesion, accept SAM's masks.

    A slice without liver in the reference is confirmed as empty (one click, no box).

    Returns:
        The number of boxes drawn.
    """
    from .prompts import box_from_mask, lesion_boxes

    ref = np.asarray(reference[z])
    hw = ref.shape
    if not (ref >= 1).any():
        session.confirm(z, empty=True)
        return 0
    prompts = 0
    session.prompt_box(_min_box(box_from_mask(ref >= 1), hw), z=z, cls=1)
    prompts += 1
    if session.candidate is not None and session.candidate.any():
        session.accept(cls=1)
    for box in lesion_boxes(ref == 2):
        session.prompt_box(_min_box(box, hw), z=z, cls=2)
        prompts += 1
        if session.candidate is not None and session.candidate.any():
            session.accept(cls=2)
    session.set_class(1)
    if z not in session.confirmed:  # SAM gave nothing: the slice still counts as looked at
        session.confirm(z, empty=True)
    return prompts


def simulate(volume: Any, model: Any, *, strategy: str = "suggest", seed: int = 0,
             start: int = 3, max_slices: int = 8, per_round: int = 1, embeddings: Any = None,
             config: Any = None, reference: np.ndarray | None = None,
             uncertainty: str = "entropy",
             on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the simulated user until ``max_slices`` slices are confirmed.

    Args:
        volume: the ``CTVolume``.
        model: the ``SamModel``.
        strategy: ``"suggest"``, ``"even"`` or ``"random"`` (how the next slices are chosen).
        seed: training seed (and the random strategy's).
        start: slices labelled before the first training (evenly inside the liver).
        max_slices: stop when this many slices are confirmed (default 8).
        per_round: slices labelled per round after the start (default 1).
        embeddings: the volume's ``VolumeEmbeddings`` (default: the cache).
        config: the head's ``TrainConfig`` (default: the session's).
        reference: the label the user copies boxes from and Dice is measured against
            (default: ``volume.label``).
        uncertainty: the session's uncertainty measure for ``"suggest"``.
        on_round: called with each round's record as soon as it is made.

    Returns:
        One record per round: ``strategy, seed, slices, prompts, liver_dice, tumour_dice,
        seconds`` (compute of that round) plus ``train_seconds``, ``z`` (slices confirmed),
        ``labelled_liver_dice`` / ``labelled_tumour_dice`` (the accepted SAM masks vs the
        reference on the confirmed slices: the ceiling of what the head can learn).

    Raises:
        SamliverError: no reference label, an unknown strategy, or bad counts.
    """
    from .evaluation import dice

    reference = getattr(volume, "label", None) if reference is None else reference
    if reference is None:
        raise SamliverError("The simulated user copies boxes from a reference label: the volume "
                            "has none (pass --label).")
    if strategy not in STRATEGIES:
        raise SamliverError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    if start < 1 or max_slices < start or per_round < 1:
        raise SamliverError(f"Need 1 <= start ({start}) <= max_slices ({max_slices}) and "
                            f"per_round >= 1 ({per_round}).")
    session = Session(volume, model, embeddings=embeddings, reference=reference, config=config,
                      seed=seed, uncertainty=uncertainty)
    records: list[dict] = []
    prompts = 0
    todo = start_slices(reference, start)
    while True:
        t0 = time.perf_counter()
        for z in todo:
            prompts += label_slice(session, z, reference)
        summary = session.train()
        session.predict()
        seconds = time.perf_counter() - t0
        scores = session.scores_vs_reference() or {}
        zs = sorted(session.confirmed)
        lab, ref = session.label[zs], np.asarray(reference)[zs]
        rec = {"strategy": strategy, "seed": int(seed), "slices": len(zs), "prompts": prompts,
               "liver_dice": scores.get("liver_dice"), "tumour_dice": scores.get("tumour_dice"),
               "seconds": round(seconds, 2), "train_seconds": round(summary["seconds"], 2),
               "z": zs, "labelled_liver_dice": dice(lab >= 1, ref >= 1),
               "labelled_tumour_dice": dice(lab == 2, ref == 2)}
        records.append(rec)
        if on_round is not None:
            on_round(rec)
        if len(zs) >= max_slices:
            break
        t1 = time.perf_counter()
        todo = session.suggest(min(per_round, max_slices - len(zs)), strategy=strategy)
        if not todo:
            break
        rec["seconds"] = round(rec["seconds"] + time.perf_counter() - t1, 2)
    return records


def format_table(records: list[dict]) -> str:
    """A plain-text table of simulation records (one row per strategy, seed and round)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'strategy':<9} {'seed':>4} {'slices':>6} {'prompts':>7} {'liver':>7} "
             f"{'tumour':>7} {'seconds':>7}  slices confirmed"]
    for r in records:
        lines.append(f"{r['strategy']:<9} {r['seed']:>4} {r['slices']:>6} {r['prompts']:>7} "
                     f"{f(r['liver_dice']):>7} {f(r['tumour_dice']):>7} {r['seconds']:>7.1f}  "
                     f"{','.join(map(str, r.get('z', [])))}")
    return "\n".join(lines)
