"""The stages of a compress run, each a thin call of the library function its own verb uses (no second
implementation): prune → :func:`~laptop_deploy.prune.plan.plan_pruning` + ``save_student``; distill →
``prepare_run`` + ``distill`` (resuming from its own checkpoint); export → the target's exporter; verify →
``verify_artifact``; bench → ``bench_runner``, teacher and student interleaved; report → :mod:`.report`.

:func:`plan_stages` lists them with the settings that fingerprint each one (see :mod:`.stages`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError
from .recipe import Checked, Recipe, distill_options
from .stages import Stage, StageContext, maybe_kill

Bar = Callable[[str, int], Callable[[int], None] | None]  # (description, total) -> update(n) or None


@dataclass
class Hooks:
    """Progress of long stages: ``bar(description, total)`` and ``steps`` (distill's per-step callback)."""

    bar: Bar | None = None
    steps: Callable[[int, int, dict[str, Any]], None] | None = None


def _latent(r: Recipe, config: Any) -> tuple[int, int]:
    return tuple(r.latent_size) if r.latent_size else (config.sample_size, config.sample_size)


def _teacher(r: Recipe) -> Any:
    from ..models.sources import resolve_model

    return resolve_model(r.model, seed=r.seed)


# ------------------------------------------------------------------------------------------------ stages


def run_profile(ctx: StageContext, r: Recipe, checked: Checked) -> dict[str, Any]:
    """The teacher's latency table on the run's runtime, precision and latent size (what ``profile`` writes)."""
    from ..deploy.latency_table import TABLE_FILE, plot_shares, save_table, table_markdown
    from ..deploy.profile import ProfileOptions, profile_unet
    from ..outputs import write_atomically

    source = _teacher(r)
    options = ProfileOptions(runtime=checked.runtime, precision=r.precision, latent_size=_latent(r, source.unet.config),
                             repeats=r.profile_repeats, threads=r.threads)
    table = profile_unet(source.unet, model=source.describe(), options=options)

    def write(tmp: Path) -> None:
        save_table(table, tmp / TABLE_FILE)
        (tmp / "latency_table.md").write_text(table_markdown(table))
        plot_shares(table, tmp / "latency_shares.png")

    write_atomically(ctx.folder, write, kind="profile", entries=["stage.json"])
    return {"step_ms": round(table.step, 4), "units": len(table.units), "setting": table.setting}


def run_prune(ctx: StageContext, r: Recipe, hooks: Hooks) -> dict[str, Any]:
    from ..models.student import make_student, save_student
    from ..prune.calibration import read_prompts
    from ..prune.plan import PruneOptions, plan_pruning
    from ..prune.report import plan_markdown

    source = _teacher(r)
    priced: dict[str, Any] = {}
    if r.budget_kind == "latency":  # priced by the profile stage's table (checked against this setting)
        from ..deploy.latency_table import TABLE_FILE, load_table

        table = load_table(ctx.run_dir / "profile" / TABLE_FILE)
        _check_latency_reachable(r, source, table, ctx.run_dir / "profile")
        priced = {"latency_table": table, "precision": r.precision}
    options = PruneOptions(ratio=r.budget_ratio, criterion=r.criterion, cost=r.budget_kind, calib=r.calib,
                           batch_size=r.calib_batch_size, seed=r.seed, granularity=r.granularity,
                           additivity_sets=r.additivity_sets,
                           prompts=read_prompts(r.prompts) if r.prompts else None,
                           latent_size=tuple(r.latent_size) if r.latent_size else None,
                           **priced)
    plan = plan_pruning(source, options, progress=(lambda total: hooks.bar("scoring", total)) if hooks.bar else None)
    result = plan.as_dict()
    maybe_kill("prune:planned")
    files = {"pruning_plan.json": json.dumps(result, indent=2) + "\n", "pruning_report.md": plan_markdown(result)}
    student = make_student(source.unet, plan.removed)
    save_student(student, ctx.folder, teacher={**source.describe(), "params": result["params_before"]},
                 files=files, extra={"method": plan.method, "params_ratio_achieved": result["params_ratio_achieved"]})
    keys = ("params_before", "params_after", "params_ratio_achieved", "macs_before", "macs_after",
            "macs_ratio_achieved", "ratio_achieved", "removed", "joint_output_loss", "notes", "latent_size",
            "latency")
    additivity = result.get("additivity")
    return {**{k: result.get(k) for k in keys},
            "additivity": None if additivity is None else {k: additivity.get(k) for k in ("pearson", "spearman")}}


def _check_latency_reachable(r: Recipe, source: Any, table: Any, profile_dir: Path) -> None:
    """A latency budget can only be checked once the units are timed: exit 2 here, the profile kept for a rerun."""
    from ..models.inventory import build_inventory
    from ..prune.latency_cost import unit_costs

    inv = build_inventory(source.unet, granularity=r.granularity, latent_size=_latent(r, source.unet.config))
    costs, total = unit_costs(inv.prunable, table)
    reachable = sum(costs.values()) / total
    if r.budget_ratio > reachable:
        raise LaptopDeployError(f"--budget {r.budget} is not reachable: only {reachable:.4f} of the teacher's "
                                f"measured step lies in prunable layers (see {profile_dir / 'latency_table.md'}); "
                                f"lower R and rerun (the profile is kept)")


def run_distill(ctx: StageContext, r: Recipe, hooks: Hooks, *, student_dir: Path) -> dict[str, Any]:
    from ..distill.data import image_data, prompt_data
    from ..distill.state import CHECKPOINT_DIR, CHECKPOINT_FILE, start_run_folder
    from ..distill.train import distill, prepare_run
    from ..models.sources import resolve_model
    from ..prune.calibration import read_prompts

    teacher = _teacher(r)
    student = resolve_model(str(student_dir))
    latent = _latent(r, teacher.unet.config)
    if r.prompts is not None:
        data = prompt_data(teacher, read_prompts(r.prompts), latent_size=latent)
    else:
        data = image_data(teacher, r.data, latent_size=latent, cache_dir=r.cache_dir,
                          progress=(lambda what, total: hooks.bar(what, total)) if hooks.bar else None)

    def progress(step: int, total: int, record: dict[str, Any]) -> None:
        if hooks.steps is not None:
            hooks.steps(step, total, record)
        maybe_kill(f"distill:step={step}")

    run = prepare_run(teacher, student, data, distill_options(r), ctx.folder, progress=progress)
    resume = ctx.resume and (ctx.folder / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    if not resume:  # a fresh run, or one killed before its first checkpoint: start the folder over
        start_run_folder(ctx.folder, force=True)
    summary = distill(run, resume=resume)
    evals = summary["eval"]
    return {"steps": summary["steps"], "resumed_from_step": summary["resumed_from_step"],
            "eval_start": evals.get("start", {}).get("total"),
            "eval_end": evals.get("end_ema", evals["end"])["total"], "device": summary["device"]}


def run_export(ctx: StageContext, r: Recipe, checked: Checked, *, model_dir: Path | None) -> dict[str, Any]:
    """Export the student in ``model_dir`` (None: the teacher itself, for the latency comparison)."""
    from ..deploy.manifest import model_hash
    from ..deploy.spec import build_spec
    from ..exporters import get_exporter
    from ..models.sources import resolve_model
    from ..outputs import write_atomically

    exporter = get_exporter(r.target)
    source = _teacher(r) if model_dir is None else resolve_model(str(model_dir))
    height, width = _latent(r, source.unet.config)
    # beside a bundle, the teacher is exported as the bundle's U-Net is (dynamic axes, batch 2): like for like
    spec = build_spec(source.unet.config, batch=2 if r.pipeline else 1, height=height, width=width,
                      dynamic=r.pipeline, precision=r.precision)
    described = {**source.describe(), "sha256": model_hash(source.unet)}
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["manifest"] = exporter.export(source.unet, spec, tmp, source=described,
                                              options=checked.export_options)
        maybe_kill(f"{ctx.folder.name}:written")

    write_atomically(ctx.folder, write, kind="artifact", entries=["stage.json"])
    manifest = written["manifest"]
    return {"target": manifest.target, "precision": manifest.precision, "model_file": manifest.model_file,
            "bytes": sum(f["bytes"] for f in manifest.files.values()),
            "digests": {name: f.get("sha256") for name, f in manifest.files.items()},
            "source_sha256": described["sha256"], "params": described["params"]}


def run_bundle(ctx: StageContext, r: Recipe, *, model_dir: Path) -> dict[str, Any]:
    """``export --pipeline``: the student's app bundle (its other parts from the teacher)."""
    from ..deploy.bundle import BundleOptions, export_bundle, resolve_sources
    from ..outputs import write_atomically

    sources = resolve_sources(str(model_dir), seed=r.seed)
    height, width = _latent(r, sources.unet.unet.config)
    options = BundleOptions(target=r.target, precision=r.precision, height=height, width=width,
                            exporter=r.exporter, opset=r.opset, seed=r.seed)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["manifest"] = export_bundle(sources, tmp, options)
        maybe_kill(f"{ctx.folder.name}:written")

    write_atomically(ctx.folder, write, kind="bundle", entries=["stage.json"])
    manifest = written["manifest"]
    return {"target": manifest.target, "precision": manifest.precision, "bundle": True,
            "bytes": manifest.parts["unet"]["bytes"], "bundle_bytes": sum(f["bytes"] for f in manifest.files.values()),
            "digests": {name: f.get("sha256") for name, f in manifest.files.items()},
            "parts": {name: part["bytes"] for name, part in manifest.parts.items()}}


def run_verify_bundle(ctx: StageContext, r: Recipe) -> dict[str, Any]:
    """``verify BUNDLE``: every part against PyTorch, then images from the same seeds against the diffusers
    pipeline (the app loop is torch-free)."""
    from ..deploy.bundle_verify import verify_bundle
    from ..outputs import write_atomically

    result = verify_bundle(ctx.run_dir / "export", steps=r.verify_steps, seeds=(r.seed,), min_psnr_db=r.min_psnr)
    data = result.as_dict()
    write_atomically(ctx.folder, lambda tmp: (tmp / "parity.json").write_text(json.dumps(data, indent=2) + "\n"),
                     kind="verify", entries=["stage.json"])
    return {"passed": data["passed"], "failures": data["failures"], "steps": r.verify_steps,
            "parts": {name: {k: part.get(k) for k in ("rel_l2", "psnr_db")} for name, part in data["parts"].items()},
            "e2e_psnr_db": data["worst_psnr_db"], "min_image_psnr_db": data["min_psnr_db"]}


def _runner_options(r: Recipe) -> dict[str, Any]:
    return {"intra_op_threads": r.threads} if r.threads else {}


def run_verify(ctx: StageContext, r: Recipe, checked: Checked, *, model_dir: Path, artifact: Path) -> dict[str, Any]:
    from ..deploy.manifest import check_integrity
    from ..deploy.verify import verify_artifact
    from ..models.sources import resolve_model
    from ..outputs import write_atomically

    manifest = check_integrity(artifact)
    source = resolve_model(str(model_dir))
    tolerances = None
    if r.min_psnr is not None:  # a fixed floor instead of verify's default (e.g. a stricter release gate)
        from ..deploy.verify import Tolerances

        tolerances = Tolerances(max_rel_l2=None, min_psnr_db=r.min_psnr)
    result = verify_artifact(artifact, source, runtime=checked.runtime, steps=r.verify_steps, seed=r.seed,
                             record=False, manifest=manifest, tolerances=tolerances, **_runner_options(r))
    data = result.as_dict()
    write_atomically(ctx.folder, lambda tmp: (tmp / "parity.json").write_text(json.dumps(data, indent=2) + "\n"),
                     kind="verify", entries=["stage.json"])
    return {k: data.get(k) for k in ("passed", "failures", "rel_l2", "psnr_db", "e2e_psnr_db", "steps",
                                     "tolerances", "runner")}


def run_bench(ctx: StageContext, r: Recipe, checked: Checked, *, artifacts: dict[str, Path]) -> dict[str, Any]:
    """Teacher and student artifacts timed interleaved (T S T S ...) by the profiler's harness: ``bench_repeats``
    rounds, each the median of ``bench_iterations`` calls after ``bench_warmup``; the load average is recorded
    before and after, and a busy machine is flagged."""
    from ..deploy.bench import environment
    from ..deploy.manifest import check_integrity
    from ..deploy.profile import measure_interleaved
    from ..outputs import write_atomically
    from ..runtimes import open_artifact

    manifests = {name: check_integrity(folder) for name, folder in artifacts.items()}
    feeds = manifests["student"].spec.example_feeds(seed=0)
    variants = {name: (lambda name=name: open_artifact(artifacts[name], manifest=manifests[name],
                                                       runtime=checked.runtime, **_runner_options(r)))
                for name in artifacts}
    load_before = os.getloadavg()
    latency = measure_interleaved(variants, feeds, repeats=r.bench_repeats, calls=r.bench_iterations,
                                  warmup=r.bench_warmup)
    load_after = os.getloadavg()
    env = environment()
    cores = env.get("logical_cores") or os.cpu_count() or 1
    data = {"runtime": checked.runtime, "repeats": r.bench_repeats, "iterations": r.bench_iterations,
            "warmup": r.bench_warmup, "latency": latency, "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
            "busy": max(load_before[0], load_after[0]) > 0.5 * cores, "environment": env}
    if "teacher" in latency:
        data["student_over_teacher"] = round(latency["student"]["median_ms"] / latency["teacher"]["median_ms"], 4)
    write_atomically(ctx.folder, lambda tmp: (tmp / "latency.json").write_text(json.dumps(data, indent=2) + "\n"),
                     kind="bench", entries=["stage.json"])
    return {k: v for k, v in data.items() if k != "environment"}


def run_report(ctx: StageContext, r: Recipe, checked: Checked, *, folders: dict[str, Path]) -> dict[str, Any]:
    from ..outputs import write_atomically
    from .report import write_report

    written: dict[str, Any] = {}
    write_atomically(ctx.folder, lambda tmp: written.update(write_report(tmp, r, checked, ctx.results, folders)),
                     kind="report", entries=["stage.json"])
    return written


# ------------------------------------------------------------------------------------------------ the plan


def plan_stages(r: Recipe, checked: Checked, hooks: Hooks, run_dir: Path) -> list[Stage]:
    """The stages of ``r`` in order, each with the settings that decide its output (its fingerprint)."""
    teacher = {"model": r.model, "seed": r.seed, "model_id": _model_identity(r.model)}
    latent = r.latent_size
    prune = {**teacher, "budget": r.budget, "criterion": r.criterion, "granularity": r.granularity,
             "calib": r.calib, "calib_batch_size": r.calib_batch_size, "additivity_sets": r.additivity_sets,
             "prompts": _file_identity(r.prompts), "latent_size": latent}
    stages = []
    if r.budget_kind == "latency":
        stages.append(Stage("profile", {**teacher, "runtime": checked.runtime, "precision": r.precision,
                                        "latent_size": latent, "repeats": r.profile_repeats, "threads": r.threads},
                            lambda ctx: run_profile(ctx, r, checked)))
    stages.append(Stage("prune", prune, lambda ctx: run_prune(ctx, r, hooks),
                        inputs=("profile",) if r.budget_kind == "latency" else ()))
    student_stage = "prune"
    if r.distill_steps > 0:
        options = {k: v for k, v in vars(distill_options(r)).items() if k not in ("checkpoint_every", "device")}
        settings = {**teacher, "options": options, "latent_size": latent, "data": _file_identity(r.data),
                    "prompts": _file_identity(r.prompts)}
        stages.append(Stage("distill", settings, lambda ctx: run_distill(ctx, r, hooks,
                                                                          student_dir=run_dir / "prune"),
                            inputs=("prune",), resumable=True))
        student_stage = "distill"
    student_dir = run_dir / student_stage
    export = {"target": r.target, "precision": r.precision, "exporter": r.exporter, "opset": r.opset,
              "latent_size": latent}
    if r.pipeline:
        stages.append(Stage("export", {**export, "pipeline": True},
                            lambda ctx: run_bundle(ctx, r, model_dir=student_dir), inputs=(student_stage,)))
        artifacts = {"student": run_dir / "export" / "unet"}  # the bundle's U-Net part is an artifact folder
    else:
        stages.append(Stage("export", export, lambda ctx: run_export(ctx, r, checked, model_dir=student_dir),
                            inputs=(student_stage,)))
        artifacts = {"student": run_dir / "export"}
    stages.append(Stage("export-teacher", {**teacher, **export, "pipeline": r.pipeline},
                        lambda ctx: run_export(ctx, r, checked, model_dir=None)))
    artifacts = {"teacher": run_dir / "export-teacher", **artifacts}
    verify = (lambda ctx: run_verify_bundle(ctx, r)) if r.pipeline else \
        (lambda ctx: run_verify(ctx, r, checked, model_dir=student_dir, artifact=run_dir / "export"))
    stages.append(Stage("verify", {"runtime": checked.runtime, "steps": r.verify_steps, "seed": r.seed,
                                   "threads": r.threads, "pipeline": r.pipeline, "min_psnr": r.min_psnr},
                        verify, inputs=(student_stage, "export")))
    stages.append(Stage("bench", {"runtime": checked.runtime, "repeats": r.bench_repeats,
                                  "iterations": r.bench_iterations, "warmup": r.bench_warmup, "threads": r.threads},
                        lambda ctx: run_bench(ctx, r, checked, artifacts=artifacts),
                        inputs=tuple(stage for stage in ("export-teacher", "export"))))
    folders = {"student_model": student_dir, "student_artifact": artifacts["student"],
               "teacher_artifact": artifacts["teacher"]}
    stages.append(Stage("report", {"grid_prompts": r.grid_prompts, "quality_per_prompt": r.quality_per_prompt,
                                   "report_steps": r.report_steps, "seed": r.seed},
                        lambda ctx: run_report(ctx, r, checked, folders=folders),
                        inputs=tuple(s.name for s in stages)))
    return stages


def _file_identity(path: Path | None) -> dict[str, Any] | None:
    """A data file or folder as its path plus size and mtime of each file (changed data re-runs its stages)."""
    if path is None:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "files": [[str(p.relative_to(path) if p != path else p.name), p.stat().st_size,
                                          p.stat().st_mtime_ns] for p in files]}


def _model_identity(spec: str) -> Any:
    """A model on disk is identified by its files' sizes and times too (a retrained teacher re-runs everything)."""
    path = Path(spec).expanduser()
    return _file_identity(path) if path.exists() else spec
