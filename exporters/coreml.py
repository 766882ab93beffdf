"""``--target coreml``: the U-Net (teacher or pruned student) as a Core ML ML Program (``model.mlpackage``) with
``manifest.json``. Conversion runs anywhere coremltools 9 installs (Linux included); prediction needs macOS
(:mod:`laptop_deploy.runtimes.coreml`).

Steps (into the caller's temporary folder; ``laptop-deploy export`` moves it into place at the end):

1. ``torch.jit.trace`` of :func:`~laptop_deploy.deploy.spec.wrap_unet` — the module every exporter and the PyTorch
   reference use — at the spec's static shapes, in fp32. The traced module is run once more on other seeded
   inputs against the eager U-Net (:func:`traced_parity`): wrapper, argument-order or tracing bugs fail here, on
   any OS, before Core ML is involved. Pruned students convert like teachers: removed layers are
   :class:`~laptop_deploy.models.layers.Removed` modules (no weights; a slice at most), nothing assumes a standard block.
2. ``ct.convert(convert_to="mlprogram")`` with the spec's input/output names, shapes and dtypes;
   ``compute_precision`` FLOAT16 for an fp16 spec (ops computed from ``timestep``/``time_ids`` before the first
   linear/matmul/conv stay fp32, as in the ONNX fp16 export: fp16's 0.5 spacing near 1000 would scramble the
   sinusoidal phase) or FLOAT32; ``minimum_deployment_target`` and ``compute_units`` from the options; extra
   latent sizes become ``EnumeratedShapes`` on ``sample`` (the spec's own size is the default shape).
3. Optional weight compression through ``coremltools.optimize.coreml``: k-means palettization
   (``OpPalettizerConfig``, 4/6/8 bits; k-means needs scikit-learn for small or fp32 tensors) or linear
   quantization (``OpLinearQuantizerConfig``, int8, or int4 from iOS18/macOS15).
4. Metadata (source model, its hash, pruning ratio, precision, compression) in ``user_defined_metadata``; saved;
   read back from disk (:func:`read_package`: inputs, outputs, op histogram, weight bytes — all of which work on
   Linux, where ``MLModel(..., skip_model_load=True)`` gives the spec without compiling) and checked against the
   spec.
"""

from __future__ import annotations

import collections
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .console import logger_level

# coremltools logs at import (an untested torch version, its macOS-only proxies missing on Linux): keep that off
# stderr, where errors are one line — and leave the logger as it was.
with logger_level("coremltools"):
    import coremltools as ct

from ..errors import LaptopDeployError
from ..deploy.manifest import Manifest, file_entry, tool_versions, write_manifest
from ..deploy.spec import FP32_INPUTS, ExportSpec, torch_inputs, wrap_unet
from ..deploy.noise_floor import TRACED_FACTORS, Gate, copy_as, floor_row
from ..deploy.verify import Tolerances, compare
from ..memory import peak_rss_mb
from .console import quiet

MODEL_DIR = "model.mlpackage"
WEIGHTS_DIR = "Data/com.apple.CoreML/weights"
DEFAULT_PRECISION = "fp16"  # what Apple devices run; --precision fp32 for a reference build
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
# ML Programs with fp16 I/O and LUT/int8 weights need iOS16 / macOS13 or later; int4 weights need iOS18 / macOS15.
DEPLOYMENT_TARGETS = {"iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS13": 16, "macOS14": 17, "macOS15": 18}
PALETTE_BITS = (4, 6, 8)
QUANTIZE_BITS = {8: "int8", 4: "int4"}
FP16_STOP_OPS = ("linear", "matmul", "conv")  # the time path stays fp32 up to these
_DTYPES = {ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32",
           ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "float16",
           ct.proto.FeatureTypes_pb2.ArrayFeatureType.DOUBLE: "float64",
           ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32: "int32"}


class CoreMLExportError(LaptopDeployError):
    """Bad Core ML options, a failed trace or conversion, or a package that does not match its ExportSpec."""


