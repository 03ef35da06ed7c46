"""int8 sensitivity sweep for the OpenVINO encoder: which parts cost mask Dice, which options help.

Why: NNCF's int8 encoder ran 0.26 s/slice on the AVX-512-BF16 EPYC but its zero-shot masks
(tight liver boxes, as ``samliver bench`` measures them) were only Dice 0.9845 vs fp32; bf16
reached 0.9924 at 0.34 s. This script quantises the cached fp32 IR with one recipe at a time
(a part kept in float via ``nncf.IgnoredScope``, or an NNCF option changed), measures mask Dice
vs fp32 on held-out liver slices that are never calibration slices, and times the candidates
round-robin against the current int8 and bf16 in one process.

Usage (one quantisation per process; each takes a few minutes on 2 cores):
    python data_scripts/int8_sensitivity.py quantize NAME [NAME ...]   # writes <out>/NAME/
    python data_scripts/int8_sensitivity.py evaluate NAME@f32 [...]    # a saved variant compiled another way
    python data_scripts/int8_sensitivity.py mark NAME f32_but_convs     # NAME with those ops kept f32 at bf16
    python data_scripts/int8_sensitivity.py profile fp32@bf16 NAME ... # time per layer type (shares)
    python data_scripts/int8_sensitivity.py time NAME [NAME ...]       # round-robin s/slice
    python data_scripts/int8_sensitivity.py wide NAME [NAME ...]       # Dice on all 112 non-calibration slices
    python data_scripts/int8_sensitivity.py bypass BASE                # fast per-part sensitivity
    python data_scripts/int8_sensitivity.py list

``bypass`` quantises once with recipe BASE, then for each part removes the FakeQuantize nodes
feeding that part's ops (weights and activations) in a copy of the quantised model: a cheap
stand-in for an ignored scope (SmoothQuant and bias correction are not redone), used to rank
the parts before the few best are re-quantised for real with ``quantize a+b``.

Results are appended as JSON lines to ``<out>/results.jsonl`` (``--out``, default
``$SAMLIVER_HOME/int8_sweep``). The reference masks come from the fp32 IR compiled at f32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

# OpenVINO threads per compiled model (accuracy runs can take 1 and leave the other core alone).
THREADS = int(os.environ.get("INT8_SWEEP_THREADS", "2"))
# Held-out slices of the 128-slice sample (every slice has liver): never calibration slices.
HELD_OUT = list(range(2, 128, 5))


def _calibration_zs(n: int, held_out: list[int], depth: int = 128) -> list[int]:
    """``n`` slices spread over the volume, never a held-out one."""
    pool = [z for z in range(depth) if z not in set(held_out)]
    idx = np.unique(np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int))
    return [pool[i] for i in idx]


def _recipes() -> dict[str, dict]:
    """name -> keyword changes to the current recipe (TRANSFORMER, 16 slices)."""
    stage = {f"float_layers{i}": {"ignored_patterns": [rf"layers\.{i}\."]} for i in range(4)}
    parts = {
        "float_patch_embed": {"ignored_patterns": [r"patch_embed"]},
        "float_neck": {"ignored_patterns": [r"neck"]},
        "float_qkv": {"ignored_patterns": [r"attn\.qkv"]},
        "float_proj": {"ignored_patterns": [r"attn\.proj"]},
        "float_fc1": {"ignored_patterns": [r"mlp\.fc1"]},
        "float_fc2": {"ignored_patterns": [r"mlp\.fc2"]},
        "float_sdpa": {"ignored_types": ["ScaledDotProductAttention"]},
        "float_attn_matmul": {"ignored_patterns": [r"attn/aten::matmul"]},
    }
    convs = ["Convolution", "GroupConvolution"]
    # The reverse view: int8 only in some linear layers, everything else bf16.
    parts["int8_mlp_only"] = {"ignored_types": convs, "ignored_patterns": [r"attn\.(qkv|proj)/"]}
    parts["int8_mlp_qkv"] = {"ignored_types": convs, "ignored_patterns": [r"attn\.proj/"]}
    parts["int8_linear_only"] = {"ignored_types": convs}
    parts["float_stem"] = {"ignored_modules": [r"patch_embed\.|layers\.0\."]}
    parts["float_layers0c"] = {"ignored_modules": [r"layers\.0\."]}
    options = {
        "no_bc": {"disable_bias_correction": True},
        "current": {},
        # (no "mixed" preset: ModelType.TRANSFORMER already implies QuantizationPreset.MIXED)
        "no_sq": {"sq_matmul": -1.0},
        "sq_0.5": {"sq_matmul": 0.5},
        "sq_0.8": {"sq_matmul": 0.8},
        "slow_bc": {"fast_bias_correction": False},
        "calib64": {"calibration": 64},
        "no_overflow_fix": {"overflow_fix": "disable"},
    }
    return {**options, **stage, **parts}


# Dynamic activation quantisation: ``dq_<asym|sym>_g<N>`` = NNCF int8 weight compression
# (INT8_ASYM / INT8_SYM, per output channel) of the fp32 IR, compiled with the CPU plugin's
# DYNAMIC_QUANTIZATION_GROUP_SIZE = N (activation scales per token and group of N input channels,
# computed at run time). ``_f32`` / ``_bf16`` at the end picks the inference precision (default f32:
# the CPU plugin quantises an activation dynamically only when it arrives in f32).
DQ_NAME = re.compile(r"dq_(asym|sym)_g(\d+)(?:_(f32|bf16))?$")


def _parse_part(part: str) -> dict:
    m = DQ_NAME.match(part)
    if m:
        return {"weights": f"INT8_{m.group(1).upper()}", "dq_group": int(m.group(2)), "hint": m.group(3) or "f32"}
    if re.fullmatch(r"sq_\d*\.?\d+", part):  # any SmoothQuant alpha for the matmuls: sq_0.75
        return {"sq_matmul": float(part[3:])}
    if re.fullmatch(r"calib\d+", part):  # calib32: that many calibration slices
        return {"calibration": int(part[5:])}
    if part.startswith("hint_"):  # hint_f32: compile a static recipe at f32 instead of bf16
        return {"hint": part[5:]}
    if part.startswith("dq_g"):  # dq_g64 on a static recipe: the FakeQuantize-free matmuls quantised dynamically
        return {"dq_group": int(part[4:])}
    return _recipes()[part]


def _parse_combo(name: str) -> dict:
    """``a+b+c``: the union of recipes a, b and c (patterns / types concatenated)."""
    out = {}
    for part in name.split("+"):
        for k, v in _parse_part(part).items():
            out[k] = out.get(k, []) + v if isinstance(v, list) else v
    return out


def _setup():
    from samliver.backends import openvino_fp32_ir
    from samliver.models import get_model
    from samliver.sample import load_sample

    model = get_model("litemedsam", device="cpu", backend="torch")
    return model, load_sample(), openvino_fp32_ir(model)


def _inputs(model, volume, zs) -> np.ndarray:
    from samliver.config import DEFAULT_WINDOW
    from samliver.preprocess import WINDOWS, window_to_unit

    return np.stack([model.prepare(window_to_unit(volume.hu[z], WINDOWS[DEFAULT_WINDOW]))[None].numpy() for z in zs])


def _compile(path, precision: str, hint: str = "LATENCY", extra: dict | None = None):
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": THREADS, **(extra or {})})


def _compile_config(r: dict) -> tuple[str, dict]:
    """(inference precision, extra CPU properties) a recipe is compiled with."""
    # Group size 0 switches dynamic quantisation off (the plugin's default is 32 on x86).
    return r.get("hint", "bf16"), {"DYNAMIC_QUANTIZATION_GROUP_SIZE": int(r.get("dq_group", 0))}


def _saved(out: Path, name: str) -> tuple[Path, str, dict]:
    """A quantised variant's IR and the compile settings saved beside it.

    ``NAME@f32`` / ``NAME@bf16,dq64``: the saved IR of NAME compiled another way (inference
    precision, dynamic quantisation group), without quantising again."""
    base, _, opts = name.partition("@")
    folder = out / base
    cfg = json.loads((folder / "compile.json").read_text()) if (folder / "compile.json").exists() else {"hint": "bf16", "extra": {}}
    hint, extra = cfg["hint"], dict(cfg["extra"])
    for opt in filter(None, opts.split(",")):
        if opt.startswith("dq"):
            extra["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(opt[2:])
        else:
            hint = opt
    return folder / "encoder.xml", hint, extra


# Per-op precision in a bf16-compiled model: the CPU plugin leaves an op in its original
# precision when its rt_info disables conversion to bf16/f16. Only ops that reach the plugin as
# they are keep it (the attribute is not copied to ops that transformations create, e.g. the
# FullyConnected built from a float MatMul, or fused snippets), so check with fc_kernels.
CONVS = {"Convolution", "GroupConvolution"}
# kind -> (op types to mark (empty: all), op types never marked, module regex (None: any))
F32_MARKS = {
    "f32_all": (set(), set(), None),  # every op the attribute survives on
    "f32_but_convs": (set(), CONVS, None),
    "f32_convs": (CONVS, set(), None),
    "f32_stem_convs": (CONVS, set(), r"patch_embed|layers\.0\."),  # the 64x64 MBConv stage and its stem
    "f32_late_convs": (CONVS, set(), r"layers\.[123]\.|neck"),  # local convs, patch merging, neck
    "f32_neck": (set(), set(), r"neck"),
}


def mark_f32(base: str, kind: str, out: Path) -> str:
    """Copy saved variant ``base`` to ``base+<kind>`` with the ops of ``kind`` marked to stay f32."""
    import shutil
    import xml.etree.ElementTree as ET

    import openvino as ov

    types, never, pattern = F32_MARKS[kind]
    never = never | {"Parameter", "Result", "Constant", "FakeQuantize"}
    chosen = {op.get_friendly_name() for op in ov.Core().read_model(str(out / base / "encoder.xml")).get_ops()
              if op.get_type_name() not in never and (not types or op.get_type_name() in types)
              and (pattern is None or re.search(pattern, _module_name(op)))}
    tree = ET.parse(out / base / "encoder.xml")
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in chosen:
            continue
        rt = layer.find("rt_info")
        rt = ET.SubElement(layer, "rt_info") if rt is None else rt
        # "dynamic:bf16,f16": from any type to bf16/f16 (not dynamic:dynamic, which also stops i64 -> i32).
        ET.SubElement(rt, "attribute", {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:bf16,f16"})
    name = f"{base}+{kind}"
    (out / name).mkdir(parents=True, exist_ok=True)
    tree.write(out / name / "encoder.xml")
    shutil.copy(out / base / "encoder.bin", out / name / "encoder.bin")
    if (out / base / "compile.json").exists():
        shutil.copy(out / base / "compile.json", out / name / "compile.json")
    print(f"{name}: {len(chosen)} ops marked f32", flush=True)
    return name


def profile(names: list[str], out: Path, runs: int = 3) -> None:
    """Where each variant's time goes: OpenVINO's per-layer counters summed by layer type and
    kernel (one slice, LATENCY model, median of ``runs``), as shares of the total."""
    import collections

    model, volume, fp32_path = _setup()
    x = _inputs(model, volume, HELD_OUT[:1])[0]
    for n in names:
        path, hint, extra = (fp32_path, n.partition("@")[2] or "bf16", {}) if n.startswith("fp32") else _saved(out, n)
        c = _compile(path, hint, extra={**extra, "PERF_COUNT": True})
        req = c.create_infer_request()
        req.infer({0: x})
        totals = []
        for _ in range(runs):
            req.infer({0: x})
            by = collections.Counter()
            for p in req.profiling_info:
                by[f"{p.node_type} {p.exec_type}"] += p.real_time.total_seconds()
            totals.append(by)
        med = {k: statistics.median(t[k] for t in totals) for k in totals[0]}
        total = sum(med.values())
        top = sorted(med.items(), key=lambda kv: -kv[1])[:12]
        rec = {"profile": n, "compile": {"hint": hint, **extra}, "total_s": round(total, 4),
               "shares": {k: round(v / total, 3) for k, v in top}, "load": os.getloadavg()}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec, indent=1), flush=True)


def evaluate(names: list[str], out: Path) -> None:
    """Held-out mask Dice of saved variants under other compile settings (``NAME@f32``)."""
    model, volume, fp32_path = _setup()
    ref, ref_masks = _reference(model, volume, fp32_path, out)
    x = _inputs(model, volume, HELD_OUT)
    for n in names:
        path, hint, extra = _saved(out, n)
        if n == "int8_export":  # what `samliver` itself builds with backends.INT8_RECIPE
            from samliver.backends import openvino_int8_ir

            path, hint, extra = openvino_int8_ir(model), "bf16", {}
        embs = _embed(_compile(path, hint, extra=extra), x)
        scores = _mask_dice(model, volume, embs, ref_masks)
        rec = {"name": n, "compile": {"hint": hint, **extra}, "fc_kernels": fc_kernels(path, hint, extra), "scores": scores,
               "dice_mean": float(np.mean(scores)), "dice_min": float(np.min(scores)),
               "max_abs_diff": float(np.abs(embs - ref).max()), "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               "load": os.getloadavg()}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "scores"}), flush=True)


def _embed(compiled, x: np.ndarray) -> np.ndarray:
    req = compiled.create_infer_request()
    out = []
    for xi in x:
        req.infer({0: xi})
        out.append(np.array(req.get_output_tensor(0).data, copy=True))
    return np.concatenate(out)


def _mask_dice(model, volume, embs, ref_masks) -> list[float]:
    # The zero-shot check of `samliver bench`: one tight liver box per slice, masks vs fp32's.
    from samliver.bench import box_masks
    from samliver.evaluation import dice

    return [float(dice(a, b)) for a, b in zip(box_masks(model, embs, volume, HELD_OUT), ref_masks)]


def _reference(model, volume, fp32_path, out: Path):
    from samliver.bench import box_masks

    cache = out / "ref_fp32.npy"
    if cache.exists():
        embs = np.load(cache)
    else:
        embs = _embed(_compile(fp32_path, "f32"), _inputs(model, volume, HELD_OUT))
        np.save(cache, embs)
    return embs, box_masks(model, embs, volume, HELD_OUT)


def quantize(name: str, out: Path) -> dict:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, OverflowFix

    model, volume, fp32_path = _setup()
    ref, ref_masks = _reference(model, volume, fp32_path, out)
    if name == "bf16":  # the float model at bf16: the bar int8 is measured against
        embs = _embed(_compile(fp32_path, "bf16"), _inputs(model, volume, HELD_OUT))
        scores = _mask_dice(model, volume, embs, ref_masks)
        rec = {"name": "bf16", "dice_mean": float(np.mean(scores)), "dice_min": float(np.min(scores)),
               "scores": scores, "max_abs_diff": float(np.abs(embs - ref).max())}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        return rec
    r = _parse_combo(name)
    if "weights" in r:
        return _quantize_weights(name, r, out, model, volume, fp32_path, ref, ref_masks)
    calib = _calibration_zs(r.get("calibration", 16), HELD_OUT)
    data = list(_inputs(model, volume, calib))
    adv = AdvancedQuantizationParameters()
    if "sq_matmul" in r:
        adv.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=r["sq_matmul"])
    if "overflow_fix" in r:
        adv.overflow_fix = OverflowFix(r["overflow_fix"])
    fp32_model = ov.Core().read_model(str(fp32_path))
    scope = _scope(fp32_model, r)
    if "disable_bias_correction" in r:
        adv.disable_bias_correction = True
    t0 = time.perf_counter()
    q = nncf.quantize(fp32_model, nncf.Dataset(data), subset_size=len(data),
                      model_type=nncf.ModelType.TRANSFORMER,
                      fast_bias_correction=r.get("fast_bias_correction", True),
                      ignored_scope=scope, advanced_parameters=adv)
    quant_s = time.perf_counter() - t0
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(folder / "encoder.xml"), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())
    return _finish(name, r, folder, model, volume, ref, ref_masks, {"calibration_slices": calib, "quantize_s": round(quant_s, 1),
                                                                    "fake_quantize_ops": fq})


def _scope(fp32_model, r: dict):
    """The recipe's float parts as an ``nncf.IgnoredScope``."""
    import nncf

    names = [op.get_friendly_name() for op in fp32_model.get_ops()
             if any(re.search(p, _module_name(op)) for p in r.get("ignored_modules", []))]
    # NNCF anchors patterns at the start of a name (re.match): search anywhere instead.
    return nncf.IgnoredScope(names=names, patterns=[".*" + p for p in r.get("ignored_patterns", [])], types=r.get("ignored_types", []),
                             validate=False)


