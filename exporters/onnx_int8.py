"""``--precision int8`` and ``int8-weights`` for the ONNX targets: post-training quantization with ONNX Runtime's
tools (``onnxruntime.quantization``) behind a quality gate.

``int8`` — static QDQ (W8A8):

1. capture calibration and held-out inputs from real denoising loops of the model (:mod:`.int8_calib`);
2. ``quant_pre_process`` (ONNX shape inference + ORT's basic graph optimisations, what ORT asks for before
   quantizing); symbolic shape inference is skipped (the U-Net's shapes are static per export or named axes); a
   graph with external weights gets ONNX shape inference alone, so the weights are never loaded here;
3. calibrate once into a calibration cache — MinMax by :func:`.int8_minmax.calibrate_minmax` (one ORT session,
   weights loaded once: ``quantize_static``'s own calibrator held the SD-1.5 model several times and was
   OOM-killed), Entropy or Percentile by ``quantize_static``'s histogram calibrators — then
   ``quantize_static`` in QDQ format: per-channel symmetric int8 weights, asymmetric uint8 activations (what ORT
   recommends on x86 with VNNI: ``reduce_range`` off), Conv / MatMul / Gemm only — their QDQ groups are the
   patterns ORT's CPU EP fuses into ``QLinearConv`` / ``MatMulIntegerToFloat`` / ``QGemm`` — with MatMul and Gemm
   outputs left float (:data:`FLOAT_OUTPUT_OPS`: no QLinearSoftmax, no Quantize/Dequantize pair before float ops);
4. the gate: PSNR of the int8 graph's output against the fp32 model on the held-out inputs (the worst case).
   While below ``min_psnr``: every node group (:func:`.int8_graph.node_groups`: one U-Net unit's
   convolutions/projections, or its attention-score MatMuls) is quantized alone and scored; groups are then kept
   in float from the most sensitive (lowest PSNR alone) on, re-quantizing from the cache each time, until the
   gate passes — or the float share of MACs would exceed ``max_float_share``: :class:`CheckFailed` (exit 1) with
   the PSNR reached;
5. the manifest records the calibration, the kept-float groups and nodes, their share of MACs, the PSNR, and the
   op types ORT's CPU EP actually executed (``int8_kernels``: proof that integer kernels run).

``int8-weights`` — weight-only int8 (:func:`.int8_graph.weights_only`): 4× smaller weights, float activations and
compute; its held-out PSNR is measured and gated the same way (nothing can be kept float there: below the floor it
fails).
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from ..deploy.spec import ExportSpec
from ..errors import CheckFailed, LaptopDeployError
from .int8_calib import Captured, capture, read_prompts
from .int8_groups import keep_float
from .int8_graph import QUANT_OPS, bias_matmul_outputs, executed_ops, insert_qdq, node_groups, node_macs, \
    weights_only
from .int8_minmax import calibrate_minmax
from .onnx_files import DATA_FILE, name_nodes, save_onnx

INT8_PRECISIONS = ("int8", "int8-weights")
CALIB_METHODS = ("minmax", "entropy", "percentile")
# Outputs left float (no QuantizeLinear after them): ORT's CPU EP then runs MatMul as MatMulIntegerToFloat and Gemm
# as a QGemm writing float, so the Softmax after QKᵀ runs in float instead of as QLinearSoftmax — 5-6× slower than
# float Softmax on SD-1.5's 4096-token self-attention, 36% of the all-int8 student's kernel time
# (benchmarks/results/int8_profile_sd15.json) — and projections that only feed reshapes, splits, residual adds and
# normalisations (float ops) lose a Quantize/Dequantize pair and a rounding.
FLOAT_OUTPUT_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Options:
    """``--calib-prompts`` (count or file), ``--calib-steps`` per loop, ``--calib-method``, the gate's
    ``--min-psnr`` (dB) and ``--max-float-share`` (fraction of Conv/MatMul/Gemm MACs the gate may keep float),
    ``per_channel`` weight scales, ``float_outputs``: quantized op types whose outputs stay float
    (:data:`FLOAT_OUTPUT_OPS`; ``()`` puts a Quantize/Dequantize pair after every one). ``given`` names the int8
    options set on the command line (refused without an int8 precision)."""

    calib_prompts: str = "4"
    calib_steps: int = 8
    calib_method: str = "minmax"
    min_psnr: float = 30.0
    max_float_share: float = 0.5
    per_channel: bool = True
    float_outputs: tuple[str, ...] = FLOAT_OUTPUT_OPS
    held_out: int = 1
    given: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: Any) -> Int8Options:
        names = ("calib_prompts", "calib_steps", "calib_method", "min_psnr", "max_float_share", "float_outputs")
        values = {n: getattr(args, n, None) for n in names}
        flag = getattr(args, "int8_float_outputs", None)  # "MatMul,Gemm" or "none"
        if flag is not None:
            values["float_outputs"] = tuple(o.strip() for o in flag.split(",") if o.strip() not in ("", "none"))
        given = tuple(n for n, v in values.items() if v is not None)
        options = cls(**{n: v for n, v in values.items() if v is not None}, given=given)
        if given and getattr(args, "precision", None) not in INT8_PRECISIONS:
            flags = ", ".join("--" + ("int8_" * (n == "float_outputs") + n).replace("_", "-") for n in given)
            raise LaptopDeployError(f"{flags}: only with --precision int8 or int8-weights "
                                    f"(got {args.precision or 'the default precision'})")
        return options

    def check(self) -> None:
        if self.calib_method not in CALIB_METHODS:
            raise LaptopDeployError(f"--calib-method {self.calib_method}: valid: {', '.join(CALIB_METHODS)}")
        if self.calib_steps < 2:
            raise LaptopDeployError(f"--calib-steps {self.calib_steps}: need at least 2 denoising steps")
        if not 0.0 <= self.max_float_share <= 1.0:
            raise LaptopDeployError(f"--max-float-share {self.max_float_share}: must lie in [0, 1]")
        if not np.isfinite(self.min_psnr):
            raise LaptopDeployError(f"--min-psnr {self.min_psnr}: must be a finite number of dB")
        if not set(self.float_outputs) <= set(QUANT_OPS):
            raise LaptopDeployError(f"--int8-float-outputs {','.join(self.float_outputs)}: valid: "
                                    f"{', '.join(QUANT_OPS)} or none")
        read_prompts(self.calib_prompts)


def quantize_onnx(fp32: Path, unet: nn.Module, spec: ExportSpec, stage: Path, *, source: dict[str, Any],
                  options: Int8Options) -> tuple[Path, dict[str, Any]]:
    """The int8 model of the fp32 graph at ``fp32`` (saved under ``stage``) and what the manifest records."""
    started = time.perf_counter()
    data = capture(unet, spec, described=source, prompts=read_prompts(options.calib_prompts),
                   steps=options.calib_steps, held_out=options.held_out)
    _say(f"int8: captured {len(data.calibration)} calibration and {len(data.held_out)} held-out inputs "
         f"({data.seconds:.1f} s)")
    del unet  # a caller that handed over its last reference frees the PyTorch weights before ORT loads the graph
    gc.collect()
    info: dict[str, Any] = {"int8_calibration": {
        **{k: v for k, v in asdict(options).items() if k != "given"}, "calibration_inputs": len(data.calibration),
        "held_out_inputs": len(data.held_out), "held_out_prompts": data.held_out_prompts,
        "capture_s": round(data.seconds, 1)}}
    if spec.precision == "int8-weights":
        model, counts = weights_only(onnx.load(str(fp32)))
        path = save_onnx(model, stage / "weights" / "model.onnx")
        del model
        psnr = held_out_psnr(path, data)
        info.update(counts, int8_psnr_db=round(psnr, 2), int8_min_psnr_db=options.min_psnr)
        if psnr < options.min_psnr:
            raise CheckFailed(f"int8-weights: held-out PSNR {psnr:.2f} dB < --min-psnr {options.min_psnr:g} dB "
                              f"(weight-only quantization keeps nothing float to trade)")
    else:
        path, gate = quantize_gated(fp32, stage, data, options)
        info.update(gate)
    info["int8_kernels"] = executed_ops(path, data.held_out[0][0])
    info["int8_seconds"] = round(time.perf_counter() - started, 1)
    return path, info


def preprocess(fp32: Path, out: Path) -> Path:
    """``quant_pre_process`` (shape inference + ORT basic optimisations) into ``out``, nodes named uniquely.
    A graph with external weights (> 2 GiB: SD-1.5 and up) takes :func:`_preprocess_external` instead."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    if fp32.with_name(DATA_FILE).exists():
        return _preprocess_external(fp32, out)
    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    model = onnx.load(str(out))
    name_nodes(model.graph)
    return save_onnx(model, out)


