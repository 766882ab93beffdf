"""``--target executorch --precision int8``: post-training static quantization with XNNPACK's PT2E quantizer, behind
the same quality gate as the ONNX int8 path (``onnx_int8.py``).

1. capture calibration and held-out inputs from real denoising loops of the model (:mod:`.int8_calib`, the
   inputs the ONNX int8 path calibrates on: every step of one loop per ``--calib-prompts`` prompt plus the empty
   prompt; held out: three steps of a loop on another prompt and seed, with the fp32 outputs);
2. ``torch.export`` of the export wrapper → ``.module()`` → torchao's ``prepare_pt2e`` with
   ``XNNPACKQuantizer`` (``get_symmetric_quantization_config(is_per_channel=True)``: symmetric per-output-channel
   int8 weights, per-tensor int8 activations; restricted to convolutions and linears like the ONNX path — the
   attention-score matmuls and residual adds stay float); the observers see every calibration input; ``convert_pt2e``
   folds them into quantize/dequantize pairs, which XNNPACK's partitioner fuses into its QC8 kernels;
3. the caller lowers that program to XNNPACK exactly as fp32 (``executorch.lower``), writes the ``.pte``, and
   :func:`gate_pte` runs the saved program in ExecuTorch's runtime on the held-out inputs: the worst PSNR against
   the fp32 PyTorch outputs must reach ``--min-psnr`` (default 30 dB), else :class:`CheckFailed` (exit 1, nothing
   written).

Between 2 and 3, the keep-float fallback (:mod:`.executorch_keep`, the ONNX path's search): the model is converted
with its weights still float behind quantize/dequantize pairs, and while its PT2E reference (the converted module,
run in PyTorch) is below ``--min-psnr`` on the held-out inputs, U-Net units (the ONNX path's node groups) are
scored quantized alone and kept float from the most sensitive on, bounded by ``--max-float-share`` (default 0.5 of
the conv/linear/matmul/attention MACs; exit 1 naming the PSNR reached). Scoring uses that PyTorch reference, not
lowered programs (a lowering takes minutes); only the final choice is folded to int8 weights, lowered and gated as
a ``.pte``.

Activation ranges: by default the quantizer's own ``HistogramObserver`` (the range minimising the L2 quantization
error; recorded as ``histogram``), or ``--calib-method minmax`` (``MinMaxObserver``); ONNX Runtime's ``entropy`` and
``percentile`` do not exist here and are refused (exit 2).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deploy.spec import ExportSpec, torch_inputs, wrap_unet
from ..errors import CheckFailed, LaptopDeployError
from .console import quiet
from .executorch_keep import compute_macs, op_name, search, torch_psnr
from .int8_calib import Captured, capture, read_prompts

CALIB_METHODS = ("histogram", "minmax")
QUANTIZER = ("XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True): symmetric per-channel "
             "int8 weights, per-tensor int8 activations; conv and linear only")


@dataclass(frozen=True)
class EtInt8Options:
    """``--calib-prompts`` (count or file), ``--calib-steps`` per loop, ``--calib-method`` (histogram | minmax),
    the gate's ``--min-psnr`` (dB) and ``--max-float-share`` (fraction of the MACs it may keep float);
    ``given``: the int8 flags set on the command line."""

    calib_prompts: str = "4"
    calib_steps: int = 8
    calib_method: str = "histogram"
    min_psnr: float = 30.0
    max_float_share: float = 0.5
    held_out: int = 1
    given: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: Any) -> EtInt8Options:
        names = ("calib_prompts", "calib_steps", "calib_method", "min_psnr", "max_float_share")
        values = {n: getattr(args, n, None) for n in names}
        given = tuple(n for n, v in values.items() if v is not None)
        if given and getattr(args, "precision", None) != "int8":
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise LaptopDeployError(f"{flags}: only with --precision int8 "
                                    f"(got {getattr(args, 'precision', None) or 'the default precision'})")
        return cls(**{n: v for n, v in values.items() if v is not None}, given=given)

    def check(self) -> None:
        if self.calib_method not in CALIB_METHODS:
            raise LaptopDeployError(f"--calib-method {self.calib_method}: --target executorch takes minmax, or no "
                                    f"--calib-method for the XNNPACK quantizer's own histogram observer")
        if self.calib_steps < 2:
            raise LaptopDeployError(f"--calib-steps {self.calib_steps}: need at least 2 denoising steps")
        if not 0.0 <= self.max_float_share <= 1.0:
            raise LaptopDeployError(f"--max-float-share {self.max_float_share}: must lie in [0, 1]")
        if not np.isfinite(self.min_psnr):
            raise LaptopDeployError(f"--min-psnr {self.min_psnr}: must be a finite number of dB")
        read_prompts(self.calib_prompts)


def capture_inputs(unet: nn.Module, spec: ExportSpec, *, source: dict[str, Any], options: EtInt8Options) -> Captured:
    """Step 1: the ONNX int8 path's captured calibration and held-out inputs (float32 feeds)."""
    data = capture(unet, spec, described=source, prompts=read_prompts(options.calib_prompts),
                   steps=options.calib_steps, held_out=options.held_out)
    _say(f"int8: captured {len(data.calibration)} calibration and {len(data.held_out)} held-out inputs "
         f"({data.seconds:.1f} s)")
    return data


