"""CLI handlers of app bundles: ``export --pipeline``, ``generate`` and ``verify BUNDLE`` (each ``verb(args) ->
(json_result, text)``).

``generate`` is the torch-free path: this module imports nothing at module level but the standard library and
``errors``, and ``generate`` imports only :mod:`laptop_deploy.deploy.generate` (onnxruntime, numpy, tokenizers,
Pillow). The other two import torch when they run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError, OutputError

PRECISIONS = ("fp32", "fp16")


def export_pipeline(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``export --pipeline``: checks, then the bundle written atomically into ``--out``."""
    from ..outputs import prepare_output, write_atomically

    prepare_output(args.out, force=args.force)
    from ..deploy.bundle import BundleOptions, export_bundle, resolve_sources

    precision = args.precision or "fp32"
    if precision not in PRECISIONS:
        raise LaptopDeployError(f"--pipeline --precision {precision}: bundles are fp32 or fp16")
    options = BundleOptions(target=args.target, precision=precision, height=args.height, width=args.width,
                            exporter=args.exporter, opset=args.opset, slim=args.slim, seed=args.seed)
    options.check()
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
             f"{manifest.export['peak_rss_mb']:,.0f} MB"]
    lines += [f"  {name:<15} {part['precision']:<5} {part['bytes'] / 1e6:>9,.1f} MB  {part['model_file']}"
              for name, part in manifest.parts.items()]
    lines += [f"  {note}" for note in manifest.export["notes"]]
    return result, "\n".join(lines)


def _check_image_out(out: Path, *, force: bool) -> None:
    if out.suffix.lower() != ".png":
        raise OutputError(f"--out {out}: write a .png file")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a .png file path")
    if out.exists() and not force:
        raise OutputError(f"--out {out} exists; pass --force to replace it")


def generate(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``generate BUNDLE``: torch-free; bad bundle / size / scheduler → exit 2 before any part loads."""
    from ..deploy.bundle_format import check_bundle
    from ..deploy.generate import GenerateOptions, generate as run, save_png
    from ..deploy.schedulers import make_scheduler

    _check_image_out(args.out, force=args.force)
    manifest = check_bundle(args.bundle, skip_digest=args.skip_digest)
    make_scheduler(args.scheduler, manifest.scheduler)  # unknown name or config: exit 2 now
    options = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance=args.guidance, seed=args.seed, scheduler=args.scheduler, height=args.height,
                              width=args.width, sequential=args.sequential, threads=args.threads)
    result = run(args.bundle, options, manifest=manifest)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", suffix=".png", dir=args.out.parent or Path("."))
    os.close(fd)
    try:  # atomically: a failure leaves no half-written image
        save_png(result, Path(tmp))
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    data = {"out": str(args.out), **result.as_dict()}
    lat = result.latency_ms
    text = (f"wrote {args.out} ({data['width']}x{data['height']}, {args.steps} steps, seed {args.seed}); "
            f"U-Net {lat.get('unet', 0):,.0f} ms over {result.calls.get('unet', 0)} calls, text encoder "
            f"{lat.get('text_encoder', 0):,.0f} ms, VAE decoder {lat.get('vae_decoder', 0):,.0f} ms; "
            f"peak RSS {result.peak_rss_mb:,.0f} MB{' (sequential)' if args.sequential else ''}")
    return data, text


def verify_bundle(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``verify BUNDLE``: parts against PyTorch, then the image against the diffusers pipeline; exit 1 below the
    PSNR floor."""
    from ..deploy.bundle_format import check_bundle, record_bundle_result
    from ..deploy.bundle_verify import DEFAULT_PROMPTS, verify_bundle as run

    check_bundle(args.dir, skip_digest=args.skip_digest)
    if args.steps < 1:
        raise LaptopDeployError(f"--steps {args.steps}: need at least 1")
    result = run(args.dir, model=args.model, prompts=tuple(args.prompt or DEFAULT_PROMPTS), steps=args.steps,
                 guidance=args.guidance, scheduler=args.scheduler, min_psnr_db=args.min_psnr, skip_digest=True)
    data = result.as_dict()
    record_bundle_result(args.dir, "verify", data)
    if not result.passed:
        data["exit_code"] = 1
    lines = [f"{'part':<16} {'rel L2':>10} {'PSNR dB':>8}"]
    lines += [f"{name:<16} {s['rel_l2']:>10.3g} {s['psnr_db']:>8.1f}" for name, s in data["parts"].items()]
    lines += [f"end to end '{c['prompt']}' seed {c['seed']}: image PSNR {c['psnr_db']:.1f} dB" for c in data["cases"]]
    verdict = "PASSED" if result.passed else "FAILED"
    lines.append(f"{verdict}: {args.dir} vs the diffusers PyTorch pipeline (min image PSNR {result.min_psnr_db:g} dB)")
    lines += [f"  {failure}" for failure in result.failures]
    return data, "\n".join(lines)