def _quantize_weights(name, r, out, model, volume, fp32_path, ref, ref_masks) -> dict:
    """Int8 weight compression (data-free) for dynamic activation quantisation at run time;
    ``dq_asym_g64+int8_mlp_qkv`` keeps that recipe's float parts float (weights too)."""
    import nncf
    import openvino as ov

    t0 = time.perf_counter()
    fp32_model = ov.Core().read_model(str(fp32_path))
    q = nncf.compress_weights(fp32_model, mode=getattr(nncf.CompressWeightsMode, r["weights"]), ignored_scope=_scope(fp32_model, r))
    quant_s = time.perf_counter() - t0
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(folder / "encoder.xml"), compress_to_fp16=False)
    return _finish(name, r, folder, model, volume, ref, ref_masks, {"quantize_s": round(quant_s, 1)})


def fc_kernels(path, precision: str, extra: dict) -> dict:
    """How the CPU plugin runs the model's FullyConnected nodes: '<runtime precision> <kernel>' -> count.

    The kernel name alone does not show dynamic quantisation (it reads brgemm_avx512_<precision>
    either way); the runtime precision of the activation input does: DQ needs it f32."""
    import collections

    c = _compile(path, precision, extra=extra)
    kinds = collections.Counter()
    for op in c.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "FullyConnected":
            kinds[f"{info['runtimePrecision'].astype(str)} {info['primitiveType'].astype(str)}"] += 1
    return dict(kinds)


