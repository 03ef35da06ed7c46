"""Encoder backends: the frozen image encoder run by torch, ONNX Runtime or OpenVINO.

Why: everything after the encoder is cheap, so the encoder decides how long a volume takes.
On a CPU the inference engines run the same network 2-4x faster than eager torch (fused
kernels, bf16/int8 matrix units), while torch stays the path for GPUs and for platforms
without the optional packages (``pip install 'samliver[fast]'``).

| backend       | precisions             | where                     | result vs torch fp32      |
|---------------|------------------------|---------------------------|---------------------------|
| ``torch``     | fp32, bf16, fp16 (CUDA)| every device              | fp32 exact                |
| ``onnxruntime``| fp32                  | CPU                       | exact (~1e-5)             |
| ``openvino``  | fp32, bf16, int8       | CPU                       | fp32 exact; bf16/int8 not |

``fp32`` on OpenVINO is asked for explicitly (``INFERENCE_PRECISION_HINT=f32``): OpenVINO's
default on a CPU with native bf16 is bf16, which is *not* exact. ``int8`` is post-training
quantisation with NNCF, calibrated on real CT slices (the bundled LiTS sample), with the
convolutions and attention output projections kept in float (:data:`INT8_RECIPE`).

Exported models live in ``$SAMLIVER_HOME/backends/<model>/<weights sha[:16]>/`` beside a
``key.json`` naming the model, weights, input size, format version and each file's SHA-256;
a missing, partial or modified file is re-exported, never used. Exports are written to a
temporary folder and renamed into place, so a crash leaves no half-written model.

:func:`resolve` picks the backend and precision: ``auto`` means OpenVINO on a CPU when it is
installed (else ONNX Runtime, else torch), torch elsewhere, at fp32 (exact). Faster, inexact
precisions are one option away (``--precision bf16`` / ``int8``); ``make bench`` reports
their speed and their mask Dice against fp32.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import DEFAULT_WINDOW
from .util import SamliverError, atomic_folder, atomic_write_text, cache_dir, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from .models import SamModel

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
EXPORT_FORMAT = 1  # bump when the export code changes what a file means
# Which precisions each backend can run (fp16 only where torch has a GPU to run it on).
SUPPORTED = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32",),
    "openvino": ("fp32", "bf16", "int8"),
}
CALIBRATION_SLICES = 32  # int8: real CT slices NNCF calibrates on (each costs two encoder passes)
# The int8 recipe: NNCF post-training quantisation (ModelType.TRANSFORMER) with the ops below kept
# in float (bf16 where native). Chosen by a sensitivity sweep on the AVX-512-BF16 EPYC
# (docs/benchmark.md, "int8 mixed precision"; data_scripts/int8_sensitivity.py): every
# convolution (TinyViT's conv stem and stage, the local convs, the neck) and the attention output
# projections stay float, the qkv and MLP matmuls run int8. Held-out mask Dice vs fp32 0.9776 ->
# 0.9879 (bf16: 0.9904) for 1.00-1.07x the old recipe's time. It is part of the export key, so
# exports of another recipe are rebuilt.
INT8_RECIPE: dict = {
    "calibration_slices": CALIBRATION_SLICES,
    # (op types, module regex) rules; an op matching any rule stays float (see int8_float_ops)
    "float_ops": ((("Convolution", "GroupConvolution"), ""), ((), r"\.attn\.proj/")),
    "fast_bias_correction": True,
    # NNCF's SmoothQuant alpha for the matmuls (absent: NNCF's 0.95). 0.7 with 32 calibration
    # slices beat 0.95 with 16 by ~0.0025 held-out mask Dice in every check, at the same speed
    # (0.9889 vs 0.9864 for samliver's own export; still under 0.99: docs/benchmark.md, "int8:
    # dynamic quantization and SmoothQuant").
    "smooth_quant_alpha": 0.7,
}


# ----------------------------------------------------------------------------------------------
# process-level settings


_ALLOCATOR_TUNED = False
# glibc's documented defaults (mallopt(3)), restored by tune_allocator(False); the mmap threshold
# is never set, so glibc keeps adjusting it dynamically as it does by default.
_GLIBC_DEFAULTS = {"M_MMAP_MAX": 65536, "M_TRIM_THRESHOLD": 128 * 1024, "M_TOP_PAD": 128 * 1024}
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_MAX": -4}


def tune_allocator(enable: bool = True) -> bool:
    """Stop glibc's malloc from handing large buffers back to the OS after every use.

    Why: an encoder forward allocates and frees the same large activations for every slice.
    glibc serves big blocks with ``mmap`` and unmaps them on ``free`` (and trims the heap top),
    so each slice faulted in ~400k fresh pages (~1 s of system time per slice on a 2-core EPYC;
    ``make bench`` shows page faults per slice for every backend). ``M_MMAP_MAX = 0`` keeps
    those blocks in the heap and a 1 GiB trim threshold keeps the heap from shrinking between
    slices: 0 faults, the same bits out. Freed memory is still reused, only not returned to the
    OS between calls. ``get_model`` calls this for CPU models; ``SAMLIVER_MALLOC=default``
    opts out.

    Args:
        enable: True to apply the settings, False to restore glibc's defaults (the benchmark
            times the bare loop both ways).

    Returns:
        True when the settings are now in force (Linux with glibc), else False.
    """
    global _ALLOCATOR_TUNED
    if enable and (os.environ.get("SAMLIVER_MALLOC", "").strip().lower() == "default"
                   or not sys.platform.startswith("linux")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    values = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30, "M_TOP_PAD": 64 << 20} if enable else _GLIBC_DEFAULTS
    ok = all(mallopt(_MALLOPT[name], value) == 1 for name, value in values.items())
    _ALLOCATOR_TUNED = bool(enable and ok)
    return _ALLOCATOR_TUNED


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    import torch

    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(bool(f()) for f in checks if f is not None)


def installed(backend: str) -> bool:
    """Whether the optional package behind ``backend`` can be imported (torch always can)."""
    if backend == "torch":
        return True
    if backend == "openvino":
        return importlib.util.find_spec("openvino") is not None
    if backend == "onnxruntime":
        return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    raise SamliverError(f"Unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}.")


def resolve(backend: str | None, precision: str | None, device: str) -> tuple[str, str]:
    """The (backend, precision) to use for ``device``.

    Args:
        backend: ``"auto"``/None (OpenVINO on CPU if installed, else ONNX Runtime, else torch;
            torch on CUDA/MPS), or one of :data:`BACKENDS`. Env default: ``$SAMLIVER_BACKEND``.
        precision: ``"auto"``/None (fp32: the only precision measured to keep masks within
            Dice 0.995 of fp32), or one of :data:`PRECISIONS`. Env default: ``$SAMLIVER_PRECISION``.
        device: the torch device the model lives on.

    Returns:
        (backend, precision), both concrete.

    Raises:
        SamliverError: an unknown name, a backend that is not installed, a CPU-only backend
            asked for on a GPU, or a precision the backend cannot run.
    """
    backend = (backend or os.environ.get("SAMLIVER_BACKEND", "") or "auto").strip().lower()
    precision = (precision or os.environ.get("SAMLIVER_PRECISION", "") or "auto").strip().lower()
    if backend not in ("auto", *BACKENDS):
        raise SamliverError(f"Unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}.")
    if precision not in ("auto", *PRECISIONS):
        raise SamliverError(f"Unknown precision {precision!r}: choose one of auto, {', '.join(PRECISIONS)}.")
    on_cpu = str(device).split(":")[0] == "cpu"
    if backend == "auto":
        if not on_cpu:
            backend = "torch"
        elif precision in ("auto", "fp32", "bf16", "int8") and installed("openvino"):
            backend = "openvino"
        elif precision in ("auto", "fp32") and installed("onnxruntime"):
            backend = "onnxruntime"
        else:
            backend = "torch"
    if precision == "auto":
        precision = "fp32"
    if backend != "torch" and not on_cpu:
        raise SamliverError(f"Backend {backend!r} runs on the CPU; the model is on {device}. Use --backend torch.")
    if backend != "torch" and not installed(backend):
        raise SamliverError(
            f"Backend {backend!r} is not installed: `pip install 'samliver[fast]'` (or choose --backend torch)."
        )
    if precision not in SUPPORTED[backend]:
        raise SamliverError(
            f"Backend {backend!r} does not run {precision}: it runs {', '.join(SUPPORTED[backend])}."
            + (" int8 needs --backend openvino." if precision == "int8" else "")
        )
    if precision == "fp16" and on_cpu:
        raise SamliverError("fp16 needs a GPU; on a CPU use --precision bf16 (native on recent CPUs) or fp32.")
    if precision == "bf16" and on_cpu and not native_bf16():
        # Emulated bf16 ran the encoder ~10x slower in torch, and OpenVINO silently runs f32.
        raise SamliverError(
            "This CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 would be emulated (slow) or "
            "silently run as fp32. Use --precision fp32, or int8 with --backend openvino."
        )
    return backend, precision


# ----------------------------------------------------------------------------------------------
# the export cache


def _export_key(model: SamModel, fmt: str, precision: str, extra: dict | None = None) -> dict:
    key = {
        "export_format": EXPORT_FORMAT,
        "model": model.name,
        "weights": model.weights_id,
        "image_size": model.image_size,
        "format": fmt,
        "precision": precision,
    }
    key.update(extra or {})
    return key


def export_dir(model: SamModel) -> Path:
    """``$SAMLIVER_HOME/backends/<model>/<weights sha[:16]>``: where a model's exports live."""
    return cache_dir("backends", model.name, model.weights_id[:16])