def _preprocess_external(fp32: Path, out: Path) -> Path:
    """ONNX shape inference on the graph alone, the weights file copied unchanged; no ORT optimisation.

    ``quant_pre_process`` holds the whole model several times at once (``onnx.load``, an ORT session writing the
    optimised model, shape inference on it): on SD-1.5 (3.4 GB of weights) that reached 22 GB and was OOM-killed
    beside the PyTorch U-Net. Here the weights are never read: ``infer_shapes_path`` works on the graph file, whose
    initializers point at ``model.onnx.data`` by name. The basic optimisations skipped are redone by ORT when it
    loads the quantized model (the OrtRunner enables all)."""
    # a copy, not a hard link: onnx refuses external data with several links ("potential hardlink attack")
    shutil.copyfile(fp32.with_name(DATA_FILE), out.with_name(DATA_FILE))
    onnx.shape_inference.infer_shapes_path(str(fp32), str(out))
    model = onnx.load(str(out), load_external_data=False)
    name_nodes(model.graph)
    onnx.save_model(model, str(out))  # the graph only: its initializers still name model.onnx.data
    return out


class _Reader:
    """``CalibrationDataReader`` over captured feeds (the interface: ``get_next() -> dict | None``)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize(pre: Path, out: Path, *, cache: Path, options: Int8Options, feeds: list[dict[str, np.ndarray]] | None,
             only: list[str] | None = None, exclude: list[str] | None = None) -> Path:
    """One ``quantize_static`` run: QDQ, per-channel int8 weights, uint8 activations, Conv/MatMul/Gemm, the outputs
    of ``options.float_outputs`` left float; calibrates into ``cache`` when ``feeds`` are given, else reads the
    ranges from it."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calib_method]
    out.parent.mkdir(parents=True, exist_ok=True)
    external = pre.with_name(pre.name + ".data").exists()
    logging.disable(logging.WARNING)  # the tool warns on every call about things decided above
    try:
        quantize_static(str(pre), str(out), _Reader(feeds) if feeds is not None else None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS),
                        per_channel=options.per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=only, nodes_to_exclude=exclude,
                        use_external_data_format=external, calibrate_method=method,
                        # No CalibMaxIntermediateOutputs: in onnxruntime 1.32 it clears the collected min/max
                        # without merging them ("No data is collected" when the count divides evenly).
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "OpTypesToExcludeOutputQuantization": list(options.float_outputs)},
                        calibration_cache_path=str(cache))
    finally:
        logging.disable(logging.NOTSET)
    if "MatMul" in options.float_outputs:
        requantize_bias_matmuls(out, cache)
    return out


