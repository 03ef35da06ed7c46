"""Encoder backends (samliver.backends): choice, export cache, and results equal to torch fp32."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from samliver import backends
from samliver.embeddings import cache_key, default_batch_size
from samliver.models import get_model
from samliver.util import SamliverError


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny's random-weights warning
        return get_model("tiny", device="cpu", backend="torch")


def _copy(model, backend, precision):
    return dataclasses.replace(model, backend=backend, precision=precision, _runner=None, _runner_for=())


needs_openvino = pytest.mark.skipif(not backends.installed("openvino"), reason="openvino not installed")


def _slices(model, n: int, seed: int) -> torch.Tensor:
    """``n`` random model inputs (n, 3, S, S), the same for a given seed."""
    return torch.randn(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(seed))


def test_resolve_auto_picks_an_exact_backend_on_cpu():
    backend, precision = backends.resolve("auto", "auto", "cpu")
    assert precision == "fp32"
    expected = "openvino" if backends.installed("openvino") else "onnxruntime" if backends.installed("onnxruntime") else "torch"
    assert backend == expected


def test_resolve_gpu_uses_torch_and_rejects_cpu_engines():
    assert backends.resolve("auto", "fp16", "cuda") == ("torch", "fp16")
    assert backends.resolve(None, None, "cuda:0") == ("torch", "fp32")
    with pytest.raises(SamliverError, match="runs on the CPU"):
        backends.resolve("openvino" if backends.installed("openvino") else "onnxruntime", "fp32", "cuda")


@pytest.mark.parametrize("backend, precision, message", [
    ("tensorrt", "fp32", "Unknown backend"),
    ("torch", "fp8", "Unknown precision"),
    ("torch", "int8", "int8 needs --backend openvino"),
    ("torch", "fp16", "fp16 needs a GPU"),
])
def test_resolve_rejects_bad_choices(backend, precision, message):
    with pytest.raises(SamliverError, match=message):
        backends.resolve(backend, precision, "cpu")


def test_resolve_reads_the_environment(monkeypatch):
    monkeypatch.setenv("SAMLIVER_BACKEND", "torch")
    monkeypatch.setenv("SAMLIVER_PRECISION", "fp32")
    assert backends.resolve(None, None, "cpu") == ("torch", "fp32")


def test_bf16_on_a_cpu_without_it_is_refused_not_emulated(monkeypatch):
    monkeypatch.setattr(backends, "native_bf16", lambda: False)
    with pytest.raises(SamliverError, match="no native bfloat16"):
        backends.resolve("torch", "bf16", "cpu")


def test_tune_allocator_applies_on_linux():
    import sys

    assert backends.tune_allocator() is sys.platform.startswith("linux")


def test_cache_key_names_backend_and_precision(tiny, small_phantom):
    key_torch = cache_key(small_phantom, _copy(tiny, "torch", "fp32"))
    key_bf16 = cache_key(small_phantom, _copy(tiny, "torch", "bf16"))
    assert key_torch["backend"] == "torch" and key_torch["precision"] == "fp32"
    assert key_torch != key_bf16


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_engines_match_torch_fp32(tiny, backend):
    if not backends.installed(backend):
        pytest.skip(f"{backend} not installed (pip install 'samliver[fast]')")
    x = _slices(tiny, 2, seed=0)
    ref = _copy(tiny, "torch", "fp32").encode(x)
    out = _copy(tiny, backend, "fp32").encode(x)
    assert out.shape == ref.shape == (2, 256, 64, 64) and out.dtype == torch.float32
    assert float((out - ref).abs().max()) < 1e-3 * float(ref.abs().max())


@needs_openvino
def test_export_is_cached_and_rebuilt_when_corrupt(tiny, monkeypatch, tmp_path):
    # A private home: other test processes export the same model into the shared one meanwhile.
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    model = _copy(tiny, "openvino", "fp32")
    x = _slices(tiny, 1, seed=1)
    first = model.encode(x)
    folder = backends.export_dir(model) / "encoder-openvino-fp32"
    stamp = json.loads((folder / "key.json").read_text())
    assert set(stamp["files"]) == {"encoder.xml", "encoder.bin"} and stamp["key"]["weights"] == tiny.weights_id
    mtime = (folder / "encoder.bin").stat().st_mtime_ns
    _copy(tiny, "openvino", "fp32").encode(x)  # a second model object reuses the export
    assert (folder / "encoder.bin").stat().st_mtime_ns == mtime
    (folder / "encoder.bin").write_bytes(b"\0" * 64)  # a damaged weights file must not be used
    again = _copy(tiny, "openvino", "fp32").encode(x)
    assert torch.allclose(first, again, atol=1e-5)
    rebuilt = json.loads((folder / "key.json").read_text())["files"]
    assert rebuilt["encoder.bin"] == stamp["files"]["encoder.bin"]  # the same weights written again
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_get_model_takes_backend_and_the_cli_option(monkeypatch, tmp_path, capsys):
    from samliver import cli

    monkeypatch.delenv("SAMLIVER_BACKEND", raising=False)
    assert cli._take_global_options(["x", "--backend", "torch", "--precision=fp32", "y"]) == ["x", "y"]
    import os

    assert os.environ["SAMLIVER_BACKEND"] == "torch" and os.environ["SAMLIVER_PRECISION"] == "fp32"
    rc = cli.main(["info", "sample", "--backend", "cuda"])
    assert rc == 2 and "--backend 'cuda' is not one of" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = get_model("tiny", device="cpu", backend="torch", precision="fp32")
    assert (model.backend, model.precision) == ("torch", "fp32")
    assert np.isfinite(model.encode(torch.zeros(1, 3, 256, 256)).numpy()).all()


@needs_openvino
def test_openvino_batch_runs_concurrently_with_the_same_result(tiny):
    # Several slices go through the THROUGHPUT model (one stream per core), one through the
    # LATENCY model: both must give each slice's embedding, in order.
    model = _copy(tiny, "openvino", "fp32")
    x = _slices(tiny, 3, seed=2)
    batch = model.encode(x)
    single = torch.cat([model.encode(x[i : i + 1]) for i in range(3)])
    assert batch.shape == (3, 256, 64, 64)
    assert torch.allclose(batch, single, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])  # in order, not one slice repeated
    assert default_batch_size(model) == 4 and default_batch_size(_copy(tiny, "torch", "fp32")) == 1


@needs_openvino
def test_openvino_encoder_serves_threads_that_share_a_model(tiny):
    """Threads sharing one model take turns on its infer requests: each gets its own slices' embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    model = _copy(tiny, "openvino", "fp32")
    inputs = [_slices(tiny, n, seed=10 + n) for n in (1, 2, 1, 3, 1, 2)]
    alone = [model.encode(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(model.encode, inputs))
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, atol=1e-5)