def _cached_export(model: SamModel, name: str, key: dict, build: Callable[[Path], list[str]]) -> Path:
    """The folder ``export_dir(model)/name`` holding a verified export; built with ``build`` if needed.

    ``build(tmp_folder)`` writes the files and returns their names; the folder is renamed into
    place only when complete, with a ``key.json`` recording ``key`` and each file's SHA-256.
    """
    folder = export_dir(model) / name
    key_file = folder / "key.json"
    try:
        stored = json.loads(key_file.read_text())
        if stored.get("key") == key and all(
            (folder / f).is_file() and sha256_file(folder / f) == digest for f, digest in stored["files"].items()
        ):
            return folder
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # missing or unreadable: rebuild below
    with atomic_folder(folder) as tmp:
        with warnings.catch_warnings():
            # Tracing warns about every Python-level shape check in the model's code; they are
            # about the model authors' code and the export is checked by its key, not by eye.
            warnings.simplefilter("ignore")
            files = build(tmp)
        atomic_write_text(tmp / "key.json", json.dumps(
            {"key": key, "files": {f: sha256_file(tmp / f) for f in files}}, indent=1, sort_keys=True))
    return folder


def _example_input(model: SamModel):
    import torch

    return torch.zeros(1, 3, model.image_size, model.image_size)


