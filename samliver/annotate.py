"""Label a volume in minutes: prompt a few slices with SAM, train a head, predict the rest, repeat.

:class:`Session` is the headless annotation loop that the notebook widget and the app show.
It holds the volume, the frozen model and its cached embeddings, the user's label volume, the
slices the user has *confirmed* (accepted a SAM mask on, or confirmed the head's prediction
of), the current head and its prediction for every slice. The user prompts a slice (box or
clicks; prompts are kept per slice *and* class, so a click while "tumour" is selected starts a
tumour prompt instead of extending the liver one), accepts SAM's mask, trains a head on the
confirmed slices only (seconds, from cached embeddings), looks at the prediction, follows a
suggestion of which slice to fix next, and exports the label (confirmed slices as labelled,
the others as predicted). ``save`` / ``resume`` keep the work across kernels.

Everything runs in the calling thread; ``train`` and ``predict`` take a progress callback and
``train`` a cancel flag, so a UI can run them in a worker thread.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import DEFAULT_WINDOW
from .util import SamliverError, atomic_path, atomic_write_text, sha256_array

SESSION_FORMAT = "samliver-annotation-1"
CLASS_NAMES = {1: "liver", 2: "tumour"}
STRATEGIES = ("suggest", "even", "random")
UNCERTAINTY = ("entropy", "entropy_sum", "flip")
# Slices with fewer predicted liver pixels than this do not extend the liver's z-range
# (isolated false-positive specks at the volume's ends would otherwise widen it).
MIN_RANGE_PIXELS = 20
# Slices beyond the predicted liver's ends that suggestions still consider: the head tends to
# stop a slice or two short of the real liver ends when few slices are labelled.
RANGE_MARGIN = 2
UNLABELLED, PREDICTED, CONFIRMED = 0, 1, 2


def annotation_train_config(seed: int = 0, steps: int | None = None, fast: bool | None = False) -> Any:
    """The training recipe of the loop: the demo's cnn head (refinement at 128 px), fewer steps.

    Why: a retrain must stay under ~30 s on a 2-core CPU so that the user waits for it; the
    demo recipe (batch 4, lr 2e-3, warm-up 10) with the refinement block at 128 px is the
    fastest measured recipe that keeps its Dice (docs/training_speed.md). With at most a few
    dozen labelled slices there is nothing to hold out, so no validation split: the final state
    is kept.

    Args:
        seed: the training seed.
        steps: optimisation steps (default: the recipe's 50, about 21 s at the measured step
            cost on a lightly loaded 2-core CPU; see docs/annotation_loop.md).
        fast: the recipe's ``SAMLIVER_FAST`` variant (None: when ``SAMLIVER_FAST`` is set).

    Returns:
        A ``TrainConfig``.
    """
    from .training import recipe

    config = recipe("loop", fast=fast, steps=steps, seed=int(seed))
    config.eval_every = config.steps  # one evaluation, at the end: nothing is held out anyway
    return config


def box_from_click(hu_slice: np.ndarray, x: float, y: float, *, tolerance_hu: float = 20.0,
                   max_radius: int = 48, margin: int = 3) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) around the region of similar intensity that contains pixel (x, y).

    Box-trained models (LiteMedSAM, MedSAM) give nearly empty masks for a lone point, so a
    click is turned into a box: pixels within ``tolerance_hu`` of the median around the click,
    connected to it, inside a window of ``max_radius`` pixels; the component's bounding box
    plus ``margin`` pixels.

    Args:
        hu_slice: the (H, W) slice in HU.
        x: column of the click (pixels).
        y: row of the click (pixels).
        tolerance_hu: intensity tolerance (default 20 HU).
        max_radius: half-size of the search window (default 48 pixels).
        margin: pixels added around the region (default 3).

    Returns:
        The box as integers in pixel coordinates.
    """
    from scipy import ndimage

    h, w = hu_slice.shape
    xi, yi = int(round(x)), int(round(y))
    y0, y1 = max(0, yi - max_radius), min(h, yi + max_radius + 1)
    x0, x1 = max(0, xi - max_radius), min(w, xi + max_radius + 1)
    patch = ndimage.median_filter(np.asarray(hu_slice[y0:y1, x0:x1], np.float32), size=3)
    cy, cx = yi - y0, xi - x0
    ref = float(np.median(patch[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3]))
    similar = np.abs(patch - ref) <= tolerance_hu
    similar = ndimage.binary_opening(similar, iterations=1)
    similar[cy, cx] = True  # the clicked pixel always belongs to its region
    comps, _ = ndimage.label(similar)
    region = comps == comps[cy, cx]
    ys, xs = np.nonzero(region)
    bx0, bx1 = xs.min() + x0 - margin, xs.max() + x0 + margin
    by0, by1 = ys.min() + y0 - margin, ys.max() + y0 + margin
    # A region smaller than a few pixels gives no useful box: use a small square instead.
    if bx1 - bx0 < 8:
        bx0, bx1 = xi - 6, xi + 6
    if by1 - by0 < 8:
        by0, by1 = yi - 6, yi + 6
    return (int(max(0, bx0)), int(max(0, by0)), int(min(w - 1, bx1)), int(min(h - 1, by1)))


