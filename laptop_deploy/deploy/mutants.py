"""Wrong artifacts on purpose: the mutations the parity gate must catch (issue 20), applied to an exported ONNX
graph (ONNX / ORT Mobile targets) or to the PyTorch U-Net before tracing (Core ML's traced-module check).

Each :class:`Mutation` models one way an export goes wrong: a weight tensor off by a factor (an early conv, an
attention projection, a norm scale, the time embedding, the issue's up-block conv), a bias lost, the timestep fed
scaled, two same-shaped inputs of the up path's last skip concat swapped (the full-resolution skip from
``conv_in``, which every U-Net here leans on), that skip connection dropped (zeroed),
and an overflow to Inf in one node (the output of ``conv_in`` times the dtype's largest finite value).

ONNX weights are found by *value* (the parameter, its transpose, or its fp16 rounding), so the same mutation
applies to graphs from the TorchScript or the dynamo exporter and to fp16 conversions whatever the initializer
names. Used by ``tests/test_parity_gate.py`` and ``benchmarks/parity_mutations.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# Weight scale per precision: 1.01 is the fp32 case. PyTorch's own fp16 run is ~1e-3 (relative L2) off
# the exact function on these U-Nets, while a 1% change of a weakly used tensor moves the output by 2e-6 to 2e-4:
# below what any fp16 comparison can resolve, so the fp16 set doubles the tensor instead (see
# parity_mutations.md for the tensors that stay below fp16's resolution even then).
SCALE = {"fp32": 1.01, "fp16": 2.0}
TIMESTEP_SCALE = {"fp32": 1.01, "fp16": 1.01}
# (label, parameter-name suffix or pattern) of the weight tensors scaled, first match in module order
WEIGHTS = (("early conv", "conv_in.weight"), ("attention projection", "attn1.to_q.weight"),
           ("norm scale", "resnets.0.norm1.weight"), ("time embedding", "time_embedding.linear_1.weight"),
           ("up-block conv", "up_blocks.0.resnets.0.conv1.weight"))
# conv2's bias feeds the residual sum directly; conv1's is cancelled by the GroupNorm after it whenever a group is
# one channel (the tiny presets), so zeroing it changes nothing and is no mutation at all.
BIAS = ("bias zeroed", "down_blocks.0.resnets.0.conv2.bias")


class MutationNotApplicable(ValueError):
    """The model has no place for this mutation (no such parameter, no equal-shaped concat inputs)."""


@dataclass(frozen=True)
class Mutation:
    """``kind``: scale | zero | timestep | swap | drop_skip | overflow; ``param`` names the parameter for the
    first two; ``factor`` is the scale."""

    name: str
    kind: str
    param: str | None = None
    factor: float = 1.0


def mutation_set(unet: nn.Module, precision: str) -> list[Mutation]:
    """Every mutation of the issue that this U-Net has a place for, at ``precision``'s magnitudes."""
    names = [n for n, _ in unet.named_parameters()]
    scale = SCALE.get(precision, SCALE["fp32"])
    found: list[Mutation] = []
    for label, suffix in WEIGHTS:
        name = next((n for n in names if n.endswith(suffix)), None)
        if name is not None:
            found.append(Mutation(f"{label} x{scale:g}", "scale", name, scale))
    bias = next((n for n in names if n.endswith(BIAS[1])), None)
    if bias is not None:
        found.append(Mutation(BIAS[0], "zero", bias))
    t = TIMESTEP_SCALE.get(precision, TIMESTEP_SCALE["fp32"])
    found += [Mutation(f"timestep x{t:g}", "timestep", factor=t), Mutation("skip inputs swapped", "swap"),
              Mutation("skip connection dropped", "drop_skip"), Mutation("Inf in one node", "overflow")]
    return found


# --- ONNX graphs ---------------------------------------------------------------------------------------------

