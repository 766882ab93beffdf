"""``--target executorch``: the U-Net (teacher or pruned student) as an ExecuTorch program (``model.pte``) lowered to
the XNNPACK delegate, with ``manifest.json`` — what an Android or iOS app loads through ExecuTorch's runtime.

Steps (into the caller's temporary folder; ``laptop-deploy export`` moves it into place at the end):

1. ``torch.export.export`` of :func:`~laptop_deploy.deploy.spec.wrap_unet` (the module every exporter and the
   PyTorch reference use) on the spec's seeded fp32 inputs. ``--dynamic``: batch, height and width become
   ``torch.export.Dim`` axes (height/width as multiples of the U-Net's downsampling factor) with upper bounds
   (``--et-max-batch``, ``--et-max-latent``; default twice the spec's sizes), because ExecuTorch plans its memory
   for the largest shape. Without ``--dynamic`` the program has the spec's static shapes (one ``.pte`` per size).
2. ``executorch.exir.to_edge_transform_and_lower`` with ``XnnpackPartitioner``: what XNNPACK supports runs in its
   delegate, the rest on ExecuTorch's portable CPU kernels. :func:`delegation_summary` (from
   ``executorch.devtools.backend_debug.get_delegation_info``) records per op type what was and was not
   delegated, and the delegated share of the convolutions and matrix products — on a phone the ops left on the
   portable kernels decide the speed.
3. ``to_executorch()`` → ``model.pte``, then the saved file is loaded in ExecuTorch's runtime
   (:class:`~laptop_deploy.runtimes.executorch.ExecuTorchRunner`) and compared with the eager U-Net on seeded inputs
   other than the export's (timesteps included; a dynamic program also at batch 2 and another latent size), judged
   by the calibrated gate (``deploy.noise_floor``, with ``Gate.for_artifact``'s factors — the ones ``verify`` uses
   for a ``.pte``: ExecuTorch's kernels sum long reductions sequentially, so the factor grows as the square root of
   the U-Net's longest conv/linear reduction): the
   ``.pte``'s error against a float64 copy of the U-Net within a factor of eager fp32's own. A mismatch fails the
   export (exit 1) and nothing is written.

``--precision int8`` replaces step 1 with XNNPACK's PT2E quantizer calibrated on captured denoising inputs and
step 3's check with a held-out PSNR gate (:mod:`.executorch_int8`).

``executorch`` logs from C++ and its import pulls ``torchao``, which prints and adds warning filters: every
ExecuTorch call here runs under :func:`~.console.quiet`, and ``executorch`` submodules are imported inside
functions (only the bare package at import time, so a missing package names the extra).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import executorch  # noqa: F401 - the bare package: cheap, and a missing one fails here, naming the extra
import numpy as np
import torch
from torch import nn

from ..errors import CheckFailed, LaptopDeployError
from ..deploy.manifest import Manifest, describe_files, tool_versions, write_manifest
from ..deploy.noise_floor import Gate, copy_as, floor_row
from ..deploy.spec import ExportSpec, torch_inputs, wrap_unet
from ..deploy.verify import Tolerances, compare
from ..memory import peak_rss_mb
from .console import quiet
from .executorch_int8 import EtInt8Options, calibration_record, capture_inputs, compute_split, gate_pte, \
    quantized_program

PTE_FILE = "model.pte"
PRECISIONS = ("fp32", "int8")  # int8: XNNPACK's PT2E quantizer behind a PSNR gate (executorch_int8.py)
DEFAULT_PRECISION = "fp32"
# op types (get_delegation_info's names, suffixes stripped) that carry the U-Net's MACs
COMPUTE_OPS = re.compile(r"^aten_(convolution|mm|addmm|bmm|linear|matmul)(_|$)")
NOT_KERNELS = {"getitem"}  # tuple indexing in the graph, not an operator that runs


class ExecuTorchExportError(LaptopDeployError):
    """Bad ExecuTorch options, or a failed torch.export / lowering / serialization."""


@dataclass(frozen=True)
class ExecuTorchOptions:
    """``max_batch`` and ``max_latent`` (height, width in latent pixels): the upper bounds of a ``--dynamic``
    program (ExecuTorch plans memory for them); None = twice the spec's batch and latent size. ``int8``: the
    calibration and gate of ``--precision int8``."""

    max_batch: int | None = None
    max_latent: tuple[int, int] | None = None
    int8: EtInt8Options = EtInt8Options()

    @classmethod
    def from_args(cls, args: Any) -> ExecuTorchOptions:
        """The options of ``laptop-deploy export`` (every exporter's Options has this constructor)."""
        latent = getattr(args, "et_max_latent", None)
        return cls(max_batch=getattr(args, "et_max_batch", None), max_latent=tuple(latent) if latent else None,
                   int8=EtInt8Options.from_args(args))

    def check(self) -> None:
        self.int8.check()
        if self.max_batch is not None and self.max_batch < 1:
            raise ExecuTorchExportError(f"--et-max-batch {self.max_batch}: must be at least 1")
        if self.max_latent is not None and min(self.max_latent) < 1:
            raise ExecuTorchExportError(f"--et-max-latent {self.max_latent[0]} {self.max_latent[1]}: sizes must "
                                        f"be at least 1")

    def check_spec(self, spec: ExportSpec) -> None:
        """fp32 or static int8; bounds only with ``--dynamic``, at least the spec's sizes, multiples of the
        downsampling."""
        if spec.precision not in PRECISIONS:
            raise ExecuTorchExportError(f"--precision {spec.precision}: the executorch target builds "
                                        f"{', '.join(PRECISIONS)}")
        if spec.precision == "int8" and spec.dynamic:  # calibration captures one batch and latent size
            raise ExecuTorchExportError("--precision int8 with --dynamic: the int8 .pte is calibrated and gated at "
                                        "one size; export it static (one .pte per size)")
        if not spec.dynamic:
            if self.max_batch is not None or self.max_latent is not None:
                raise ExecuTorchExportError("--et-max-batch / --et-max-latent bound a --dynamic export; this one "
                                            "is static")
            return
        batch, (height, width) = self.bounds(spec)
        if batch < 2:
            raise ExecuTorchExportError(f"--et-max-batch {batch}: a dynamic batch needs a maximum of at least 2")
        if batch < spec.batch or height < spec.height or width < spec.width:
            raise ExecuTorchExportError(f"dynamic bounds batch {batch}, latent {height}x{width} are below the "
                                        f"spec's batch {spec.batch}, latent {spec.height}x{spec.width}")
        if height % spec.downsample or width % spec.downsample:
            raise ExecuTorchExportError(f"--et-max-latent {height} {width}: sizes must be multiples of "
                                        f"{spec.downsample}")

    def bounds(self, spec: ExportSpec) -> tuple[int, tuple[int, int]]:
        """(max batch, (max height, max width)) of a dynamic program."""
        return self.max_batch or max(2, 2 * spec.batch), self.max_latent or (2 * spec.height, 2 * spec.width)


Options = ExecuTorchOptions  # every exporter module names its options class `Options`


def export(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
           options: ExecuTorchOptions = ExecuTorchOptions()) -> Manifest:
    """Export ``unet`` per ``spec`` to ``out_dir/model.pte`` (XNNPACK-delegated) and write its manifest."""
    options.check()
    options.check_spec(spec)
    start = time.perf_counter()
    int8: dict[str, Any] = {}
    if spec.precision == "int8":
        data = capture_inputs(unet, spec, source=source, options=options.int8)
        program, reference, kept = _quantize(unet, spec, data, options)
        int8 = {"int8_calibration": calibration_record(data, options.int8),
                "int8_compute": compute_split(program.graph_module), **kept}
    else:
        program = export_program(unet, spec, options)
    export_s = time.perf_counter() - start
    edge = lower(program)
    delegation = delegation_summary(edge.exported_program().graph_module)
    lower_s = time.perf_counter() - start - export_s
    write_program(edge, out_dir / PTE_FILE)
    del program, edge
    if spec.precision == "int8":  # quantization noise: the PSNR gate, not the fp32 noise floor
        int8.update(gate_pte(out_dir / PTE_FILE, spec, data, options=options.int8, reference=reference),
                     int8_float_mac_share=int8["int8_compute"]["float_mac_share"],
                     int8_kernels=sorted(op for op, (done, _) in delegation["ops"].items()
                                         if "quantize" in op and done))  # q/dq fused into XNNPACK's int8 ops
        parity, notes = [], summary_lines(delegation, []) + [_int8_line(int8)]
    else:
        parity = pte_parity(out_dir / PTE_FILE, unet, spec)
        notes = summary_lines(delegation, parity)
    bounds = options.bounds(spec) if spec.dynamic else None
    export_info = {**{k: v for k, v in asdict(options).items() if k != "int8"}, "backend": "XnnpackPartitioner",
                   "delegation": delegation, **int8,
                   "dynamic_bounds": None if bounds is None else {"batch": bounds[0], "latent": list(bounds[1])},
                   "pte_parity": parity, "notes": notes,
                   "export_s": round(export_s, 2), "lower_s": round(lower_s, 2),
                   "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    manifest = Manifest(target="executorch", precision=spec.precision, model_file=PTE_FILE, spec=spec,
                        source=source, files=describe_files(out_dir), tools=tool_versions(), export=export_info)
    write_manifest(out_dir, manifest)
    return manifest


def _quantize(unet: nn.Module, spec: ExportSpec, data: Any,
              options: ExecuTorchOptions) -> tuple[Any, nn.Module, dict[str, Any]]:
    try:
        return quantized_program(unet, spec, data, options.int8)
    except LaptopDeployError:  # the gate's verdict (exit 1) or bad input: as raised
        raise
    except Exception as exc:  # torch.export / torchao raise many exception types
        raise ExecuTorchExportError(f"int8 quantization failed: {type(exc).__name__}: {_first_line(exc)} "
                                    f"(--debug shows the traceback)") from exc


def _int8_line(int8: dict[str, Any]) -> str:
    share = int8["int8_compute"]["float_mac_share"]
    kept = int8.get("int8_kept_float_groups") or []
    why = "attention-score matmuls" + (f"; kept float by the gate: {', '.join(kept)}" if kept else "")
    return (f"  int8: held-out PSNR of the .pte vs fp32 {int8['int8_psnr_db']:.2f} dB (gate "
            f"{int8['int8_min_psnr_db']:g} dB; PyTorch's PT2E reference {int8.get('int8_pt2e_reference_psnr_db')} "
            f"dB); {'n/a' if share is None else f'{100 * share:.1f}%'} of conv/linear/matmul MACs float ({why})")


def dynamic_shapes(spec: ExportSpec, options: ExecuTorchOptions) -> dict[str, dict[int, Any]] | None:
    """``torch.export``'s ``dynamic_shapes`` keyed by the wrapper's argument names, or None for a static spec.
    Height and width are ``downsample × Dim`` so that every size the program accepts is valid for the U-Net."""
    if not spec.dynamic:
        return None
    from torch.export import Dim

    max_batch, (max_h, max_w) = options.bounds(spec)
    factor = spec.downsample
    batch = Dim("batch", min=1, max=max_batch)
    height = factor * Dim("height_blocks", min=1, max=max_h // factor)
    width = factor * Dim("width_blocks", min=1, max=max_w // factor)
    shapes: dict[str, dict[int, Any]] = {name: {0: batch} for name in spec.input_names}
    shapes["sample"] = {0: batch, 2: height, 3: width}
    return shapes


def export_program(unet: nn.Module, spec: ExportSpec, options: ExecuTorchOptions) -> Any:
    """``torch.export.export`` of the export wrapper on the spec's seeded fp32 inputs (an ``ExportedProgram``)."""
    wrapper = wrap_unet(unet, spec)
    # a dynamic batch traced at 1 would be specialized to 1 (torch.export's 0/1 rule): trace at 2, as the ONNX
    # exporter does
    example = spec.example_feeds(batch=max(spec.batch, 2) if spec.dynamic else None, seed=0)
    return export_module(wrapper, torch_inputs(spec, example), dynamic_shapes(spec, options))


def export_module(module: nn.Module, args: tuple[Any, ...], shapes: Any = None, *, what: str = "") -> Any:
    """``torch.export.export(module, args, dynamic_shapes=shapes)`` (non-strict, no grad, quiet); its failures as
    one :class:`ExecuTorchExportError` line (``what`` names the part). Also the app bundles' parts' export."""
    try:
        with quiet("torch.export", python_stderr=True), torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many exception types (guards, unsupported ops, ...)
        raise ExecuTorchExportError(f"{what + ': ' if what else ''}torch.export failed: {type(exc).__name__}: "
                                    f"{_first_line(exc)} (--debug shows the traceback)") from exc


def lower(program: Any) -> Any:
    """Edge dialect + XNNPACK delegation (``to_edge_transform_and_lower``): an ``EdgeProgramManager``."""
    try:
        with quiet("executorch", python_stderr=True):
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    except Exception as exc:  # exir raises many exception types
        raise ExecuTorchExportError(f"lowering to XNNPACK failed: {type(exc).__name__}: {_first_line(exc)} "
                                    f"(--debug shows the traceback)") from exc


def write_program(edge: Any, path: Path) -> None:
    """Memory-plan and serialize ``edge`` (``to_executorch``) into the flatbuffer ``path``."""
    try:
        with quiet("executorch", python_stderr=True):
            program = edge.to_executorch()
            with open(path, "wb") as file:
                program.write_to_file(file)
    except Exception as exc:
        raise ExecuTorchExportError(f"ExecuTorch serialization failed: {type(exc).__name__}: "
                                    f"{_first_line(exc)}") from exc


def delegation_summary(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """What XNNPACK took: ``ops`` {op type: [delegated, portable]} (node counts; op types as
    ``get_delegation_info`` names them, e.g. ``aten_convolution_default``), ``portable`` the op types left on the
    portable kernels with their counts, ``compute_delegated_share`` the delegated fraction of convolution and
    matrix-product nodes (1.0 = all), ``subgraphs`` the number of XNNPACK partitions (each a call into the
    delegate)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    ops = {name: [b.delegated, b.non_delegated] for name, b in sorted(info.delegation_by_operator.items())
           if name not in NOT_KERNELS}
    return summarize_ops(ops, subgraphs=info.num_delegated_subgraphs)


def summarize_ops(ops: dict[str, list[int]], *, subgraphs: int) -> dict[str, Any]:
    """:func:`delegation_summary` from per-op [delegated, portable] counts (pure; unit-tested)."""
    delegated = sum(d for d, _ in ops.values())
    portable = {name: p for name, (_, p) in ops.items() if p}
    compute = [counts for name, counts in ops.items() if COMPUTE_OPS.match(name)]
    compute_total = sum(d + p for d, p in compute)
    share = sum(d for d, _ in compute) / compute_total if compute_total else None
    return {"subgraphs": subgraphs, "delegated_nodes": delegated, "portable_nodes": sum(portable.values()),
            "compute_nodes": compute_total, "compute_delegated_share": share,
            "portable": dict(sorted(portable.items(), key=lambda item: -item[1])), "ops": ops}


def pte_parity(path: Path, unet: nn.Module, spec: ExportSpec, *, seed: int = 1) -> list[dict[str, Any]]:
    """The saved program in ExecuTorch's runtime vs the eager U-Net (diffusers' own call) on seeded inputs other
    than the export's: random timesteps, and for a dynamic program also batch 2 at another latent size. Judged by
    the calibrated gate with ``Gate.for_artifact``'s factors for this U-Net, as ``verify`` (the ``.pte``'s error
    against a float64 copy of the U-Net within a factor of eager fp32's own) plus non-finite checks. Raises
    :class:`CheckFailed` on a mismatch; returns one metrics dict per case (errors against eager fp32, and the gate's
    floor and factors)."""
    from ..runtimes.executorch import ExecuTorchRunner

    cases = [("seeded", spec.example_feeds(seed=seed))]
    if spec.dynamic:
        h, w = spec.height + spec.downsample, spec.width + 2 * spec.downsample
        cases.append((f"seeded 2x{h}x{w}", spec.example_feeds(batch=2, height=h, width=w, seed=seed + 1)))
    rng = np.random.default_rng(seed)
    rows, failures = [], []
    wrapper = wrap_unet(unet, spec)
    exact = wrap_unet(copy_as(unet, torch.float64), spec)  # the exact function the noise floor is measured from
    gate = Gate.for_artifact("fp32", target="executorch", unet=unet)  # verify's factor for this U-Net
    with ExecuTorchRunner(path, spec=spec) as runner:
        for name, feeds in cases:
            batch = feeds["sample"].shape[0]
            feeds["timestep"] = rng.uniform(1, 999, batch).round().astype(np.float32)
            with torch.no_grad():
                ref = wrapper(*torch_inputs(spec, feeds)).numpy()
                truth = exact(*torch_inputs(spec, feeds, dtype=torch.float64)).numpy()
            out = runner.infer(feeds)
            case = f"{name} (.pte vs eager)"
            # fixed thresholds off: non-finite values and missing/misshapen outputs only; the gate judges the rest
            report = compare({"out_sample": ref}, out, tolerances=Tolerances(None, None), case=case)
            failures += report.failures
            if not report.outputs:
                continue
            row = floor_row(truth, ref, out["out_sample"], gate=gate, case=case, output="out_sample",
                            reference="torch fp32")
            failures += [f"{case}: {f}" for f in row.failures]
            metrics = report.outputs[0]
            rows.append({"case": name, "rel_l2": metrics.rel_l2, "psnr_db": metrics.psnr_db,
                         "max_abs": metrics.max_abs, "floor_rel_l2": row.floor_rel_l2,
                         "artifact_rel_l2": row.artifact_rel_l2, "factor_rel_l2": row.factor_rel_l2,
                         "factor_max_abs": row.factor_max_abs, "max_factor": gate.rel_l2_factor})
    if failures:
        raise CheckFailed(f"the .pte differs from the eager U-Net: {'; '.join(failures)}")
    return rows


def summary_lines(delegation: dict[str, Any], parity: list[dict[str, Any]]) -> list[str]:
    """``laptop-deploy export``'s summary: delegation and the .pte's parity."""
    share = delegation["compute_delegated_share"]
    portable = ", ".join(f"{name.removeprefix('aten_')} {count}" for name, count in
                         list(delegation["portable"].items())[:10]) or "none"
    lines = [f"  XNNPACK: {delegation['delegated_nodes']} nodes in {delegation['subgraphs']} subgraphs; "
            f"convolutions/matmuls delegated: {'n/a' if share is None else f'{share:.1%}'} of "
            f"{delegation['compute_nodes']}",
            f"  portable kernels ({delegation['portable_nodes']} nodes): {portable}"]
    return lines + (["  .pte in ExecuTorch's runtime vs eager PyTorch: " + ", ".join(
        f"{row['case']} rel L2 {row['rel_l2']:.2g}, {row['factor_rel_l2']:.2g}x the fp32 noise floor "
        f"{row['floor_rel_l2']:.2g} (max {row['max_factor']:g}x)" for row in parity)] if parity else [])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
