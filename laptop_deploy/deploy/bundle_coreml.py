"""``export --pipeline --target coreml``: the whole pipeline as ``.mlpackage`` parts in Apple's Resources naming.

Layout (names and I/O: :mod:`.coreml_parts`; docs/BUNDLE.md compares it with Apple's)::

    TextEncoder.mlpackage  (SDXL: + TextEncoder2.mlpackage)
    Unet.mlpackage         or UnetChunk1.mlpackage + UnetChunk2.mlpackage (--chunk-unet, :mod:`.unet_chunks`)
    VAEDecoder.mlpackage   VAEEncoder.mlpackage        fp32 always (bundle_parts.FP32_PARTS)
    vocab.json merges.txt  Apple's BPETokenizer files, written when the tokenizer is a BPE model
    tokenizer/             tokenizer.json (+ transformers' files): what the ONNX bundle and `generate` read
    scheduler/scheduler_config.json
    manifest.json          laptop-deploy-bundle v1 (target coreml): every file inside every package with its sha256

Each part is traced (``torch.jit.trace`` of its wrapper, fp32), checked against the stock PyTorch call with the
calibrated gate at the traced factors (:func:`.bundle_parts.module_check`; the chunks: chunk 2 ∘ chunk 1
against the whole U-Net), then converted, compressed and read back by the Core ML exporter's own steps
(:mod:`laptop_deploy.exporters.coreml`: ``convert``, ``compress``, ``read_package``, ``check_package``).
Prediction needs macOS; on Linux ``verify BUNDLE`` re-runs the traced checks (:func:`verify_traced`) and says that
prediction was not run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckFailed
from .bundle_format import BundleManifest, describe_tree, write_bundle_manifest
from .bundle_parts import FP32_PARTS, VAE_PARTS, as_tuple, module_check, save_tokenizer, vae_scale_factor
from .coreml_parts import CoreMLPart, chunk_specs, package_name, text_part, unet_part, unet_reference, vae_part

APPLE_LAYOUT = "ml-stable-diffusion Resources (.mlpackage; compile to .mlmodelc with xcrun coremlcompiler)"


def build_parts(sources: Any, *, precision: str, height: int, width: int, chunk: bool) -> tuple[list[CoreMLPart],
                                                                                                   dict | None]:
    """Every part of the bundle in run order; with ``chunk`` the U-Net becomes ``unet_chunk1``/``unet_chunk2``
    (their reference is None: :func:`check_chunks` judges the pair). Returns (parts, the chunk plan's dict)."""
    from ..models.unet_io import TEXT_TOKENS, downsample_factor

    unet, parts = sources.unet.unet.eval(), sources.parts
    sdxl = sources.unet.family == "sdxl"
    vae = parts.part("vae").eval()
    factor = vae_scale_factor(vae)
    result = [text_part(name, parts.part(name).eval(), tokens=TEXT_TOKENS, sdxl=sdxl, precision=precision)
              for name in (["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"])]
    whole = unet_part(unet, height=height, width=width, factor=factor, downsample=downsample_factor(unet.config),
                      precision=precision)
    plan_dict = None
    if chunk:
        from .unet_chunks import split_unet

        first, second, plan = split_unet(unet)
        spec1, spec2, boundary = chunk_specs(unet, plan, first, height=height, width=width, factor=factor,
                                             downsample=whole.spec.downsample, precision=precision)
        args2 = ((whole.example[2],) if plan.cross_attention_in_chunk2 else ()) + tuple(boundary)
        result += [CoreMLPart("unet_chunk1", unet, first, spec1, None, whole.example, whole.check),
                   CoreMLPart("unet_chunk2", unet, second, spec2, None, args2, ())]
        plan_dict = plan.as_dict()
    else:
        result.append(whole)
    channels = unet.config["in_channels"]
    result += [vae_part(name, vae, latent_channels=channels, height=height, width=width, factor=factor)
               for name in VAE_PARTS]
    return result, plan_dict


def trace(part: CoreMLPart) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the part's wrapper on its example inputs (fp32, fixed shapes)."""
    from ..exporters.coreml import CoreMLExportError, _first_line
    from ..exporters.console import quiet

    try:
        with quiet("coremltools", python_stderr=True), torch.no_grad():
            # check_trace off: module_check below is the stronger check (other inputs, stock call, float64 gate)
            return torch.jit.trace(part.wrapper, part.example, check_trace=False)
    except Exception as exc:  # tracing failures come as many exception types
        raise CoreMLExportError(f"{part.name}: torch.jit.trace failed: {type(exc).__name__}: "
                                f"{_first_line(exc)}") from exc


def check_part(part: CoreMLPart, traced: torch.jit.ScriptModule) -> dict[str, Any]:
    return module_check(lambda args: traced(*args), part.module, part.reference, part.check,
                        part.spec.output_names, case=f"{part.name} traced vs PyTorch")


def check_chunks(first: CoreMLPart, second: CoreMLPart, traced1: Any, traced2: Any) -> dict[str, Any]:
    """Chunk 2 ∘ chunk 1 (traced, chunk 2 fed by name as Apple's Unet.swift does: chunk 1's outputs merged with
    the original inputs) against diffusers' whole U-Net on other seeded inputs."""
    names = first.spec.input_names

    def run(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feeds = dict(zip(names, args)) | dict(zip(first.spec.output_names, as_tuple(traced1(*args))))
        return traced2(*(feeds[name] for name in second.spec.input_names))

    return module_check(run, first.module, unet_reference, first.check, ["noise_pred"],
                        case="unet_chunk2(unet_chunk1) traced vs the whole U-Net")


def _check_all(parts: list[CoreMLPart], traced: dict[str, Any], plan: dict | None) -> dict[str, dict[str, Any]]:
    results = {p.name: check_part(p, traced[p.name]) for p in parts if p.reference is not None}
    if plan is not None:
        by_name = {p.name: p for p in parts}
        results["unet_chunk2"] = results["unet_chunk1"] = check_chunks(
            by_name["unet_chunk1"], by_name["unet_chunk2"], traced["unet_chunk1"], traced["unet_chunk2"])
    return results


def _convert(part: CoreMLPart, traced: Any, out: Path, options: Any, *, source: dict[str, Any]) -> dict[str, Any]:
    """The exporter's convert → compress (U-Net parts) → save → read back → check against the spec."""
    from ..exporters import coreml
    from ..exporters.console import quiet

    mlmodel = coreml.convert(traced, part.spec, options)
    if part.name.startswith("unet"):
        mlmodel = coreml.compress(mlmodel, options)
    mlmodel.short_description = f"{package_name(part.name)[:-10]} of {source.get('spec', 'unknown model')}"
    mlmodel.user_defined_metadata.update({"laptop_deploy.part": part.name, "laptop_deploy.source":
                                          str(source.get("spec", "")), "laptop_deploy.source_sha256":
                                          str(source.get("sha256", "")), "laptop_deploy.precision":
                                          part.spec.precision})
    path = out / package_name(part.name)
    with quiet("coremltools", python_stderr=True):
        mlmodel.save(str(path))
    del mlmodel
    summary = coreml.read_package(path)
    coreml.check_package(summary, part.spec, options)
    return {"weight_bytes": summary.weight_bytes, "ops": sum(summary.ops.values()), "opset": summary.opset}


def _apple_tokenizer_files(folder: Path, out: Path, suffix: str = "") -> dict[str, str]:
    """``vocab.json`` + ``merges.txt`` (Apple's BPETokenizer input) from ``folder/tokenizer.json`` when it is a
    BPE model; {} for any other model (the toy's word-level one keeps its ``tokenizer.json`` only)."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        return {}
    vocab, merges = f"vocab{suffix}.json", f"merges{suffix}.txt"
    (out / vocab).write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    (out / merges).write_text("#version: 0.2\n" + "".join(f"{line}\n" for line in lines))
    return {"vocab": vocab, "merges": merges}


def _tokenizers(parts: Any, out: Path, sdxl: bool) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]):
        entry, _ = save_tokenizer(parts.part(name), out / name)
        apple = _apple_tokenizer_files(out / name, out, "" if index == 0 else "_2")
        if index and apple and (out / apple["vocab"]).read_bytes() == (out / "vocab.json").read_bytes() \
                and (out / apple["merges"]).read_bytes() == (out / "merges.txt").read_bytes():
            for file in apple.values():  # SDXL's two CLIP tokenizers share one BPE (Apple ships one pair)
                (out / file).unlink()
            apple = {"vocab": "vocab.json", "merges": "merges.txt"}
        entries[name] = {**entry, **({"apple": apple} if apple else {})}
    return entries


def _convert_parts(parts: list[CoreMLPart], traced: dict[str, Any], checks: dict[str, dict[str, Any]], out: Path,
                   options: Any, *, plan: dict | None, unet_source: dict[str, Any],
                   parts_spec: str) -> dict[str, dict[str, Any]]:
    """Convert every traced part into ``out`` (one line per part on stderr); returns the manifest's part entries.
    ``params`` of a chunk is its share of the U-Net (the plan's), not the whole U-Net its wrapper holds."""
    entries: dict[str, dict[str, Any]] = {}
    for part in parts:
        began = time.perf_counter()
        source = unet_source if part.name.startswith("unet") else {"part": part.name, "of": parts_spec}
        info = _convert(part, traced.pop(part.name), out, options, source=source)
        params = (plan["params"][part.name == "unet_chunk2"] if plan and part.name.startswith("unet_chunk")
                  else sum(p.numel() for p in part.wrapper.parameters()))
        entries[part.name] = {"model_file": package_name(part.name), "precision": part.spec.precision,
                              "inputs": part.spec.as_dict()["inputs"], "outputs": part.spec.as_dict()["outputs"],
                              "bytes": sum(f["bytes"] for f in describe_tree(out / package_name(part.name)).values()),
                              "params": params, **info, "traced_parity": checks[part.name], "source": source,
                              **({"note": FP32_PARTS[part.name]} if part.name in FP32_PARTS else {})}
        print(f"  {part.name:<14} {package_name(part.name):<22} traced rel L2 {checks[part.name]['rel_l2']:.2g}, "
              f"converted in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    return entries


def export_coreml_bundle(sources: Any, out: Path, options: Any) -> BundleManifest:
    """Write the Core ML bundle into the (empty, temporary) folder ``out``; returns its manifest."""
    from ..memory import peak_rss_mb
    from ..models.unet_io import downsample_factor
    from .manifest import model_hash, tool_versions

    start = time.perf_counter()
    unet, family = sources.unet.unet, sources.unet.family
    config, sdxl = unet.config, sources.unet.family == "sdxl"
    height, width = options.height or config["sample_size"], options.width or config["sample_size"]
    described = {**sources.unet.describe(), "sha256": model_hash(unet)}
    parts, plan = build_parts(sources, precision=options.precision, height=height, width=width,
                              chunk=options.chunk_unet)
    traced = {p.name: trace(p) for p in parts}
    checks = _check_all(parts, traced, plan)
    entries = _convert_parts(parts, traced, checks, out, options.coreml, plan=plan, unet_source=described,
                             parts_spec=sources.parts.spec)
    tokenizers = _tokenizers(sources.parts, out, sdxl)
    scheduler = sources.parts.part("scheduler")
    scheduler.save_pretrained(out / "scheduler")
    vae_config = dict(sources.parts.part("vae").config)
    factor = vae_scale_factor(sources.parts.part("vae"))
    chunks = None if plan is None else {
        "files": [package_name("unet_chunk1"), package_name("unet_chunk2")], "plan": plan,
        "feeds": {t["name"]: "unet_chunk1" if t["name"] in plan["boundary"] else "input"
                  for t in entries["unet_chunk2"]["inputs"]},
        "rule": "unet_chunk2's inputs = unet_chunk1's outputs merged with the U-Net inputs by name (Unet.swift)"}
    coreml_options = options.coreml
    manifest = BundleManifest(
        target="coreml", family=family, precision=options.precision, parts=entries, tokenizers=tokenizers,
        scheduler=json.loads((out / "scheduler" / "scheduler_config.json").read_text()),
        image={"vae_scale_factor": factor, "latent_channels": config["in_channels"],
               "scaling_factor": vae_config["scaling_factor"], "shift_factor": vae_config.get("shift_factor"),
               "height": height * factor, "width": width * factor, "multiple_of": factor * downsample_factor(config),
               "fixed": True},
        unet={"sdxl": sdxl, "downsample": downsample_factor(config), "force_zeros_for_empty_prompt":
              True if sdxl else None, "batch": 2, "encoder_hidden_states_layout": "[batch, channels, 1, tokens]",
              "chunks": chunks},
        source=described, provenance=sources.provenance, files=describe_tree(out), tools=tool_versions(),
        export={"layout": APPLE_LAYOUT, "compute_units": coreml_options.compute_units,
                "deployment_target": coreml_options.deployment_target, "palettize": coreml_options.palettize,
                "quantize": coreml_options.quantize, "chunk_unet": options.chunk_unet,
                "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                "notes": [f"{name}: {entry['note']}" for name, entry in entries.items() if "note" in entry]
                + ["Core ML prediction needs macOS: the parts were checked as traced PyTorch modules here"]})
    write_bundle_manifest(out, manifest)
    return manifest


def verify_traced(manifest: BundleManifest, sources: Any) -> dict[str, Any]:
    """``verify BUNDLE`` off macOS: with ``sources`` resolved from the recorded source spec (or ``--model``),
    check that the U-Net is the one exported (sha256 of its weights), rebuild, trace and check each part as at
    export. Returns {"parts": {part: metrics}, "source_sha256": ...}; raises :class:`CheckFailed` (exit 1) on a
    mismatch."""
    from .manifest import model_hash

    digest = model_hash(sources.unet.unet)
    if manifest.source.get("sha256") and digest != manifest.source["sha256"]:
        raise CheckFailed(f"the U-Net of '{sources.unet.spec}' (sha256 {digest[:16]}…) is not the one this bundle "
                          f"was exported from ({manifest.source['sha256'][:16]}…)")
    factor = manifest.image["vae_scale_factor"]
    parts, plan = build_parts(sources, precision=manifest.precision, height=manifest.image["height"] // factor,
                              width=manifest.image["width"] // factor,
                              chunk=bool((manifest.unet or {}).get("chunks")))
    missing = sorted(set(manifest.parts) ^ {p.name for p in parts})
    if missing:
        raise CheckFailed(f"the bundle's parts differ from the model's: {', '.join(missing)}")
    for part in parts:
        recorded = [t["name"] for t in manifest.parts[part.name]["inputs"]]
        if recorded != part.spec.input_names:
            raise CheckFailed(f"{part.name}: the bundle's inputs {recorded} are not the model's "
                              f"{part.spec.input_names}")
    traced = {p.name: trace(p) for p in parts}
    return {"parts": _check_all(parts, traced, plan), "source_sha256": digest}
