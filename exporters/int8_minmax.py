"""MinMax calibration of an ONNX graph in one ONNX Runtime session, written as the calibration cache
``onnxruntime.quantization.quantize_static`` reads (``calibration_cache_path``; its JSON format through
``save_tensors_data``).

Why not ``quantize_static``'s own calibrator: it loads the model (weights included), builds an augmented copy in
memory, saves it and opens it in a session, then keeps its own copy for the QDQ rewrite — on SD-1.5 (3.4 GB of
weights) that single call was OOM-killed at 20.5 GB anonymous RSS on this 24 GB machine. Here the graph is read
without its weights (``load_external_data=False``), the ReduceMin/ReduceMax outputs are added to that graph-only
proto, and the augmented graph is saved beside the weights file it still names, so the one session that calibrates
maps the weights once. Peak: one fp32 session plus the captured feeds.

The tensors calibrated, the statistics and the range format are those of ``MinMaxCalibrater`` without moving
average or symmetric ranges (what :func:`.onnx_int8.quantize` asks for): every float input and output of a
Conv / MatMul / Gemm node that is not an initializer; per tensor the minimum and maximum over every element of every
calibration call, stored as 1-element float32 arrays. ``tests/test_int8.py`` checks the cache equals ORT's.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .int8_graph import QUANT_OPS

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
_SUFFIX = ("__ld_min", "__ld_max")  # output names of the added reductions: tensor + suffix


def tensors_to_calibrate(graph: onnx.GraphProto, op_types: tuple[str, ...] = QUANT_OPS) -> list[str]:
    """Float, non-initializer inputs and outputs of ``op_types`` nodes whose type shape inference recorded
    (``MinMaxCalibrater.select_tensors_to_calibrate``'s rule), in graph order."""
    typed = {v.name: v for v in itertools.chain(graph.value_info, graph.output, graph.input)}
    weights = {i.name for i in graph.initializer}
    chosen: dict[str, None] = {}
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        for name in itertools.chain(node.input, node.output):
            info = typed.get(name)
            if (info is not None and info.type.HasField("tensor_type")
                    and info.type.tensor_type.elem_type in _FLOAT_TYPES and name not in weights):
                chosen[name] = None
    return list(chosen)


def augmented(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``model`` (a graph-only proto is enough) with a scalar ReduceMin and ReduceMax output per tensor."""
    graph = model.graph
    for name in tensors:
        for op, suffix in zip(("ReduceMin", "ReduceMax"), _SUFFIX):
            graph.node.append(helper.make_node(op, [name], [name + suffix], keepdims=0, name=name + suffix))
            graph.output.append(helper.make_tensor_value_info(name + suffix, TensorProto.FLOAT, []))
    return model


def calibrate_minmax(pre: Path, feeds: list[dict[str, np.ndarray]], cache: Path,
                     op_types: tuple[str, ...] = QUANT_OPS) -> int:
    """Run ``feeds`` through the graph at ``pre`` (weights inline or in its external-data file) and write the
    MinMax calibration cache of the tensors around ``op_types`` nodes to ``cache``; returns the number of tensors
    calibrated."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data
    from tqdm import tqdm

    model = onnx.load(str(pre), load_external_data=False)
    tensors = tensors_to_calibrate(model.graph, op_types)
    if not feeds:
        raise ValueError("calibrate_minmax: no calibration input")
    # beside the original: its initializers name the weights file relative to the graph's folder
    path = pre.with_name(pre.stem + ".minmax.onnx")
    onnx.save_model(augmented(model, tensors), str(path))
    del model
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as MinMaxCalibrater
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        names = [t + s for t in tensors for s in _SUFFIX]
        low = np.full(len(tensors), np.inf, dtype=np.float32)
        high = np.full(len(tensors), -np.inf, dtype=np.float32)
        for feed in tqdm(feeds, desc="int8 calibration", unit="input", file=sys.stderr, leave=False):
            values = np.asarray(session.run(names, feed), dtype=np.float32).reshape(len(tensors), 2)
            low, high = np.fmin(low, values[:, 0]), np.fmax(high, values[:, 1])  # NaN-ignoring, as nanmin
        del session
    finally:
        path.unlink(missing_ok=True)
    ranges = {t: (np.array([lo], dtype=np.float32), np.array([hi], dtype=np.float32))
              for t, lo, hi in zip(tensors, low, high)}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    return len(tensors)
