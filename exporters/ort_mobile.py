"""``--target ort-mobile``: an ORT-format ``model.ort`` for ONNX Runtime Mobile (Android/iOS), from the ONNX export.

The ONNX graph is built by :mod:`.onnx` (same exporter options, fp32 or fp16), then converted with onnxruntime's
own tool, ``onnxruntime.tools.convert_onnx_models_to_ort`` (what ``python -m
onnxruntime.tools.convert_onnx_models_to_ort`` runs): graph optimisations applied offline at level ``all`` minus
the x86-only NCHWc layout transform, saved in the flatbuffer ORT format, plus ``required_operators.config`` for a
reduced-operator mobile build. The ORT format is one flatbuffer and cannot exceed 2 GiB: a full-size fp32 SD-1.5
(3.4 GB of weights) is refused up front — export fp16 or prune first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
from torch import nn

from ..deploy.manifest import Manifest, describe_files, tool_versions, write_manifest
from ..deploy.spec import ExportSpec
from ..memory import peak_rss_mb
from .onnx import MODEL_FILE, PRECISIONS, ExportError, OnnxOptions  # noqa: F401 - PRECISIONS: same

ORT_FILE = "model.ort"
FLATBUFFER_LIMIT = 2**31 - 2**26
Options = OnnxOptions  # same options as --target onnx: the ORT file is converted from that graph


def export(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
           options: OnnxOptions = OnnxOptions()) -> Manifest:
    """Export ``unet`` to ``out_dir/model.ort`` (+ ``required_operators.config``) and write its manifest."""
    from . import onnx as onnx_target

    options.check()
    bytes_per_weight = {"fp16": 2, "int8": 1, "int8-weights": 1}.get(spec.precision, 4)
    weight_bytes = sum(p.numel() for p in unet.parameters()) * bytes_per_weight
    if weight_bytes > FLATBUFFER_LIMIT:
        raise ExportError(f"ort-mobile: the ORT format is one flatbuffer limited to 2 GiB; this model has "
                          f"{weight_bytes / 1e9:.2f} GB of {spec.precision} weights (use --precision fp16 or "
                          f"prune further)")
    start = time.perf_counter()
    stage = out_dir / ".onnx"
    stage.mkdir()
    try:
        onnx_manifest = onnx_target.export(unet, spec, stage, source=source, options=options)
        converted = convert_to_ort(stage / MODEL_FILE, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    export_info = {**onnx_manifest.export, **{k: v for k, v in asdict(options).items() if k != "int8"},
                   "onnx_sha256": onnx_manifest.files[MODEL_FILE]["sha256"],
                   "ort_optimization": "all (NchwcTransformer excluded: portable to ARM)",
                   "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    manifest = Manifest(target="ort-mobile", precision=spec.precision, model_file=converted.name, spec=spec,
                        source=source, files=describe_files(out_dir), tools=tool_versions(), export=export_info)
    write_manifest(out_dir, manifest)
    return manifest


def convert_to_ort(onnx_path: Path, out_dir: Path) -> Path:
    """Run onnxruntime's ORT-format converter on ``onnx_path``; the ``.ort`` file and operator config land in
    ``out_dir``. Returns the ``.ort`` path."""
    log = io.StringIO()
    logging.disable(logging.INFO)  # the tool logs its progress at INFO and prints it: keep both off the console
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(onnx_path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:  # the tool re-raises whatever onnxruntime raised while converting
        lines = [ln for ln in log.getvalue().splitlines() if "Error" in ln] or [str(exc)]
        raise ExportError(f"ORT-format conversion failed: {lines[-1].strip()[:300]}") from exc
    finally:
        logging.disable(logging.NOTSET)
    path = out_dir / ORT_FILE
    if not path.is_file():
        written = sorted(p.name for p in out_dir.iterdir())
        raise ExportError(f"ORT-format conversion wrote no {ORT_FILE} (got {written})")
    return path