def export_onnx(model: SamModel) -> Path:
    """The encoder as ONNX (batch 1, fp32), exported once per model and weights.

    Returns:
        The path of ``encoder.onnx`` inside the export cache.
    """
    import torch

    def build(tmp: Path) -> list[str]:
        # Batch 1: TinyViT's traced reshapes fix the batch size (a dynamic batch fails in ORT);
        # batch 1 is also what measured fastest on a CPU.
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(model.image_encoder.cpu(), (_example_input(model),), str(tmp / "encoder.onnx"),
                              dynamo=False, opset_version=17, input_names=["x"], output_names=["embedding"])
        model.image_encoder.to(model.device)
        return ["encoder.onnx"]

    return _cached_export(model, "encoder-onnx", _export_key(model, "onnx", "fp32"), build) / "encoder.onnx"


def openvino_fp32_ir(model: SamModel) -> Path:
    """The model's encoder as an OpenVINO float32 IR, exported once into ``$SAMLIVER_HOME`` (keyed and
    checked like the embedding cache); its path."""
    import openvino as ov
    import torch

    def build(tmp: Path) -> list[str]:
        with torch.no_grad():
            ov_model = ov.convert_model(model.image_encoder.cpu().eval(), example_input=_example_input(model))
        model.image_encoder.to(model.device)
        # compress_to_fp16=False: the default would round the weights to fp16 on disk.
        ov.save_model(ov_model, str(tmp / "encoder.xml"), compress_to_fp16=False)
        return ["encoder.xml", "encoder.bin"]

    return _cached_export(model, "encoder-openvino-fp32", _export_key(model, "openvino-ir", "fp32"), build) / "encoder.xml"


def calibration_batches(model: SamModel, n: int = CALIBRATION_SLICES) -> list[np.ndarray]:
    """``n`` real CT slices (the bundled LiTS sample, spread over the liver), prepared for ``model``.

    Returns:
        A list of float32 arrays (1, 3, S, S).
    """
    from .preprocess import WINDOWS, window_to_unit
    from .sample import load_sample

    try:
        volume = load_sample()
    except SamliverError as err:
        raise SamliverError(f"int8 calibration needs the sample CT: run `samliver fetch-sample` ({err}).") from err
    rows = np.flatnonzero((volume.label > 0).any(axis=(1, 2))) if volume.label is not None else np.arange(len(volume.hu))
    zs = rows[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))]
    return [model.prepare(window_to_unit(volume.hu[int(z)], WINDOWS[DEFAULT_WINDOW]))[None].numpy() for z in zs]