@dataclass(frozen=True)
class CoreMLOptions:
    """``compute_units`` the app's default (ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY); ``deployment_target`` the
    minimum OS (iOS16–18, macOS13–15); ``palettize`` or ``quantize`` weight bits (4/6/8, or 8/4); ``sizes``
    extra latent (height, width) sizes the package also accepts (``EnumeratedShapes``)."""

    compute_units: str = "ALL"
    deployment_target: str = "iOS17"
    palettize: int | None = None
    quantize: int | None = None
    sizes: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_args(cls, args: Any) -> CoreMLOptions:
        """The options of ``laptop-deploy export`` (every exporter's Options has this constructor)."""
        return cls(compute_units=args.compute_units, deployment_target=args.deployment_target,
                   palettize=args.palettize, quantize=args.quantize, sizes=parse_sizes(args.coreml_sizes or ""))

    def check(self) -> None:
        if self.compute_units not in COMPUTE_UNITS:
            raise CoreMLExportError(f"compute units '{self.compute_units}' is not one of {', '.join(COMPUTE_UNITS)}")
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            raise CoreMLExportError(f"deployment target '{self.deployment_target}' is not one of "
                                    f"{', '.join(DEPLOYMENT_TARGETS)}")
        if self.palettize is not None and self.quantize is not None:
            raise CoreMLExportError("--palettize and --quantize are exclusive; choose one weight compression")
        if self.palettize is not None and self.palettize not in PALETTE_BITS:
            raise CoreMLExportError(f"--palettize {self.palettize}: bits must be one of {PALETTE_BITS}")
        if self.quantize is not None and self.quantize not in QUANTIZE_BITS:
            raise CoreMLExportError(f"--quantize {self.quantize}: bits must be one of {tuple(QUANTIZE_BITS)}")
        if self.quantize == 4 and DEPLOYMENT_TARGETS[self.deployment_target] < 18:
            raise CoreMLExportError(f"--quantize 4 (int4 weights) needs iOS18 or macOS15, not "
                                    f"{self.deployment_target} (use --deployment-target iOS18)")
        if self.palettize is not None and importlib.util.find_spec("sklearn") is None:
            raise CoreMLExportError("--palettize needs the package 'scikit-learn' (coremltools' k-means), which "
                                    "is not installed: pip install 'laptop-deploy[coreml]'")

    def check_spec(self, spec: ExportSpec) -> None:
        """Core ML has no open-ended dynamic axes: a list of sizes, each valid for the U-Net."""
        if spec.dynamic:
            raise CoreMLExportError("Core ML takes a list of latent sizes, not --dynamic axes: use --coreml-sizes "
                                    "HxW,... (the spec's --height/--width is the default)")
        bad = [f"{h}x{w}" for h, w in self.sizes if h % spec.downsample or w % spec.downsample]
        if bad:
            raise CoreMLExportError(f"--coreml-sizes {', '.join(bad)}: latent sizes must be multiples of "
                                    f"{spec.downsample}")


Options = CoreMLOptions  # every exporter module names its options class `Options`


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"16x16,32x24"`` → ((16, 16), (32, 24)); latent pixels (image pixels / 8)."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        height, sep, width = item.lower().partition("x")
        if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
            raise CoreMLExportError(f"--coreml-sizes: '{item}' is not HxW (latent pixels, e.g. 64x64)")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


