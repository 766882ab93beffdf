"""One function per CLI verb: ``verb(args) -> (json_result, text)``. They only translate arguments into library
calls; all work lives in the library modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError


def inventory(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..models.inventory import build_inventory, format_inventory
    from ..models.sources import resolve_model

    # Counting needs only the architecture: presets and folders resolve on the meta device without weights.
    source = resolve_model(args.model, materialize=False, seed=args.seed, allow_pickle=args.allow_pickle)
    inv = build_inventory(source.unet, granularity=args.granularity,
                          latent_size=tuple(args.latent_size) if args.latent_size else None)
    model = source.describe()
    title = f"{args.model} ({model['kind']}, {model['family']}): granularity {inv.granularity}"
    return {"model": model, **inv.as_dict()}, format_inventory(inv, title=title)


def _removal_names(text: str) -> list[str]:
    """``--remove`` value: comma-separated names, or @FILE holding lines, a JSON list, or {"removed": [...]}."""
    if not text.startswith("@"):
        return [n.strip() for n in text.split(",") if n.strip()]
    path = Path(text[1:])
    try:
        content = path.read_text()
    except OSError as exc:
        raise LaptopDeployError(f"--remove {text}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return [line.strip() for line in content.splitlines() if line.strip() and not line.startswith("#")]
    names = data.get("removed") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LaptopDeployError(f"--remove {text}: expected a JSON list of names or an object with 'removed'")
    return names


def _progress_bar(description: str):
    """A tqdm factory on stderr when it is a terminal (nothing otherwise: logs and --json stay clean)."""
    import sys

    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def start(total: int):
        return tqdm(total=total, desc=description, unit="batch", file=sys.stderr, leave=False).update

    return start


def prune(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..prune.calibration import read_prompts
    from ..prune.plan import PruneOptions, plan_pruning
    from ..prune.report import plan_markdown
    from ..models.sources import resolve_model
    from ..models.student import make_student, save_student
    from ..outputs import prepare_output
    from .profile_commands import latency_options, measure_after_pruning

    prepare_output(args.out, force=args.force)  # unsafe, foreign or unwritable --out: exit 2 before loading
    options = PruneOptions(
        ratio=args.ratio, preset=args.preset, criterion=args.criterion, cost=args.cost, calib=args.calib,
        batch_size=args.batch_size, seed=args.seed, device=args.device, autocast=args.autocast,
        granularity=args.granularity, additivity_sets=args.additivity_sets,
        prompts=read_prompts(args.prompts) if args.prompts else None, images=args.images,
        latent_size=tuple(args.latent_size) if args.latent_size else None, steps=args.steps, refine=args.refine,
        calib_seeds=args.calib_seeds, remove=_removal_names(args.remove) if args.remove is not None else None,
        **latency_options(args))  # a missing, foreign or mismatched --latency-table: exit 2 before loading
    if options.remove == []:
        raise LaptopDeployError("--remove names no layer")
    options.validate()  # before the model is loaded: bad flags fail in a second
    source = resolve_model(args.model, seed=args.seed, allow_pickle=args.allow_pickle)
    plan = plan_pruning(source, options, progress=_progress_bar("scoring"))
    measure_after_pruning(plan, source.unet, skip=args.no_measure)  # the prediction checked on the student
    result = plan.as_dict()
    _warn_assumed_schedule(result["notes"])
    # Everything that could still fail (formatting included) happens before the folder is written.
    summary, text = _prune_summary(result, out=args.out)
    files = {"pruning_plan.json": json.dumps(result, indent=2) + "\n", "pruning_report.md": plan_markdown(result)}
    student = make_student(source.unet, plan.removed)
    save_student(student, args.out, force=args.force, files=files,
                 teacher={**source.describe(), "params": result["params_before"]},
                 extra={"method": plan.method, "params_ratio_achieved": result["params_ratio_achieved"]})
    return summary, text


def _warn_assumed_schedule(notes: list[str]) -> None:
    """An assumption that changes the result is said on stderr too (stdout may be --json)."""
    import sys

    from ..prune.calibration import NO_SCHEDULER

    if NO_SCHEDULER in notes:
        print(f"laptop-deploy: warning: {NO_SCHEDULER}", file=sys.stderr)


def _prune_summary(result: dict[str, Any], *, out: Path) -> tuple[dict[str, Any], str]:
    from ..prune.report import format_value

    summary = {"out": str(out), **{k: result[k] for k in (
        "params_before", "params_after", "ratio_achieved", "params_ratio_achieved", "macs_before", "macs_after",
        "macs_ratio_achieved", "removed", "joint_output_loss", "forward_passes", "scoring_seconds", "notes")}}
    additivity = result["additivity"]
    summary["additivity"] = None if additivity is None else {k: additivity[k] for k in (
        "pearson", "spearman", "chosen_joint_over_sum", "mean_joint_over_sum", "chosen_additive",
        "chosen_verdict")}
    text = (f"removed {len(result['removed'])} layers: {result['params_before']:,} -> {result['params_after']:,} "
            f"params ({result['params_ratio_achieved']:.2%}), {result['macs_ratio_achieved']:.2%} of MACs; output "
            f"loss {format_value(result['joint_output_loss'])}")
    if additivity is not None:
        text += (f"; additivity Pearson {format_value(additivity['pearson'], '.3f')}, "
                 f"Spearman {format_value(additivity['spearman'], '.3f')}")
    summary["latency"] = result.get("latency")
    if result.get("latency"):
        from ..prune.latency_cost import latency_text

        text += "\n" + latency_text(result["latency"])
    refinement, stability = result.get("refinement"), result.get("stability")
    if refinement:  # --refine: what the rounds bought, at what cost in passes
        summary["refinement"] = {k: refinement[k] for k in ("one_shot_joint", "final_joint", "one_shot_passes",
                                                            "total_passes", "stopped")}
        text += (f"\nrefined ({len(refinement['rounds'])} round(s), {refinement['stopped']}): joint loss "
                 f"{refinement['one_shot_joint']:.4g} -> {refinement['final_joint']:.4g}, passes "
                 f"{refinement['one_shot_passes']} -> {refinement['total_passes']}")
    if stability:  # --calib-seeds: the note below says when the choice is unstable
        summary["stability"] = {k: stability[k] for k in ("seeds", "distinct_sets", "unstable", "in_doubt",
                                                          "joint_own", "joint_final")}
    text += "".join(f"\nnote: {note}" for note in result["notes"])
    text += f"\nstudent, pruning_plan.json and pruning_report.md written to {out}"
    return summary, text


def distill(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..prune.calibration import read_prompts
    from ..distill.options import DistillOptions
    from ..distill.train import check_student, distill, prepare_run
    from ..distill.state import prepare_run_folder, start_run_folder
    from ..distill.data import image_data, prompt_data
    from ..models.sources import resolve_model
    from ..models.student import is_student_folder, read_student_meta
    from ..models.unet_io import check_latent_size

    options = DistillOptions(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lambda_task=args.lambda_task, lambda_out=args.lambda_out,
        lambda_feat=args.lambda_feat, feature_norm=args.feature_norm, mixed_precision=args.mixed_precision,
        ema_decay=args.ema_decay, uncond_prob=args.uncond_prob, seed=args.seed,
        checkpoint_every=args.checkpoint_every, eval_samples=args.eval_samples,
        gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    options.validate()  # bad flags, a missing folder and an unwritable --out fail before any model loads
    if args.data is not None and not args.data.is_dir():
        raise LaptopDeployError(f"--data {args.data}: no such folder")
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    prepare_run_folder(args.out, resume=args.resume, force=args.force)
    student_path = Path(args.student)
    if not student_path.is_dir():
        raise LaptopDeployError(f"--student {student_path}: no such folder (write one with `laptop-deploy prune`)")
    teacher_seed = args.teacher_seed
    if teacher_seed is None and is_student_folder(student_path):
        teacher_seed = read_student_meta(student_path).get("teacher", {}).get("seed", 0)
    student = resolve_model(str(student_path))
    teacher = resolve_model(args.teacher, seed=teacher_seed or 0, allow_pickle=args.allow_pickle)
    config = teacher.unet.config
    latent_size = tuple(args.latent_size) if args.latent_size else (config.sample_size, config.sample_size)
    check_latent_size(config, *latent_size)
    # The student must fit the teacher before any data is encoded or cached (prepare_run checks again, cheaply).
    check_student(teacher.unet, student.unet, student_name=student.spec, teacher_name=teacher.spec)
    if "scheduler" not in teacher.available_parts():
        from ..prune.calibration import NO_SCHEDULER

        _warn_assumed_schedule([NO_SCHEDULER])
    if prompts is not None:
        data = prompt_data(teacher, prompts, latent_size=latent_size)
    else:
        data = image_data(teacher, args.data, latent_size=latent_size, cache_dir=args.cache_dir,
                          progress=_counter_bar)
    run = prepare_run(teacher, student, data, options, args.out, progress=_step_bar())
    run.device()  # --mixed-precision on the CPU: exit 2 before the run folder exists
    if not args.resume and run.env.main:  # rank 0 alone replaces the folder (the others never write there)
        start_run_folder(args.out, force=args.force)
    summary = distill(run, resume=args.resume)
    if not run.env.main:
        return None, ""  # under torchrun / accelerate launch only rank 0 reports
    if summary.get("stopped"):  # a check that failed after the run folder was legitimately written: exit 1
        import sys

        print(f"laptop-deploy: error: {summary['stopped']['message']}", file=sys.stderr)
        return {**summary, "exit_code": 1}, (f"stopped: {summary['stopped']['message']}\n"
                                              f"distill_summary.json and distill_log.jsonl written to {args.out}")
    return summary, _distill_text(summary)


def _counter_bar(description: str, total: int):
    start = _progress_bar(description)
    return start(total) if start else None


def _step_bar():
    """A tqdm bar over optimizer steps with the loss terms (stderr terminals only)."""
    import sys

    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(step: int, total: int, record: dict[str, Any]) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, initial=step - 1, desc="distill", unit="step", file=sys.stderr)
        bar["bar"].set_postfix({k: f"{record[k]:.3g}" for k in ("total", "out", "feat", "task") if k in record},
                               refresh=False)
        bar["bar"].update(1)
        if step == total:
            bar["bar"].close()

    return update


def _distill_text(summary: dict[str, Any]) -> str:
    from ..prune.report import format_value

    evals = summary["eval"]
    start = evals.get("start", {}).get("total")
    end = evals["end"]["total"]
    ema = evals.get("end_ema", {}).get("total")
    speed = (f"{summary['steps_per_s']:.2f} steps/s, {summary['samples_per_s']:.1f} samples/s"
             if summary["steps_per_s"] else "no steps run")
    resumed = f", resumed at step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""
    text = (f"distilled {summary['steps_run']} steps{resumed} on {summary['device']} in {summary['seconds']:.1f} s "
            f"({speed}); eval loss {format_value(start)} -> {format_value(end)}"
            + (f" (EMA {format_value(ema)})" if ema is not None else ""))
    data = summary["data"]
    if data.get("skipped_unreadable") or data.get("skipped_no_caption"):
        text += (f"\nnote: skipped {data.get('skipped_unreadable', 0)} unreadable images and "
                 f"{data.get('skipped_no_caption', 0)} without a caption (first: "
                 f"{', '.join(data.get('unreadable', [])[:3]) or 'n/a'})")
    text += f"\nstudent, distill_summary.json, distill_log.jsonl and checkpoints/ written to {summary['out']}"
    return text


def quality(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The toy teacher and ``--model`` (a student pruned or distilled from it) draw the held-out prompts from the
    same seeds; the judge grades both, PSNR compares them, McNemar says whether the alignments differ."""
    from ..distill.train import check_student
    from ..errors import DistillError
    from ..models.sources import resolve_model
    from ..toy.evaluate import eval_pairs, judge_model, mcnemar
    from ..toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    steps = DEFAULT_STEPS if args.steps is None else args.steps
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    if args.per_prompt < 1 or steps < 1 or guidance < 0:
        raise LaptopDeployError("--per-prompt and --steps must be at least 1, --guidance at least 0")
    teacher = resolve_model("toy")
    model = resolve_model(args.model)
    try:
        check_student(teacher.unet, model.unet, student_name=args.model, teacher_name="toy")
    except DistillError as exc:
        raise LaptopDeployError(f"quality judges the toy teacher's students only: {exc}") from None
    pairs = eval_pairs(per_prompt=args.per_prompt)
    reference = judge_model(teacher, teacher.unet, pairs, steps=steps, guidance=guidance)
    judged = judge_model(teacher, model.unet, pairs, steps=steps, guidance=guidance)
    rows = [{"model": "toy", **reference.row()}, {"model": args.model, **judged.row(reference)}]
    paired = mcnemar(judged.alignment, reference.alignment)
    result = {"prompts": "held-out", "images": len(pairs), "steps": steps, "guidance": guidance, "models": rows,
              "paired_test": {"test": "exact McNemar, two-sided", "only_model_right": paired["only_first"],
                              "only_teacher_right": paired["only_second"], "p": paired["p"]}}
    lines = [f"{len(pairs)} images: the 24 held-out prompts x {args.per_prompt} seeds, DPM-Solver++ {steps} "
             f"steps, guidance {guidance:g}",
             f"{'model':<28} {'params':>11} {'alignment (95% CI)':>22} {'shape':>6} {'colour':>6} {'place':>6} "
             f"{'decline':>8} {'PSNR dB':>8}"]
    for row in rows:
        low, high = row["alignment_95"]
        decline = "" if row["decline_pct"] is None else f"{row['decline_pct']:+.1f}%"
        psnr_db = "" if row["psnr_db"] is None else f"{row['psnr_db']:.2f}"
        lines.append(f"{row['model'][-28:]:<28} {row['params']:>11,} {row['alignment']:>7.3f} "
                     f"({low:.3f}-{high:.3f}) {row['shape_accuracy']:>6.2f} {row['colour_accuracy']:>6.2f} "
                     f"{row['position_accuracy']:>6.2f} {decline:>8} {psnr_db:>8}")
    p_text = "p < 0.0001" if paired["p"] < 1e-4 else f"p = {paired['p']:.2g}"
    lines.append(f"paired on the same images: {paired['only_first']} right only with the model, "
                 f"{paired['only_second']} only with the teacher (McNemar {p_text})")
    return result, "\n".join(lines)