def module_name(op) -> str:
    """The torch module an OpenVINO IR op came from, as the converter named it.

    Why: ops keep their module path (``__module.layers.1.blocks.0.mlp.fc1/aten::linear/MatMul``),
    except convolutions fused with their batch norm, which get a generated name
    (``Multiply_24853``, numbered differently by every conversion): those take the name of the
    op they feed (``__module.layers.0.blocks.0.conv1.bn/...``), so a recipe can name modules.
    """
    name = op.get_friendly_name()
    if not name.startswith("__module") and op.get_output_size():
        name = next((t.get_node().get_friendly_name() for t in op.output(0).get_target_inputs()), name)
    return name


def int8_float_ops(ov_model, recipe: dict | None = None) -> list[str]:
    """The names of the ops of ``ov_model`` that the int8 recipe keeps in float.

    Args:
        ov_model: the fp32 ``openvino.Model`` about to be quantised.
        recipe: an int8 recipe (default :data:`INT8_RECIPE`); its ``float_ops`` is a sequence of
            rules ``(op types, module regex)``: an op stays float when, for some rule, its type
            is one of the types (empty: any type) and the regex is found in its
            :func:`module_name` (empty: any module).

    Returns:
        Sorted op names, for ``nncf.IgnoredScope(names=...)``.
    """
    import re

    recipe = INT8_RECIPE if recipe is None else recipe
    rules = [(set(types), re.compile(pattern)) for types, pattern in recipe.get("float_ops", ())]
    # Constants (weights, biases) are quantised with the op they feed, never on their own.
    out = [op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() != "Constant"
           and any((not types or op.get_type_name() in types) and pattern.search(module_name(op))
                  for types, pattern in rules)]
    return sorted(out)