def quantized_program(unet: nn.Module, spec: ExportSpec, data: Captured,
                      options: EtInt8Options) -> tuple[Any, nn.Module, dict[str, Any]]:
    """Step 2 and the keep-float search: (the quantized ``ExportedProgram`` ready to lower, the converted module —
    PyTorch's reference of the int8 arithmetic —, the search's manifest record). Raises :class:`CheckFailed` when
    no allowed float set reaches the gate; torch.export and torchao raise many exception types: the caller wraps
    them."""
    wrapper = wrap_unet(unet, spec)
    args = torch_inputs(spec, spec.example_feeds(seed=0))
    with quiet("torchao", python_stderr=True), torch.no_grad():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        graph = torch.export.export(wrapper, args, strict=False).module()
        prepared = prepare_pt2e(graph, make_quantizer(options))
        del graph
    started = time.perf_counter()
    with torch.no_grad():
        for feeds in data.calibration:
            prepared(*torch_inputs(spec, feeds))
    _say(f"int8: observers calibrated on {len(data.calibration)} inputs ({time.perf_counter() - started:.1f} s)")
    with quiet("torchao", python_stderr=True), torch.no_grad():
        converted = convert_pt2e(prepared, fold_quantize=False)  # float weights behind q/dq: any pair can go
    del prepared
    record = search(converted, spec, data, min_psnr=options.min_psnr, max_share=options.max_float_share)
    with quiet("torchao", python_stderr=True), torch.no_grad():
        from torchao.quantization.pt2e.constant_fold import constant_fold
        from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint

        constant_fold(converted, _quant_node_constraint)  # int8 weights, as convert_pt2e(fold_quantize=True)
        return torch.export.export(converted, args, strict=False), converted, record


