"""Speed benchmark: ``samliver bench`` (and ``make bench``).

One table, measured in one run on the real sample case with LiteMedSAM (defaults):

* **physical limits**: this CPU's matmul throughput (2048^3, fp32 / bf16 / int8) and the model's
  FLOPs per slice (encoder) and per box (prompt encoder + mask decoder), so each time can be put
  next to its bound (``% of peak`` = achieved FLOP/s / the peak of the precision it runs at);
* **encoder backends** (:mod:`samliver.backends`), timed round-robin against the bare loop (a
  ``model.image_encoder(x)`` forward per slice, fp32, ``inference_mode``) so machine load hits all
  alike; the bare loop is timed twice (``bare`` and ``bare_again``) and the two must agree. Each
  row has s/slice, x bare, % of peak, the largest embedding difference from fp32 and the Dice
  between its tight-box liver masks and the fp32 ones (mean and min over the accuracy slices).
  ``default`` is :func:`samliver.embeddings.embed_volume` into an empty cache with the default
  backend: preprocessing and the float16 write included;
* **cache hit**, **box -> mask** (``Predictor``, one box and several boxes per call) and
  **head training** (the demo recipe and the ``autosam`` one, :func:`time_demo_recipe`).

A Markdown table (name | value | unit | note) goes to stdout and ``{"name", "value", "unit"}``
records to ``outputs/bench.json`` (written atomically). Scripts read these names:
``peak_fp32_gflops``, ``encoder_bare_s_per_slice``, ``encoder_default_s_per_slice``,
``encoder_fastest_s_per_slice`` (the fastest backend whose mask Dice vs fp32 is >= 0.99),
``encoder_fastest_mask_dice_vs_fp32``, ``decoder_box_ms``, ``head_train_demo_s``,
``head_train_autosam_s``.
``--quick`` (or ``SAMLIVER_FAST=1``) runs the same code small: 2 slices, one round, small
matmuls, torch backends only, no head training (e.g. ``--quick --model tiny --volume phantom``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DEFAULT_MODEL, DEFAULT_WINDOW
from .util import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import VolumeEmbeddings


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``repeats`` calls of ``fn`` (and its last result)."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeats)):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def _load(spec: str):
    if spec == "phantom":
        from .phantom import make_phantom

        return make_phantom((16, 96, 96), n_lesions=2, seed=0)
    from .sample import load_volume_arg

    return load_volume_arg(spec)


def _pick_slices(volume, n: int) -> list[int]:
    """``n`` slices spread over those with liver (all slices if the volume has no label)."""
    depth = volume.hu.shape[0]
    if volume.label is not None:
        pool = [int(z) for z in np.flatnonzero((volume.label > 0).any(axis=(1, 2)))]
    else:
        pool = []
    pool = pool or list(range(depth))
    idx = np.unique(np.round(np.linspace(0, len(pool) - 1, min(n, len(pool)))).astype(int))
    return [pool[i] for i in idx]


def _slice_box(volume, z: int) -> np.ndarray:
    """The tight ground-truth liver box of slice ``z`` (``prompts.box_from_mask``), or the
    central half of the slice when it has no label or no liver."""
    from .prompts import box_from_mask

    box = box_from_mask(volume.label[z] > 0) if volume.label is not None else None
    if box is None:
        h, w = volume.hu.shape[1:]
        box = np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4])
    return box


def _batch(volume, model, zs, window):
    import torch

    from .preprocess import window_to_unit

    return torch.stack([model.prepare(window_to_unit(volume.hu[z], window)) for z in zs])


def box_masks(model, embs, volume, zs: list[int]) -> list[np.ndarray]:
    """Masks decoded exactly from ``embs`` (N, 256, 64, 64), one tight liver box per slice of ``zs``:
    the encoder backends' accuracy check (their masks against fp32's)."""
    from .prompt_based_segmentation import Predictor

    predictor = Predictor(model, decoder="shared")  # exact: the check is the encoder's
    out = []
    for emb, z in zip(embs, zs):
        predictor.set_embedding(emb, volume.hu.shape[1:])
        out.append(predictor.predict(box=_slice_box(volume, z))[0][0])
    return out


def _box_dice(model, embs: np.ndarray, volume, zs) -> float:
    """Mean liver Dice of the tight ground-truth box masks over the slices with liver."""
    from .evaluation import dice

    scores = [dice(m, volume.label[z] > 0) for m, z in zip(box_masks(model, embs, volume, zs), zs)
              if (volume.label[z] > 0).any()]
    return float(np.mean(scores)) if scores else float("nan")


def _peaks(n: int, repeats: int) -> dict[str, float | None]:
    """Matmul throughput of this CPU in G(FL)OP/s: fp32, bf16 (None without native bf16) and int8."""
    import torch

    from .backends import native_bf16

    def rate(fn) -> float:
        fn()
        wall, _, _ = _timed(fn, repeats)
        return 2 * n**3 / wall / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    out: dict[str, float | None] = {"fp32": rate(lambda: a @ b), "bf16": None, "int8": None}
    if native_bf16():
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16"] = rate(lambda: a16 @ b16)
    try:
        i8a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        i8b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        out["int8"] = rate(lambda: torch._int_mm(i8a, i8b))
    except (RuntimeError, AttributeError):  # not every torch build has an int8 CPU matmul
        pass
    return out


def _flops(model) -> tuple[float, float]:
    """GFLOP of one encoder forward (one slice) and of one box decode (prompt encoder + decoder)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.image_size, model.image_size, device=model.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        emb = model.image_encoder(x)
    enc = counter.get_total_flops() / 1e9
    box = torch.tensor([[40.0, 40.0, 200.0, 200.0]], device=model.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
        model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return enc, counter.get_total_flops() / 1e9


def _encoder_candidates(model, volume, window, *, quick: bool, int8: bool):
    """(name, backend, precision, callable(batch) -> embeddings, note) for each encoder path timed.

    Exports (ONNX / OpenVINO IR / int8 calibration) happen here, outside the timing, through
    the export cache; a backend that cannot run on this machine is returned with the error
    as its callable's result so the table says why.
    """
    import dataclasses

    import torch

    from .backends import SUPPORTED, installed, native_bf16
    from .embeddings import default_batch_size, embed_volume

    enc = model.image_encoder

    def bare(batch):
        with torch.inference_mode():
            return torch.cat([enc(batch[i : i + 1]) for i in range(len(batch))])

    counter = iter(range(10**6))
    tmp = Path(tempfile.mkdtemp(prefix="samliver-bench-"))
    default = get_default_model(model)

    def default_path(zs):
        # embed_volume from HU slices into an empty cache: preprocessing + encode + float16 write.
        emb = embed_volume(volume, default, slices=zs, window=window, progress=False,
                           cache_root=tmp / f"run{next(counter)}")
        return torch.from_numpy(emb.stack(zs))

    out = [
        ("bare", "torch", "fp32", bare, "bare loop: image_encoder(x) per slice, fp32, inference_mode (the baseline)"),
        ("default", default.backend, default.precision, default_path,
         f"embed_volume, default backend ({default.backend}/{default.precision}), empty cache, incl. preprocessing + write"),
    ]
    wanted = [("torch", "fp32")]
    if not quick:
        wanted += [("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
        if int8:
            wanted.append(("openvino", "int8"))
    for backend, precision in wanted:
        name = f"{backend}_{precision}"
        if precision not in SUPPORTED[backend]:
            continue
        if not installed(backend):
            out.append((name, backend, precision, RuntimeError(f"{backend} not installed (pip install 'samliver[fast]')"), ""))
            continue
        if precision == "bf16" and not native_bf16():
            out.append((name, backend, precision, RuntimeError("skipped: this CPU has no native bf16"), ""))
            continue
        variant = dataclasses.replace(model, backend=backend, precision=precision, _runner=None, _runner_for=())
        t0 = time.perf_counter()
        try:
            variant.encode(torch.zeros(1, 3, model.image_size, model.image_size))  # export + compile
        except Exception as err:  # a backend this machine cannot run is reported, not fatal
            out.append((name, backend, precision, err, ""))
            continue
        prep = time.perf_counter() - t0
        n = default_batch_size(variant)

        def per_slice(batch, _encode=variant.encode, _n=n):
            # in calls of default_batch_size slices, as embed_volume makes them
            return torch.cat([_encode(batch[i : i + _n]) for i in range(0, len(batch), _n)])

        out.append((name, backend, precision, per_slice, f"model.encode on {backend}/{precision}, {n} slice(s) per call; "
                    f"first call (export/compile, cached after) {prep:.1f} s"))
        if backend == "torch" and precision == "fp32":
            out.append(("torch_fp32_batched", backend, precision, variant.encode,
                        "model.encode on torch/fp32, all timed slices in one call (the old batch-4 default)"))
    return out, tmp


def get_default_model(model):
    """A copy of ``model`` on the backend/precision that ``get_model`` picks by default here."""
    import dataclasses

    from .backends import resolve

    backend, precision = resolve("auto", "auto", model.device)
    return dataclasses.replace(model, backend=backend, precision=precision, _runner=None, _runner_for=())


def run_bench(
    model_name: str = DEFAULT_MODEL,
    volume_spec: str = "sample",
    n_slices: int = 4,
    repeats: int = 3,
    n_prompts: int = 40,
    accuracy_slices: int = 12,
    quick: bool = False,
    int8: bool = True,
    head: bool = True,
    window: str = DEFAULT_WINDOW,
) -> list[dict]:
    """Run the benchmark; returns rows ``{"name", "value", "unit", "note"}`` (see the module doc).

    Args:
        model_name: model to time (default LiteMedSAM).
        volume_spec: ``"sample"``, ``"phantom"`` or a CT file.
        n_slices: slices per timed encoder call (spread over the liver).
        repeats: round-robin rounds; medians are reported.
        n_prompts: box prompts for the decoder latency.
        accuracy_slices: liver slices on which each backend's masks are compared with fp32.
        quick: small smoke run (torch backends only, small matmuls, no head training).
        int8: include OpenVINO int8 (its first use calibrates with NNCF, minutes).
        head: time head training (the demo recipe and the autosam one: HEAD_TRAIN_RECIPES).
        window: HU window.

    Returns:
        The table's rows.
    """
    import torch

    from .backends import tune_allocator
    from .embeddings import embed_volume
    from .evaluation import dice
    from .models import auto_num_threads, get_model

    rows: list[dict] = []

    def add(name, value, unit, note=""):
        rows.append({"name": name, "value": float(value) if value is not None else None, "unit": unit, "note": note})

    load0 = os.getloadavg()[0]
    volume = _load(volume_spec)
    model = get_model(model_name, device="cpu", backend="torch", precision="fp32")
    # One thread count for every row, chosen once (auto_num_threads: all cores unless the machine
    # is already busy): rows that picked their own count as the load moved were not comparable.
    threads = model.num_threads or auto_num_threads() or torch.get_num_threads()
    torch.set_num_threads(threads)
    model.num_threads = threads
    add("cpu_cores", os.cpu_count() or 0, "cores", f"torch threads {threads}; load average at start {load0:.2f}; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    # -- physical limits -------------------------------------------------------------------------
    peaks = _peaks(512 if quick else 2048, 1 if quick else 5)
    add("peak_fp32_gflops", peaks["fp32"], "GFLOP/s", "torch matmul fp32, median")
    add("peak_bf16_gflops", peaks["bf16"], "GFLOP/s", "torch matmul bf16" if peaks["bf16"] else "no native bf16 on this CPU")
    add("peak_int8_gops", peaks["int8"], "GOP/s", "torch._int_mm int8" if peaks["int8"] else "no int8 matmul in this torch")
    enc_gflop, dec_gflop = _flops(model)
    add("encoder_gflop_per_slice", enc_gflop, "GFLOP", f"{model.name} image encoder, FlopCounterMode")
    add("decoder_gflop_per_box", dec_gflop, "GFLOP", "prompt encoder + mask decoder, one box")
    add("encoder_bound_fp32_s_per_slice", enc_gflop / peaks["fp32"], "s/slice", "FLOPs / fp32 peak")

    # -- encoder backends, round-robin -----------------------------------------------------------
    zs = _pick_slices(volume, 2 if quick else n_slices)
    x = _batch(volume, model, zs, window)
    acc_zs = _pick_slices(volume, 2 if quick else accuracy_slices)
    x_acc = _batch(volume, model, acc_zs, window)
    candidates, tmp = _encoder_candidates(model, volume, window, quick=quick, int8=int8)
    try:
        runnable = [c for c in candidates if callable(c[3])]
        runnable.insert(1, ("bare_again", "torch", "fp32", runnable[0][3], "the bare loop again, same rounds: must agree with bare"))
        if tune_allocator():
            def bare_glibc(batch, _bare=runnable[0][3]):
                tune_allocator(False)
                try:
                    return _bare(batch)
                finally:
                    tune_allocator(True)

            candidates.insert(2, ("bare_glibc_malloc", "torch", "fp32", bare_glibc,
                                  "the bare loop with glibc's default malloc settings (before samliver.backends.tune_allocator)"))
            runnable.insert(2, candidates[2])
        for name, _, _, fn, _ in runnable:  # warm-up (first-call allocations, lazy inits)
            fn(zs[:1]) if name == "default" else fn(x[:1])
        timings: dict[str, list[float]] = {c[0]: [] for c in runnable}
        cpu_s: dict[str, list[float]] = {c[0]: [] for c in runnable}
        faults: dict[str, list[float]] = {c[0]: [] for c in runnable}
        for _ in range(1 if quick else repeats):
            for name, _, _, fn, _ in runnable:
                f0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
                fn(zs) if name == "default" else fn(x)
                timings[name].append((time.perf_counter() - t0) / len(zs))
                cpu_s[name].append((time.process_time() - c0) / len(zs))
                faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(zs))
        # accuracy: embeddings and tight-box liver masks vs fp32 on the accuracy slices
        ref = runnable[0][3](x_acc).float().numpy()
        ref_masks = box_masks(model, ref, volume, acc_zs)
        bare_s = statistics.median(timings["bare"])
        fastest = None
        for name, _backend, precision, fn, note in candidates[:1] + [runnable[1]] + candidates[1:]:
            if not callable(fn):
                add(f"backend_{name}_s_per_slice", None, "s/slice", f"{type(fn).__name__}: {str(fn)[:100]}")
                continue
            sec = statistics.median(timings[name])
            if name == "bare_again":
                add("backend_bare_again_s_per_slice", sec, "s/slice", note)
                add("encoder_bare_agreement", sec / bare_s, "x", "bare_again / bare: ~1 when the two bare loops agree")
                continue
            out = (fn(acc_zs) if name == "default" else fn(x_acc)).float().numpy()
            masks = box_masks(model, out, volume, acc_zs)
            scores = [dice(a, b) for a, b in zip(masks, ref_masks)]
            peak = peaks.get("int8" if precision == "int8" else precision) or peaks["fp32"]
            if precision == "int8" and peak < peaks["fp32"]:
                peak = peaks["fp32"]  # torch has no fast int8 CPU kernel here: % of the fp32 peak instead
            add(f"backend_{name}_s_per_slice", sec, "s/slice", f"{note}; {len(zs)} slices, median of {len(timings[name])} rounds")
            add(f"backend_{name}_cpu_s_per_slice", statistics.median(cpu_s[name]), "cpu-s/slice",
                "process CPU time (less sensitive to other load than the wall clock)")
            add(f"backend_{name}_page_faults_per_slice", statistics.median(faults[name]), "faults", "minor page faults (allocator churn)")
            add(f"backend_{name}_x_bare", bare_s / sec, "x", "bare / this (>1: faster)")
            add(f"backend_{name}_pct_peak", 100 * enc_gflop / sec / peak, "%", f"achieved FLOP/s / the {precision} matmul peak measured above")
            add(f"backend_{name}_max_abs_diff", float(np.abs(out - ref).max()), "abs", "embedding vs bare fp32")
            add(f"backend_{name}_mask_dice_vs_fp32", float(np.mean(scores)), "dice",
                f"tight liver box masks vs fp32 masks, mean of {len(scores)} slices; min {min(scores):.4f}")
            if name not in ("bare", "default", "bare_glibc_malloc") and float(np.mean(scores)) >= 0.99 and (fastest is None or sec < fastest[1]):
                fastest = (name, sec, float(np.mean(scores)))
        add("encoder_bare_s_per_slice", bare_s, "s/slice", "the bare loop (baseline of this run)")
        add("encoder_default_s_per_slice", statistics.median(timings["default"]), "s/slice",
            f"embed_volume with the default backend ({candidates[1][1]}/{candidates[1][2]})")
        if fastest is not None:
            add("encoder_fastest_s_per_slice", fastest[1], "s/slice", f"{fastest[0]}: fastest backend with mask Dice >= 0.99 vs fp32")
            add("encoder_fastest_mask_dice_vs_fp32", fastest[2], "dice", fastest[0])

        # -- cache hit -----------------------------------------------------------------------
        default = get_default_model(model)
        emb = embed_volume(volume, default, slices=zs, window=window, progress=False, cache_root=tmp / "hit")
        wall, _, _ = _timed(lambda: embed_volume(volume, default, slices=zs, window=window, progress=False,
                                                 cache_root=tmp / "hit"), max(repeats, 5))
        add("cache_hit_embed_volume_ms", 1000 * wall / len(zs), "ms/slice", "embed_volume with every slice cached (key + file checks)")
        wall, _, _ = _timed(lambda: emb.stack(zs), max(repeats, 5))
        add("cache_hit_ms", 1000 * wall / len(zs), "ms/slice", "one cached embedding read (memory-mapped float16 -> float32)")

        # -- box -> mask -----------------------------------------------------------------------------
        from .prompt_based_segmentation import Predictor

        predictor = Predictor(model)
        exact = Predictor(model, decoder="shared")
        h, w = volume.hu.shape[1:]
        t0 = time.perf_counter()
        predictor.set_embedding(emb[zs[0]], (h, w), model_name=model.name)
        predictor.predict(box=_slice_box(volume, zs[0]))  # builds / loads a compiled decoder once
        add("decoder_setup_s", time.perf_counter() - t0, "s",
            f"the default decoder ({predictor.backend}) ready for its first prompt in this process")
        per_slice = max(2, n_prompts // len(zs))
        timings, masks = {}, {}
        for name, pred in (("default", predictor), ("exact", exact)):
            if name == "exact" and predictor.backend == exact.backend:
                break
            rng = np.random.default_rng(0)  # the same boxes for both decoders
            lat, first, out = [], [], []
            for z in zs:
                # A user sets a slice once, then draws boxes on it: the first box pays for the
                # per-slice work (set_embedding + the decoder's shared image projections).
                t0 = time.perf_counter()
                pred.set_embedding(emb[z], (h, w), model_name=model.name)
                for i in range(per_slice + 1):
                    box = np.clip(_slice_box(volume, z) + rng.uniform(-3, 3, 4), 0, [w, h, w, h])
                    box[2:] = np.maximum(box[2:], box[:2] + 1)
                    out.append(pred.predict(box=box)[0][0])
                    (first if i == 0 else lat).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
            timings[name], masks[name] = (1000 * np.asarray(lat), 1000 * np.asarray(first)), out
        lat_ms, first_ms = timings["default"]
        add("decoder_box_ms", float(np.median(lat_ms)), "ms", f"predict(box) on a slice already set, via Predictor "
            f"({predictor.backend}, masks at slice size), median of {len(lat_ms)}; "
            f"{100 * dec_gflop / (np.median(lat_ms) / 1000) / peaks['fp32']:.0f} % of the fp32 peak counted at "
            "SAM's FLOPs per box")
        add("decoder_box_p90_ms", float(np.percentile(lat_ms, 90)), "ms", "90th percentile, same prompts")
        add("decoder_first_box_ms", float(np.median(first_ms)), "ms",
            f"set_embedding + the first box on a fresh slice, median of {len(first_ms)} slices")
        if "exact" in timings:
            from .evaluation import dice

            add("decoder_box_exact_ms", float(np.median(timings["exact"][0])), "ms",
                f"the same prompts through the exact float32 decoder ({exact.backend})")
            agree = [dice(a, b) for a, b in zip(masks["default"], masks["exact"]) if a.any() or b.any()]
            add("decoder_mask_dice_vs_exact", float(np.mean(agree)), "Dice",
                f"masks of the default decoder vs the exact one, mean of {len(agree)} boxes (min {min(agree):.4f})")
        boxes = np.stack([_slice_box(volume, zs[0])] * 8) + rng.uniform(-3, 3, (8, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        predictor.set_embedding(emb[zs[0]], (h, w), model_name=model.name)
        wall, _, _ = _timed(lambda: predictor.predict(boxes=boxes), 3 if quick else 9)
        add("decoder_batched_box_ms", 1000 * wall / len(boxes), "ms/box", f"predict(boxes=...) with {len(boxes)} boxes in one call")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    # -- head training ---------------------------------------------------------------------------
    if head and not quick:
        for name, value, unit, note in head_train_rows():
            add(name, value, unit, note)

    add("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "MiB", "ru_maxrss of this process")
    add("load_average_end", os.getloadavg()[0], "load", f"1-min load average on {os.cpu_count()} cores (contention)")
    return rows

def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table: name | value | unit | note."""
    lines = ["| name | value | unit | note |", "|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        text = "n/a" if v is None else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}")
        lines.append(f"| {r['name']} | {text} | {r['unit']} | {r.get('note', '')} |")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write ``[{"name", "value", "unit"}, ...]`` to ``path`` atomically."""
    data = [{"name": r["name"], "value": r["value"], "unit": r["unit"]} for r in rows]
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


HEAD_TRAIN_RECIPES = (("head_train_demo_s", "default"), ("head_train_autosam_s", "autosam"))
"""Bench rows of head training: (row name, ``config.RECIPES`` name) timed on the demo split."""


def head_train_rows() -> list[tuple[str, float, str, str]]:
    """``(name, seconds, "s", note)`` for each of :data:`HEAD_TRAIN_RECIPES`, via :func:`time_demo_recipe`.

    The note carries the run's test Dice, so that a faster row that lost accuracy shows it.
    """
    from .training import recipe

    rows = []
    for name, recipe_name in HEAD_TRAIN_RECIPES:
        config = recipe(recipe_name)
        r = time_demo_recipe(config)
        rows.append((name, r["seconds"], "s",
                     f"{recipe_name} recipe ({config.kind}, {r['steps']} steps x batch {config.batch_size}, "
                     f"sparse K = 8, {r['threads']} threads); test Dice liver {r['liver_dice']:.3f} / "
                     f"tumour {r['tumour_dice']:.3f}"))
    return rows


def time_demo_recipe(config: Any = None, *, embeddings: VolumeEmbeddings | None = None) -> dict:
    """Train the demo's head on the sample's demo split and score it, timed (for benchmarks).

    ``config`` defaults to the demo recipe (``training.recipe("default")``). The sample and the
    LiteMedSAM embeddings of every slice come from the caches (the first call encodes them,
    which is not timed). Test Dice as the demo reports it: the other 120 slices, post-processed,
    global over the stack.

    Returns:
        ``{"seconds", "ms_per_step", "steps", "liver_dice", "tumour_dice", "threads"}``.
    """
    import torch

    from .config import DEFAULT_K
    from .datasets import protocol_split
    from .embeddings import embed_volume
    from .evaluation import dice
    from .inference import predict_volume
    from .models import get_model
    from .postprocess import postprocess
    from .sample import fetch_sample, load_sample
    from .training import recipe, train_head
    from .training_data import slice_tensors

    fetch_sample()
    volume = load_sample()
    model = get_model(DEFAULT_MODEL)
    embeddings = embeddings or embed_volume(volume, model, progress=False)
    train, test = protocol_split(volume.label, protocol="sparse", k=DEFAULT_K)
    config = config or recipe("default")
    x, y, images = slice_tensors(volume, embeddings, train)
    res = train_head(x, y, images=images, config=config, model=model, progress=False)
    raw = predict_volume(volume, model, res.head, embeddings=embeddings, slices=test,
                         postprocess_label=False, progress=False)
    pred, gt = postprocess(raw[test]), volume.label[test]
    n = max(1, len(res.history["step"]))
    return {"seconds": res.history["seconds"], "ms_per_step": 1e3 * res.history["seconds"] / n,
            "steps": n, "liver_dice": dice(pred >= 1, gt >= 1),
            "tumour_dice": dice(pred == 2, gt == 2),
            "threads": config.threads or torch.get_num_threads()}
