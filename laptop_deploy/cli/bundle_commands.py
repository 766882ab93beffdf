"""CLI handlers of app bundles: ``export --pipeline``, ``generate`` and ``verify BUNDLE`` (each ``verb(args) ->
(json_result, text)``).

``generate`` is the torch-free path: this module imports nothing at module level but the standard library and
``errors``, and ``generate`` imports only :mod:`laptop_deploy.deploy.generate` (onnxruntime, numpy, tokenizers,
Pillow). The other two import torch when they run.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import LaptopDeployError

PRECISIONS = ("fp32", "fp16")


def export_pipeline(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``export --pipeline``: checks, then the bundle written atomically into ``--out``."""
    from ..outputs import prepare_output, write_atomically

    prepare_output(args.out, force=args.force)
    from ..deploy.attention_slice import AttentionSlice
    from ..deploy.bundle import BundleOptions, export_bundle, resolve_sources

    attention_slice = AttentionSlice.parse(getattr(args, "attention_slice", None))  # a bad value: exit 2 now

    # Core ML bundles default to fp16, as the single-artifact Core ML export and Apple's published models do
    precision = args.precision or ("fp16" if args.target == "coreml" else "fp32")
    if precision not in PRECISIONS:
        raise LaptopDeployError(f"--pipeline --precision {precision}: bundles are fp32 or fp16")
    coreml = None
    if args.target == "coreml":
        from ..exporters import get_exporter  # a missing coremltools: one line naming the [coreml] extra

        coreml = get_exporter("coreml").Options.from_args(args)
    options = BundleOptions(target=args.target, precision=precision, height=args.height, width=args.width,
                            exporter=args.exporter, opset=args.opset, slim=args.slim, seed=args.seed,
                            chunk_unet=getattr(args, "chunk_unet", False), coreml=coreml,
                            attention_slice=attention_slice)
    options.check()
    if args.target == "executorch":
        from ..exporters import get_exporter

        get_exporter("executorch")  # a missing executorch: one line naming the [executorch] extra (exit 2)
    sources = resolve_sources(args.model, seed=args.seed)
    from ..deploy.spec import build_spec

    build_spec(sources.unet.unet.config, height=args.height, width=args.width)  # latent size: exit 2 before work
    written: dict[str, Any] = {}
    write_atomically(args.out, lambda tmp: written.update(manifest=export_bundle(sources, tmp, options)),
                     force=args.force, kind="bundle")
    manifest = written["manifest"]
    size = sum(f["bytes"] for f in manifest.files.values())
    result = {"out": str(args.out), "target": manifest.target, "precision": manifest.precision,
              "family": manifest.family, "parts": manifest.parts, "tokenizers": manifest.tokenizers,
              "image": manifest.image, "bytes": size, "provenance": manifest.provenance, "export": manifest.export}
    lines = [f"bundled {args.model} into {args.out} ({manifest.target}, {manifest.family}, {manifest.precision}): "
             f"{size / 1e6:,.1f} MB, {manifest.export['seconds']:.1f} s, peak RSS "
             f"{manifest.export['peak_rss_mb']:,.0f} MiB"]
    lines += [f"  {name:<15} {part['precision']:<5} {part['bytes'] / 1e6:>9,.1f} MB  {part['model_file']}"
              for name, part in manifest.parts.items()]
    lines += [f"  {note}" for note in manifest.export["notes"]]
    return result, "\n".join(lines)


