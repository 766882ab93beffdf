"""fp16 variant of an exported ONNX U-Net that keeps the numerically sensitive parts in fp32.

Converted by onnxruntime's ``convert_float_to_float16`` (an extension of onnxconverter-common's) with a block list:

* op types (:data:`SENSITIVE_OPS`): normalisations (GroupNorm is exported as InstanceNormalization + affine),
  Softmax, and the transcendental/reduction ops whose fp16 results lose most bits (Sin, Cos, Exp, Pow, Sqrt,
  ReduceMean, Reciprocal);
* the timestep / ``time_ids`` embeddings: every node computed from those inputs up to the first MatMul/Gemm/Conv
  (the sinusoidal arguments reach ~1000 rad, where float16's spacing is 0.5 rad);
* with ``upcast_attention`` in the config (SD-2.x), the QKᵀ MatMul and the scaling feeding every Softmax, as
  diffusers does in PyTorch: those scores overflow fp16.

The converter computes a blocked node in fp32 but still rounds its output to fp16 before the next node, blocked or
not; :func:`drop_cast_round_trips` removes those fp32 → fp16 → fp32 round trips so a blocked chain (t·freq → sin)
really stays fp32. Measured on ``random:tiny-sd15`` at t = 999: the time embedding's max error is 0.14 after the
plain conversion and 2.4e-4 (fp16 rounding of the result) with the region kept fp32.

``timestep`` and ``time_ids`` stay float32 graph inputs; the other inputs and ``out_sample`` become float16.
"""

from __future__ import annotations

import heapq
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from .onnx_files import name_nodes, save_onnx


SENSITIVE_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "Sin", "Cos",
                 "Exp", "Pow", "Sqrt", "ReduceMean", "Reciprocal")
STOP_OPS = ("MatMul", "Gemm", "Conv")  # the fp32 embedding region ends at the first learned projection
SCORE_PATH_OPS = ("Mul", "Div", "Add", "Cast", "Reshape", "Transpose", "Where")


def embedding_region(graph: onnx.GraphProto, sources: list[str]) -> set[str]:
    """Names of the nodes computed from ``sources`` (graph inputs) before any MatMul/Gemm/Conv, plus the
    Constant nodes they read."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    region: set[str] = set()
    frontier = list(sources)
    while frontier:
        for node in consumers[frontier.pop()]:
            if node.op_type in STOP_OPS or node.name in region:
                continue
            region.add(node.name)
            frontier.extend(node.output)
    # Constant nodes feeding the region (the frequency table) would otherwise be rounded to fp16 themselves.
    producer = {out: node for node in graph.node for out in node.output}
    inputs = {name for node in graph.node if node.name in region for name in node.input}
    region |= {producer[name].name for name in inputs if name in producer and producer[name].op_type == "Constant"}
    return region


def attention_score_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the QKᵀ MatMuls (and the scaling between them and Softmax) feeding every Softmax."""
    producer = {out: node for node in graph.node for out in node.output}
    chosen: set[str] = set()
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        frontier = [softmax.input[0]]
        while frontier:
            node = producer.get(frontier.pop())
            if node is None or node.name in chosen:
                continue
            if node.op_type == "MatMul":
                chosen.add(node.name)
            elif node.op_type in SCORE_PATH_OPS:
                chosen.add(node.name)
                frontier.extend(node.input)
    return chosen


def drop_cast_round_trips(graph: onnx.GraphProto) -> int:
    """Rewire ``x(fp32) → Cast(fp16) → Cast(fp32) → consumers`` to read ``x`` directly; returns how many.

    The converter wraps every blocked node in casts to and from fp16, so a chain of blocked nodes would still pass
    its values through fp16 between nodes (t·freq ≈ 999 rounded to 0.5 rad); without the round trips the chain
    stays fp32 end to end. A half cast that loses all its consumers is removed as well.
    """
    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    fp32 = {v.name for v in graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producer = {out: node for node in graph.node for out in node.output}
    rewire: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == onnx.TensorProto.FLOAT and first is not None \
                and cast_to(first) == onnx.TensorProto.FLOAT16 \
                and (first.input[0] in fp32 or first.input[0].endswith("_cast_to_fp16")):  # a blocked node's output
            rewire[node.output[0]] = first.input[0]
    graph_outputs = {o.name for o in graph.output}
    rewire = {k: v for k, v in rewire.items() if k not in graph_outputs}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    used = {name for node in graph.node for name in node.input} | graph_outputs
    keep = [n for n in graph.node if n.output[0] not in rewire and (n.op_type != "Cast" or n.output[0] in used)]
    removed = len(graph.node) - len(keep)
    if removed:
        nodes = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(nodes, keep):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return len(rewire)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows its producers (the converter appends its Cast nodes at the
    end, which onnx.checker rejects). Stable: among ready nodes the earlier one goes first."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    pending = [{producer[name] for name in node.input if name in producer} for node in graph.node]
    consumers: dict[int, list[int]] = defaultdict(list)
    for index, deps in enumerate(pending):
        for dep in deps:
            consumers[dep].append(index)
    ready = [i for i, deps in enumerate(pending) if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            pending[consumer].discard(index)
            if not pending[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) != len(graph.node):
        raise ValueError(f"{len(graph.node) - len(order)} nodes are on a cycle; the graph cannot be sorted")
    nodes = [onnx.NodeProto() for _ in order]
    for copy, index in zip(nodes, order):
        copy.CopyFrom(graph.node[index])
    del graph.node[:]
    graph.node.extend(nodes)


def convert_to_fp16(path: Path, *, fp32_inputs: list[str],
                    upcast_attention: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The fp16 model of the fp32 graph at ``path``; ``fp32_inputs`` stay float32 inputs and their embeddings
    stay fp32 up to the first projection. Returns the model and what was kept in fp32 (for the manifest)."""

    model = onnx.load(str(path))
    name_nodes(model.graph)
    blocked = embedding_region(model.graph, fp32_inputs)
    if upcast_attention:
        blocked |= attention_score_nodes(model.graph)
    sensitive = sum(n.op_type in SENSITIVE_OPS for n in model.graph.node)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        named = save_onnx(model, Path(tmp) / "named.onnx")
        del model
        # From a path the converter runs onnx.shape_inference.infer_shapes_path, which also works above 2 GiB.
        fp16 = convert_float_to_float16(str(named), keep_io_types=fp32_inputs,
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *SENSITIVE_OPS],
                                        node_block_list=sorted(blocked))
    # The converter renames blocked nodes' fp32 outputs but keeps the dynamo exporter's fp16-retyped value_info
    # for them, which strict ONNX type inference rejects; value_info is optional, so drop it.
    del fp16.graph.value_info[:]
    round_trips = drop_cast_round_trips(fp16.graph)
    topological_sort(fp16.graph)
    info = {"fp16_block_ops": list(SENSITIVE_OPS), "fp16_fp32_nodes": len(blocked) + sensitive,
            "fp16_fp32_inputs": fp32_inputs, "fp16_upcast_attention": upcast_attention,
            "fp16_cast_round_trips_removed": round_trips}
    return fp16, info
