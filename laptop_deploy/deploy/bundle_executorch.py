"""``export --pipeline --target executorch``: the whole pipeline as ExecuTorch programs, one ``model.pte`` per part,
lowered to the XNNPACK delegate — in the ONNX bundle's layout and names (:mod:`.bundle_format`, ``model.pte`` in
place of ``model.onnx``; no ``model_index.json``: diffusers loads no ``.pte``)::

    text_encoder/model.pte   (SDXL: + text_encoder_2/model.pte)   input_ids int32 [batch, 77] -> ...
    unet/model.pte           the (pruned) U-Net, ExportSpec names
    vae_decoder/model.pte    vae_encoder/model.pte
    <part>/manifest.json     the part as a single artifact (target executorch): `bench` and `verify` take it
    tokenizer/  scheduler/  manifest.json (target executorch, ``image.fixed``)

Shapes: the batch axis is dynamic from 1 to :data:`MAX_BATCH` — ``generate`` feeds a text encoder one prompt at a
time, the U-Net the guidance pair [uncond, cond] (one image at a time with ``--sequential``), the VAE one latent —
and every other axis is fixed at the bundle's size (ExecuTorch plans memory for the largest shape it accepts; one
bundle per size, as for Core ML). The manifest's shapes say so: ``batch`` is the only named axis.

Each part: ``torch.export`` of the ONNX bundle's wrapper (:mod:`.bundle_parts`; the U-Net's
:func:`~.spec.wrap_unet`) at batch 2 → ``to_edge_transform_and_lower`` with XNNPACK → ``model.pte`` (the
single-target exporter's steps, :mod:`laptop_deploy.exporters.executorch`), then the saved program, loaded in
ExecuTorch's runtime, against the eager wrapper at batch 1 and 2 on other seeded inputs, judged by the calibrated gate
(:func:`.bundle_parts.module_check`) at ``verify``'s ExecuTorch factors for the part
(:func:`~.noise_floor.sequential_factors` of its longest reduction). A mismatch fails the export (exit 1) and
nothing is written. fp32 only: the int8 ``.pte`` is gated per U-Net export (``--target executorch --precision int8``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bundle_parts import as_tuple, module_check, part_feeds, part_spec
from .manifest import Manifest, describe_files, tool_versions, write_manifest
from .spec import ExportSpec, TensorSpec, torch_inputs, wrap_unet

MAX_BATCH = 2  # classifier-free guidance: [uncond, cond]
PTE_FILE = "model.pte"


def fixed_sizes(spec: ExportSpec) -> ExportSpec:
    """``spec`` with every named axis but ``batch`` fixed at the spec's size (latent ``height``/``width``; a VAE
    spec's ``image_height``/``image_width`` = latent × its ``downsample``, the VAE factor)."""
    sizes = {"height": spec.height, "width": spec.width, "image_height": spec.height * spec.downsample,
             "image_width": spec.width * spec.downsample}

    def fix(tensor: TensorSpec) -> TensorSpec:
        return replace(tensor, shape=tuple(sizes.get(d, d) if isinstance(d, str) else d for d in tensor.shape))

    return replace(spec, inputs=tuple(map(fix, spec.inputs)), outputs=tuple(map(fix, spec.outputs)))