def requantize_bias_matmuls(path: Path, cache: Path) -> int:
    """Quantize/Dequantize pairs back on the outputs :func:`.int8_graph.bias_matmul_outputs` names (their scale and
    zero point from the calibration cache, computed as ``quantize_static`` does for uint8 activations), so ORT runs
    those MatMuls as QLinearMatMul and not as a float Gemm; the graph at ``path`` is rewritten in place (weights
    untouched). Returns the number of pairs added."""
    from onnxruntime.quantization.calibrate import load_tensors_data
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    model = onnx.load(str(path), load_external_data=False)
    ranges = load_tensors_data(cache)
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8)
    params = {}
    for name in bias_matmul_outputs(model.graph):
        if name in ranges:
            low, high = (np.asarray(v, dtype=np.float32).reshape(()) for v in ranges[name].range_value)
            zero, scale = compute_scale_zp(low, high, qmin, qmax, symmetric=False)
            params[name] = (np.asarray(scale, np.float32), np.asarray(zero, np.uint8))
    added = insert_qdq(model, params) if params else 0
    if added:
        onnx.save_model(model, str(path))  # the graph file; an external weights file keeps its name
    return added


def held_out_psnr(path: Path, data: Captured) -> float:
    """Worst PSNR (dB) over the held-out inputs of the model at ``path`` (ORT CPU, all optimisations — as the
    OrtRunner runs it) against the fp32 PyTorch outputs."""
    import onnxruntime as ort

    from ..deploy.verify import output_metrics

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    worst = np.inf
    for feeds, reference in data.held_out:
        names = list(reference)
        outputs = dict(zip(names, session.run(names, feeds)))
        for name in names:
            worst = min(worst, output_metrics(reference[name], outputs[name]).psnr_db)
    return float(worst)


