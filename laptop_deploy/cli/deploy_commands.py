"""CLI handlers of the deployment verbs — ``export``, ``verify``, ``bench`` — each ``verb(args) -> (json_result,
text)``. They translate arguments into library calls and check cheap things (output folder, target, manifest,
latent size) before anything expensive runs; ``result["exit_code"] = 1`` marks a check that ran and failed."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError


def export(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if getattr(args, "pipeline", False):  # the whole pipeline as an app bundle (deploy.bundle)
        from .bundle_commands import export_pipeline

        return export_pipeline(args)
    if getattr(args, "chunk_unet", False):
        raise LaptopDeployError("--chunk-unet splits the U-Net of an app bundle: use it with --pipeline "
                                "--target coreml")
    if getattr(args, "attention_slice", None) is not None:
        raise LaptopDeployError("--attention-slice slices the attention of an app bundle's parts: use it with "
                                "--pipeline")
    if getattr(args, "int8_float_outputs", None) is not None and args.target not in ("onnx", "ort-mobile"):
        raise LaptopDeployError(f"--int8-float-outputs chooses ONNX Runtime's int8 kernels: use it with --target "
                                f"onnx or ort-mobile, not '{args.target}'")
    from ..exporters import get_exporter
    from ..deploy.manifest import model_hash
    from ..models.sources import resolve_model
    from ..deploy.spec import build_spec
    from ..outputs import prepare_output, write_atomically

    prepare_output(args.out, force=args.force)
    exporter = get_exporter(args.target)
    supported = getattr(exporter, "PRECISIONS", ("fp32", "fp16"))  # int8 only where the exporter declares it
    if args.precision and args.precision not in supported:
        raise LaptopDeployError(f"--precision {args.precision} is not supported by --target {args.target}; "
                                f"valid: {', '.join(supported)}")
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
            f"peak RSS {manifest.export['peak_rss_mb']:,.0f} MiB")
    text += "".join(f"\n{line}" for line in manifest.export.get("notes", []))  # e.g. trt --dry-run's commands
    return result, text


def _stage_printer(verb: str, *, quiet_s: float = 60.0) -> Callable[[str], None]:
    """One stderr line per stage with the seconds since the first — on a terminal, or once the verb has run
    ``quiet_s`` (a full-size verify takes many minutes; a tiny one's log stays clean)."""
    start = time.perf_counter()

    def stage(text: str) -> None:
        elapsed = time.perf_counter() - start
        if elapsed >= quiet_s or sys.stderr.isatty():
            print(f"{verb}: {text} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    return stage


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(args, "provider", None):
        options["providers"] = args.provider
    if getattr(args, "threads", None):
        options["intra_op_threads"] = args.threads
    if getattr(args, "allow_fallback", False):  # an OrtRunner option; other runtimes refuse it (exit 2)
        if getattr(args, "runtime", None) not in (None, "ort"):
            raise LaptopDeployError(f"--allow-fallback applies to --runtime ort, not '{args.runtime}'")
        options["allow_fallback"] = True
    return options


def verify(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..deploy.bundle_format import is_bundle

    if is_bundle(args.dir):  # an app bundle (export --pipeline): every part, then end to end
        from .bundle_commands import verify_bundle

        return verify_bundle(args)
    if args.model is None:
        raise LaptopDeployError("verify: --model is required for a single artifact (the PyTorch model to compare)")
    from ..deploy.manifest import check_integrity
    from ..runtimes import DEFAULT_RUNTIME, runner_class
    from ..models.sources import resolve_model
    from ..deploy.verify import parity_rules, verify_artifact

    # no manifest, truncated or modified files: exit 2 before the model loads
    manifest = check_integrity(args.dir, skip_digest=args.skip_digest)
    runner_class(args.runtime or DEFAULT_RUNTIME.get(manifest.target, "ort"))  # missing runtime: exit 2 now
    if args.steps < 2:
        raise LaptopDeployError(f"--steps {args.steps}: need at least 2 denoising steps")
    rules = functools.partial(parity_rules, manifest.precision, max_rel_l2=args.max_rel_l2, min_psnr_db=args.min_psnr,
                              atol=getattr(args, "atol", None), rtol=getattr(args, "rtol", None),
                              factor=getattr(args, "factor", None))
    rules()  # a bad --factor: exit 2 before the model loads
    source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
    tolerances, gate = rules(target=manifest.target, unet=source.unet)  # .pte: the factor depends on the U-Net
    result = verify_artifact(args.dir, source, runtime=args.runtime, steps=args.steps, seed=args.seed,
                             tolerances=tolerances, gate=gate, manifest=manifest, stage=_stage_printer("verify"),
                             **_runner_options(args))
    data = result.as_dict()
    data["providers"] = data["runner"].get("providers")  # what ran, not what was asked for (None: not ORT)
    if not result.passed:
        data["exit_code"] = 1
    return data, _verify_text(data, folder=args.dir, precision=manifest.precision)


def _verify_text(data: dict[str, Any], *, folder: Path, precision: str) -> str:
    """The per-case table (error vs PyTorch fp32; the gate's floor, the artifact's error vs float64 and their
    ratio) and the verdict, naming the rule that decided it."""
    def g(value: float | None, fmt: str = ".3g") -> str:
        return "n/a" if value is None else format(value, fmt)

    gate = data.get("gate") or {}
    rows = {(r["case"], r["output"]): r for r in gate.get("rows", [])}
    lines = [f"{'case':<22} {'max abs':>9} {'rel L2':>9} {'PSNR dB':>8} {'NaN/Inf':>7} │ {'floor':>9} "
             f"{'vs f64':>9} {'factor':>7} {'max-abs x':>9}"]
    e2e = {**data["end_to_end"], "case": f"end-to-end ({data['steps']} steps)"}
    for c, key in [*((c, (c["case"], c["output"])) for c in data["cases"]), (e2e, ("end-to-end", "latents"))]:
        r = rows.get(key, {})
        lines.append(f"{c['case']:<22} {g(c['max_abs']):>9} {g(c['rel_l2']):>9} {g(c['psnr_db'], '.1f'):>8} "
                     f"{c['nan_count'] + c['inf_count']:>7} │ {g(r.get('floor_rel_l2')):>9} "
                     f"{g(r.get('artifact_rel_l2')):>9} {g(r.get('factor_rel_l2'), '.2f'):>7} "
                     f"{g(r.get('factor_max_abs'), '.2f'):>9}")
    verdict = "PASSED" if data["passed"] else "FAILED"
    tol = data["tolerances"]
    fixed = ", ".join(f"{k} {v:g}" for k, v in tol.items() if v is not None) or "none (non-finite values only)"
    worst = f"worst factor {g(gate.get('factor_rel_l2'), '.2f')} at {gate.get('worst_case')}" if rows else ""
    if gate and gate.get("enforced"):
        lines.append(f"{verdict}: {folder} ({precision}) — calibrated gate: error vs float64 ≤ "
                     f"{gate['rel_l2_factor']:g}× the {next(iter(rows.values()))['reference']} noise floor "
                     f"(relative L2) and ≤ {gate['max_abs_factor']:g}× (max abs); {worst}")
    else:
        lines.append(f"{verdict}: {folder} ({precision}) — fixed thresholds vs PyTorch fp32: {fixed}"
                     + (f"; calibrated gate (reported, not applied): {worst}" if rows else ""))
    lines.append(f"  vs PyTorch fp32: worst rel L2 {g(data['rel_l2'])}, worst PSNR {g(data['psnr_db'], '.1f')} dB")
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
    feeds = spec.example_feeds(seed=0, batch=args.batch)  # another batch needs a dynamic artifact (exit 2)
    results = bench_many(runners, feeds, warmup=args.warmup, iterations=args.iterations)
    main = results[-1]
    data = {**{k: v for k, v in main.as_dict().items() if k != "times_ms"},
            "runners": [r.as_dict() for r in results], "ratios": ratios(results), "environment": environment(),
            "batch": args.batch or spec.batch, "height": spec.height, "width": spec.width,
            "providers": main.runner.get("providers")}  # what ran, not what was asked for (None: not ORT)
    record_result(args.dir, "latency", {k: v for k, v in data.items() if k != "runners"})
    env = data["environment"]
    text = (f"{format_table(results)}\n{data['batch']}x{spec.height}x{spec.width} latent, {args.iterations} "
            f"iterations after {args.warmup} warm-up; {env['cpu']}, {env['logical_cores']} logical cores")
    data["precision"] = manifest.precision
    if "int8_psnr_db" in manifest.export:  # issue 17: what the int8 speed was bought with
        data["int8"] = {k: manifest.export.get(f"int8_{k}") for k in ("psnr_db", "float_mac_share", "kernels")}
        text += (f"\nint8: held-out PSNR {data['int8']['psnr_db']} dB vs fp32 at export, "
                 f"{100 * (data['int8']['float_mac_share'] or 0):.1f}% of MACs kept float")
    return data, text
