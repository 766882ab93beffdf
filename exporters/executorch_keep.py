"""The ExecuTorch int8 gate's keep-float fallback: which U-Net units stay float so that the int8 ``.pte`` reaches
``--min-psnr`` — the ONNX int8 path's search (``onnx_int8.quantize_gated``, :func:`.int8_groups.keep_float`) on a
PT2E graph.

The input is the calibrated model converted with ``convert_pt2e(fold_quantize=False)``: every quantized convolution
and linear reads its activation through a quantize → dequantize pair and its float weight through a per-channel
pair, and its output goes through one more pair. Observers see float activations during calibration, so the
ranges do not depend on what else is quantized: the model with a set of nodes float is *this* graph with the pairs
those nodes alone introduced bypassed (:func:`float_edges`) — no second calibration, no second ``prepare_pt2e``.
An edge producer → consumer keeps its pair when the producer is a quantized node (its output annotation) or the
consumer is (its input annotation); a float node's weight is read unquantized. That equals the quantizer's own
opt-out (a filter that refuses the float nodes, then prepare / calibrate / convert): tested on a real graph.

Scoring is done in PyTorch on that reference, not on lowered programs (one lowering of a tiny U-Net takes minutes
here): :func:`search` scores each unit quantized alone on the held-out inputs, then keeps units float from the most
sensitive on while the reference's PSNR is below the gate plus :data:`REFERENCE_MARGIN_DB` (XNNPACK's int8 kernels
are not bit-equal to the reference), bounded by ``--max-float-share`` (exit 1 naming the PSNR reached). The caller
then lowers the chosen graph once and gates the saved ``.pte`` against ``--min-psnr`` itself.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from ..deploy.spec import ExportSpec, torch_inputs
from ..errors import CheckFailed
from .int8_calib import Captured
from .int8_groups import keep_float, unit_of

# The search aims this far above --min-psnr: it scores PyTorch's reference of the int8 arithmetic, and XNNPACK's int8
# kernels (their own requantization rounding) land near it but not on it — measured held out: toy all int8 .pte
# 49.1 dB vs reference 48.9; tiny-sd15 with conv_in float 29.76 vs 30.34, which a target of --min-psnr alone let
# through to a refused .pte. 1 dB is above both gaps; only one lowering follows the search.
REFERENCE_MARGIN_DB = 1.0
_COMPUTE = ("linear", "matmul", "bmm", "mm")  # op names (besides conv* and scaled_dot_product_attention*)
_QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")
_DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")


def op_name(node: Any) -> str:
    """``conv2d`` for ``aten.conv2d.default``, ``quantize_per_tensor`` for
    ``quantized_decomposed.quantize_per_tensor.default`` ('' for anything but a call)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return ""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def is_quantized(node: Node) -> bool:
    """A convolution or linear whose weight arrives through a dequantize (what the quantizer annotated)."""
    return op_name(node).startswith(("conv", "linear")) and len(node.args) > 1 and \
        op_name(node.args[1]) in _DEQUANTIZE


