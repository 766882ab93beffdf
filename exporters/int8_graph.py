"""Graph facts the int8 exporter needs, on plain ONNX protos (no quantization API here):

* :func:`node_groups` — the quantizable nodes (Conv, MatMul, Gemm) grouped by the U-Net unit that produced them
  (``down_blocks.1.attentions.0``, ``conv_in``...), with activation × activation MatMuls (attention QKᵀ and
  attention·V) in a group of their own per unit, ``<unit>:scores``: they have no weights to calibrate per channel
  and their Softmax-shaped inputs are the classic int8 failure, so the gate can keep them float alone. The unit comes
  from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata or the TorchScript exporter's ``/a/b/Op`` names.
* :func:`node_macs` — multiply-accumulates per node at the static input sizes (shape inference on the graph alone,
  weights not loaded): Conv = out elements × Cin/groups × kernel area; MatMul/Gemm = out elements × K.
* :func:`weights_only` — ``--precision int8-weights``: every Conv/MatMul/Gemm weight initializer stored as int8
  (symmetric, per output channel) behind a ``DequantizeLinear``; activations stay float.
* :func:`executed_ops` — the op types ONNX Runtime's CPU EP really ran (from its profiler), to show that QDQ pairs
  became integer kernels (``QLinearConv``, ``QLinearMatMul``, ``MatMulIntegerToFloat``...).
* :func:`bias_matmul_outputs` / :func:`insert_qdq` — the quantized MatMuls whose float output only feeds a bias
  ``Add``, and a Quantize/Dequantize pair put back there: ORT's basic-level MatMul+Add fusion would otherwise turn
  them into a *float* Gemm over weights dequantized on every call (before its QDQ fusions run).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .int8_groups import unit_of

QUANT_OPS = ("Conv", "MatMul", "Gemm")
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
                "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul")


def _scope(node: onnx.NodeProto) -> str:
    """Module path of ``node`` without the wrapper prefix, e.g. ``down_blocks.0.resnets.1.conv1``."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip().strip("'\"") for s in prop.value.strip("[]").split(",")]
            paths = [s for s in scopes if s.startswith("unet.") or s == "unet"]
            return paths[-1].removeprefix("unet").lstrip(".") if paths else ""
    parts = [p for p in node.name.split("/") if p]  # TorchScript: /unet/down_blocks.0/resnets.0/conv1/Conv
    parts = parts[1:] if parts and parts[0] == "unet" else parts
    return ".".join(parts[:-1]) if len(parts) > 1 else ""


def node_groups(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Quantizable node names by group (see the module docstring); every node needs a unique name."""
    weights = {t.name for t in graph.initializer}
    weights |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    groups: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        unit = unit_of(_scope(node))
        scores = node.op_type == "MatMul" and not any(name in weights for name in node.input[:2])
        groups[f"{unit}:scores" if scores else unit].append(node.name)
    return dict(groups)


def node_macs(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """MACs of every Conv/MatMul/Gemm node of the model at ``path`` for inputs shaped like ``feeds``."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    del model.graph.value_info[:]  # symbolic shapes from the exporter would shadow the static ones
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    shapes |= {t.name: list(t.dims) for t in inferred.graph.initializer}
    macs: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        out, a = shapes.get(node.output[0]), shapes.get(node.input[0])
        w = shapes.get(node.input[1])
        if not out or not w or not a or 0 in out:
            macs[node.name] = 0
            continue
        if node.op_type == "Conv":
            macs[node.name] = int(np.prod(out)) * int(np.prod(w[1:]))  # w[1] is already Cin / groups
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            macs[node.name] = int(np.prod(out)) * (a[0] if trans_a else a[-1])
        else:
            macs[node.name] = int(np.prod(out)) * a[-1]
    return macs


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight (input 1): Conv [Cout, ...] → 0, MatMul [K, N] → last, Gemm by
    transB."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((x.i for x in node.attribute if x.name == "transB"), 0) else 1
    return -1


def weights_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Store every float Conv/MatMul/Gemm weight as symmetric per-channel int8 + a float32 scale, dequantized by a
    ``DequantizeLinear`` in front of its consumer (in place). Returns the model and counts (tensors, weights)."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            consumers[name] += 1
    new_nodes, done, count = [], {}, 0
    for node in model.graph.node:
        name = node.input[1] if node.op_type in QUANT_OPS and len(node.input) > 1 else ""
        tensor = inits.get(name)
        if tensor is not None and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2 \
                and consumers[name] == 1 and name not in done:
            w = numpy_helper.to_array(tensor)
            axis = _weight_axis(node) % w.ndim
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0  # symmetric: zero point 0
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            tensor.CopyFrom(numpy_helper.from_array(q, f"{name}_int8"))
            model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
            new_nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name],
                                                   name=f"{name}_DequantizeLinear", axis=axis))
            done[name] = True
            count += w.size
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model, {"int8_weight_tensors": len(done), "int8_weights": count}


def executed_ops(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Op types of the kernels ONNX Runtime's CPU EP executed in one call of the model at ``path`` (all graph
    optimisations on, as the OrtRunner loads it), counted from its profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            counts[event.get("args", {}).get("op_name", "?")] += 1
    return dict(sorted(counts.items()))


def _made_by(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def bias_matmul_outputs(graph: onnx.GraphProto) -> list[str]:
    """Output tensors of quantized MatMuls (both inputs from ``DequantizeLinear``) with no ``QuantizeLinear`` after
    them whose only consumer is an ``Add`` with a constant operand (a linear layer's bias).

    Why: with MatMul outputs float (``FLOAT_OUTPUT_OPS``) ORT's basic-level MatMulAddFusion turns DQ→MatMul→Add into
    a Gemm before its QDQ fusions run, and that Gemm runs in float over weights dequantized on every call (the
    SD-1.5 teacher, whose >2 GiB graph skips ``quant_pre_process``'s own MatMul+Add fusion: 64 such Gemms).
    A Quantize/Dequantize pair on the MatMul's output makes it a QLinearMatMul instead."""
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    made = _made_by(graph)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        if not all(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in node.input[:2]):
            continue
        out = node.output[0]
        users = readers.get(out, [])
        if out in outputs or len(users) != 1 or users[0].op_type != "Add":
            continue
        other = [i for i in users[0].input if i != out]
        if len(other) == 1 and other[0] in constants:
            found.append(out)
    return found


def insert_qdq(model: onnx.ModelProto, params: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Put ``QuantizeLinear`` → ``DequantizeLinear`` (scale, zero point: 0-d float32 and uint8/int8 arrays) on each
    tensor of ``params``, right after the node that makes it, its readers rewired to the dequantized copy (in
    place; the graph-only proto of an external-weights model is enough). Returns the number of pairs added."""
    graph = model.graph
    made = {out: index for index, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for tensor, (scale, zero) in params.items():
        if tensor not in made:
            continue
        q, dq = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), f"{tensor}_scale"),
                                  numpy_helper.from_array(np.asarray(zero), f"{tensor}_zero_point")])
        for node in graph.node:
            node.input[:] = [dq if name == tensor else name for name in node.input]
        after[made[tensor]].extend([
            onnx.helper.make_node("QuantizeLinear", [tensor, f"{tensor}_scale", f"{tensor}_zero_point"], [q],
                                  name=f"{tensor}_QuantizeLinear"),
            onnx.helper.make_node("DequantizeLinear", [q, f"{tensor}_scale", f"{tensor}_zero_point"], [dq],
                                  name=f"{tensor}_DequantizeLinear")])
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(index, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return sum(len(v) for v in after.values()) // 2
