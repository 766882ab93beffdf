"""CLI handlers of the deployment verbs — ``export``, ``verify``, ``bench`` — each ``verb(args) -> (json_result,
text)``. They translate arguments into library calls and check cheap things (output folder, target, manifest,
latent size) before anything expensive runs; ``result["exit_code"] = 1`` marks a check that ran and failed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError


def export(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..exporters import get_exporter
    from ..deploy.manifest import model_hash
    from ..models.sources import resolve_model
    from ..deploy.spec import build_spec
    from ..outputs import prepare_output, write_atomically

    prepare_output(args.out, force=args.force)
    exporter = get_exporter(args.target)
    options = exporter.Options.from_args(args)
    if getattr(args, "dry_run", False) and not getattr(options, "dry_run", False):
        raise LaptopDeployError(f"--dry-run is supported by --target trt only, not '{args.target}'")
    options.check()
    # The spec (and the latent-size check) needs only the config: resolve on the meta device first.
    source = resolve_model(args.model, materialize=False, seed=args.seed, allow_pickle=args.allow_pickle)
    spec = build_spec(source.unet.config, batch=args.batch, height=args.height, width=args.width,
                      dynamic=args.dynamic,
                      precision=args.precision or getattr(exporter, "DEFAULT_PRECISION", "fp32"))
    if any(p.is_meta for p in source.unet.parameters()):
        source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
    described = {**source.describe(), "sha256": model_hash(source.unet)}
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["manifest"] = exporter.export(source.unet, spec, tmp, source=described, options=options)

    write_atomically(args.out, write, force=args.force, kind="artifact")
    manifest = written["manifest"]
    size = sum(f["bytes"] for f in manifest.files.values())
    result = {"out": str(args.out), "target": manifest.target, "precision": manifest.precision,
              "model_file": manifest.model_file, "files": {n: f["bytes"] for n, f in manifest.files.items()},
              "bytes": size, "spec": spec.as_dict(), "source": described, "export": manifest.export}
    shape = "dynamic batch/height/width" if spec.dynamic else f"batch {spec.batch}, latent {spec.height}x{spec.width}"
    text = (f"exported {args.model} to {args.out / manifest.model_file} ({manifest.target}, {manifest.precision}, "
            f"{shape}): {len(manifest.files)} files, {size / 1e6:,.1f} MB, {manifest.export['seconds']:.1f} s, "
            f"peak RSS {manifest.export['peak_rss_mb']:,.0f} MB")
    text += "".join(f"\n{line}" for line in manifest.export.get("notes", []))  # e.g. trt --dry-run's commands
    return result, text


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(args, "provider", None):
        options["providers"] = args.provider
    if getattr(args, "threads", None):
        options["intra_op_threads"] = args.threads
    return options


def verify(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..deploy.manifest import check_integrity
    from ..runtimes import DEFAULT_RUNTIME, runner_class
    from ..models.sources import resolve_model
    from ..deploy.verify import Tolerances, verify_artifact

    # no manifest, truncated or modified files: exit 2 before the model loads
    manifest = check_integrity(args.dir, skip_digest=args.skip_digest)
    runner_class(args.runtime or DEFAULT_RUNTIME.get(manifest.target, "ort"))  # missing runtime: exit 2 now
    if args.steps < 2:
        raise LaptopDeployError(f"--steps {args.steps}: need at least 2 denoising steps")
    base = Tolerances.for_precision(manifest.precision)
    tolerances = Tolerances(max_rel_l2=base.max_rel_l2 if args.max_rel_l2 is None else args.max_rel_l2,
                            min_psnr_db=base.min_psnr_db if args.min_psnr is None else args.min_psnr)
    source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
    result = verify_artifact(args.dir, source, runtime=args.runtime, steps=args.steps, seed=args.seed,
                             tolerances=tolerances, manifest=manifest, **_runner_options(args))
    data = result.as_dict()
    if not result.passed:
        data["exit_code"] = 1
    return data, _verify_text(data, folder=args.dir, precision=manifest.precision)


def _verify_text(data: dict[str, Any], *, folder: Path, precision: str) -> str:
    def psnr(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [f"{'case':<22} {'max abs':>10} {'mean abs':>10} {'rel L2':>10} {'cosine':>10} {'PSNR dB':>8} "
             f"{'NaN/Inf':>8}"]
    for c in data["cases"]:
        lines.append(f"{c['case']:<22} {c['max_abs']:>10.3g} {c['mean_abs']:>10.3g} {c['rel_l2']:>10.3g} "
                     f"{c['cosine']:>10.6f} {psnr(c['psnr_db']):>8} {c['nan_count'] + c['inf_count']:>8}")
    e2e = data["end_to_end"]
    lines.append(f"{'end-to-end (' + str(data['steps']) + ' steps)':<22} {e2e['max_abs']:>10.3g} "
                 f"{e2e['mean_abs']:>10.3g} {e2e['rel_l2']:>10.3g} {e2e['cosine']:>10.6f} "
                 f"{psnr(e2e['psnr_db']):>8} {e2e['nan_count'] + e2e['inf_count']:>8}")
    tol = data["tolerances"]
    verdict = "PASSED" if data["passed"] else "FAILED"
    lines.append(f"{verdict}: {folder} ({precision}) vs PyTorch fp32 — worst rel L2 {data['rel_l2']:.3g} "
                 f"(max {tol['max_rel_l2']}), worst PSNR {psnr(data['psnr_db'])} dB (min {tol['min_psnr_db']})")
    lines += [f"  {failure}" for failure in data["failures"]]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..deploy.bench import bench_many, environment, format_table, ratios
    from ..deploy.manifest import check_integrity, record_result
    from ..runtimes import open_artifact
    from ..runtimes.pytorch import TorchRunner

    manifest = check_integrity(args.dir, skip_digest=args.skip_digest)
    spec = manifest.spec
    artifact = open_artifact(args.dir, manifest=manifest, runtime=args.runtime, **_runner_options(args))
    label = f"{artifact.name} {manifest.target} {manifest.precision}"
    runners: dict[str, Any] = {}
    if args.vs_torch:  # first, so ratios read "artifact vs eager PyTorch"
        model = args.model or manifest.source.get("spec")
        seed = args.seed if args.seed is not None else manifest.source.get("seed", 0)
        runners["torch eager fp32"] = TorchRunner(model, spec=spec.with_precision("fp32"), seed=seed,
                                                  allow_pickle=args.allow_pickle)
    runners[label] = artifact
    results = bench_many(runners, spec.example_feeds(seed=0), warmup=args.warmup, iterations=args.iterations)
    main = results[-1]
    data = {**{k: v for k, v in main.as_dict().items() if k != "times_ms"},
            "runners": [r.as_dict() for r in results], "ratios": ratios(results), "environment": environment(),
            "batch": spec.batch, "height": spec.height, "width": spec.width}
    record_result(args.dir, "latency", {k: v for k, v in data.items() if k != "runners"})
    env = data["environment"]
    text = (f"{format_table(results)}\n{spec.batch}x{spec.height}x{spec.width} latent, {args.iterations} "
            f"iterations after {args.warmup} warm-up; {env['cpu']}, {env['logical_cores']} logical cores")
    return data, text
