"""``--target onnx``: the U-Net (teacher or pruned student) as an ONNX graph, checked, optionally slimmed, fp32 or
fp16, with ``manifest.json``.

Steps (each writes into the caller's temporary folder; ``laptop-deploy export`` moves it into place at the end):

1. trace :func:`~laptop_deploy.deploy.spec.wrap_unet` with ``torch.onnx.export`` — the dynamo exporter
   (``torch.export``, non-strict) by default, the TorchScript exporter with ``exporter="torchscript"`` — opset ≥ 18,
   dynamic axes from the ExportSpec; removed layers are :class:`~laptop_deploy.models.layers.Removed` modules and leave
   no weights and only a slice/identity in the graph;
2. optionally ``onnxslim.slim`` (constant folding, dead-node and identity elimination);
3. fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with a block list (:mod:`.onnx_fp16`);
4. save: one ``model.onnx``, or ``model.onnx`` + one ``model.onnx.data`` when the weights exceed protobuf's 2 GiB;
5. ``onnx.checker.check_model(full_check=True)`` on the path (works above 2 GiB) and a check that the graph's
   inputs, outputs, dtypes and dynamic axes are the spec's.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxscript  # noqa: F401 - the dynamo exporter's translator: a missing one fails before any work
import torch
from torch import nn

from ..errors import LaptopDeployError
from ..deploy.manifest import Manifest, describe_files, tool_versions, write_manifest
from ..deploy.spec import FP32_INPUTS, ExportSpec, torch_inputs, wrap_unet
from ..memory import peak_rss_mb
from .console import quiet
from .onnx_files import DATA_FILE, MODEL_FILE, PROTOBUF_LIMIT, save_onnx
from .onnx_fp16 import convert_to_fp16
from .onnx_int8 import INT8_PRECISIONS, Int8Options, quantize_onnx

EXPORTERS = ("dynamo", "torchscript")
PRECISIONS = ("fp32", "fp16", *INT8_PRECISIONS)  # what --precision may be for this target
MIN_OPSET = 18
_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}  # int: token ids (bundles)


class ExportError(LaptopDeployError):
    """An export that failed or produced a graph that does not match its ExportSpec."""


@dataclass(frozen=True)
class OnnxOptions:
    """How to export: ``exporter`` dynamo|torchscript, ``opset`` ≥ 18, ``slim`` runs onnxslim."""

    exporter: str = "dynamo"
    opset: int = MIN_OPSET
    slim: bool = False
    int8: Int8Options = Int8Options()  # calibration and gate of --precision int8 / int8-weights (onnx_int8.py)

    @classmethod
    def from_args(cls, args: Any) -> OnnxOptions:
        """The options of ``laptop-deploy export`` (every exporter's Options has this constructor)."""
        return cls(exporter=args.exporter, opset=args.opset, slim=args.slim, int8=Int8Options.from_args(args))

    def check(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ExportError(f"exporter '{self.exporter}' is not one of {', '.join(EXPORTERS)}")
        if self.opset < MIN_OPSET:
            raise ExportError(f"opset {self.opset} is below the minimum {MIN_OPSET}")
        if self.slim and importlib.util.find_spec("onnxslim") is None:
            raise ExportError("--slim needs the package 'onnxslim', which is not installed: "
                              "pip install 'laptop-deploy[onnx]'")
        self.int8.check()


Options = OnnxOptions  # every exporter module names its options class `Options`


def export(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
           options: OnnxOptions = OnnxOptions()) -> Manifest:
    """Export ``unet`` per ``spec`` into the (empty) folder ``out_dir`` and write its manifest.

    ``source`` describes the model (spec string, kind, family, params, removed, sha256) for the manifest.
    """
    options.check()
    start = time.perf_counter()
    stage = Path(tempfile.mkdtemp(prefix=".stage.", dir=out_dir))
    try:
        fp32 = export_fp32(unet, spec, stage, options=options)
        return finish_artifact(fp32, unet, spec, out_dir, source=source, options=options, started=start,
                               consume=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def finish_artifact(fp32: Path, unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
                    options: OnnxOptions, started: float | None = None, consume: bool = False) -> Manifest:
    """Steps 2–5 on an exported fp32 graph: slim, fp16, save into ``out_dir``, check, write the manifest.
    Intermediate files go to a temporary folder inside ``out_dir``; ``consume`` moves the fp32 files instead of
    copying them when they are the result (no second copy of a multi-GB graph)."""
    started = time.perf_counter() if started is None else started
    stage = Path(tempfile.mkdtemp(prefix=".finish.", dir=out_dir))
    info: dict[str, Any] = {}
    try:
        path = fp32
        if options.slim:
            path = slim(path, stage / "slim" / MODEL_FILE)
        if spec.precision == "fp16":
            keep = [name for name in FP32_INPUTS if name in spec.input_names]
            model, info = convert_to_fp16(path, fp32_inputs=keep,
                                          upcast_attention=bool(getattr(unet.config, "upcast_attention", False)))
            path = save_onnx(model, stage / "fp16" / MODEL_FILE)
            del model
        if spec.precision in INT8_PRECISIONS:
            path, info = quantize_onnx(path, unet, spec, stage / "int8", source=source, options=options.int8)
        for item in path.parent.iterdir():
            if item.name in (MODEL_FILE, DATA_FILE):
                (shutil.copy2 if path == fp32 and not consume else shutil.move)(str(item), out_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    check_onnx(out_dir / MODEL_FILE, spec)
    export_info = {**{k: v for k, v in asdict(options).items() if k != "int8"},  # int8: in `info` when used
                   "seconds": round(time.perf_counter() - started, 2),
                   "weight_bytes": _weight_bytes(unet), "peak_rss_mb": round(peak_rss_mb(), 1), **info}
    manifest = Manifest(target="onnx", precision=spec.precision, model_file=MODEL_FILE, spec=spec,
                        source=source, files=describe_files(out_dir), tools=tool_versions(), export=export_info)
    write_manifest(out_dir, manifest)
    return manifest


def export_fp32(unet: nn.Module, spec: ExportSpec, folder: Path, *, options: OnnxOptions,
                wrapper: nn.Module | None = None, args: tuple[torch.Tensor, ...] | None = None) -> Path:
    """Trace the fp32 graph into ``folder/model.onnx`` (+ ``model.onnx.data`` above 2 GiB); returns the path.
    ``wrapper`` / ``args``: another pipeline part's wrapper and example arguments (default: the U-Net's)."""
    wrapper = wrapper if wrapper is not None else wrap_unet(unet, spec)
    if args is None:
        example = spec.example_feeds(batch=max(spec.batch, 2) if spec.dynamic else None, seed=0)
        args = torch_inputs(spec, example)
    external = _weight_bytes(unet) > PROTOBUF_LIMIT
    path = folder / MODEL_FILE
    try:
        with quiet("torch.onnx"), torch.no_grad():
            if options.exporter == "dynamo":
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, opset_version=options.opset, input_names=spec.input_names,
                    output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes(), verbose=False)
                program.save(str(path), external_data=external)
                del program
            else:
                traced = folder / "torchscript"
                traced.mkdir()
                torch.onnx.export(
                    wrapper, args, str(traced / MODEL_FILE), dynamo=False, opset_version=options.opset,
                    input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes() or None, do_constant_folding=True)
                # The TorchScript exporter scatters >2 GiB weights over one file per tensor: gather them.
                save_onnx(onnx.load(str(traced / MODEL_FILE)), path)
                shutil.rmtree(traced)
    except Exception as exc:  # torch.export / translation failures come as many exception types
        if isinstance(exc, LaptopDeployError):
            raise
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        other = "torchscript" if options.exporter == "dynamo" else "dynamo"
        raise ExportError(f"{options.exporter} exporter failed: {type(exc).__name__}: {first[:300]} "
                          f"(try --exporter {other}; --debug shows the traceback)") from exc
    if spec.dynamic:
        name_dynamic_axes(path, spec)
    return path


def name_dynamic_axes(path: Path, spec: ExportSpec) -> None:
    """Give the graph's dynamic I/O axes the spec's names (``batch``, ``height``, ``width``); the dynamo exporter
    writes derived expressions such as ``8*(((height - 1)//8)) + 8`` for the output. Rewrites only the graph
    file: external weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    axes = spec.dynamic_axes()
    for value in (*model.graph.input, *model.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
    onnx.save_model(model, str(path))


def slim(path: Path, out: Path) -> Path:
    """onnxslim over ``path``, saved to ``out`` (external data above 2 GiB)."""
    import onnxslim

    with quiet("torch.onnx"):
        model = onnxslim.slim(str(path))
    if model is None:
        raise ExportError("onnxslim returned no model (its own check failed); export without --slim")
    return save_onnx(model, out)


def check_onnx(path: Path, spec: ExportSpec) -> None:
    """``onnx.checker`` on the file, then the graph's I/O names, dtypes and dynamic axes against ``spec``."""
    try:
        onnx.checker.check_model(str(path), full_check=True)  # + strict type and shape inference
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    for want, got in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        if [t.name for t in want] != [v.name for v in got]:
            raise ExportError(f"graph I/O {[v.name for v in got]} differs from the spec's {[t.name for t in want]}")
        for tensor, value in zip(want, got):
            _check_value(tensor, value)


def _check_value(tensor: Any, value: onnx.ValueInfoProto) -> None:
    ttype = value.type.tensor_type
    if ttype.elem_type != _ONNX_TYPES[tensor.dtype]:
        raise ExportError(f"{tensor.name}: graph dtype {onnx.TensorProto.DataType.Name(ttype.elem_type)}, "
                          f"spec {tensor.dtype}")
    dims = ttype.shape.dim
    if len(dims) != len(tensor.shape):
        raise ExportError(f"{tensor.name}: graph rank {len(dims)}, spec {list(tensor.shape)}")
    for axis, (dim, want) in enumerate(zip(dims, tensor.shape)):
        if isinstance(want, str) and dim.HasField("dim_value"):
            raise ExportError(f"{tensor.name}: axis {axis} ({want}) came out static ({dim.dim_value}); the "
                              f"model specialised it during tracing")
        if isinstance(want, int) and dim.HasField("dim_value") and dim.dim_value != want:
            raise ExportError(f"{tensor.name}: axis {axis} is {dim.dim_value} in the graph, {want} in the spec")


def _weight_bytes(unet: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unet.state_dict().values())


