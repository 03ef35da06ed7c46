"""Speed and memory benchmark: ``samliver bench`` (and ``make bench``).

Measures, on the real sample case (default) with LiteMedSAM (default):

* ``naive``: one slice at a time, float32, default threads, a bare ``model.image_encoder(x)``
  forward under ``torch.no_grad`` (what a first notebook would do);
* ``samliver``: :func:`samliver.embeddings.embed_volume` into an empty temporary cache
  (samliver's default encoder path), and the speed-up naive / samliver;
* ``cache_hit``: reading an embedding back from the cache (memory-mapped float16);
* ``box_to_mask``: a cached box -> mask round trip (``Predictor.set_embedding`` +
  ``predict(box=...)``), median and 90th percentile over many prompts;
* encoder variants tried for speed (batch size, threads, channels_last, bfloat16 autocast where
  the CPU has it natively, and with ``--compile`` ``torch.compile``), timed round-robin with the
  naive loop as the in-run baseline, each with its largest embedding difference from the float32
  reference and the Dice between its box masks and the float32 ones, so a faster variant that
  changes results shows it;
* peak resident memory (``resource.getrusage``).

Timings are the median of ``--repeats`` runs, as wall-clock seconds and as this process's CPU
seconds: on a shared machine the wall clock includes waiting for other processes, the CPU time
much less so; the table notes the load average seen. A Markdown table (name | value | unit |
note) goes to stdout and the figures as a JSON list of ``{"name", "value", "unit"}`` to
``outputs/bench.json`` (written atomically). ``--quick`` (or ``SAMLIVER_FAST=1``) runs the same
code on 2 slices, once, with 10 prompts and no variants, e.g. ``--quick --model tiny --volume
phantom`` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .util import SamliverError, atomic_write_text, fast_mode


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
    from .embeddings import load_volume_arg

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


def _masks(model, embs, volume, zs) -> list[np.ndarray]:
    """Masks decoded from ``embs`` (N, 256, 64, 64) with one ``_slice_box`` per slice."""
    from .prompt_based_segmentation import Predictor

    predictor = Predictor(model)
    out = []
    for emb, z in zip(embs, zs):
        predictor.set_embedding(emb, volume.hu.shape[1:])
        out.append(predictor.predict(box=_slice_box(volume, z))[0][0])
    return out


def _box_dice(model, embs: np.ndarray, volume, zs) -> float:
    """Mean liver Dice of the tight ground-truth box masks over the slices with liver."""
    from .evaluation import dice

    scores = [dice(m, volume.label[z] > 0) for m, z in zip(_masks(model, embs, volume, zs), zs)
              if (volume.label[z] > 0).any()]
    return float(np.mean(scores)) if scores else float("nan")


def _native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX); without them torch emulates bf16 slowly."""
    import torch

    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(bool(f()) for f in checks if f is not None)