def make_quantizer(options: EtInt8Options) -> Any:
    """``XNNPACKQuantizer`` with :func:`quantization_config`, restricted to convolutions and linears — what the ONNX
    path quantizes (Conv/MatMul/Gemm). Left to itself the quantizer also puts int8 outputs on every residual add,
    mul and cat: measured on the toy teacher that cost 18 dB (held-out 31.5 dB against ONNX int8's 49.7 dB)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import CONV_TARGETS, LINEAR_TARGETS, \
        XNNPACKQuantizer

    compute = CONV_TARGETS | LINEAR_TARGETS
    # a pattern's partition holds its op node and its weight/bias inputs: reject only other operators
    return XNNPACKQuantizer().set_global(quantization_config(options)).set_filter_function(
        lambda node: node.op != "call_function" or node.target in compute)


def quantization_config(options: EtInt8Options) -> Any:
    """The quantizer's symmetric per-channel config; ``minmax`` swaps its activation observer."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    config = get_symmetric_quantization_config(is_per_channel=True)
    if options.calib_method == "histogram":
        return config
    from torchao.quantization.pt2e import MinMaxObserver

    act = dataclasses.replace(config.input_activation,
                              observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def compute_split(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """MACs of the convolution / linear / matmul nodes of a converted (quantize-dequantize) ATen graph, split by
    whether their weight (second operand) arrives through a dequantize node, i.e. runs as int8:
    ``{"quantized_nodes", "float_nodes", "quantized_macs", "float_macs", "float_mac_share", "float_ops"}``."""
    split = {"quantized_nodes": 0, "float_nodes": 0, "quantized_macs": 0, "float_macs": 0}
    float_ops: dict[str, int] = {}
    for node, macs in compute_macs(graph_module).items():
        name = op_name(node)
        weight = node.args[1] if len(node.args) > 1 else None
        # a matmul or attention fed by dequantized activations still runs float
        quantized = name.startswith(("conv", "_convolution", "linear")) and \
            getattr(weight, "op", None) == "call_function" and "dequantize" in str(weight.target)
        key = "quantized" if quantized else "float"
        split[f"{key}_nodes"] += 1
        split[f"{key}_macs"] += macs
        if not quantized:
            float_ops[name] = float_ops.get(name, 0) + 1
    total = split["quantized_macs"] + split["float_macs"]
    return {**split, "float_mac_share": round(split["float_macs"] / total, 4) if total else None,
            "float_ops": float_ops}


def gate_pte(path: Path, spec: ExportSpec, data: Captured, *, options: EtInt8Options,
         reference: nn.Module | None = None) -> dict[str, Any]:
    """Step 3: the saved ``.pte`` in ExecuTorch's runtime on the held-out inputs vs the fp32 PyTorch outputs.
    Returns the manifest's int8 record (worst PSNR dB; with ``reference``, the converted PyTorch module's own PSNR
    on the same inputs — the quantization's share of the error); raises :class:`CheckFailed` below the gate."""
    from ..deploy.verify import output_metrics
    from ..runtimes.executorch import ExecuTorchRunner

    worst, worst_ref, rows = np.inf, np.inf, []
    with ExecuTorchRunner(path, spec=spec) as runner:
        for feeds, expected in data.held_out:
            out = runner.infer(feeds)
            psnr = min(output_metrics(expected[name], out[name]).psnr_db for name in expected)
            row = {"psnr_db": round(float(psnr), 2)}
            if reference is not None:
                ref_psnr = torch_psnr(reference, spec, [(feeds, expected)])[0]
                row["pt2e_reference_psnr_db"] = round(ref_psnr, 2)
                worst_ref = min(worst_ref, ref_psnr)
            rows.append(row)
            worst = min(worst, psnr)
    record = {"int8_psnr_db": round(float(worst), 2), "int8_min_psnr_db": options.min_psnr,
              "int8_held_out": rows}
    if reference is not None:
        record["int8_pt2e_reference_psnr_db"] = round(float(worst_ref), 2)
    _say(f"int8: held-out PSNR of the .pte vs fp32 {worst:.2f} dB (gate {options.min_psnr:g} dB)")
    if not worst >= options.min_psnr:  # NaN fails too
        raise CheckFailed(f"int8 gate: held-out PSNR of the .pte {worst:.2f} dB < --min-psnr {options.min_psnr:g} dB "
                          f"(the keep-float search's PyTorch reference passed; XNNPACK's int8 kernels lost the rest)")
    return record


def calibration_record(data: Captured, options: EtInt8Options) -> dict[str, Any]:
    """The manifest's ``int8_calibration``: the options and what was captured."""
    return {**{k: v for k, v in dataclasses.asdict(options).items() if k != "given"}, "quantizer": QUANTIZER,
            "calibration_inputs": len(data.calibration), "held_out_inputs": len(data.held_out),
            "held_out_prompts": data.held_out_prompts, "capture_s": round(data.seconds, 1)}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
