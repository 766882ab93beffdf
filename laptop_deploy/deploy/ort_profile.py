"""Per-unit times from ONE ONNX Runtime session: the profiler's kernel events mapped back to module paths.

The dynamo exporter stores each node's module path in its metadata (``pkg.torch.onnx.name_scopes``: ``['',
'unet', 'unet.down_blocks.0', 'unet.down_blocks.0.resnets.0', ..., 'conv2d_5']``); the TorchScript exporter puts
it in the node name (``/unet/down_blocks.0/resnets.0/conv1/Conv``). ONNX Runtime's optimiser renames some nodes:
fusions keep the first node's name before a ``/`` (``node_silu_1/QuickGeluFusion/``), NCHWc convolutions are named
after their output tensor (``conv2d_51_nchwc``), and layout nodes it inserts (``ReorderInput``, ``Transpose``,
``gemm_input_reshape``) have no origin at all. Those are given to the next mapped node in execution order (they
prepare its input), so every kernel microsecond lands in exactly one place: a unit, or outside every unit.

No per-unit export or session: one profiled session times every unit at once (SD-1.5: seconds, not the N
exports an ablation would need). Times are inclusive: a node inside a transformer block also counts for its
Transformer2DModel.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_SUFFIXES = ("_nchwc",)
_CATEGORIES = (
    ("conv", ("conv",)),
    ("matmul/attention", ("matmul", "gemm", "attention", "softmax", "einsum")),
    ("norm", ("norm",)),
    ("elementwise", ("add", "mul", "sub", "div", "sigmoid", "silu", "gelu", "erf", "tanh", "relu", "sqrt", "pow",
                     "exp", "sin", "cos", "neg", "where", "clip")),
)


def op_category(op: str) -> str:
    """conv | matmul/attention | norm | elementwise | other, from an ONNX op type or an aten op name."""
    low = op.lower().removeprefix("aten::")
    for category, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def _paths_from_scopes(scopes: list[str]) -> list[str]:
    return [s.removeprefix("unet.") for s in scopes if s.startswith("unet.")]


def _paths_from_name(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p][:-1]  # the last part is the op
    if not parts or parts[0] != "unet":
        return []
    return [".".join(parts[1:i + 1]) for i in range(1, len(parts))]


def node_scopes(model_path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(node name -> module paths enclosing it, output tensor name -> the same) of an ONNX file (weights not
    read). Paths are relative to the U-Net (``down_blocks.0.resnets.0``); [] for nodes outside every module."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    by_node: dict[str, list[str]] = {}
    by_tensor: dict[str, list[str]] = {}
    found = False
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if SCOPES_KEY in meta:
            try:
                paths = _paths_from_scopes(ast.literal_eval(meta[SCOPES_KEY]))
            except (ValueError, SyntaxError):
                paths = []
        else:
            paths = _paths_from_name(node.name)
        found = found or bool(paths)
        by_node[node.name] = paths
        for out in node.output:
            by_tensor[out] = paths
    if not found:
        raise LaptopDeployError(f"{model_path}: no node carries a module path (neither the dynamo exporter's "
                                f"'{SCOPES_KEY}' metadata nor TorchScript scope names); re-export it with "
                                f"`laptop-deploy export --target onnx` to profile it per unit")
    return by_node, by_tensor


def _lookup(name: str, by_node: dict[str, list[str]], by_tensor: dict[str, list[str]]) -> list[str] | None:
    if name in by_node:
        return by_node[name]
    head = name.split("/")[0]
    if head in by_node:
        return by_node[head]
    for suffix in _SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in by_tensor:
            return by_tensor[base]
    return by_tensor.get(name)


def read_profile(profile_path: Path, *, by_node: dict[str, list[str]], by_tensor: dict[str, list[str]],
                 units: list[str], skip_runs: int) -> dict[str, Any]:
    """Per run (after the first ``skip_runs``): the run's wall ms, ms per unit (inclusive), ms per op category
    (``ops``) and per kernel op type (``op_types``), and the ms of kernels whose origin had to be inferred from
    their neighbour."""
    events = json.loads(Path(profile_path).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[skip_runs:]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    unit_set = set(units)
    out = []
    for run in runs:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        inside = [e for e in kernels if lo <= e["ts"] <= hi]
        per_unit: dict[str, float] = defaultdict(float)
        per_op: dict[str, float] = defaultdict(float)
        per_type: dict[str, float] = defaultdict(float)  # by the kernel's ONNX op type (QuantizeLinear, ...)
        pending: list[float] = []
        inferred = 0.0
        for e in inside:
            ms = e["dur"] / 1e3
            per_op[op_category(e.get("args", {}).get("op_name", ""))] += ms
            per_type[e.get("args", {}).get("op_name", "?")] += ms
            paths = _lookup(re.sub(r"_kernel_time$", "", e["name"]), by_node, by_tensor)
            if paths is None:
                pending.append(ms)
                continue
            share = ms + sum(pending)
            inferred += sum(pending)
            pending = []
            for path in paths:
                if path in unit_set:
                    per_unit[path] += share
        out.append({"run_ms": run["dur"] / 1e3, "units": dict(per_unit), "ops": dict(per_op),
                    "op_types": dict(per_type),
                    "kernel_ms": sum(e["dur"] for e in inside) / 1e3, "inferred_ms": inferred + sum(pending)})
    return {"runs": out}