def mutate_onnx(model: Any, unet: nn.Module, mutation: Mutation) -> Any:
    """A mutated copy of the ``onnx.ModelProto`` ``model`` exported from ``unet``."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = copy.deepcopy(model)
    graph = model.graph
    if mutation.kind in ("scale", "zero"):
        param = dict(unet.named_parameters())[mutation.param].detach().float().numpy()
        init = _find_initializer(graph, param, mutation.param)
        arr = numpy_helper.to_array(init)
        new = arr * arr.dtype.type(mutation.factor) if mutation.kind == "scale" else np.zeros_like(arr)
        init.CopyFrom(numpy_helper.from_array(new.astype(arr.dtype), init.name))
        return model
    types = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
    if mutation.kind == "timestep":
        elem = types["timestep"].elem_type
        _insert_mul(graph, "timestep", mutation.factor, elem, helper, numpy_helper, onnx)
        return model
    inferred = shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    if mutation.kind in ("swap", "drop_skip"):
        node = _skip_concat(graph, types)
        if mutation.kind == "swap":
            node.input[0], node.input[1] = node.input[1], node.input[0]
        else:
            _insert_mul(graph, node.input[1], 0.0, types[node.input[1]].elem_type, helper, numpy_helper, onnx,
                        only=node)
        return model
    if mutation.kind == "overflow":
        conv = next(n for n in graph.node if n.op_type == "Conv")
        out = conv.output[0]
        elem = types[out].elem_type if out in types else onnx.TensorProto.FLOAT
        big = float(np.finfo(helper.tensor_dtype_to_np_dtype(elem)).max)
        _insert_mul(graph, out, big, elem, helper, numpy_helper, onnx)
        return model
    raise ValueError(f"unknown mutation kind '{mutation.kind}'")


def _find_initializer(graph: Any, param: np.ndarray, name: str) -> Any:
    """The initializer named after the parameter (TorchScript keeps names), else the first holding its values
    (values can repeat, e.g. norm scales still at their initial ones: the name decides where it exists)."""
    from onnx import numpy_helper

    named = next((i for i in graph.initializer if i.name.endswith(name) and tuple(i.dims) == param.shape), None)
    if named is not None:
        return named
    candidates = [param]
    if param.ndim == 2:
        candidates.append(param.T)
    for init in graph.initializer:
        if int(np.prod(init.dims)) != param.size:
            continue
        arr = numpy_helper.to_array(init)
        for want in candidates:  # exporters may reshape (a GroupNorm scale becomes [C, 1, 1]): compare flat
            if np.array_equal(arr.reshape(-1), want.astype(arr.dtype).reshape(-1)):
                return init
    raise MutationNotApplicable(f"no initializer holds this parameter's values ({param.shape})")


def _skip_concat(graph: Any, types: dict[str, Any]) -> Any:
    """The last channel concat of two rank-4 inputs of equal shape: the up path's full-resolution skip (the deepest
    one barely matters in a trained U-Net: swapping it moves the toy teacher's output less than fp16 noise)."""
    sliced = {i for n in graph.node if n.op_type == "Slice" for i in n.input[:1]}
    for node in reversed(graph.node):
        # a removed up ResNet of a student keeps its concat and slices the skip off again: not a live skip
        if node.op_type != "Concat" or len(node.input) != 2 or node.output[0] in sliced:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        shapes = [tuple(d.dim_value for d in types[i].shape.dim) if i in types else None for i in node.input]
        if axis == 1 and shapes[0] and len(shapes[0]) == 4 and shapes[0] == shapes[1]:
            return node
    raise MutationNotApplicable("no channel concat with two equal-shaped inputs")


def _insert_mul(graph: Any, tensor: str, factor: float, elem: int, helper: Any, numpy_helper: Any, onnx: Any,
                only: Any = None) -> None:
    """Feed ``tensor × factor`` to every consumer of ``tensor`` (or only to node ``only``)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    const, scaled = f"mutant_{len(graph.initializer)}_k", f"{tensor}_mutant"
    graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=dtype), const))
    for node in [only] if only is not None else list(graph.node):
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = scaled
    producer = next((i for i, n in enumerate(graph.node) if tensor in n.output), -1)
    graph.node.insert(producer + 1, helper.make_node("Mul", [tensor, const], [scaled], name=f"{tensor}_mutant"))


# --- PyTorch modules (Core ML's traced-module check) ----------------------------------------------------------

def mutate_module(unet: nn.Module, mutation: Mutation) -> nn.Module:
    """A mutated deep copy of ``unet`` (weights changed, or hooks that tracing records)."""
    unet = copy.deepcopy(unet)
    params = dict(unet.named_parameters())
    if mutation.kind in ("scale", "zero"):
        with torch.no_grad():
            params[mutation.param].mul_(mutation.factor if mutation.kind == "scale" else 0.0)
    elif mutation.kind == "timestep":
        unet.time_proj.register_forward_pre_hook(lambda m, args: (args[0] * mutation.factor, *args[1:]))
    elif mutation.kind in ("swap", "drop_skip"):
        last = unet.up_blocks[-1].resnets[-1]
        half = unet.config.block_out_channels[0]  # the up path's output + conv_in's: equal widths
        if getattr(getattr(last, "conv1", None), "in_channels", None) != 2 * half:
            raise MutationNotApplicable("the last up ResNet's skip concat has unequal halves (or was removed)")

        def skip(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            y = torch.cat([x[:, half:], x[:, :half]], 1) if mutation.kind == "swap" else \
                torch.cat([x[:, :half], torch.zeros_like(x[:, half:])], 1)
            return (y, *args[1:])

        last.register_forward_pre_hook(skip)
    elif mutation.kind == "overflow":
        unet.conv_in.register_forward_hook(lambda m, args, out: out * torch.finfo(out.dtype).max)
    else:
        raise ValueError(f"unknown mutation kind '{mutation.kind}'")
    return unet