def _tiny_fp32_ir(tiny):
    import openvino as ov

    return ov.Core().read_model(str(backends.openvino_fp32_ir(tiny)))


@needs_openvino
def test_int8_float_ops_select_modules_and_types(tiny):
    ir = _tiny_fp32_ir(tiny)
    neck_convs = backends.int8_float_ops(ir, {"float_ops": ((("Convolution",), r"neck\."),)})
    assert len(neck_convs) == 2 and all("neck" in n for n in neck_convs)  # neck.0 (1x1) and neck.2 (3x3)
    neck_all = backends.int8_float_ops(ir, {"float_ops": (((), r"neck\."),)})
    assert set(neck_convs) < set(neck_all)  # no types: every op of the neck
    all_convs = backends.int8_float_ops(ir, {"float_ops": ((("Convolution",), ""),)})
    assert set(neck_convs) < set(all_convs)  # no module: the patch embedding's convolution too
    proj = backends.int8_float_ops(ir, {"float_ops": ((("MatMul",), r"attn\.proj/"),)})
    assert proj and all("attn.proj" in n for n in proj)
    both = backends.int8_float_ops(ir, {"float_ops": ((("Convolution",), ""), (("MatMul",), r"attn\.proj/"))})
    assert set(both) == set(all_convs) | set(proj)  # rules add up
    assert backends.int8_float_ops(ir, {}) == []
    assert backends.int8_float_ops(ir)  # the shipped recipe keeps something in float
    # A convolution fused with a batch norm has a generated name: it takes the module it feeds.
    conv = next(op for op in ir.get_ops() if op.get_friendly_name() == neck_convs[0])
    assert backends.module_name(conv).startswith("__module.neck")


def test_int8_export_applies_the_recipe_and_keys_it(tiny, monkeypatch, tmp_path):
    if not backends.installed("openvino") or importlib.util.find_spec("nncf") is None:
        pytest.skip("openvino / nncf not installed")
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))  # a fake int8 export must not reach the real cache
    seen = {}

    def fake_quantize(model, dataset, **kwargs):  # records what the recipe asked NNCF for
        seen.update(kwargs, n=len(list(dataset.get_inference_data())))
        return model

    monkeypatch.setattr(nncf, "quantize", fake_quantize)
    monkeypatch.setattr(backends, "calibration_batches",
                        lambda model, n: [np.zeros((1, 3, 256, 256), np.float32)] * n)
    recipe = {"calibration_slices": 3, "float_ops": ((("Convolution",), r"neck\."),), "fast_bias_correction": True}
    monkeypatch.setattr(backends, "INT8_RECIPE", recipe)
    path = backends.openvino_int8_ir(tiny)
    assert seen["n"] == 3 and seen["model_type"] == nncf.ModelType.TRANSFORMER
    # No alpha in the recipe: NNCF's own SmoothQuant default.
    assert seen["advanced_parameters"].smooth_quant_alphas == AdvancedQuantizationParameters().smooth_quant_alphas
    assert sorted(seen["ignored_scope"].names) == backends.int8_float_ops(_tiny_fp32_ir(tiny), recipe)
    assert len(seen["ignored_scope"].names) == 2
    key = json.loads((path.parent / "key.json").read_text())["key"]
    assert key["precision"] == "int8" and key["recipe"]["float_ops"] == [[["Convolution"], r"neck\."]]
    # Another recipe is another export: the old one is rebuilt, not reused.
    seen.clear()
    monkeypatch.setattr(backends, "INT8_RECIPE", {**recipe, "float_ops": (((), r"blocks\.0\."),)})
    backends.openvino_int8_ir(tiny)
    assert "ignored_scope" in seen and not any("neck" in n for n in seen["ignored_scope"].names)
    seen.clear()
    backends.openvino_int8_ir(tiny)  # the same recipe again: the cached export, no quantisation
    assert not seen
    # A SmoothQuant alpha in the recipe reaches NNCF and the export key.
    monkeypatch.setattr(backends, "INT8_RECIPE", {**recipe, "smooth_quant_alpha": 0.8})
    backends.openvino_int8_ir(tiny)
    assert seen["advanced_parameters"].smooth_quant_alphas.matmul == 0.8
    key = json.loads((backends.openvino_int8_ir(tiny).parent / "key.json").read_text())["key"]
    assert key["recipe"]["smooth_quant_alpha"] == 0.8