@dataclass
class PackageSummary:
    """What a saved ``.mlpackage`` declares, read from its spec: ``inputs``/``outputs`` as
    ``{name, shape, dtype, sizes}`` (``sizes``: enumerated shapes, if any), ``ops`` the op-type histogram of the
    ``main`` function (nested blocks included), ``weight_bytes`` the size of its weights folder (bytes)."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ops: dict[str, int]
    weight_bytes: int
    opset: str
    metadata: dict[str, str] = field(default_factory=dict)


def export(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
           options: CoreMLOptions = CoreMLOptions()) -> Manifest:
    """Convert ``unet`` per ``spec`` into ``out_dir/model.mlpackage`` and write its manifest."""
    options.check()
    options.check_spec(spec)
    start = time.perf_counter()
    traced = trace_unet(unet, spec)
    parity = traced_parity(traced, unet, spec)
    mlmodel = convert(traced, spec, options)
    del traced
    mlmodel = compress(mlmodel, options)
    mlmodel.short_description = f"U-Net noise prediction ({source.get('spec', 'unknown model')})"
    mlmodel.user_defined_metadata.update(metadata(unet, spec, source=source, options=options))
    with quiet("coremltools", python_stderr=True):
        mlmodel.save(str(out_dir / MODEL_DIR))
    del mlmodel
    summary = read_package(out_dir / MODEL_DIR)
    check_package(summary, spec, options)
    export_info = {**asdict(options), "sizes": [list(s) for s in options.sizes], "traced_parity": parity,
                   "summary": asdict(summary), "notes": summary_lines(summary, options, parity), "seconds": round(time.perf_counter() - start, 2),
                   "peak_rss_mb": round(peak_rss_mb(), 1)}
    manifest = Manifest(target="coreml", precision=spec.precision, model_file=MODEL_DIR, spec=spec, source=source,
                        files=describe_package(out_dir), tools=tool_versions(), export=export_info)
    write_manifest(out_dir, manifest)
    return manifest


def trace_unet(unet: nn.Module, spec: ExportSpec) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the export wrapper on the spec's seeded fp32 inputs (the spec's shapes)."""
    wrapper = wrap_unet(unet, spec)
    args = torch_inputs(spec, spec.example_feeds(seed=0))
    try:
        with quiet("coremltools", python_stderr=True), torch.no_grad():
            return torch.jit.trace(wrapper, args)
    except Exception as exc:  # tracing failures come as many exception types
        raise CoreMLExportError(f"torch.jit.trace failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def traced_parity(traced: torch.jit.ScriptModule, unet: nn.Module, spec: ExportSpec, *,
                  seed: int = 1) -> dict[str, Any]:
    """The traced module vs the eager U-Net (diffusers' own call, ``added_cond_kwargs`` nested) on seeded inputs
    other than the trace's (timestep included), judged by the calibrated gate (``deploy.noise_floor``): the traced
    module's error against a float64 copy of the U-Net within a factor of eager fp32's own. Raises
    :class:`CoreMLExportError` on a mismatch; returns the metrics."""
    feeds = spec.with_precision("fp32").example_feeds(seed=seed)
    # example_feeds' timesteps depend on the batch only: draw others, so a timestep baked in by the trace shows
    feeds["timestep"] = np.random.default_rng(seed).uniform(1, 999, spec.batch).round().astype(np.float32)

    def eager(model: nn.Module, dtype: torch.dtype) -> np.ndarray:
        args = dict(zip(spec.input_names, torch_inputs(spec, feeds, dtype=dtype)))
        added = {k: args.pop(k) for k in ("text_embeds", "time_ids") if k in args}
        return model(args["sample"], args["timestep"], args["encoder_hidden_states"], added_cond_kwargs=added or None,
                     return_dict=False)[0].double().numpy()

    with torch.no_grad():
        out = traced(*torch_inputs(spec, feeds)).numpy()
        ref, exact = eager(unet, torch.float32), eager(copy_as(unet, torch.float64), torch.float64)
    report = compare({"out_sample": ref}, {"out_sample": out}, tolerances=Tolerances(None, None),
                     case="traced vs eager")
    row = floor_row(exact, ref, out, gate=Gate(*TRACED_FACTORS), case="traced vs eager", output="out_sample",
                    reference="torch fp32")
    if not report.passed or not row.passed:
        failures = "; ".join(report.failures + row.failures)
        raise CoreMLExportError(f"the traced module differs from the U-Net: {failures}")
    metrics = report.outputs[0]
    return {"rel_l2": metrics.rel_l2, "psnr_db": metrics.psnr_db, "max_abs": metrics.max_abs,
            "floor_rel_l2": row.floor_rel_l2, "factor_rel_l2": row.factor_rel_l2,
            "factor_max_abs": row.factor_max_abs}


def convert(traced: torch.jit.ScriptModule, spec: ExportSpec, options: CoreMLOptions) -> Any:
    """``ct.convert`` to an ML Program with the spec's names, shapes and dtypes (see the module docstring)."""
    sizes = [(spec.height, spec.width)] + [s for s in options.sizes if s != (spec.height, spec.width)]
    inputs = [ct.TensorType(name=t.name, shape=_input_shape(t.shape, sizes), dtype=np.dtype(t.dtype).type)
              for t in spec.inputs]
    outputs = [ct.TensorType(name=t.name, dtype=np.dtype(t.dtype).type) for t in spec.outputs]
    precision = (ct.transform.FP16ComputePrecision(op_selector=fp16_op_selector())
                 if spec.precision == "fp16" else ct.precision.FLOAT32)
    try:
        with quiet("coremltools", python_stderr=True):
            return ct.convert(traced, source="pytorch", convert_to="mlprogram", inputs=inputs, outputs=outputs,
                              compute_precision=precision, compute_units=getattr(ct.ComputeUnit, options.compute_units),
                              minimum_deployment_target=getattr(ct.target, _ios(options.deployment_target)))
    except Exception as exc:  # the converter raises many exception types
        raise CoreMLExportError(f"ct.convert failed: {type(exc).__name__}: {_first_line(exc)} "
                                f"(--debug shows the traceback)") from exc