def _check_cls(cls: int) -> int:
    if int(cls) not in (1, 2):
        raise SamliverError(f"Class must be 1 (liver) or 2 (tumour), got {cls}.")
    return int(cls)


def _cancelled(cancel: Callable[[], bool] | threading.Event | None) -> Callable[[], bool] | None:
    if cancel is None:
        return None
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def _spread_pick(scores: dict[int, float], n: int, taken: list[int], gap: int) -> list[int]:
    """The ``n`` best-scoring slices, each at least ``gap`` slices from the others and ``taken``.

    The gap shrinks when too few slices satisfy it (a short liver, many labelled slices).
    """
    order = sorted(scores, key=lambda z: (-scores[z], z))
    picked: list[int] = []
    for g in range(max(1, gap), 0, -1):
        for z in order:
            if len(picked) >= n:
                return picked
            if z in picked:
                continue
            if all(abs(z - t) >= g for t in list(taken) + picked):
                picked.append(z)
        if len(picked) >= n:
            break
    return picked[:n]


def _farthest(candidates: list[int], n: int, taken: list[int]) -> list[int]:
    """``n`` slices of ``candidates``, each the farthest from ``taken`` and those picked before."""
    picked: list[int] = []
    cands = list(candidates)
    for _ in range(n):
        if not cands:
            break
        anchors = list(taken) + picked
        if not anchors:
            z = cands[len(cands) // 2]
        else:
            dist = [min(abs(c - a) for a in anchors) for c in cands]
            z = cands[int(np.argmax(dist))]
        picked.append(z)
        cands.remove(z)
    return picked


class Session:
    """The annotation loop on one volume: prompt, accept, train, predict, suggest, export.

    Args:
        volume: the ``CTVolume`` to label.
        model: the ``SamModel`` whose (cached) embeddings drive both SAM prompts and the head.
        embeddings: a ``VolumeEmbeddings`` of this volume and model (default: the cache;
            missing slices are encoded when needed).
        window: the HU window of the embeddings (default ``DEFAULT_WINDOW``; the embeddings'
            own window wins).
        reference: the label to score against (default: ``volume.label``); ``None``: no
            reference, no Dice anywhere.
        config: the head's ``TrainConfig`` (default :func:`annotation_train_config`).
        seed: training seed and the seed of the random strategy.
        log: an action log to continue (``resume`` passes the saved one).
        uncertainty: how ``suggest`` ranks slices: ``"entropy"`` (mean class entropy inside
            the predicted liver, the default), ``"entropy_sum"`` or ``"flip"`` (disagreement
            with the left-right flipped prediction).
    """

    def __init__(self, volume: Any, model: Any, *, embeddings: Any = None,
                 window: str | tuple = DEFAULT_WINDOW, reference: Any = "volume",
                 config: Any = None, seed: int = 0, log: list | None = None,
                 uncertainty: str = "entropy") -> None:
        hu = np.asarray(getattr(volume, "hu", None) if volume is not None else None)
        if hu.ndim != 3:
            raise SamliverError(f"A session needs a 3D CT volume (z, y, x), got {hu.shape}.")
        if uncertainty not in UNCERTAINTY:
            raise SamliverError(f"Unknown uncertainty {uncertainty!r}: choose one of "
                                f"{', '.join(UNCERTAINTY)}.")
        self.volume = volume
        self.model = model
        self.window = getattr(embeddings, "window", None) or window
        if embeddings is None:
            from .embeddings import open_embeddings

            embeddings = open_embeddings(volume, model, window=self.window)
        if tuple(embeddings.original_hw) != tuple(hu.shape[1:]):
            raise SamliverError(f"The embeddings are of {tuple(embeddings.original_hw)} slices but the "
                                f"volume's are {tuple(hu.shape[1:])}: embed this volume.")
        self.embeddings = embeddings
        if isinstance(reference, str) and reference == "volume":
            reference = getattr(volume, "label", None)
        if reference is not None:
            reference = np.asarray(reference)
            if reference.shape != hu.shape:
                raise SamliverError(f"The reference label {reference.shape} does not match the "
                                    f"volume {hu.shape}.")
        self.reference = reference
        self.seed = int(seed)
        self.config = config if config is not None else annotation_train_config(seed=self.seed)
        self.uncertainty = uncertainty
        self.log: list[dict] = list(log) if log else []
        self.label = np.zeros(hu.shape, np.uint8)
        self.confirmed: set[int] = set()
        self.head: Any = None
        self.prediction: np.ndarray | None = None
        self.probabilities: np.ndarray | None = None  # (z, y, x) float16 P(liver or tumour)
        self.slice_uncertainty: np.ndarray | None = None  # (z,) the score suggest ranks by
        self.last_train: dict | None = None
        self.z = int(hu.shape[0] // 2)
        self.cls = 1
        self.multimask = False
        self.latency_ms: float | None = None
        self._prompts: dict[tuple[int, int], dict] = {}
        self._cands: dict[tuple[int, int], dict] = {}
        self._undo: list[tuple[str, dict[int, np.ndarray], frozenset]] = []
        self._predictor: Any = None
        self._predictor_z: int | None = None
        self._flip_disagreement: np.ndarray | None = None
        names = tuple(getattr(model, "prompt_types", ("points",)))
        self.box_trained = "points" not in names or getattr(model, "name", "") in (
            "litemedsam", "medsam_vit_b")

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        """Number of axial slices."""
        return int(self.volume.hu.shape[0])

    @property
    def candidate(self) -> np.ndarray | None:
        """SAM's chosen mask (bool, H, W) for the current (slice, class), not yet accepted."""
        c = self._cands.get((self.z, self.cls))
        return None if c is None else c["masks"][c["choice"]]

    @property
    def candidates(self) -> np.ndarray | None:
        """All of SAM's masks (K, H, W) for the current (slice, class) (K = 3 with multimask)."""
        c = self._cands.get((self.z, self.cls))
        return None if c is None else c["masks"]

    @property
    def scores(self) -> list[float]:
        """SAM's predicted IoU of each candidate mask (the model's own confidence, 0..1)."""
        c = self._cands.get((self.z, self.cls))
        return [] if c is None else [float(s) for s in c["scores"]]

    @property
    def choice(self) -> int:
        """Index of the chosen candidate mask."""
        c = self._cands.get((self.z, self.cls))
        return 0 if c is None else int(c["choice"])

    def prompts(self, z: int | None = None, cls: int | None = None) -> dict:
        """The prompts of (z, cls) (default: current): ``{"box": tuple | None, "points": [...]}``."""
        key = (self.z if z is None else int(z), self.cls if cls is None else int(cls))
        p = self._prompts.get(key) or {"box": None, "points": []}
        return {"box": p["box"], "points": list(p["points"])}

    def slice_states(self) -> np.ndarray:
        """Per slice: 0 unlabelled, 1 predicted (by the head), 2 confirmed by the user."""
        states = np.full(self.depth, UNLABELLED, np.int8)
        if self.prediction is not None:
            states[:] = PREDICTED
        for z in self.confirmed:
            states[z] = CONFIRMED
        return states

    def _record(self, action: str, **fields: Any) -> None:
        self.log.append({"t": round(time.time(), 3), "action": action, **fields})

    def _check_z(self, z: int | None) -> int:
        z = self.z if z is None else int(z)
        if not 0 <= z < self.depth:
            raise SamliverError(f"Slice {z} is outside 0..{self.depth - 1}.")
        return z

    # ------------------------------------------------------------------ embeddings
    def _missing(self, zs: list[int]) -> list[int]:
        have = set(self.embeddings.available())
        return [z for z in zs if z not in have]

    def encode(self, zs: list[int] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
        """Encode the slices of ``zs`` (default: all) that the cache lacks, into the same cache.

        Args:
            zs: slice indices; None for every slice of the volume.
            progress: called as ``progress(done, total)`` after every few slices.
        """
        from .embeddings import embed_volume

        todo = self._missing(list(range(self.depth)) if zs is None else zs)
        if not todo:
            return
        root = Path(self.embeddings.path).parent.parent  # <root>/<model>/<key>
        done = [0]

        def on_batch(n: int) -> None:  # embed_volume reports each encoded batch
            done[0] += n
            progress(done[0], len(todo))

        embed_volume(self.volume.hu, self.model, slices=todo, window=self.window, progress=False,
                     cache_root=root, on_batch=on_batch if progress is not None else None)

    def _set_predictor(self, z: int) -> None:
        if self._predictor is None:
            from .prompt_based_segmentation import Predictor

            self._predictor = Predictor(self.model)
        if self._predictor_z == z:
            return
        self.encode([z])
        self._predictor.set_slice(self.embeddings, z)  # checks model and weights
        self._predictor_z = z

    # ------------------------------------------------------------------ prompting
    def set_slice(self, z: int) -> None:
        """Go to slice ``z`` (its prompts, if any, are kept per slice and class)."""
        self.z = self._check_z(z)

    def set_class(self, cls: int) -> None:
        """Choose the class the next prompt and accept apply to (1 liver, 2 tumour)."""
        self.cls = _check_cls(cls)

    def _key(self, z: int | None, cls: int | None) -> tuple[int, int]:
        if z is not None:
            self.set_slice(z)
        if cls is not None:
            self.set_class(cls)
        return self.z, self.cls

    def prompt_box(self, box_xyxy: Any, *, z: int | None = None, cls: int | None = None) -> np.ndarray:
        """Prompt SAM with a box (x0, y0, x1, y1 in pixels, any corner order) on (z, cls).

        A new box replaces the previous box of that (slice, class); its clicks are kept.

        Returns:
            The candidate mask (bool, H, W).

        Raises:
            SamliverError: a box narrower than 2 pixels or outside the image.
        """
        key = self._key(z, cls)
        h, w = self.volume.hu.shape[1:]
        try:
            x0, y0, x1, y1 = (float(v) for v in np.asarray(box_xyxy, dtype=np.float64).reshape(4))
        except (TypeError, ValueError) as err:
            raise SamliverError(f"A box is (x0, y0, x1, y1), got {box_xyxy!r}.") from err
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        xa, xb, ya, yb = max(0.0, xa), min(float(w), xb), max(0.0, ya), min(float(h), yb)
        if xb - xa < 2 or yb - ya < 2:
            raise SamliverError("The box is empty (narrower than 2 pixels or outside the image): "
                                "drag a box around the structure.")
        p = self._prompts.setdefault(key, {"box": None, "points": [], "history": []})
        p["history"].append((p["box"], list(p["points"])))
        p["box"] = (xa, ya, xb, yb)
        self._record("prompt_box", z=key[0], cls=key[1], box=[round(v, 1) for v in p["box"]])
        return self._decode(key)

    def prompt_click(self, x: float, y: float, *, positive: bool = True, z: int | None = None,
                     cls: int | None = None) -> np.ndarray:
        """Prompt SAM with a click on (z, cls): positive (object) or negative (not object).

        With a box-trained model (LiteMedSAM, MedSAM) a first positive click without a box
        seeds a box from the similar-intensity region around it (:func:`box_from_click`).

        Returns:
            The candidate mask (bool, H, W).

        Raises:
            SamliverError: a click outside the image, or a first negative click with a
                box-trained model.
        """
        key = self._key(z, cls)
        h, w = self.volume.hu.shape[1:]
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)) or \
                not (-0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5):
            raise SamliverError(f"The click is outside the image (0..{w - 1} x 0..{h - 1}): "
                                "click on the slice.")
        p = self._prompts.setdefault(key, {"box": None, "points": [], "history": []})
        if self.box_trained and p["box"] is None and not positive:
            raise SamliverError(f"{self.model.name} is box-trained: drag a box first, then use "
                                "negative clicks to correct it.")
        p["history"].append((p["box"], list(p["points"])))
        if self.box_trained and p["box"] is None:
            p["box"] = tuple(float(v) for v in box_from_click(self.volume.hu[key[0]], x, y))
        p["points"].append((float(x), float(y), 1 if positive else 0))
        self._record("prompt_click", z=key[0], cls=key[1], x=round(float(x), 1),
                     y=round(float(y), 1), positive=bool(positive))
        return self._decode(key)

    def _decode(self, key: tuple[int, int]) -> np.ndarray:
        z, _ = key
        p = self._prompts[key]
        self._set_predictor(z)
        points = labels = None
        if p["points"]:
            points = np.array([[x, y] for x, y, _ in p["points"]], np.float32)
            labels = np.array([lab for _, _, lab in p["points"]], np.int64)
        box = None if p["box"] is None else np.array(p["box"], np.float64)
        t0 = time.perf_counter()
        masks, scores, _ = self._predictor.predict(points=points, point_labels=labels, box=box,
                                                   multimask_output=self.multimask)
        self.latency_ms = 1000.0 * (time.perf_counter() - t0)
        masks = np.asarray(masks, bool).reshape(-1, *self.volume.hu.shape[1:])
        scores = np.asarray(scores, np.float32).reshape(-1)
        choice = int(np.argmax(scores)) if len(scores) > 1 else 0
        self._cands[key] = {"masks": masks, "scores": scores, "choice": choice}
        return masks[choice]

    def set_multimask(self, on: bool) -> None:
        """Ask SAM for three masks per prompt (choose one with :meth:`choose_mask`) or one."""
        self.multimask = bool(on)
        key = (self.z, self.cls)
        p = self._prompts.get(key)
        if p is not None and (p["box"] is not None or p["points"]):
            self._decode(key)

    def choose_mask(self, index: int) -> None:
        """Choose candidate ``index`` (0-based) of the current (slice, class)."""
        c = self._cands.get((self.z, self.cls))
        if c is None:
            raise SamliverError("No candidate masks: prompt the slice first.")
        if not 0 <= int(index) < len(c["masks"]):
            raise SamliverError(f"There is no mask {int(index) + 1}: choose 1..{len(c['masks'])}.")
        c["choice"] = int(index)

    def undo_prompt(self) -> bool:
        """Take back the last box or click of the current (slice, class); False if none."""
        key = (self.z, self.cls)
        p = self._prompts.get(key)
        if not p or not p["history"]:
            return False
        p["box"], p["points"] = p["history"].pop()
        if p["box"] is None and not p["points"]:
            self._prompts.pop(key, None)
            self._cands.pop(key, None)
        else:
            self._decode(key)
        return True

    def clear_prompts(self) -> None:
        """Forget the prompts and candidate of the current (slice, class)."""
        key = (self.z, self.cls)
        self._prompts.pop(key, None)
        self._cands.pop(key, None)

    # ------------------------------------------------------------------ label changes
    def _snapshot(self, action: str, zs: list[int]) -> None:
        self._undo.append((action, {z: self.label[z].copy() for z in zs}, frozenset(self.confirmed)))

    def _write(self, z: int, mask: np.ndarray, cls: int) -> None:
        sl = self.label[z]
        if cls == 2:
            sl[mask] = 2
        else:
            sl[mask & (sl != 2)] = 1  # accepting liver keeps tumours already marked

    def accept(self, *, cls: int | None = None) -> int:
        """Write the candidate of the current slice into the label and confirm the slice.

        Args:
            cls: the class to write (default: the current class; its candidate is used).

        Returns:
            The number of pixels written.

        Raises:
            SamliverError: no candidate, or an empty one.
        """
        cls = self.cls if cls is None else _check_cls(cls)
        key = (self.z, cls)
        c = self._cands.get(key)
        mask = None if c is None else c["masks"][c["choice"]]
        if mask is None or not mask.any():
            raise SamliverError(f"No {CLASS_NAMES[cls]} mask to accept on slice {self.z}: "
                                "draw a box first.")
        self._snapshot("accept", [self.z])
        self._write(self.z, mask, cls)
        self.confirmed.add(self.z)
        self._prompts.pop(key, None)
        self._cands.pop(key, None)
        n = int(mask.sum())
        self._record("accept", z=self.z, cls=cls, pixels=n)
        return n

    def confirm(self, z: int | None = None, *, empty: bool = False) -> None:
        """Confirm slice ``z`` as the head predicted it (or as empty: ``empty=True``).

        One click when the head got a slice right; ``empty`` marks a slice without liver.

        Raises:
            SamliverError: no prediction yet (and not ``empty``).
        """
        z = self._check_z(z)
        if not empty and self.prediction is None:
            raise SamliverError("There is no prediction to confirm yet: train a head first.")
        self._snapshot("confirm", [z])
        if empty:
            self.label[z] = 0
        else:
            self.label[z] = self.export_label()[z]
        self.confirmed.add(z)
        self._record("confirm", z=z, empty=bool(empty))

    def clear_slice(self, z: int | None = None) -> None:
        """Erase the user's label on slice ``z`` and unconfirm it."""
        z = self._check_z(z)
        self._snapshot("clear_slice", [z])
        self.label[z] = 0
        self.confirmed.discard(z)
        self._record("clear_slice", z=z)

    def propagate(self, *, cls: int | None = None, max_slices: int | None = None) -> list[int]:
        """SAM 3D propagation from the current slice; the filled slices are accepted.

        Starts from the candidate of (z, cls), else from the label of slice z. Each next
        slice is prompted with the previous mask's box plus a margin; it stops where the mask
        vanishes or stops resembling the previous one (a leak into a neighbouring organ).

        Args:
            cls: the class (default: current).
            max_slices: slices per direction (default: no limit).

        Returns:
            The slices written (sorted; they become confirmed).

        Raises:
            SamliverError: nothing to start from.
        """
        from .multi_dimensional_segmentation import propagate_mask

        cls = self.cls if cls is None else _check_cls(cls)
        z = self.z
        c = self._cands.get((z, cls))
        mask = c["masks"][c["choice"]] if c is not None else (
            self.label[z] >= 1 if cls == 1 else self.label[z] == 2)
        if mask is None or not mask.any():
            raise SamliverError(f"No {CLASS_NAMES[cls]} mask on slice {z} to propagate: draw a "
                                "box first.")
        self._set_predictor(z)
        try:  # slices without a cached embedding are encoded on the way
            vol, done = propagate_mask(self._predictor, self.embeddings, z, mask,
                                       volume=self.volume.hu, max_slices=max_slices)
        finally:
            self._predictor_z = None  # propagation moved the predictor to other slices
        self._snapshot("propagate", done)
        for zz in done:
            self._write(zz, vol[zz], cls)
        self.confirmed.update(done)
        self._prompts.pop((z, cls), None)
        self._cands.pop((z, cls), None)
        self._record("propagate", z=z, cls=cls, slices=[int(v) for v in done])
        return [int(v) for v in done]

    def undo(self) -> bool:
        """Undo the last label change (accept / confirm / clear / propagate); False if none."""
        if not self._undo:
            return False
        action, slices, confirmed = self._undo.pop()
        for z, old in slices.items():
            self.label[z] = old
        self.confirmed = set(confirmed)
        self._record("undo", undone=action, slices=sorted(int(z) for z in slices))
        return True

    # ------------------------------------------------------------------ learning loop
    def train(self, *, progress: Callable[[int, int, float], None] | None = None,
              cancel: Callable[[], bool] | threading.Event | None = None) -> dict:
        """Train a head on the confirmed slices only (from cached embeddings).

        Args:
            progress: ``progress(step, total, loss)`` after every step.
            cancel: a callable or ``threading.Event``, polled every step; when set, training
                stops and the previous head (and prediction) stays.

        Returns:
            ``{"slices", "steps", "seconds", "stopped", "final_loss", "kind"}``; ``stopped`` is
            ``"steps"`` when training finished, ``"cancelled"`` when cancelled.

        Raises:
            SamliverError: no confirmed slice, or no liver in any confirmed slice.
        """
        from .training import train_head
        from .training_data import slice_tensors

        zs = sorted(self.confirmed)
        if not zs:
            raise SamliverError("No confirmed slice to train on: box the liver on a slice and "
                                "accept it (3 slices spread over the liver are a good start).")
        if not any((self.label[z] >= 1).any() for z in zs):
            raise SamliverError(f"None of the confirmed slices {zs} contains liver: label the "
                                "liver on at least one slice before training.")
        t0 = time.perf_counter()
        self.encode(zs)
        emb, labels, images = slice_tensors(replace(self.volume, label=self.label), self.embeddings,
                                            zs)
        config = copy.deepcopy(self.config)
        from .checkpoints import model_info

        result = train_head(emb, labels, images=images, config=config, model=self.model,
                            model_info=model_info(self.model, self.embeddings), progress=False,
                            callback=progress, should_stop=_cancelled(cancel))
        hist = result.history
        summary = {"slices": zs, "steps": len(hist["step"]), "seconds": time.perf_counter() - t0,
                   "stopped": hist["stopped"], "final_loss": hist["loss"][-1] if hist["loss"] else None,
                   "kind": config.kind}
        if hist["stopped"] != "cancelled":
            self.head = result.head
            self.head.checkpoint_info = {"config": asdict(config), "history": hist,
                                         **model_info(self.model, self.embeddings)}
            self._train_config = config
        self.last_train = summary
        self._record("train", slices=zs, steps=summary["steps"], stopped=summary["stopped"],
                     seconds=round(summary["seconds"], 2))
        return summary

    def predict(self, *, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Run the head on every slice: fills ``prediction``, ``probabilities`` and the
        per-slice uncertainty that :meth:`suggest` ranks by.

        Args:
            progress: ``progress(done, total)`` slices, after each chunk.

        Returns:
            ``prediction``: (z, y, x) uint8, post-processed (largest liver component, tumours
            inside it), before the user's confirmed slices are merged in (``export_label``).

        Raises:
            SamliverError: no head yet.
        """
        from .inference import predict_probabilities
        from .postprocess import postprocess

        if self.head is None:
            raise SamliverError("No head yet: confirm a few slices and train first.")
        depth = self.depth
        self.encode(list(range(depth)))
        pred = np.zeros(self.volume.hu.shape, np.uint8)
        fg = np.zeros(self.volume.hu.shape, np.float16)
        unc = np.zeros(depth, np.float32)
        flip = np.zeros(depth, np.float32)
        chunk = 16
        for i in range(0, depth, chunk):
            zs = list(range(i, min(depth, i + chunk)))
            _, probs = predict_probabilities(self.volume, self.model, self.head,
                                             embeddings=self.embeddings, slices=zs, progress=False)
            arg = probs.argmax(1)
            pred[zs] = arg
            p_fg = probs[:, 1] + probs[:, 2]
            fg[zs] = p_fg
            ent = -(probs * np.log(np.clip(probs, 1e-6, 1.0))).sum(1)
            region = p_fg > 0.1  # the predicted liver and its uncertain rim
            area = region.sum((1, 2))
            total = (ent * region).sum((1, 2))
            if self.uncertainty == "entropy_sum":
                unc[zs] = total / 1000.0
            else:
                unc[zs] = np.where(area > 0, total / np.maximum(area, 1), 0.0)
            if self.uncertainty == "flip":
                _, tta = predict_probabilities(self.volume, self.model, self.head,
                                               embeddings=self.embeddings, slices=zs,
                                               progress=False, tta=True)
                flipped = (2.0 * tta - probs).argmax(1)  # tta = (p + p_flipped) / 2
                disagree = ((flipped != arg) & region).sum((1, 2))
                flip[zs] = np.where(area > 0, disagree / np.maximum(area, 1), 0.0)
            if progress is not None:
                progress(zs[-1] + 1, depth)
        self.prediction = postprocess(pred)
        self.probabilities = fg
        self.slice_uncertainty = flip if self.uncertainty == "flip" else unc
        self._record("predict", slices=depth)
        return self.prediction

    def export_label(self) -> np.ndarray:
        """The label to export: confirmed slices as the user labelled them, the others as
        the head predicted them (post-processed with the confirmed slices in place, so that
        the largest-component rule sees the whole liver). Zeros where nothing is known.
        """
        from .postprocess import postprocess

        zs = sorted(self.confirmed)
        if self.prediction is None:
            out = np.zeros_like(self.label)
            out[zs] = self.label[zs]
            return out
        merged = self.prediction.copy()
        merged[zs] = self.label[zs]
        out = postprocess(merged) if merged.any() else merged
        out[zs] = self.label[zs]  # the user's own slices are never changed
        return out

    def scores_vs_reference(self) -> dict | None:
        """Whole-volume Dice of :meth:`export_label` against the reference, or None without one.

        Returns:
            ``{"liver_dice", "tumour_dice"}`` (liver = liver + tumour, as in LiTS).
        """
        from .evaluation import label_dice

        if self.reference is None:
            return None
        return label_dice(self.export_label(), self.reference)

    def liver_range(self) -> tuple[int, int] | None:
        """The liver's z-range as the session sees it: predicted and confirmed liver slices.

        Returns:
            ``(first, last)`` or None when nothing is known yet.
        """
        rows = []
        if self.prediction is not None:
            rows += [int(z) for z in np.flatnonzero((self.prediction >= 1).sum((1, 2)) >= MIN_RANGE_PIXELS)]
        rows += [z for z in self.confirmed if (self.label[z] >= 1).any()]
        if not rows:
            return None
        return min(rows), max(rows)

    def suggest(self, n: int = 1, *, strategy: str = "suggest") -> list[int]:
        """The next ``n`` unconfirmed slices to label.

        ``"suggest"``: the most uncertain slices of the head's prediction (see
        ``uncertainty``), at least a few slices apart from each other and from the confirmed
        slices; ``"even"``: each the farthest from the confirmed slices; ``"random"``: random.
        All choose inside the liver's z-range as the session sees it (:meth:`liver_range`,
        plus a margin of two slices); with nothing known yet, the whole volume. Without a
        prediction, ``"suggest"`` falls back to ``"even"``.

        Returns:
            Slice indices (fewer than ``n`` when fewer slices are left).
        """
        if strategy not in STRATEGIES:
            raise SamliverError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
        if int(n) < 1:
            raise SamliverError(f"Ask for at least one suggestion, got n={n}.")
        rng_z = self.liver_range()
        lo, hi = (0, self.depth - 1) if rng_z is None else (
            max(0, rng_z[0] - RANGE_MARGIN), min(self.depth - 1, rng_z[1] + RANGE_MARGIN))
        cands = [z for z in range(lo, hi + 1) if z not in self.confirmed]
        if not cands:
            cands = [z for z in range(self.depth) if z not in self.confirmed]
        taken = sorted(self.confirmed)
        if strategy == "random":
            rng = np.random.default_rng([self.seed, len(self.confirmed)])
            out = sorted(int(z) for z in rng.choice(cands, size=min(int(n), len(cands)), replace=False))
        elif strategy == "even" or self.slice_uncertainty is None:
            out = _farthest(cands, int(n), taken)
        else:
            # A gap of about half the spacing the labelled slices would have if spread evenly.
            gap = max(2, (hi - lo + 1) // (2 * (len(taken) + int(n) + 1)))
            out = _spread_pick({z: float(self.slice_uncertainty[z]) for z in cands}, int(n), taken, gap)
        self._record("suggest", strategy=strategy, slices=[int(z) for z in out])
        return [int(z) for z in out]

    # ------------------------------------------------------------------ save / resume
    def identity(self) -> dict:
        """What a saved session must match to be resumed: the volume and the model."""
        return {"volume": {"sha256": sha256_array(self.volume.hu), "shape": list(self.volume.hu.shape),
                           "source": str(getattr(self.volume, "source", ""))},
                "model": {"name": self.model.name, "weights_id": getattr(self.model, "weights_id", None)}}

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Save the label NIfTI (source geometry), the head and ``session.json`` into ``folder``.

        Files: ``label.nii.gz`` (:meth:`export_label`), ``confirmed.npz`` (the user's slices,
        for :meth:`resume`), ``head.pt`` (when trained) and ``session.json`` (identity of volume
        and model, confirmed slices, the action log), each written atomically, so an earlier
        save in the same folder stays whole if this one fails.

        Returns:
            ``{"label", "confirmed", "head", "session"}`` paths (``head`` only when trained).

        Raises:
            SamliverError: the folder cannot be created or written.
        """
        from .checkpoints import model_info, save_checkpoint
        from .io import CTVolume, save_label_nifti

        folder = Path(folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".samliver-write-test-{time.time_ns()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SamliverError(f"Cannot write to {folder} ({err.strerror or err}): choose a "
                                "writable folder; nothing was saved.") from err
        volume = self.volume if isinstance(self.volume, CTVolume) else CTVolume(hu=np.asarray(self.volume.hu))
        paths: dict[str, Path] = {}
        try:
            paths["label"] = save_label_nifti(self.export_label(), volume, folder / "label.nii.gz")
            zs = np.array(sorted(self.confirmed), np.int64)
            with atomic_path(folder / "confirmed.npz", suffix=".npz") as tmp:
                np.savez_compressed(tmp, slices=zs, labels=self.label[zs])
            paths["confirmed"] = folder / "confirmed.npz"
            if self.head is not None:
                paths["head"] = save_checkpoint(folder / "head.pt", self.head,
                                                config=getattr(self, "_train_config", self.config),
                                                model_info=model_info(self.model, self.embeddings))
            self._record("save", folder=str(folder))
            state = {"format": SESSION_FORMAT, **self.identity(), "seed": self.seed,
                     "uncertainty": self.uncertainty, "confirmed": [int(z) for z in zs],
                     "config": asdict(self.config), "files": {k: p.name for k, p in paths.items()},
                     "last_train": self.last_train, "log": self.log}
            paths["session"] = atomic_write_text(folder / "session.json",
                                                 json.dumps(state, indent=1, default=str))
        except OSError as err:
            raise SamliverError(f"Saving to {folder} failed ({err.strerror or err}): files saved "
                                "there before are unchanged; choose another folder.") from err
        return paths

    @classmethod
    def resume(cls, folder: str | Path, volume: Any, model: Any, *, predict: bool = True,
               **kwargs: Any) -> "Session":
        """Continue a session saved by :meth:`save` on the same volume with the same model.

        Args:
            folder: the folder given to ``save``.
            volume: the same volume.
            model: the same model (name and weights).
            predict: run the saved head on the volume (default True) so the prediction is back.
            **kwargs: passed to :class:`Session` (embeddings, reference, ...).

        Returns:
            The restored session (label, confirmed slices, head, log).

        Raises:
            SamliverError: no saved session there, or one for another volume or model.
        """
        from .checkpoints import load_head_checked, read_checkpoint
        from .training import TrainConfig

        folder = Path(folder).expanduser()
        path = folder / "session.json"
        if not path.is_file():
            raise SamliverError(f"No saved session in {folder} (session.json is missing).")
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SamliverError(f"{path} is not a readable session file ({err}).") from err
        if not isinstance(state, dict) or state.get("format") != SESSION_FORMAT:
            raise SamliverError(f"{path} is not a samliver annotation session.")
        vol = state.get("volume", {})
        if list(np.asarray(volume.hu).shape) != vol.get("shape") or sha256_array(volume.hu) != vol.get("sha256"):
            raise SamliverError(f"The session in {folder} was saved for another volume "
                                f"({vol.get('source') or 'shape ' + str(vol.get('shape'))}): open that "
                                "volume, or start a new session.")
        mod = state.get("model", {})
        wid = getattr(model, "weights_id", None)
        if mod.get("name") != model.name or (mod.get("weights_id") and wid and mod["weights_id"] != wid):
            raise SamliverError(f"The session in {folder} was made with model {mod.get('name')!r} "
                                f"(other weights or name than {model.name!r}): load that model, or "
                                "start a new session.")
        kwargs.setdefault("seed", state.get("seed", 0))
        kwargs.setdefault("uncertainty", state.get("uncertainty", "entropy"))
        if "config" not in kwargs and state.get("config"):
            kwargs["config"] = TrainConfig(**state["config"])
        session = cls(volume, model, log=state.get("log"), **kwargs)
        try:
            with np.load(folder / "confirmed.npz") as data:
                zs, labels = data["slices"], data["labels"]
        except (OSError, KeyError, ValueError) as err:
            raise SamliverError(f"{folder / 'confirmed.npz'} is missing or damaged ({err}).") from err
        if len(zs):
            session.label[zs] = labels
        session.confirmed = {int(z) for z in zs}
        session.last_train = state.get("last_train")
        head_path = folder / "head.pt"
        if head_path.is_file():
            session.head = load_head_checked(head_path, model)
            session._train_config = TrainConfig(**read_checkpoint(head_path)["config"])
            if predict:
                session.predict()
        session._record("resume", folder=str(folder))
        return session
