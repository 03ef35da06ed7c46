"""Prompted segmentation of one slice: set the image (or a cached embedding) once, predict many.

Prompts are in original slice pixel coordinates ``(x, y)`` (x = column); masks come back at
the original slice size. Works for every model in :mod:`samliver.models`.

Decoding: prompts without a mask input go through
:class:`samliver.decoder_backends.SharedImageDecoder`, which does the image-only part of SAM's
mask decoder once per slice and shares it by all boxes and points (about a third of the work per
prompt, same masks as SAM's decoder up to float32 rounding). By default on a CPU its per-prompt
part runs as an OpenVINO graph when OpenVINO is installed
(:class:`samliver.decoder_backends.OpenVINODecoder`), in bfloat16 on CPUs with native bfloat16
(~2x faster than torch, mask Dice ~0.999 against the exact decoder) and in float32 elsewhere;
without OpenVINO, torch runs it. ``Predictor(model, decoder="reference")`` uses segment_anything's
decoder as is. See ``docs/decoder_speed.md``; :func:`time_box_to_mask` measures them.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np

from .config import DEFAULT_WINDOW
from .util import SamliverError, torch_threads

DECODERS = ("auto", "openvino", "shared", "reference")
DECODER_PRECISIONS = ("auto", "fp32", "bf16")


class Predictor:
    """SAM-style predictor over a :class:`samliver.models.SamModel`.

    ``set_image(slice_hu)`` runs the encoder once; ``set_embedding(emb, original_hw)`` reuses a
    cached (256, 64, 64) embedding instead; ``predict(...)`` then only runs the prompt encoder
    and mask decoder (tens of milliseconds on a CPU).

    Args:
        model: a :class:`samliver.models.SamModel`.
        decoder: ``"auto"`` (default): on a CPU, the shared-image decoder for prompts without a
            mask input when the model's decoder is segment_anything's (every model in samliver),
            run by OpenVINO when it is installed (falling back to torch if OpenVINO cannot build
            it), else by torch; on a GPU, SAM's own decoder (there the decoder is bound by kernel
            launches, not arithmetic). ``"openvino"``: the shared decoder run by OpenVINO (CPU
            only; an error without OpenVINO). ``"shared"``: the shared decoder run by torch, on
            any device; ``"reference"``: always SAM's own decoder (one image copy per prompt).
            The environment variable ``SAMLIVER_DECODER`` (one of these names) replaces
            ``"auto"`` for every predictor of the process.
        precision: the OpenVINO decoder's arithmetic: ``"auto"`` (default): ``"bf16"`` on CPUs
            with native bfloat16 (AVX512-BF16 or AMX; mask Dice ~0.999 against the exact
            decoder), else ``"fp32"`` (exact to float32 rounding). The torch decoders are float32.

    Raises:
        SamliverError: an unknown decoder or precision, ``"shared"``/``"openvino"`` for a
            decoder that is not segment_anything's, ``"openvino"`` without OpenVINO installed, or
            ``"bf16"`` for a decoder other than OpenVINO's.
    """

    def __init__(self, model, decoder: str = "auto", precision: str = "auto") -> None:
        from .decoder_backends import SharedImageDecoder, openvino_installed, supports_shared_decoder

        if decoder not in DECODERS:
            raise SamliverError(f"Unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}.")
        if precision not in DECODER_PRECISIONS:
            raise SamliverError(f"Unknown decoder precision {precision!r}: choose one of {', '.join(DECODER_PRECISIONS)}.")
        supported = supports_shared_decoder(model.mask_decoder)
        if decoder == "auto":
            # One switch for every predictor a program makes (widgets, CLI, notebooks), e.g.
            # SAMLIVER_DECODER=shared for masks exact to float32 without touching code. Like
            # "auto", it falls back to SAM's decoder for a decoder class the others cannot run.
            decoder = os.environ.get("SAMLIVER_DECODER", "").strip().lower() or "auto"
            if decoder not in DECODERS:
                raise SamliverError(f"SAMLIVER_DECODER={decoder!r} is not a decoder: choose one of "
                                    f"{', '.join(DECODERS)}, or unset it.")
            if not supported:
                decoder = "reference"
        if decoder in ("shared", "openvino") and not supported:
            raise SamliverError(
                f"The shared-image decoder needs segment_anything's MaskDecoder; {model.name} has "
                f"{type(model.mask_decoder).__name__}: use decoder='reference'."
            )
        if decoder == "openvino" and not openvino_installed():
            raise SamliverError("decoder='openvino' needs the openvino package: pip install openvino, or use decoder='shared'.")
        if precision == "bf16" and decoder in ("shared", "reference"):
            raise SamliverError(f"precision='bf16' is for the OpenVINO decoder; decoder={decoder!r} runs float32.")
        self.model = model
        self.decoder = "shared" if decoder != "reference" and supported else "reference"
        self._cpu_only = decoder == "auto"
        # OpenVINO runs the shared decoder's per-prompt part when asked for, or under "auto"
        # when installed; built at the first prompt (see _openvino_decoder).
        self._use_openvino = self.decoder == "shared" and (
            decoder == "openvino" or (decoder == "auto" and openvino_installed())
        )
        self._openvino_required = decoder == "openvino"
        self.precision = precision
        self._openvino = None  # the OpenVINODecoder, or False once it failed under "auto"
        self._openvino_for: tuple = ()
        self._shared = SharedImageDecoder(model.prompt_encoder, model.mask_decoder) if self.decoder == "shared" else None
        self._slice_cache = None  # the shared decoder's per-slice work, made at the first prompt
        self.features = None
        self.original_hw: tuple[int, int] | None = None
        self.transform = None
        self._image_pe = None
        self._resize_key: tuple | None = None  # _to_original's per-axis matrices, for this transform
        self._resize: tuple = ()

    @property
    def backend(self) -> str:
        """What decodes prompts without a mask input: ``"openvino-bf16"``, ``"openvino-fp32"``,
        ``"torch-shared"`` or ``"torch-reference"`` (before the first prompt: what will be tried)."""
        if self.decoder == "reference":
            return "torch-reference"
        if self._use_openvino and self._openvino is not False:
            return f"openvino-{self._openvino_precision()}"
        return "torch-shared"

    def _openvino_precision(self) -> str:
        from .backends import native_bf16

        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"

    def _openvino_decoder(self):
        """The OpenVINO decoder for this model (None: torch decodes). An engine fixes its threads
        when compiled: it is rebuilt when the model's explicit ``num_threads`` changes, not when
        the automatic choice follows the load average (a compile costs ~1-2 s)."""
        from .backends import export_dir
        from .decoder_backends import OpenVINODecoder

        if not self._use_openvino or self._openvino is False:
            return None
        wanted = (self.model.num_threads, self._openvino_precision())
        if self._openvino is None or self._openvino_for != wanted:
            try:
                folder = export_dir(self.model) / "decoder-openvino"
            except Exception:  # noqa: BLE001 - an unusable cache folder only costs a trace per process
                folder = None
            self._openvino = OpenVINODecoder(self._shared, precision=wanted[1], threads=self.model.cpu_threads(),
                                             folder=folder)
            self._openvino_for = wanted
        return self._openvino

    # -- image ------------------------------------------------------------------------
    def set_image(self, slice_hu: np.ndarray, window=DEFAULT_WINDOW) -> None:
        """Encode one (H, W) HU slice with the model (default window ``"abdomen"``).

        Args:
            slice_hu: one axial slice in HU.
            window: HU window name or ``(lo, hi)``.

        Raises:
            SamliverError: not a 2D slice.
        """
        from .preprocess import window_to_unit

        img = np.asarray(slice_hu, dtype=np.float32)
        if img.ndim != 2:
            raise SamliverError(f"set_image expects one (H, W) slice, got shape {img.shape}.")
        batch = self.model.prepare(window_to_unit(img, window))[None]
        self._set_features(self.model.encode(batch), img.shape)

    def set_embedding(self, emb, original_hw, model_name: str | None = None) -> None:
        """Use a cached embedding (256, 64, 64) (or (1, 256, 64, 64)) of a slice of size ``original_hw``.

        ``model_name``: the model the embedding came from; a different model is an error, since
        its decoder would silently produce garbage.
        """
        import torch

        if model_name is not None and model_name != self.model.name:
            raise SamliverError(
                f"These embeddings come from model {model_name!r} but the predictor uses {self.model.name!r}: "
                "embed the volume with the same model."
            )
        arr = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        if arr.ndim == 3:
            arr = arr[None]
        expected = (1, self.model.embed_dim, *self.model.embed_hw)
        if tuple(arr.shape) != expected:
            raise SamliverError(f"Embedding of shape {tuple(arr.shape)} does not fit {self.model.name} (expects {expected[1:]}).")
        self._set_features(arr, original_hw)

    def set_slice(self, embeddings, z: int) -> None:
        """Use slice ``z`` of a :class:`samliver.embeddings.VolumeEmbeddings` (model and weights checked).

        Args:
            embeddings: cached embeddings of a volume, from :func:`samliver.embed_volume`.
            z: the axial slice index; it must be among the embedded slices.

        Raises:
            SamliverError: the slice is not embedded, or the embeddings come from another model.
        """
        if embeddings.model_name != self.model.name or embeddings.weights_id != self.model.weights_id:
            raise SamliverError(
                f"Embeddings from {embeddings.model_name!r} (weights {embeddings.weights_id[:12]}) do not match "
                f"the predictor's model {self.model.name!r} (weights {self.model.weights_id[:12]})."
            )
        self.set_embedding(embeddings[z], embeddings.original_hw)

    def _set_features(self, feats, original_hw) -> None:
        import torch

        h, w = (int(v) for v in original_hw)
        self.features = feats.to(self.model.device, dtype=next(self.model.mask_decoder.parameters()).dtype)
        self.original_hw = (h, w)
        self.transform = self.model.transform((h, w))
        self._slice_cache = None
        with torch.inference_mode():
            # Recomputed per slice (cheap): the model may have moved to another device meanwhile.
            self._image_pe = self.model.prompt_encoder.get_dense_pe()

    def _to_original(self, low):
        """Low-res logits (n, K, h, w) -> (n, K, H, W) at the slice size, as SAM's postprocessing
        (``transform.mask_to_original``: bilinear up to the model's input frame, crop, bilinear to
        the slice). When the low-res grid is smaller than the frame (SAM ViT models: 256 -> 1024),
        on a CPU, the two resizes and the crop are one exact linear map per axis, applied as two
        small matrix products: 0.4 instead of 1.9 ms for a 128 x 128 slice, same logits to ~2e-6."""
        import torch
        import torch.nn.functional as F

        t = self.transform
        fh, fw = low.shape[-2:]
        if low.device.type != "cpu" or (fh, fw) == (t.target, t.target):
            return t.mask_to_original(low)
        key = (t.original_hw, t.input_hw, t.target, fh, fw)
        if self._resize_key != key:

            def axis(n_low: int, n_input: int, n_orig: int):
                # F.interpolate of an identity is the resize's own matrix: the same weights, exactly.
                def resize(n_in: int, n_out: int):
                    eye = torch.eye(n_in)[None, None]
                    return F.interpolate(eye, size=(n_in, n_out), mode="bilinear", align_corners=False)[0, 0].T

                a = resize(n_low, t.target)[:n_input]
                return resize(n_input, n_orig) @ a if n_input != n_orig else a

            self._resize = (axis(fh, t.input_hw[0], t.original_hw[0]), axis(fw, t.input_hw[1], t.original_hw[1]).T.contiguous())
            self._resize_key = key
        rows, cols = self._resize
        return rows @ low @ cols

    def reset_image(self) -> None:
        self.features = None
        self.original_hw = None
        self.transform = None
        self._slice_cache = None

    # -- prompts ----------------------------------------------------------------------
    def _check_box(self, box: np.ndarray) -> np.ndarray:
        box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
        h, w = self.original_hw
        for b in box:
            x0, y0, x1, y1 = b
            if not np.all(np.isfinite(b)):
                raise SamliverError(f"Box {b.tolist()} is not finite.")
            if x1 <= x0 or y1 <= y0:
                raise SamliverError(f"Box {b.tolist()} is empty or inverted: give x0 < x1 and y0 < y1 (x0, y0, x1, y1).")
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise SamliverError(f"Box {b.tolist()} lies outside the {w}x{h} (width x height) slice.")
        # A box sticking out of the image is clipped, as a user would mean. Box coordinates are
        # pixel edges (pixel x spans [x, x + 1)), so the right edge of the image is x = w.
        box[:, [0, 2]] = np.clip(box[:, [0, 2]], 0, w)
        box[:, [1, 3]] = np.clip(box[:, [1, 3]], 0, h)
        return box

    def _check_points(self, points, labels) -> tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if labels is None:
            lab = np.ones(len(pts), np.int64)
        else:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise SamliverError(f"{len(pts)} points but {len(lab)} point labels: give one label (1/0) per point.")
        h, w = self.original_hw
        for p in pts:
            if not (np.all(np.isfinite(p)) and 0 <= p[0] <= w - 1 and 0 <= p[1] <= h - 1):
                raise SamliverError(f"Point {p.tolist()} lies outside the {w}x{h} (width x height) slice.")
        return pts, lab

    def predict(
        self,
        points=None,
        point_labels=None,
        box=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ):
        """Decode masks from prompts in original slice pixels.

        points (N, 2) x, y with point_labels (N,) 1 = object, 0 = background; box (4,) x0, y0,
        x1, y1 in pixel-edge coordinates (pixel x spans [x, x + 1); see
        :func:`samliver.prompts.box_from_mask`); boxes (M, 4) several boxes at once (one prediction each; points (N, 2) are then
        shared by all boxes, or give per-box points (M, N, 2) with labels (M, N)); mask_input
        (1, 256, 256) low-res logits from a previous call ((M, 1, 256, 256) with boxes).

        Returns:
            ``(masks, scores, low_res_logits)``: masks bool (K, H, W) (K = 3 with
            ``multimask_output``, else 1), or (M, K, H, W) for boxes; scores the predicted IoU
            per mask; low_res_logits (K, 256, 256) / (M, K, 256, 256). With ``return_logits``
            the masks are the logits at slice size instead of booleans.

        Raises:
            SamliverError: no slice set, no prompt, both ``box`` and ``boxes``, prompts of the
                wrong shape or outside the slice, or a prompt type the model does not take.
        """
        import torch

        if self.features is None:
            raise SamliverError("No image set: call set_image(slice) or set_embedding(emb, original_hw) first.")
        if box is not None and boxes is not None:
            raise SamliverError("Give either box or boxes, not both.")
        if points is None and box is None and boxes is None and mask_input is None:
            raise SamliverError("No prompt given: pass points, a box, boxes or a mask_input.")
        several = boxes is not None
        t = self.transform
        coords_t = labels_t = box_t = mask_t = None
        n = 1
        if points is not None and len(np.asarray(points).reshape(-1, 2)):
            raw = np.asarray(points, dtype=np.float64)
            pts, lab = self._check_points(points, point_labels)
            if several and raw.ndim == 3:
                # Per-box points (M, N, 2) with labels (M, N): one object per box, decoded together.
                if point_labels is None or np.asarray(point_labels).shape != raw.shape[:2]:
                    raise SamliverError(
                        f"Per-box points of shape {raw.shape} need point_labels of shape {raw.shape[:2]}."
                    )
                if raw.shape[0] != len(np.asarray(boxes).reshape(-1, 4)):
                    raise SamliverError(f"{raw.shape[0]} groups of points for {len(np.asarray(boxes).reshape(-1, 4))} boxes.")
                pts, lab = pts.reshape(raw.shape), lab.reshape(raw.shape[:2])
                coords_t = torch.as_tensor(t.apply_coords(pts), dtype=torch.float32, device=self.model.device)
                labels_t = torch.as_tensor(lab, dtype=torch.int64, device=self.model.device)
            else:
                coords_t = torch.as_tensor(t.apply_coords(pts), dtype=torch.float32, device=self.model.device)[None]
                labels_t = torch.as_tensor(lab, dtype=torch.int64, device=self.model.device)[None]
        bx = boxes if several else box
        if bx is not None:
            b = self._check_box(bx)
            if not several and len(b) != 1:
                raise SamliverError("box takes one x0, y0, x1, y1; use boxes= for several.")
            box_t = torch.as_tensor(t.apply_boxes(b), dtype=torch.float32, device=self.model.device)
            n = len(b)
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            # SAM's mask input is the low-res logits (4x the embedding grid, e.g. 256x256 for a
            # 64x64 embedding), as returned by a previous predict().
            low_hw = (4 * self.model.embed_hw[0], 4 * self.model.embed_hw[1])
            if m.ndim < 2 or tuple(m.shape[-2:]) != low_hw:
                raise SamliverError(
                    f"mask_input must be the (1, {low_hw[0]}, {low_hw[1]}) low-res logits of a previous "
                    f"predict(), got shape {m.shape}."
                )
            m = m.reshape(-1, 1, *low_hw)
            mask_t = torch.as_tensor(m, device=self.model.device)
        if coords_t is not None and n > 1 and coords_t.shape[0] == 1:
            coords_t = coords_t.expand(n, -1, -1)
            labels_t = labels_t.expand(n, -1)
        if mask_t is not None and n > 1 and mask_t.shape[0] == 1:
            mask_t = mask_t.expand(n, -1, -1, -1)
        use_shared = self._shared is not None and mask_t is None
        if use_shared and self._cpu_only and self.features.device.type != "cpu":
            use_shared = False
        engine = self._openvino_decoder() if use_shared and self.features.device.type == "cpu" else None
        # Threads as for the encoder (model.cpu_threads): 1 on an oversubscribed machine, where 2
        # threads decoded 2-6x slower than 1 (docs/decoder_speed.md); restored afterwards. Around
        # the OpenVINO decoder, whose own threads take every core, torch's small per-prompt ops
        # (prompt encoding, resizing the mask) run on one: torch's OpenMP workers keep spinning
        # after a parallel op and slowed the next inference (docs/decoder_speed.md).
        threads = self.model.cpu_threads()
        outside = torch.get_num_threads()
        with torch.inference_mode(), torch_threads(1 if engine is not None else threads):
            sparse, dense = self.model.prompt_encoder(
                points=None if coords_t is None else (coords_t, labels_t), boxes=box_t, masks=mask_t
            )
            if use_shared:
                # A mask prompt changes the image tokens per prompt: only prompts without one share.
                if self._slice_cache is None:
                    with torch_threads(threads or outside):  # the slice's one heavy torch step
                        self._slice_cache = self._shared.prepare_slice(self.features, self._image_pe)
                low = None
                if self._openvino_required and engine is None:
                    raise SamliverError(
                        f"decoder='openvino' runs on the CPU; the model is on {self.features.device}: "
                        "use decoder='shared' or 'auto'."
                    )
                if engine is not None:
                    try:
                        low, iou = engine.decode(self._slice_cache, sparse, multimask_output=multimask_output)
                        low, iou = low.to(self.features.device), iou.to(self.features.device)
                    except Exception as err:  # noqa: BLE001 - "auto" degrades to torch, "openvino" reports
                        if self._openvino_required:
                            raise SamliverError(
                                f"The OpenVINO decoder failed ({type(err).__name__}): use decoder='shared'."
                            ) from err
                        first_line = (str(err).strip().splitlines() or [""])[0][:200]
                        warnings.warn(f"OpenVINO could not run the decoder ({type(err).__name__}: {first_line}); "
                                      "decoding with torch instead.", RuntimeWarning, stacklevel=2)
                        self._openvino = False
                if low is None:
                    with torch_threads(threads or outside):  # torch decodes: the model's threads again
                        low, iou = self._shared.decode(self._slice_cache, sparse, multimask_output=multimask_output)
            else:
                low, iou = self.model.mask_decoder(
                    image_embeddings=self.features,
                    image_pe=self._image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                )
            full = self._to_original(low.float())  # (n, K, H, W) logits
        logits = full.cpu().numpy()
        masks = logits if return_logits else logits > 0.0
        scores = iou.float().cpu().numpy()
        low_np = low.float().cpu().numpy()
        if not several:
            return masks[0], scores[0], low_np[0]
        return masks, scores, low_np


def time_box_to_mask(
    model,
    emb,
    boxes,
    original_hw: tuple[int, int] | None = None,
    *,
    repeats: int = 7,
    num_threads: int | None = None,
    clock: str = "wall",
) -> dict:
    """Box -> mask speed through :class:`Predictor`, shared-image vs SAM's reference decoder.

    All variants run round-robin in this process (``repeats`` rounds), so their ratios hold even
    on a busy machine; absolute times do not. Each round decodes every box one call at a time
    (``single``) and all boxes in one ``predict(boxes=...)`` call (``batched``), masks at the
    original slice size included.

    Args:
        model: a :class:`samliver.models.SamModel`.
        emb: one slice's embedding (C, h, w) or (1, C, h, w) from this model.
        boxes: (N, 4) boxes x0, y0, x1, y1 in original slice pixels.
        original_hw: the slice size; default the model's square input size.
        repeats: rounds; the medians over rounds are reported.
        num_threads: torch CPU threads while timing (restored afterwards); default: as
            :meth:`Predictor.predict` picks them (``model.num_threads``, else 1 on an
            oversubscribed machine, else torch's default).
        clock: ``"wall"`` (default) or ``"cpu"``: this process's CPU time, which leaves out the
            time spent waiting for a core on a busy machine (with one thread, the cleanest
            comparison there; with several it also counts threads spinning at barriers).

    Returns:
        A dict of median milliseconds per box: ``reference_single``, ``reference_batched``,
        ``shared_single``, ``shared_batched`` (shared decoder run by torch, slice already
        prepared), ``default_single``, ``default_batched`` (``Predictor(model)``'s default,
        named by ``default_backend``, e.g. ``"openvino-bf16"``; with its mask agreement vs the
        reference, ``default_mask_dice_mean`` / ``default_mask_dice_min``),
        ``shared_prepare`` (ms per slice, once for all its prompts), ``shared_first_box``
        (prepare + one box: a fresh slice); the ratios ``speedup_single`` and
        ``speedup_batched`` (reference / shared, same run); the agreement of the masks
        (``mask_dice_min`` over boxes, ``max_abs_logit_diff``); and ``boxes``, ``threads`` (None: not
        pinned), ``repeats``, ``clock``.
    """
    import torch

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        raise SamliverError("time_box_to_mask needs at least one box.")
    if repeats < 1:
        raise SamliverError(f"repeats must be at least 1, got {repeats}.")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if clock not in clocks:
        raise SamliverError(f"Unknown clock {clock!r}: choose 'wall' or 'cpu'.")
    now = clocks[clock]
    hw = original_hw if original_hw is not None else (model.image_size, model.image_size)
    previous, previous_model = torch.get_num_threads(), model.num_threads
    if num_threads:
        torch.set_num_threads(int(num_threads))
        model.num_threads = int(num_threads)  # predict() would otherwise pick its own (model.cpu_threads)
    try:
        shared, reference = Predictor(model, decoder="shared"), Predictor(model, decoder="reference")
        default = Predictor(model)
        for p in (shared, reference, default):
            p.set_embedding(emb, hw)
        n = len(boxes)

        def one_by_one(p: Predictor) -> None:
            for b in boxes:
                p.predict(box=b)

        def first_box() -> None:
            shared.set_embedding(emb, hw)  # drops the prepared slice
            shared.predict(box=boxes[0])

        def prepare() -> None:
            with torch.inference_mode():
                shared._shared.prepare_slice(shared.features, shared._image_pe)

        variants = {
            "reference_single": (lambda: one_by_one(reference), n),
            "reference_batched": (lambda: reference.predict(boxes=boxes), n),
            "shared_single": (lambda: one_by_one(shared), n),
            "shared_batched": (lambda: shared.predict(boxes=boxes), n),
            "default_single": (lambda: one_by_one(default), n),
            "default_batched": (lambda: default.predict(boxes=boxes), n),
            "shared_prepare": (prepare, 1),
            "shared_first_box": (first_box, 1),
        }
        shared.predict(box=boxes[0])  # warm-up; prepares the slice
        reference.predict(box=boxes[0])
        default.predict(box=boxes[0])  # builds (or loads) an OpenVINO engine before timing
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, (run, count) in variants.items():
                if name in ("shared_single", "shared_batched") and shared._slice_cache is None:
                    shared.predict(box=boxes[0])  # keep the slice prepared for these two
                start = now()
                run()
                times[name].append((now() - start) * 1000.0 / count)
        ref_logits = reference.predict(boxes=boxes, return_logits=True)[0]
        default_logits = default.predict(boxes=boxes, return_logits=True)[0]
        new_logits = shared.predict(boxes=boxes, return_logits=True)[0]
    finally:
        if num_threads:
            torch.set_num_threads(previous)
            model.num_threads = previous_model
    out: dict = {name: float(np.median(v)) for name, v in times.items()}
    out["speedup_single"] = out["reference_single"] / out["shared_single"]
    out["speedup_batched"] = out["reference_batched"] / out["shared_batched"]

    def dices(x, y):
        x, y = x.reshape(n, -1) > 0, y.reshape(n, -1) > 0
        total = x.sum(1) + y.sum(1)
        return np.where(total > 0, 2.0 * (x & y).sum(1) / np.maximum(total, 1), 1.0)

    out["mask_dice_min"] = float(np.min(dices(new_logits, ref_logits)))
    out["max_abs_logit_diff"] = float(np.abs(ref_logits - new_logits).max())
    out["default_backend"] = default.backend
    out["default_mask_dice_mean"] = float(np.mean(dices(default_logits, ref_logits)))
    out["default_mask_dice_min"] = float(np.min(dices(default_logits, ref_logits)))
    out.update(boxes=n, threads=int(num_threads) if num_threads else None, repeats=repeats, clock=clock)
    return out