def _input_shape(shape: tuple[int | str, ...], sizes: list[tuple[int, int]]) -> Any:
    if len(shape) != 4 or len(sizes) == 1:  # only `sample` varies with the latent size
        return tuple(shape)
    return ct.EnumeratedShapes(shapes=[[shape[0], shape[1], h, w] for h, w in sizes], default=list(shape))


def _ios(target: str) -> str:
    """ct.target has iOS names only; macOS13/14/15 are the same Core ML versions as iOS16/17/18."""
    return f"iOS{DEPLOYMENT_TARGETS[target]}"


def fp16_op_selector() -> Any:
    """``FP16ComputePrecision``'s op selector: False (keep fp32) for ops computed from ``timestep``/``time_ids``
    before a linear/matmul/conv, True otherwise. Ops arrive in program order, so producers are seen first."""
    fp32_vars: set[str] = set(FP32_INPUTS)

    def select(op: Any) -> bool:
        from_time = any(var.name in fp32_vars for var in _input_vars(op))
        if not from_time or op.op_type in FP16_STOP_OPS:
            return True
        fp32_vars.update(out.name for out in op.outputs)
        return False

    return select


def _input_vars(op: Any) -> Iterator[Any]:
    for value in op.inputs.values():
        yield from (value if isinstance(value, (list, tuple)) else [value])


def compress(mlmodel: Any, options: CoreMLOptions) -> Any:
    """Palettize or linearly quantize the weights (``coremltools.optimize.coreml``), or return ``mlmodel``."""
    import coremltools.optimize.coreml as cto

    if options.palettize is not None:
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=options.palettize))
        action = cto.palettize_weights
    elif options.quantize is not None:
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=QUANTIZE_BITS[options.quantize]))
        action = cto.linear_quantize_weights
    else:
        return mlmodel
    try:
        with quiet("coremltools", python_stderr=True):
            return action(mlmodel, config=config)
    except Exception as exc:
        raise CoreMLExportError(f"{action.__name__} failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def metadata(unet: nn.Module, spec: ExportSpec, *, source: dict[str, Any], options: CoreMLOptions) -> dict[str, str]:
    """``user_defined_metadata`` entries (strings): source model and hash, removed layers, pruning ratio (fraction
    of the teacher architecture's parameters removed), precision, compression, sizes."""
    params = sum(p.numel() for p in unet.parameters())
    with torch.device("meta"):
        teacher = type(unet).from_config(unet.config)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    compression = (f"palettized {options.palettize}-bit k-means" if options.palettize else
                   f"linear {QUANTIZE_BITS[options.quantize]}" if options.quantize else "none")
    return {"laptop_deploy.source": str(source.get("spec", "")), "laptop_deploy.source_sha256":
            str(source.get("sha256", "")), "laptop_deploy.removed": ",".join(source.get("removed", [])),
            "laptop_deploy.params": str(params), "laptop_deploy.pruning_ratio": f"{1 - params / teacher_params:.4f}",
            "laptop_deploy.precision": spec.precision, "laptop_deploy.compression": compression,
            "laptop_deploy.latent_sizes": ",".join(f"{h}x{w}" for h, w in
                                                   [(spec.height, spec.width), *options.sizes])}


def read_package(path: Path) -> PackageSummary:
    """Read a saved ``.mlpackage`` without compiling it (works on Linux): I/O, op histogram, weight bytes."""
    if not (path / "Manifest.json").is_file():
        raise CoreMLExportError(f"{path}: not an .mlpackage (no Manifest.json)")
    with quiet("coremltools", python_stderr=True):
        model_spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if model_spec.WhichOneof("Type") != "mlProgram":
        raise CoreMLExportError(f"{path}: a {model_spec.WhichOneof('Type')} model, expected an mlProgram")
    function = model_spec.mlProgram.functions["main"]
    ops: collections.Counter[str] = collections.Counter()
    _count_ops(function.block_specializations[function.opset], ops)
    weights = path / WEIGHTS_DIR
    weight_bytes = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) if weights.is_dir() else 0
    return PackageSummary(inputs=[_feature(f) for f in model_spec.description.input],
                          outputs=[_feature(f) for f in model_spec.description.output],
                          ops=dict(ops.most_common()), weight_bytes=weight_bytes, opset=function.opset,
                          metadata=dict(model_spec.description.metadata.userDefined))