def export_pte_part(name: str, module: nn.Module, spec: ExportSpec, out: Path, options: Any, *,
                    source: dict[str, Any], wrapper: nn.Module | None = None,
                    args: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Export one part into ``out/name`` (``model.pte`` + its ``manifest.json``), check it, and return its bundle
    manifest entry (model file, precision, I/O, bytes, delegation, the check's metrics). The signature is
    :func:`.bundle._export_part`'s, whose ONNX steps this replaces."""
    from ..exporters.executorch import ExecuTorchExportError, delegation_summary, export_module, lower, write_program
    from ..memory import peak_rss_mb

    if spec.precision != "fp32":
        raise ExecuTorchExportError(f"{name}: an executorch bundle is fp32 (got {spec.precision})")
    start = time.perf_counter()
    spec = fixed_sizes(spec)
    if wrapper is None:  # the U-Net: the exporter's own wrapper on the spec's seeded inputs
        wrapper = wrap_unet(module, spec)
        args = torch_inputs(spec, spec.example_feeds(batch=MAX_BATCH, seed=0))
    args = tuple(torch.cat([a] * MAX_BATCH) if a.shape[0] == 1 else a for a in args)  # batch 1 would specialize
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = export_module(wrapper, args, tuple({0: batch} for _ in args), what=name)
    edge = lower(program)
    delegation = delegation_summary(edge.exported_program().graph_module)
    folder = out / name
    folder.mkdir()
    write_program(edge, folder / PTE_FILE)
    del program, edge
    checks = check_pte(folder / PTE_FILE, wrapper, spec, case=name)
    manifest = Manifest(target="executorch", precision="fp32", model_file=PTE_FILE, spec=spec, source=source,
                        files=describe_files(folder), tools=tool_versions(),
                        export={"backend": "XnnpackPartitioner", "bundle_part": name, "delegation": delegation,
                                "pte_parity": checks, "max_batch": MAX_BATCH,
                                "seconds": round(time.perf_counter() - start, 2),
                                "peak_rss_mb": round(peak_rss_mb(), 1)})
    write_manifest(folder, manifest)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return {"model_file": f"{name}/{PTE_FILE}", "precision": "fp32", "inputs": spec.as_dict()["inputs"],
            "outputs": spec.as_dict()["outputs"], "bytes": sum(f["bytes"] for f in describe_files(folder).values()),
            "weight_bytes": weight_bytes, "pte_parity": checks,
            "delegation": {k: delegation[k] for k in ("compute_delegated_share", "compute_nodes", "subgraphs",
                                                      "portable_nodes", "portable")}}


def check_pte(path: Path, wrapper: nn.Module, spec: ExportSpec, *, case: str) -> list[dict[str, Any]]:
    """The saved program in ExecuTorch's runtime against ``wrapper`` at batch 1 and :data:`MAX_BATCH` on seeded
    inputs other than the export's; raises :class:`~laptop_deploy.errors.CheckFailed` (exit 1) on a mismatch."""
    from ..runtimes.executorch import ExecuTorchRunner
    from .noise_floor import longest_reduction, sequential_factors

    entry = spec.as_dict()
    factors = sequential_factors(longest_reduction(wrapper))  # verify's ExecuTorch factors for this part
    rows = []
    with ExecuTorchRunner(path, spec=spec) as runner:
        def run(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            out = runner.infer({name: a.numpy() for name, a in zip(spec.input_names, args)})
            return tuple(torch.from_numpy(out[name]) for name in spec.output_names)

        for batch in (1, MAX_BATCH):
            feeds = part_feeds(entry, {"batch": batch}, torch.Generator().manual_seed(batch))
            rows.append({"batch": batch, **module_check(
                run, wrapper, lambda module, *a: as_tuple(module(*a)), tuple(feeds.values()), spec.output_names,
                case=f"{case} .pte vs PyTorch (batch {batch})", gate=factors)})
    return rows


class PtePart:
    """One part of an ``executorch`` bundle in ExecuTorch's runtime (``generate``'s and ``verify``'s counterpart of
    :class:`.generate.OrtPart`): ``run(feeds)`` → outputs by name as float32."""

    def __init__(self, path: Path, part: dict[str, Any], *, threads: int | None = None) -> None:
        from ..runtimes import runner_class

        self.spec = part_spec(part)
        # a missing executorch package: exit 2 naming the [executorch] extra
        self.runner = runner_class("executorch")(path, spec=self.spec, intra_op_threads=threads)
        self.runner.__enter__()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.infer(self.spec.cast_feeds({name: feeds[name] for name in self.spec.input_names}))

    def close(self) -> None:
        self.runner.__exit__(None, None, None)