def quantize_gated(fp32: Path, stage: Path, data: Captured, options: Int8Options) -> tuple[Path, dict[str, Any]]:
    """Steps 2–4 of the module docstring; returns the int8 model's path and the manifest's gate record."""
    pre = preprocess(fp32, stage / "pre" / "model.onnx")
    cache = stage / "calibration.json"
    groups = node_groups(onnx.load(str(pre), load_external_data=False).graph)
    macs = node_macs(pre, data.held_out[0][0])
    total = sum(macs.values()) or 1
    shares = {g: sum(macs.get(n, 0) for n in nodes) / total for g, nodes in groups.items()}
    feeds: list[dict[str, np.ndarray]] | None = data.calibration
    if options.calib_method == "minmax":  # one session, weights mapped once (quantize_static's copies OOM on SD-1.5)
        calibrate_minmax(pre, data.calibration, cache)
        feeds = None
    current = {"path": quantize(pre, stage / "q0" / "model.onnx", cache=cache, options=options, feeds=feeds)}
    psnr = held_out_psnr(current["path"], data)
    _say(f"int8: all {sum(map(len, groups.values()))} Conv/MatMul/Gemm nodes quantized: held-out PSNR {psnr:.2f} dB "
         f"(gate {options.min_psnr:g} dB)")
    sensitivity: dict[str, float] = {}
    if psnr < options.min_psnr and min(shares.values(), default=1.0) <= options.max_float_share:
        sensitivity = group_sensitivity(pre, stage, groups, cache=cache, data=data, options=options)

    def evaluate(kept: list[str]) -> float:
        old = current["path"]
        current["path"] = quantize(pre, stage / f"q{len(kept)}" / "model.onnx", cache=cache, options=options,
                                   feeds=None, exclude=[n for g in kept for n in groups[g]])
        _remove_model(old)  # one candidate on disk at a time (multi-GB for SD-1.5)
        return held_out_psnr(current["path"], data)

    kept, psnr, log = keep_float(sorted(sensitivity, key=sensitivity.get), shares, evaluate, start_db=psnr,
                                 min_psnr=options.min_psnr, max_share=options.max_float_share)
    nodes = [n for g in kept for n in groups[g]]
    share = sum(shares[g] for g in kept)
    record = {"int8_psnr_db": round(psnr, 2), "int8_min_psnr_db": options.min_psnr,
              "int8_kept_float_groups": kept, "int8_kept_float_nodes": nodes,
              "int8_float_mac_share": round(share, 4), "int8_macs": int(total),
              "int8_quantized_nodes": sum(map(len, groups.values())) - len(nodes), "int8_gate_log": log,
              "int8_group_sensitivity_db": {g: round(v, 2) for g, v in sorted(sensitivity.items(),
                                                                             key=lambda item: item[1])}}
    if psnr < options.min_psnr:
        raise CheckFailed(f"int8 gate: held-out PSNR {psnr:.2f} dB < --min-psnr {options.min_psnr:g} dB with "
                          f"{len(kept)} of {len(groups)} node groups float ({100 * share:.1f}% of MACs; "
                          f"--max-float-share {options.max_float_share:g})")
    return current["path"], record


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _remove_model(path: Path) -> None:
    for item in path.parent.iterdir():
        item.unlink()


def group_sensitivity(pre: Path, stage: Path, groups: dict[str, list[str]], *, cache: Path, data: Captured,
                      options: Int8Options) -> dict[str, float]:
    """Held-out PSNR (dB) with only one group quantized, for every group (lower = more sensitive)."""
    from tqdm import tqdm

    scores: dict[str, float] = {}
    for index, (group, nodes) in enumerate(tqdm(groups.items(), desc="int8 sensitivity", unit="group",
                                                file=sys.stderr, leave=False)):
        path = quantize(pre, stage / "alone" / f"{index}" / "model.onnx", cache=cache, options=options, feeds=None,
                        only=nodes)
        scores[group] = held_out_psnr(path, data)
        _remove_model(path)  # one candidate on disk at a time (multi-GB for SD-1.5)
    return scores