def _finish(name, r, folder: Path, model, volume, ref, ref_masks, fields: dict) -> dict:
    precision, extra = _compile_config(r)
    (folder / "compile.json").write_text(json.dumps({"hint": precision, "extra": extra}))
    embs = _embed(_compile(folder / "encoder.xml", precision, extra=extra), _inputs(model, volume, HELD_OUT))
    scores = _mask_dice(model, volume, embs, ref_masks)
    rec = {"name": name, "recipe": r, "compile": {"hint": precision, **extra}, **fields,
           "fc_kernels": fc_kernels(folder / "encoder.xml", precision, extra), "held_out": HELD_OUT, "scores": scores,
           "dice_mean": float(np.mean(scores)), "dice_min": float(np.min(scores)),
           "max_abs_diff": float(np.abs(embs - ref).max()), "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
           "load": os.getloadavg()}
    with open(folder.parent / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k not in ("calibration_slices", "held_out")}), flush=True)
    return rec


def _module_name(op) -> str:
    """The torch module an IR op came from; convolutions fused with their batch norm get
    generated names (Multiply_24853), so those take the name of the op they feed."""
    name = op.get_friendly_name()
    if not name.startswith("__module") and op.get_output_size():
        name = next((t.get_node().get_friendly_name() for t in op.output(0).get_target_inputs()), name)
    return name


