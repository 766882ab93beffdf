"""Experiment (2026-11-29): does quantizing Add/Mul/Concat too (fewer Quantize/Dequantize boundaries around the
residual sums) speed the SD-1.5 latency@0.5 student's int8 graph, and what does it cost in held-out PSNR?

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/int8_op_types_experiment.py   # student: see docs/INT8.md

A = Conv/MatMul/Gemm (what export --precision int8 quantizes), B = A + Add/Mul/Concat; MinMax calibration on the
same captured inputs (1 prompt + empty, 2 steps), fp32 / A / B timed interleaved over 3 rounds, each call in a
fresh process. Writes benchmarks/results/int8_op_types_experiment.json.
"""
import json, sys, time, logging, gc
from pathlib import Path
import numpy as np
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.deploy.spec import build_spec
from laptop_deploy.exporters.onnx import OnnxOptions, export_fp32
from laptop_deploy.exporters.int8_calib import capture
from laptop_deploy.exporters import int8_minmax, onnx_int8
from laptop_deploy.exporters.onnx_int8 import Int8Options, preprocess, held_out_psnr
from laptop_deploy.deploy.fresh_timing import measure_fresh

work = Path("/tmp/i8/exp"); work.mkdir(parents=True, exist_ok=True)
src = resolve_model("/tmp/i8/sd15-lat05")
spec = build_spec(src.unet.config, precision="int8", height=64, width=64)
(work / "fp32").mkdir(exist_ok=True)
fp32 = export_fp32(src.unet, spec.with_precision("fp32"), work / "fp32", options=OnnxOptions())
data = capture(src.unet, spec, described=src.describe(), prompts=["a photo of a cat"], steps=2)
del src; gc.collect()
pre = preprocess(fp32, work / "pre" / "model.onnx")
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
out = {}
for label, ops in (("A", ("Conv", "MatMul", "Gemm")), ("B", ("Conv", "MatMul", "Gemm", "Add", "Mul", "Concat"))):
    cache = work / f"cache_{label}.json"
    import onnx
    model = onnx.load(str(pre), load_external_data=False)
    tensors = int8_minmax.tensors_to_calibrate(model.graph, ops)
    # calibrate with these op types: reuse calibrate_minmax's internals through its op-type-aware selection
    orig = int8_minmax.tensors_to_calibrate
    int8_minmax.tensors_to_calibrate = lambda g, op_types=ops: orig(g, ops)
    int8_minmax.calibrate_minmax(pre, data.calibration, cache)
    int8_minmax.tensors_to_calibrate = orig
    path = work / label / "model.onnx"; path.parent.mkdir(exist_ok=True)
    logging.disable(logging.WARNING)
    quantize_static(str(pre), str(path), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(ops),
                    per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    use_external_data_format=False, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False}, calibration_cache_path=str(cache))
    logging.disable(logging.NOTSET)
    out[label] = {"psnr": held_out_psnr(path, data), "path": str(path)}
    print(label, out[label], flush=True)
s32 = spec.with_precision("fp32")
print("timing round", flush=True)
t = measure_fresh({"fp32": (fp32, s32), "A": (Path(out["A"]["path"]), s32), "B": (Path(out["B"]["path"]), s32)},
                  repeats=3, progress=lambda l: print(l, flush=True))
import os
result = {"command": "python benchmarks/int8_op_types_experiment.py", "student": "/tmp/i8/sd15-lat05",
          "latent": [64, 64], "held_out_psnr_db": {k: round(v["psnr"], 2) for k, v in out.items()}, "timing": t,
          "speed_over_fp32": {k: round(t["fp32"]["median_ms"] / t[k]["median_ms"], 3) for k in ("A", "B")},
          "load_average_end": os.getloadavg()}
Path("/work/main/benchmarks/results/int8_op_types_experiment.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result), flush=True)