def scope(node: Node) -> str:
    """The module path of ``node`` below the export wrapper (``down_blocks.0.resnets.1.conv1``; '' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path.removeprefix("unet").lstrip(".")


def node_groups(gm: GraphModule) -> dict[str, list[Node]]:
    """The quantized nodes by U-Net unit (:func:`.int8_groups.unit_of`, the ONNX path's grouping)."""
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_quantized(node):
            groups[unit_of(scope(node))].append(node)
    return dict(groups)


def _paired(node: Any) -> Node | None:
    """The float value behind a dequantize(quantize(value)) node, else None."""
    if op_name(node) in _DEQUANTIZE and op_name(node.args[0]) in _QUANTIZE:
        return node.args[0].args[0]
    return None


def _quantized_output(value: Node, quantized: set[Node]) -> bool:
    """Whether ``value``'s output is annotated with only ``quantized`` annotated: a quantized node's, or that of an
    op the quantizer's ``propagate_annotation`` gives its input's spec (view, permute, mean...: re-quantizing a
    mean is not idempotent, so these count) when that input is."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import _is_share_obs_or_fq_op

    while value not in quantized:
        if value.op != "call_function" or not _is_share_obs_or_fq_op(value.target) or not value.args:
            return False
        value = _paired(value.args[0])
        if value is None:
            return False
    return True


def float_edges(gm: GraphModule, quantized: set[Node]) -> list[tuple[Node, Node, Node]]:
    """(consumer, dequantize node, float value) for every quantize/dequantize pair that would not exist with only
    ``quantized`` annotated: neither its producer's output (:func:`_quantized_output`) nor its consumer is
    quantized."""
    edges = []
    for dq in gm.graph.nodes:
        value = _paired(dq)
        if value is None or _quantized_output(value, quantized):
            continue
        edges += [(user, dq, value) for user in dq.users if user not in quantized]
    return edges


@contextlib.contextmanager
def bypassed(gm: GraphModule, edges: list[tuple[Node, Node, Node]]) -> Iterator[GraphModule]:
    """``gm`` with ``edges`` bypassed (each consumer reads the float value) for the duration; restored after."""
    saved = {user: (user.args, user.kwargs) for user, _, _ in edges}
    for user, dq, value in edges:
        user.replace_input_with(dq, value)
    if edges:
        gm.recompile()
    try:
        yield gm
    finally:
        for user, (args, kwargs) in saved.items():
            user.args, user.kwargs = args, kwargs
        if edges:
            gm.recompile()


def keep_float_nodes(gm: GraphModule, nodes: set[Node]) -> None:
    """Make ``nodes`` float for good (the chosen graph): bypass their pairs and drop the unused quantize ops."""
    quantized = {n for n in gm.graph.nodes if is_quantized(n)} - nodes
    for user, dq, value in float_edges(gm, quantized):
        user.replace_input_with(dq, value)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def torch_psnr(module: Any, spec: ExportSpec, held_out: list[tuple[dict, dict]]) -> list[float]:
    """PSNR (dB) of ``module``'s output against the fp32 outputs, per held-out input (PyTorch, float32)."""
    from ..deploy.verify import output_metrics

    values = []
    for feeds, expected in held_out:
        with torch.no_grad():
            out = module(*torch_inputs(spec, feeds))
        out = out[0] if isinstance(out, (tuple, list)) else out
        values.append(float(output_metrics(next(iter(expected.values())), out.numpy()).psnr_db))
    return values


def compute_macs(graph_module: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """:func:`node_macs` of every convolution / linear / matmul / attention node."""
    return {node: node_macs(node, op_name(node)) for node in graph_module.graph.nodes
            if op_name(node) in _COMPUTE or op_name(node).startswith(
                ("conv", "_convolution", "scaled_dot_product_attention", "_scaled_dot_product"))}


def _weight_value(arg: Any) -> torch.Tensor | None:
    """The weight's fake tensor, or for a converted graph's dequantize chain (no ``val`` there) the constant it
    starts from."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if isinstance(arg.meta.get("val"), torch.Tensor):
        return arg.meta["val"]
    while arg.op == "call_function" and arg.args and isinstance(arg.args[0], torch.fx.Node):
        arg = arg.args[0]
    if arg.op != "get_attr":
        return None
    value: Any = arg.graph.owning_module
    for part in str(arg.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def node_macs(node: torch.fx.Node, name: str) -> int:
    """Multiply-accumulates of one conv / linear / matmul / attention node from its fake-tensor shapes (0 if
    unknown): output elements × the reduction length (conv: in-channels per group × kernel area; linear: in
    features; matmul: K), attention 2·B·H·L·S·D (scores and their product with V; q [B, H, L, D], k [B, H, S,
    D])."""
    out = node.meta.get("val")
    w = _weight_value(node.args[1] if len(node.args) > 1 else None)
    if not isinstance(out, torch.Tensor) or not isinstance(w, torch.Tensor):
        return 0
    if "scaled_dot_product" in name:
        return 2 * int(out.numel()) * int(w.shape[-2])  # out [B, H, L, D] x S keys, twice
    if name.startswith(("conv", "_convolution")) and w.dim() >= 3:
        reduction = int(np.prod(w.shape[1:]))  # [C_out, C_in / groups, kh, kw]
    elif name == "linear":
        reduction = int(w.shape[-1])  # [out_features, in_features]
    else:
        reduction = int(w.shape[-2])  # matmul / bmm: [.., K, N]
    return int(out.numel()) * reduction


def mac_shares(gm: GraphModule, groups: dict[str, list[Node]]) -> tuple[dict[str, float], int]:
    """Each group's share of the graph's conv / linear / matmul / attention MACs, and that total
    (:func:`compute_macs`)."""
    macs = compute_macs(gm)
    total = sum(macs.values()) or 1
    return {g: sum(macs.get(n, 0) for n in nodes) / total for g, nodes in groups.items()}, total


def search(gm: GraphModule, spec: ExportSpec, data: Captured, *, min_psnr: float,
           max_share: float) -> dict[str, Any]:
    """Choose the float groups of ``gm`` (converted with ``fold_quantize=False``), apply them to ``gm`` and return
    the manifest's record; :class:`CheckFailed` (exit 1) when the reference cannot reach ``min_psnr`` +
    :data:`REFERENCE_MARGIN_DB` within ``max_share`` of the MACs float. PSNRs here are the PT2E reference's in
    PyTorch (worst held-out input)."""
    target = min_psnr + REFERENCE_MARGIN_DB
    groups = node_groups(gm)
    shares, total = mac_shares(gm, groups)
    everything = {n for nodes in groups.values() for n in nodes}

    def psnr_with(quantized: set[Node]) -> float:
        with bypassed(gm, float_edges(gm, quantized)):
            return min(torch_psnr(gm, spec, data.held_out))

    start = psnr_with(everything)
    _say(f"int8: all {len(everything)} conv/linear nodes quantized: PT2E reference held-out PSNR {start:.2f} dB "
         f"(search target {target:g} dB: gate {min_psnr:g} + {REFERENCE_MARGIN_DB:g})")
    sensitivity: dict[str, float] = {}
    if start < target and min(shares.values(), default=1.0) <= max_share:
        from tqdm import tqdm

        sensitivity = {g: psnr_with(set(nodes)) for g, nodes in tqdm(
            groups.items(), desc="int8 sensitivity", unit="group", file=sys.stderr, leave=False)}
    kept, psnr, log = keep_float(sorted(sensitivity, key=sensitivity.get), shares,
                                 lambda kept: psnr_with(everything.difference(*(groups[g] for g in kept))),
                                 start_db=start, min_psnr=target, max_share=max_share)
    share = sum(shares[g] for g in kept)
    if not psnr >= target:
        raise CheckFailed(f"int8 gate: held-out PSNR {psnr:.2f} dB (PT2E reference) < {target:g} dB (--min-psnr "
                          f"{min_psnr:g} + {REFERENCE_MARGIN_DB:g} for XNNPACK's kernels) with {len(kept)} of "
                          f"{len(groups)} node groups float ({100 * share:.1f}% of MACs; --max-float-share "
                          f"{max_share:g})")
    float_nodes = {n for g in kept for n in groups[g]}
    keep_float_nodes(gm, float_nodes)
    return {"int8_kept_float_groups": kept, "int8_kept_float_modules": sorted(scope(n) for n in float_nodes),
            "int8_kept_float_mac_share": round(share, 4), "int8_macs": int(total), "int8_gate_log": log,
            "int8_search_target_db": target,
            "int8_gate_scored_by": "PT2E reference in PyTorch (worst held-out PSNR); the .pte is gated after",
            "int8_group_sensitivity_db": {g: round(v, 2) for g, v in sorted(sensitivity.items(),
                                                                           key=operator.itemgetter(1))}}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