def _bypass(qmodel, pattern: str | None, types: tuple[str, ...] = ()) -> int:
    """Reconnect the inputs of matching ops past their FakeQuantize; returns how many."""
    import re

    n = 0
    for op in qmodel.get_ops():
        name = op.get_friendly_name()
        if not name.startswith("__module") and op.get_output_size():
            # Convolutions fused with their batch norm get generated names (Multiply_24853):
            # take the module name of the op they feed.
            name = next((t.get_node().get_friendly_name() for t in op.output(0).get_target_inputs()), name)
        if types and pattern:  # both: an op of those types in the modules matched
            hit = op.get_type_name() in types and re.search(pattern, name)
        else:
            hit = (pattern and re.search(pattern, name)) or op.get_type_name() in types
        if not hit:
            continue
        if op.get_type_name() == "FakeQuantize":
            continue
        for inp in op.inputs():
            src = inp.get_source_output()
            if src.get_node().get_type_name() == "FakeQuantize":
                inp.replace_source_output(src.get_node().input_value(0))
                n += 1
    return n


def bypass(base: str, out: Path, parts: list[str] | None = None) -> None:
    import nncf
    import openvino as ov

    model, volume, fp32_path = _setup()
    ref, ref_masks = _reference(model, volume, fp32_path, out)
    r = _parse_combo(base)
    data = list(_inputs(model, volume, _calibration_zs(r.get("calibration", 16), HELD_OUT)))
    q = nncf.quantize(ov.Core().read_model(str(fp32_path)), nncf.Dataset(data), subset_size=len(data),
                      model_type=nncf.ModelType.TRANSFORMER)
    # In memory, not saved: saving folds the weight FakeQuantize nodes into int8 constants.
    core, x = ov.Core(), _inputs(model, volume, HELD_OUT)
    selectors = {
        "none": (None, ()), "layers0": (r"layers\.0\.", ()), "layers1": (r"layers\.1\.", ()),
        "layers2": (r"layers\.2\.", ()), "layers3": (r"layers\.3\.", ()), "patch_embed": (r"patch_embed", ()),
        "neck": (r"neck", ()), "qkv": (r"attn\.qkv", ()), "proj": (r"attn\.proj", ()), "fc1": (r"mlp\.fc1", ()),
        "fc2": (r"mlp\.fc2", ()), "sdpa": (None, ("ScaledDotProductAttention",)),
        "attn_matmul": (r"attn/aten::matmul", ()), "conv": (None, ("Convolution", "GroupConvolution")),
        "layers2.0-1": (r"layers\.2\.blocks\.[01]\.", ()), "layers2.4-5": (r"layers\.2\.blocks\.[45]\.", ()),
    }
    selectors["all"] = (r".", ())
    selectors["conv_stem"] = (r"patch_embed|layers\.0\.", ("Convolution", "GroupConvolution"))
    selectors["all_f32"] = selectors["all"]
    selectors["none_f32"] = selectors["none"]
    for part, (pattern, types) in selectors.items():
        if parts and part not in parts:
            continue
        m = q.clone()
        n = _bypass(m, pattern, types)
        m.validate_nodes_and_infer_types()
        hint = "f32" if part.endswith("_f32") else "bf16"
        c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                          "INFERENCE_NUM_THREADS": 2})
        embs = _embed(c, x)
        scores = _mask_dice(model, volume, embs, ref_masks)
        rec = {"bypass_base": base, "part": part, "fq_inputs_bypassed": n, "dice_mean": float(np.mean(scores)),
               "dice_min": float(np.min(scores)), "max_abs_diff": float(np.abs(embs - ref).max()), "load": os.getloadavg()}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def time_models(names: list[str], out: Path, rounds: int, per_call: int = 4) -> dict:
    """Round-robin s/slice (THROUGHPUT model, ``per_call`` slices per call as embed_volume)."""
    import openvino as ov

    from samliver.backends import openvino_int8_ir

    model, volume, fp32_path = _setup()
    paths = {"bf16": (fp32_path, "bf16", {}), "int8_current": (openvino_int8_ir(model), "bf16", {})}
    paths.update({n: _saved(out, n) for n in names})
    x = _inputs(model, volume, HELD_OUT[:8])
    queues = {}
    for n, (p, prec, extra) in paths.items():
        c = _compile(p, prec, "THROUGHPUT", extra)
        queues[n] = ov.AsyncInferQueue(c, int(c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def run(q):
        for i in range(0, len(x), per_call):
            for j in range(i, min(i + per_call, len(x))):
                q.start_async({0: x[j]})
            q.wait_all()

    for q in queues.values():
        run(q)  # warm-up
    times = {n: [] for n in queues}
    load0 = os.getloadavg()
    for _ in range(rounds):
        for n, q in queues.items():
            t0 = time.perf_counter()
            run(q)
            times[n].append((time.perf_counter() - t0) / len(x))
    rec = {"timing": {n: statistics.median(t) for n, t in times.items()}, "rounds": rounds, "slices": len(x),
           "load_start": load0, "load_end": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=1), flush=True)
    return rec


def evaluate_wide(names: list[str], out: Path) -> None:
    """Mask Dice vs fp32 on every slice that is not one of the 16 calibration slices (112 of 128)."""
    from samliver.bench import box_masks

    model, volume, fp32_path = _setup()
    # Never a calibration slice of any variant compared (16 for most; calib32 recipes use 32).
    calib = set(_calibration_zs(16, HELD_OUT))
    for n in names:
        if n not in ("bf16", "int8_export"):
            calib |= set(_calibration_zs(_parse_combo(n.partition("@")[0]).get("calibration", 16), HELD_OUT))
    zs = [z for z in range(volume.hu.shape[0]) if z not in calib]
    x = _inputs(model, volume, zs)
    ref_masks = box_masks(model, _embed(_compile(fp32_path, "f32"), x), volume, zs)
    from samliver.evaluation import dice

    for n in names:
        path, prec, extra = (fp32_path, "bf16", {}) if n == "bf16" else _saved(out, n)
        if n == "int8_export":  # what `samliver` itself builds with backends.INT8_RECIPE
            from samliver.backends import openvino_int8_ir

            path, prec, extra = openvino_int8_ir(model), "bf16", {}
        masks = box_masks(model, _embed(_compile(path, prec, extra=extra), x), volume, zs)
        scores = [float(dice(a, b)) for a, b in zip(masks, ref_masks)]
        rec = {"wide_eval": n, "slices": len(zs), "dice_mean": float(np.mean(scores)), "dice_min": float(np.min(scores)),
               "dice_p10": float(np.percentile(scores, 10)), "load": os.getloadavg()}
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["quantize", "evaluate", "mark", "profile", "bypass", "time", "wide", "list"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from samliver.util import cache_dir

    out = Path(args.out) if args.out else cache_dir("int8_sweep")
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "list":
        print("\n".join(_recipes()))
        print("sq_<alpha> (any alpha), dq_<asym|sym>_g<N>[_f32|_bf16], hint_<precision>, dq_g<N>; NAME@f32[,dq<N>] for evaluate/time")
    elif args.command == "quantize":
        for n in args.names:
            quantize(n, out)
    elif args.command == "evaluate":
        evaluate(args.names, out)
    elif args.command == "profile":
        profile(args.names, out)
    elif args.command == "mark":  # mark BASE KIND [KIND ...], then evaluate / time BASE+KIND
        for k in args.names[1:]:
            mark_f32(args.names[0], k, out)
    elif args.command == "wide":
        evaluate_wide(args.names, out)
    elif args.command == "bypass":
        bypass(args.names[0], out, args.names[1:] or None)
    else:
        time_models(args.names, out, args.rounds)


if __name__ == "__main__":
    main()
