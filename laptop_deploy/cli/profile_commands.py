"""CLI handler of ``profile`` and the latency options of ``prune`` (``--cost latency``): they translate arguments
into calls of :mod:`laptop_deploy.deploy.profile`, :mod:`~laptop_deploy.deploy.latency_table` and
:mod:`laptop_deploy.prune.latency_cost`, checking cheap things (output folder, table, setting) before any model
loads."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError

PNG_FILE = "latency_shares.png"
MD_FILE = "latency_table.md"
ORT_TARGETS = ("onnx", "ort-mobile")
TRT_COMMAND = ("trtexec --loadEngine={plan} --shapes={shapes} --warmUp=500 --iterations=20 --separateProfileRun "
               "--profilingVerbosity=detailed --dumpProfile --exportProfile={out}/trt_profile.json "
               "--exportLayerInfo={out}/trt_layers.json")


def _say(message: str) -> None:
    print(f"profile: {message}", file=sys.stderr, flush=True)


def _command_line() -> str:
    return "laptop-deploy " + " ".join(sys.argv[1:])


def profile(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..deploy.latency_table import TABLE_FILE, plot_shares, save_table, table_markdown
    from ..deploy.profile import ProfileOptions, profile_unet
    from ..models.sources import resolve_model
    from ..outputs import prepare_output, write_atomically

    if args.artifact is None and args.model is None:
        raise LaptopDeployError("give an ARTIFACT folder or --model M to profile")
    options = ProfileOptions(runtime=args.runtime, precision=args.precision, batch=args.batch,
                             latent_size=tuple(args.latent_size) if args.latent_size else None,
                             repeats=args.repeats, warmup=args.warmup, threads=args.threads, providers=args.provider)
    if args.artifact is None:
        options.validate()
        from ..runtimes import runner_class

        runner_class(options.runtime)  # onnxruntime not installed: exit 2 naming the extra, before any work
    prepare_output(args.out, force=args.force)  # exit 2 before any model loads
    if args.artifact is not None:
        dry = _artifact_dry_run(args)
        if dry is not None:
            return dry
        table = _profile_artifact(args, options)
    else:
        source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
        table = profile_unet(source.unet, model=source.describe(), options=options, progress=_say)
    command = _command_line()
    table.extra["command"] = command

    def write(tmp: Path) -> None:
        save_table(table, tmp / TABLE_FILE)
        (tmp / MD_FILE).write_text(table_markdown(table, command=command))
        plot_shares(table, tmp / PNG_FILE)

    write_atomically(args.out, write, force=args.force, kind="profile")
    data = {"out": str(args.out), **table.as_dict()}
    text = table_markdown(table) + f"\n{TABLE_FILE}, {MD_FILE} and {PNG_FILE} written to {args.out}"
    return data, text


def _artifact_dry_run(args: argparse.Namespace) -> tuple[dict[str, Any], str] | None:
    """TensorRT / Core ML artifacts are profiled on the machine that runs them: ``--dry-run`` prints how."""
    from ..deploy.manifest import read_manifest

    manifest = read_manifest(args.artifact, check_files=False)
    if manifest.target in ORT_TARGETS:
        if args.dry_run:
            raise LaptopDeployError("--dry-run is for TensorRT and Core ML artifacts; an ONNX artifact profiles "
                                    "here")
        return None
    if manifest.target == "trt" and args.dry_run:
        spec = manifest.spec
        shapes = ",".join(f"{t.name}:" + "x".join(str(d if isinstance(d, int) else getattr(spec, d, 1))
                                                  for d in t.shape) for t in spec.inputs)
        command = TRT_COMMAND.format(plan=Path(args.artifact) / "model.plan", shapes=shapes, out=args.out)
        return {"target": "trt", "dry_run": True, "command": command}, command
    raise LaptopDeployError(f"{args.artifact}: a '{manifest.target}' artifact is profiled where its runtime runs; "
                            f"pass --dry-run for the command (per-unit mapping of its profile is not built yet)"
                            if manifest.target == "trt" else
                            f"{args.artifact}: per-unit profiling of '{manifest.target}' artifacts is not "
                            f"supported; profile the ONNX export of the same model")


def _profile_artifact(args: argparse.Namespace, options: Any) -> Any:
    """ORT profile of an exported ONNX artifact (integrity-checked first), units named by its source model."""
    import os

    from ..deploy.manifest import check_integrity
    from ..deploy.profile import profile_artifact_file
    from ..models.sources import resolve_model
    from ..runtimes import runner_class

    manifest = check_integrity(args.artifact, skip_digest=args.skip_digest)  # modified files: exit 2
    runner_class("ort")  # onnxruntime missing: exit 2 with the extra to install
    spec = manifest.spec
    h, w = options.latent_size or (spec.height, spec.width)
    if spec.dynamic:
        spec = replace(spec, batch=options.batch, height=h, width=w)
    elif (options.batch, h, w) != (spec.batch, spec.height, spec.width):
        raise LaptopDeployError(f"{args.artifact} is static: batch {spec.batch}, latent {spec.height}x{spec.width}; "
                                f"asked batch {options.batch}, {h}x{w} (export with --dynamic or those sizes)")
    if args.runtime != "ort":
        raise LaptopDeployError(f"--runtime {args.runtime}: an '{manifest.target}' artifact profiles with ort")
    model = args.model or manifest.source.get("spec")
    if not model:
        raise LaptopDeployError(f"{args.artifact}: its manifest names no source model; pass --model M")
    seed = manifest.source.get("seed", args.seed) if args.model is None else args.seed
    source = resolve_model(model, materialize=False, seed=seed, allow_pickle=args.allow_pickle)
    setting = {"runtime": "ort", "precision": manifest.precision, "latent_size": [h, w], "batch": spec.batch,
               "artifact": str(args.artifact), "repeats": options.repeats, "warmup": options.warmup}
    _say(f"profiling {options.repeats} calls of {args.artifact} in onnxruntime")
    return profile_artifact_file(Path(args.artifact) / manifest.model_file, spec, unet=source.unet,
                                 model={**source.describe(), "artifact_source": manifest.source},
                                 options=replace(options, precision=manifest.precision), setting=setting,
                                 load_before=os.getloadavg())


def latency_options(args: argparse.Namespace) -> dict[str, Any]:
    """PruneOptions fields for ``--cost latency``: the table (read and checked against the asked setting here,
    before the model loads; its units are checked against the model later), runtime, batch, precision."""
    from ..deploy.latency_table import check_table, load_table
    from ..models.sources import resolve_model

    table = None
    if args.batch < 1:
        raise LaptopDeployError(f"--batch must be ≥ 1, got {args.batch}")
    if args.latency_table is not None:
        table = load_table(args.latency_table)
        meta = resolve_model(args.model, materialize=False, seed=args.seed, allow_pickle=args.allow_pickle)
        size = tuple(args.latent_size) if args.latent_size else (meta.unet.config.sample_size,) * 2
        check_table(table, latent_size=size, batch=args.batch, precision=args.precision, runtime=args.runtime,
                    where=f"--latency-table {args.latency_table}")
    elif args.runtime is None and args.cost == "latency":
        raise LaptopDeployError("--cost latency needs --latency-table T.json or --runtime R (profile now)")
    if args.runtime is not None:
        from ..runtimes import runner_class

        runner_class(args.runtime)  # not installed: exit 2 now
    return {"latency_table": table, "runtime": args.runtime if table is None else None, "batch": args.batch,
            "precision": args.precision}


def measure_after_pruning(plan: Any, unet: Any, *, skip: bool) -> None:
    """Time the chosen student against the teacher in the table's setting and add it to ``plan.latency``."""
    from ..prune.latency_cost import measure_student

    if plan.latency is None or skip:
        return
    _say("timing the student against the teacher (interleaved, 3 rounds; --no-measure skips)")
    plan.latency["measured"] = measure_student(unet, plan.removed, plan.latency, progress=None)