def _nncf_advanced(recipe: dict):
    """NNCF's advanced quantisation parameters for ``recipe`` (its SmoothQuant alpha, if any)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    adv = AdvancedQuantizationParameters()
    if recipe.get("smooth_quant_alpha") is not None:
        # The alpha for the matmuls (NNCF's TRANSFORMER default: 0.95; negative: no SmoothQuant).
        adv.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=float(recipe["smooth_quant_alpha"]))
    return adv


def openvino_int8_ir(model: SamModel) -> Path:
    """The encoder quantised by NNCF with ``INT8_RECIPE`` (calibrated on real liver slices), exported
    once into ``$SAMLIVER_HOME`` with the recipe in its key; its path."""
    import openvino as ov

    recipe = dict(INT8_RECIPE)

    def build(tmp: Path) -> list[str]:
        try:
            import nncf
        except ImportError as err:
            raise SamliverError("int8 needs NNCF: `pip install 'samliver[int8]'`.") from err
        data = calibration_batches(model, recipe["calibration_slices"])
        fp32 = ov.Core().read_model(str(openvino_fp32_ir(model)))
        # TRANSFORMER keeps softmax/layer-norm inputs in float and quantises the matmuls, which
        # is where the time goes in TinyViT/ViT; the generic preset lost more mask Dice. The
        # recipe's float ops run bf16 where the CPU has it (OpenVINOEncoder's hint).
        scope = nncf.IgnoredScope(names=int8_float_ops(fp32, recipe), validate=False)
        quantised = nncf.quantize(fp32, nncf.Dataset(data), subset_size=len(data),
                                  model_type=nncf.ModelType.TRANSFORMER, ignored_scope=scope,
                                  fast_bias_correction=recipe["fast_bias_correction"],
                                  advanced_parameters=_nncf_advanced(recipe))
        ov.save_model(quantised, str(tmp / "encoder.xml"), compress_to_fp16=False)
        return ["encoder.xml", "encoder.bin"]

    # The whole recipe is in the key: an export made with another recipe is rebuilt, not reused.
    extra = {"calibration": f"LiTS sample, {recipe['calibration_slices']} liver slices, abdomen window",
             "nncf": "transformer", "recipe": json.loads(json.dumps(recipe))}  # tuples as lists, as stored
    return _cached_export(model, "encoder-openvino-int8", _export_key(model, "openvino-ir", "int8", extra), build) / "encoder.xml"


# ----------------------------------------------------------------------------------------------
# runners: callable(batch (B, 3, S, S) float32 tensor) -> (B, 256, h, w) float32 tensor


class TorchEncoder:
    """The encoder in eager torch; bf16/fp16 through autocast."""

    def __init__(self, model: SamModel, precision: str) -> None:
        import torch

        self.module = model.image_encoder
        self.device = model.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self, batch):
        import torch

        with torch.inference_mode():
            # No channels_last: it measured 1.27x on an AVX-512 CPU but 0.79x (CPU time) on
            # an AVX2 one, so plain NCHW it stays.
            batch = batch.to(self.device, dtype=torch.float32)
            if self.dtype is not None:
                with torch.autocast(device_type=str(self.device).split(":")[0], dtype=self.dtype):
                    out = self.module(batch)
            else:
                out = self.module(batch)
            return out.float().contiguous()


class OnnxRuntimeEncoder:
    """The exported encoder in an ONNX Runtime CPU session (fp32)."""

    def __init__(self, model: SamModel, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(export_onnx(model)), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch):
        import torch

        x = batch.detach().cpu().float().numpy()
        return torch.cat([torch.from_numpy(self.session.run(None, {"x": x[i : i + 1]})[0]) for i in range(len(x))])


class OpenVINOEncoder:
    """The exported encoder compiled by OpenVINO for the CPU, at fp32 (explicit hint), bf16 or int8.

    Two compiled forms of the same network, because one slice and a volume want different
    things: a single slice (the widget's next slice) runs on a LATENCY model (one stream, every
    thread on it); several slices (``embed_volume``) run on a THROUGHPUT model, whose streams
    (one per core here) each encode their own slice at the same time. On the 2-core
    AVX-512-BF16 EPYC that made fp32 encoding 1.13x faster per slice than one slice at a time
    (0.62 vs 0.70 s), with bit-identical embeddings; docs/benchmark.md.
    """

    def __init__(self, model: SamModel, precision: str, threads: int | None) -> None:
        import openvino as ov

        path = openvino_int8_ir(model) if precision == "int8" else openvino_fp32_ir(model)
        self.config = {
            # Without the hint OpenVINO runs bf16 on CPUs that have it: never silently inexact.
            # int8: the layers NNCF left in float run in bf16 where the CPU has it (that is
            # what int8 means on such a CPU: 1.14x faster, mask Dice unchanged), else f32.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" or (precision == "int8" and native_bf16()) else "f32",
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.core = ov.Core()
        # OpenVINO's own compiled-blob cache beside the export: a second process compiles in a
        # fraction of the time (the blob is keyed by OpenVINO on the model and its settings).
        self.core.set_property({"CACHE_DIR": str(path.parent / "compiled")})
        self.network = self.core.read_model(str(path))
        self.request = self.core.compile_model(self.network, "CPU", {**self.config, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        self._queue = None
        # One infer request (and one queue) serves every caller: threads that share a model (two
        # embed_volume calls at once) take turns, else one reads the other's output or OpenVINO
        # refuses a busy request.
        self._lock = threading.Lock()

    def _throughput_queue(self):
        import openvino as ov

        if self._queue is None:
            compiled = self.core.compile_model(self.network, "CPU", {**self.config, "PERFORMANCE_HINT": "THROUGHPUT"})
            self._queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return self._queue

    def __call__(self, batch):
        import torch

        x = batch.detach().cpu().float().numpy()
        with self._lock:
            if len(x) == 1:
                self.request.infer({0: x})
                return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True))
            queue, out = self._throughput_queue(), [None] * len(x)

            def done(request, i):
                out[i] = np.array(request.get_output_tensor(0).data, copy=True)

            queue.set_callback(done)
            for i in range(len(x)):
                queue.start_async({0: x[i : i + 1]}, i)
            queue.wait_all()
        return torch.from_numpy(np.concatenate(out))


def build_runner(model: SamModel, backend: str, precision: str, threads: int | None = None):
    """The callable that encodes a batch for ``model`` on ``backend`` at ``precision``.

    Args:
        model: a :class:`samliver.models.SamModel`.
        backend: one of :data:`BACKENDS` (already resolved).
        precision: one of :data:`PRECISIONS` (already resolved).
        threads: CPU threads for the inference engine (None: its default, one per core).

    Returns:
        callable(batch tensor (B, 3, S, S)) -> float32 tensor (B, 256, h, w) on the CPU
        (torch: on the model's device).
    """
    if backend == "torch":
        return TorchEncoder(model, precision)
    if backend == "onnxruntime":
        return OnnxRuntimeEncoder(model, threads)
    if backend == "openvino":
        return OpenVINOEncoder(model, precision, threads)
    raise SamliverError(f"Unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}.")