def _onnx_encoder(enc, x):
    """An ONNX Runtime session of the encoder (exported to a temporary file), as a callable."""
    import tempfile

    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory(prefix="samliver-onnx-") as tmp:
        path = str(Path(tmp) / "encoder.onnx")
        # Batch 1: TinyViT's traced reshapes fix the batch size (a dynamic batch fails in ORT).
        torch.onnx.export(enc, (x[:1],), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["embedding"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(batch):
        return torch.cat([torch.from_numpy(session.run(None, {"x": batch[i : i + 1].numpy()})[0])
                          for i in range(len(batch))])

    return run


def _encoder_variants(model, x, *, compile_too: bool, bf16_too: bool = True):
    """(name, note, callable(batch) -> embeddings) for each speed-up tried on the bare encoder."""
    import torch

    enc = model.image_encoder

    def plain(batch):
        with torch.inference_mode():
            return enc(batch)

    def one_thread(batch):
        import dataclasses

        return dataclasses.replace(model, num_threads=1).encode(batch)

    def channels_last(batch):
        with torch.inference_mode():
            return enc(batch.contiguous(memory_format=torch.channels_last))

    def bf16(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(batch).float()

    def naive_loop(batch):
        with torch.no_grad():
            return torch.cat([enc(batch[i : i + 1]) for i in range(len(batch))])

    variants = [
        ("naive_loop", "the naive loop again, timed in the same rounds (the baseline)", naive_loop, None),
        ("inference_mode_b1", "batch 1, torch.inference_mode", lambda b: plain(b[:1]), 1),
        ("batched", "all timed slices in one forward, inference_mode, default threads", plain, None),
        ("samliver_encode", "model.encode, batched: samliver's default (inference_mode, auto_num_threads)",
         model.encode, None),
        ("threads1_batched", "SamModel(num_threads=1).encode (SAMLIVER_THREADS=1), batched", one_thread, None),
        ("channels_last_batched", "channels_last input, batched", channels_last, None),
    ]
    try:
        import onnxruntime  # noqa: F401  (optional: `pip install onnxruntime onnx`)

        variants.append(("onnxruntime_b1", "ONNX Runtime CPU session of the exported encoder (fp32), one slice per run",
                         _onnx_encoder(enc, x), None))
    except Exception as err:  # not installed, or the export failed: reported, not fatal
        def unavailable(batch, _err=err):
            raise RuntimeError(f"onnxruntime variant unavailable ({type(_err).__name__}: {_err})")

        variants.append(("onnxruntime_b1", "ONNX Runtime (optional)", unavailable, None))
    if bf16_too:
        variants.append(("bf16_autocast_batched", "bfloat16 autocast on CPU, batched", bf16, None))
    if compile_too:
        compiled = torch.compile(enc, dynamic=False)

        def run_compiled(batch):
            with torch.inference_mode():
                return compiled(batch)

        variants.append(("torch_compile_batched", "torch.compile (inductor), warm", run_compiled, None))
    return variants


def run_bench(
    model_name: str = "litemedsam",
    volume_spec: str = "sample",
    n_slices: int = 4,
    repeats: int = 3,
    n_prompts: int = 60,
    variants: bool = True,
    variant_slices: int = 2,
    variant_repeats: int = 2,
    compile_too: bool = False,
    force_bf16: bool = False,
    window: str = "abdomen",
    progress: bool = False,
) -> list[dict]:
    """Run the benchmark; returns rows ``{"name", "value", "unit", "note"}`` (see the module doc)."""
    import torch

    from .embeddings import embed_volume
    from .models import get_model
    from .prompt_based_segmentation import Predictor

    rows: list[dict] = []

    def add(name, value, unit, note=""):
        rows.append({"name": name, "value": float(value) if value is not None else None, "unit": unit, "note": note})

    load0 = os.getloadavg()[0]
    volume = _load(volume_spec)
    model = get_model(model_name, device="cpu")
    zs = _pick_slices(volume, n_slices)
    x = _batch(volume, model, zs, window)
    threads = torch.get_num_threads()
    add("cpu_cores", os.cpu_count() or 0, "cores", f"torch threads {threads}; load average at start {load0:.2f}")
    add("slices_timed", len(zs), "slices", f"{model.name} on {volume_spec}, slices {zs}")
    from .models import auto_num_threads

    auto = model.num_threads or auto_num_threads() or threads
    add("encoder_threads_samliver", auto, "threads", "threads model.encode uses now (num_threads / SAMLIVER_THREADS / auto)")

    # (a) naive: one slice at a time, fp32, bare forward
    def naive():
        with torch.no_grad():
            return torch.cat([model.image_encoder(x[i : i + 1]) for i in range(len(zs))])

    naive()  # warm-up (first-call allocations)
    wall, cpu, ref = _timed(naive, repeats)
    ref = ref.float().numpy()
    naive_s = wall / len(zs)
    add("encoder_naive", naive_s, "s/slice", f"1 slice/forward, fp32, no_grad, median of {repeats}")
    add("encoder_naive_cpu", cpu / len(zs), "cpu-s/slice", "process CPU time, same runs")

    # (b) samliver's path, uncached, into a temporary cache folder
    with tempfile.TemporaryDirectory(prefix="samliver-bench-") as tmp:
        counter = iter(range(10**6))

        def fresh():
            return embed_volume(volume, model, slices=zs, window=window, progress=progress,
                                cache_root=Path(tmp) / f"run{next(counter)}")

        wall, cpu, emb = _timed(fresh, repeats)
        ours = emb.stack(zs)
        samliver_s = wall / len(zs)
        add("encoder_samliver", samliver_s, "s/slice", "embed_volume, empty cache, incl. preprocessing + float16 write")
        add("encoder_samliver_cpu", cpu / len(zs), "cpu-s/slice", "process CPU time, same runs")
        add("speedup_naive_over_samliver", naive_s / samliver_s, "x", "wall-clock ratio (>1: samliver faster)")
        add("embedding_max_abs_diff_samliver", float(np.abs(ours - ref).max()), "abs", "vs naive fp32 (float16 cache rounding included)")

        # (c) cache hit: the same call again finds every slice on disk
        wall, _, _ = _timed(lambda: embed_volume(volume, model, slices=zs, window=window, progress=False,
                                                 cache_root=emb.path.parent.parent), repeats)
        add("cache_hit_embed_volume", 1000 * wall / len(zs), "ms/slice", "embed_volume with all slices cached (key + file checks)")
        wall, _, _ = _timed(lambda: emb.stack(zs), max(repeats, 5))
        add("cache_hit_load", 1000 * wall / len(zs), "ms/slice", "memory-mapped float16 -> float32 array")

        # (d) cached box -> mask latency
        predictor = Predictor(model)
        rng = np.random.default_rng(0)
        h, w = volume.hu.shape[1:]
        lat, lat_cpu = [], []
        for i in range(n_prompts):
            z = zs[i % len(zs)]
            box = np.clip(_slice_box(volume, z) + rng.uniform(-3, 3, 4), 0, [w, h, w, h])
            box[2:] = np.maximum(box[2:], box[:2] + 1)
            t0, c0 = time.perf_counter(), time.process_time()
            predictor.set_embedding(emb[z], (h, w), model_name=model.name)
            predictor.predict(box=box)
            lat.append(time.perf_counter() - t0)
            lat_cpu.append(time.process_time() - c0)
        lat_ms = 1000 * np.asarray(lat[1:] if len(lat) > 1 else lat)
        add("box_to_mask_median", float(np.median(lat_ms)), "ms", f"set_embedding + predict(box), {len(lat_ms)} prompts; target <= 15 ms")
        add("box_to_mask_p90", float(np.percentile(lat_ms, 90)), "ms", "90th percentile, same prompts")
        add("box_to_mask_median_cpu", 1000 * float(np.median(lat_cpu)), "cpu-ms", "process CPU time per prompt")
        # the decoder's many small operations suffer most when torch's threads wait for busy cores
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            lat1, cpu1 = [], []
            for i in range(max(2, n_prompts // 2)):
                z = zs[i % len(zs)]
                t0, c0 = time.perf_counter(), time.process_time()
                predictor.set_embedding(emb[z], (h, w), model_name=model.name)
                predictor.predict(box=np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4]))
                lat1.append(time.perf_counter() - t0)
                cpu1.append(time.process_time() - c0)
        finally:
            torch.set_num_threads(previous)
        add("box_to_mask_median_threads1", 1000 * float(np.median(lat1[1:])), "ms",
            f"same with torch.set_num_threads(1), {len(lat1) - 1} prompts")
        add("box_to_mask_median_threads1_cpu", 1000 * float(np.median(cpu1[1:])), "cpu-ms",
            "its CPU time: the latency on an idle core")

    # quality of the default path: liver box Dice from naive vs samliver embeddings
    if volume.label is not None:
        d_ref = _box_dice(model, ref, volume, zs)
        d_ours = _box_dice(model, ours, volume, zs)
        add("liver_box_dice_naive", d_ref, "dice", f"tight GT box per slice, {len(zs)} slices")
        add("liver_box_dice_samliver", d_ours, "dice", "same boxes, embeddings from the cache (float16)")

    # encoder variants
    if variants:
        nv = max(1, min(variant_slices, len(zs)))
        xv, zv = x[:nv], zs[:nv]
        ref_masks = _masks(model, ref[:nv], volume, zv)
        bf16_too = force_bf16 or _native_bf16()
        if not bf16_too:
            add("variant_bf16_autocast_batched", None, "s/slice",
                "skipped: this CPU has no native bfloat16 (emulated bf16 was ~100x slower on the tiny model); --bf16 forces it")
        from .evaluation import dice

        # Round-robin: every round times each variant once, so a change in the machine's load
        # during the run affects all variants alike (the first entry is the naive loop again).
        candidates = _encoder_variants(model, xv, compile_too=compile_too, bf16_too=bf16_too)
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in candidates}
        outputs: dict[str, object] = {}
        first: dict[str, float] = {}
        for name, _, fn, _ in candidates:
            if name.startswith("torch_compile"):
                w0 = time.perf_counter()
                try:
                    fn(xv)  # the compilation
                except Exception as err:  # a variant this CPU/torch cannot run is reported, not fatal
                    outputs[name] = err
                first[name] = time.perf_counter() - w0
        for _ in range(max(1, variant_repeats)):
            for name, _, fn, _ in candidates:
                if isinstance(outputs.get(name), Exception):
                    continue
                w0, c0 = time.perf_counter(), time.process_time()
                try:
                    outputs[name] = fn(xv)
                except Exception as err:
                    outputs[name] = err
                    continue
                timings[name].append((time.perf_counter() - w0, time.process_time() - c0))
        base = None
        for name, note, _, n in candidates:
            k = n or nv
            out = outputs.get(name)
            if isinstance(out, Exception) or not timings[name]:
                add(f"variant_{name}", None, "s/slice", f"failed: {type(out).__name__}: {str(out)[:80]}")
                continue
            wall = statistics.median(t[0] for t in timings[name]) / k
            cpu = statistics.median(t[1] for t in timings[name]) / k
            base = wall if base is None else base
            out = torch.as_tensor(out).float().numpy()
            diff = float(np.abs(out - ref[:k]).max())
            masks = _masks(model, out, volume, zv[:k])
            mdice = float(np.mean([dice(a, b) for a, b in zip(masks, ref_masks[:k])]))
            extra = f"; first call (compilation) {first[name]:.0f} s" if name in first else ""
            add(f"variant_{name}", wall, "s/slice", f"{note}{extra}; {k} slices, median of {len(timings[name])}, interleaved")
            add(f"variant_{name}_cpu", cpu, "cpu-s/slice", "process CPU time")
            add(f"variant_{name}_speedup", base / wall, "x", "naive loop (same rounds) / variant, wall clock")
            add(f"variant_{name}_max_abs_diff", diff, "abs", "embedding vs fp32 naive")
            add(f"variant_{name}_mask_dice_vs_fp32", mdice, "dice", "box masks from variant vs from fp32 embeddings")

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


def main(argv: list[str] | None = None) -> int:
    """``samliver bench [--quick] [--model litemedsam] [--volume sample] [--slices 4] [--out outputs/bench.json]``."""
    parser = argparse.ArgumentParser(prog="samliver bench", description="Speed and memory benchmark (prints a table).")
    parser.add_argument("--model", default="litemedsam", help="model name (default litemedsam)")
    parser.add_argument("--volume", default="sample", help="'sample' (default), 'phantom', or a CT file")
    parser.add_argument("--slices", type=int, default=4, help="slices timed (default 4, spread over the liver)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, median reported (default 3)")
    parser.add_argument("--prompts", type=int, default=60, help="box prompts for the latency figure (default 60)")
    parser.add_argument("--no-variants", action="store_true", help="skip the encoder speed-up variants")
    parser.add_argument("--variant-slices", type=int, default=2, help="slices per variant timing (default 2)")
    parser.add_argument("--variant-repeats", type=int, default=2, help="runs per variant (default 2)")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    parser.add_argument("--bf16", action="store_true", help="try bfloat16 autocast even without native CPU support")
    parser.add_argument("--quick", action="store_true", help="tiny run: 2 slices, 1 repeat, 10 prompts, no variants")
    parser.add_argument("--out", default="outputs/bench.json", help="JSON output (default outputs/bench.json)")
    args = parser.parse_args(argv)
    quick = args.quick or fast_mode()
    if quick:
        args.slices, args.repeats, args.prompts = min(args.slices, 2), 1, min(args.prompts, 10)
        args.no_variants = True
    if args.slices < 1 or args.repeats < 1 or args.prompts < 1:
        raise SamliverError("--slices, --repeats and --prompts must be at least 1.")
    rows = run_bench(
        model_name=args.model, volume_spec=args.volume, n_slices=args.slices, repeats=args.repeats,
        n_prompts=args.prompts, variants=not args.no_variants, variant_slices=args.variant_slices,
        variant_repeats=args.variant_repeats, compile_too=args.compile, force_bf16=args.bf16,
    )
    print(format_table(rows))
    path = write_json(rows, args.out)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0