def generate(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``generate BUNDLE``: torch-free; bad bundle / size / scheduler → exit 2 before any part loads."""
    from ..deploy.bundle_format import check_bundle
    from ..deploy.generate import GenerateOptions, generate as run, save_png
    from ..deploy.schedulers import make_scheduler
    from ..outputs import prepare_output_file, replace_file

    prepare_output_file(args.out, force=args.force, suffix=".png")
    manifest = check_bundle(args.bundle, skip_digest=args.skip_digest)
    if manifest.target == "coreml":
        raise LaptopDeployError(coreml_refusal("generate"))
    make_scheduler(args.scheduler, manifest.scheduler)  # unknown name or config: exit 2 now
    options = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance=args.guidance, seed=args.seed, scheduler=args.scheduler, height=args.height,
                              width=args.width, sequential=args.sequential, threads=args.threads,
                              phase_peaks=True)  # the verb's process: its VmHWM is ours to reset
    result = run(args.bundle, options, manifest=manifest)
    replace_file(args.out, lambda tmp: save_png(result, tmp))  # a failure leaves no half-written image
    data = {"out": str(args.out), **result.as_dict()}
    lat = result.latency_ms
    text = (f"wrote {args.out} ({data['width']}x{data['height']}, {args.steps} steps, seed {args.seed}); "
            f"U-Net {lat.get('unet', 0):,.0f} ms over {result.calls.get('unet', 0)} calls, text encoder "
            f"{lat.get('text_encoder', 0):,.0f} ms, VAE decoder {lat.get('vae_decoder', 0):,.0f} ms; "
            f"peak RSS {result.peak_rss_mb:,.0f} MiB{' (sequential)' if args.sequential else ''}")
    return data, text


def verify_bundle(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``verify BUNDLE``: parts against PyTorch (calibrated gate, or ``--max-rel-l2/--atol/--rtol``;
    ``--factor``), then the image against the diffusers pipeline (``--min-psnr``); exit 1 when either fails."""
    from ..deploy.bundle_format import check_bundle, record_bundle_result
    from ..deploy.bundle_verify import DEFAULT_PROMPTS, PartOverrides, verify_bundle as run
    from ..deploy.verify import parity_rules

    if check_bundle(args.dir, skip_digest=args.skip_digest).target == "coreml":
        return _verify_coreml(args)
    if args.steps < 1:
        raise LaptopDeployError(f"--steps {args.steps}: need at least 1")
    overrides = PartOverrides(max_rel_l2=getattr(args, "max_rel_l2", None), atol=getattr(args, "atol", None),
                              rtol=getattr(args, "rtol", None), factor=getattr(args, "factor", None))
    parity_rules("fp32", factor=overrides.factor)  # a bad --factor is exit 2 before any model loads
    result = run(args.dir, model=args.model, prompts=tuple(args.prompt or DEFAULT_PROMPTS), steps=args.steps,
                 guidance=args.guidance, scheduler=args.scheduler, min_psnr_db=args.min_psnr, skip_digest=True,
                 overrides=overrides)
    data = result.as_dict()
    record_bundle_result(args.dir, "verify", data)
    if not result.passed:
        data["exit_code"] = 1
    lines = [f"{'part':<16} {'rel L2':>10} {'PSNR dB':>8} {'floor':>10} {'vs f64':>10} {'factor':>8}  judged by"]
    lines += [_part_line(name, s) for name, s in data["parts"].items()]
    lines += [f"end to end '{c['prompt']}' seed {c['seed']}: image PSNR {c['psnr_db']:.1f} dB" for c in data["cases"]]
    verdict = "PASSED" if result.passed else "FAILED"
    lines.append(f"{verdict}: {args.dir} vs the diffusers PyTorch pipeline (min image PSNR {result.min_psnr_db:g} dB)")
    lines += [f"  {failure}" for failure in result.failures]
    return data, "\n".join(lines)


def _part_line(name: str, part: dict[str, Any]) -> str:
    """One row of ``verify BUNDLE``'s parts table: errors vs PyTorch fp32, the gate's worst output (floor and
    artifact relative L2 against float64, their ratio and the allowed one) and what judged the part."""
    gate = part.get("gate") or {}

    def num(key: str) -> str:
        value = gate.get(key)
        return "-" if value is None else f"{value:.3g}"

    judged = part["judged_by"] + (f" (max {gate['rel_l2_factor']:g}x {gate['reference']})"
                                  if part["judged_by"] == "calibrated gate" else "")
    psnr = "-" if part["psnr_db"] is None else f"{part['psnr_db']:.1f}"
    rel = "-" if part["rel_l2"] is None else f"{part['rel_l2']:.3g}"
    return (f"{name:<16} {rel:>10} {psnr:>8} {num('floor_rel_l2'):>10} {num('artifact_rel_l2'):>10} "
            f"{num('factor_rel_l2'):>8}  {judged}{'; ' + part['note'] if part.get('note') else ''}")


def coreml_refusal(verb: str) -> str:
    """Why ``verb`` cannot run a Core ML bundle here (one line). Standard library only: ``generate`` stays
    torch-free, so this does not go through ``runtimes.coreml`` (whose check says the same for artifacts)."""
    import platform
    import sys

    if sys.platform != "darwin":
        return (f"{verb}: Core ML prediction requires macOS (this is {platform.system()}); this Core ML bundle "
                f"converts and inspects here, run it on a Mac (Apple's Swift StableDiffusionPipeline loads its "
                f"Resources once compiled with xcrun coremlcompiler)")
    return (f"{verb}: running a Core ML bundle is not implemented in laptop-deploy yet; load its Resources in "
            f"Apple's Swift StableDiffusionPipeline (compile each .mlpackage with xcrun coremlcompiler)")


def _verify_coreml(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``verify BUNDLE`` of a Core ML bundle: the per-part traced checks run (and are recorded in the manifest);
    prediction cannot, so the verb then exits 2 with the reason — a check that did not run never passes."""
    from ..deploy.bundle import resolve_sources
    from ..deploy.bundle_coreml import verify_traced
    from ..deploy.bundle_format import read_bundle_manifest, record_bundle_result

    manifest = read_bundle_manifest(args.dir)
    sources = resolve_sources(args.model or manifest.source["spec"], seed=int(manifest.source.get("seed", 0)))
    result = verify_traced(manifest, sources)  # CheckFailed: exit 1
    record_bundle_result(args.dir, "verify_traced", result)
    worst = max(s["factor_rel_l2"] for s in result["parts"].values())
    raise LaptopDeployError(f"per-part traced checks passed ({len(result['parts'])} parts, worst {worst:.2g}x the "
                            f"fp32 floor); end to end not run — {coreml_refusal('verify')}")