def _count_ops(block: Any, ops: collections.Counter[str]) -> None:
    for op in block.operations:
        ops[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, ops)


def _feature(description: Any) -> dict[str, Any]:
    array = description.type.multiArrayType
    enumerated = [list(s.shape) for s in array.enumeratedShapes.shapes]
    return {"name": description.name, "shape": list(array.shape),
            "dtype": _DTYPES.get(array.dataType, str(array.dataType)), "sizes": enumerated}


def check_package(summary: PackageSummary, spec: ExportSpec, options: CoreMLOptions) -> None:
    """The package's I/O names, dtypes, default shapes and enumerated sizes are the spec's."""
    for kind, want, got in (("inputs", spec.inputs, summary.inputs), ("outputs", spec.outputs, summary.outputs)):
        if [t.name for t in want] != [g["name"] for g in got]:
            raise CoreMLExportError(f"package {kind} {[g['name'] for g in got]} differ from the spec's "
                                    f"{[t.name for t in want]}")
        for tensor, feature in zip(want, got):
            if feature["dtype"] != tensor.dtype:
                raise CoreMLExportError(f"{tensor.name}: package dtype {feature['dtype']}, spec {tensor.dtype}")
            if feature["shape"] and feature["shape"] != list(tensor.shape):
                raise CoreMLExportError(f"{tensor.name}: package shape {feature['shape']}, spec {list(tensor.shape)}")
    sample = summary.inputs[0]
    want_sizes = {(spec.height, spec.width), *options.sizes}
    got_sizes = {(s[2], s[3]) for s in sample["sizes"]} or {(spec.height, spec.width)}
    if got_sizes != want_sizes:
        raise CoreMLExportError(f"sample: package accepts latent sizes {sorted(got_sizes)}, asked for "
                                f"{sorted(want_sizes)}")


def describe_package(folder: Path) -> dict[str, dict[str, Any]]:
    """:func:`~laptop_deploy.deploy.manifest.file_entry` of every file inside ``folder/model.mlpackage``, keyed by its
    path relative to ``folder`` (the package is a directory; the manifest lists its files)."""
    root = folder / MODEL_DIR
    return {p.relative_to(folder).as_posix(): file_entry(p) for p in sorted(root.rglob("*")) if p.is_file()}


def summary_lines(summary: PackageSummary, options: CoreMLOptions, parity: dict[str, Any]) -> list[str]:
    """``laptop-deploy export``'s summary of the package: I/O, op histogram, weight bytes, traced parity."""

    def tensors(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t['name']} {t['dtype']}{t['shape'] or ''}"
                         + (f" ({len(t['sizes'])} sizes)" if t["sizes"] else "") for t in items)

    ops = ", ".join(f"{name} {count}" for name, count in list(summary.ops.items())[:12])
    compression = (f"{options.palettize}-bit palettized" if options.palettize else
                   f"{QUANTIZE_BITS[options.quantize]} quantized" if options.quantize else "uncompressed")
    return [f"  inputs:  {tensors(summary.inputs)}", f"  outputs: {tensors(summary.outputs)}",
            f"  ops ({sum(summary.ops.values())}, {summary.opset}): {ops}",
            (f"  weights: {summary.weight_bytes:,} bytes ({compression}); compute units {options.compute_units}, "
             f"minimum {options.deployment_target}"),
            (f"  traced module vs eager PyTorch: rel L2 {parity['rel_l2']:.2g}, PSNR {parity['psnr_db']:.1f} dB "
             f"(Core ML prediction itself needs macOS: laptop-deploy verify there)")]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


