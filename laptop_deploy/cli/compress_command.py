"""CLI handler of ``compress``: flags (+ ``--config``) → a validated recipe → the stages of
:mod:`laptop_deploy.compress`, one line per stage on stderr, the report's headline on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FLAG_HELP = {  # the recipe keys that are flags too (all others: --config only); None = no default shown here
    "seed": (int, "seed of random:<preset> weights, calibration, distillation and samples (default 0)"),
    "profile_repeats": (int, "latency budgets: timed calls of the teacher's profile, at least 3 (default 5)"),
    "criterion": (str, "pruning criterion (default output-loss)"),
    "granularity": (str, "auto, attention or block (default auto)"),
    "calib": (int, "calibration samples (default 8)"),
    "additivity_sets": (int, "random sets for the additivity check (default 10; 0 skips it)"),
    "batch_size": (int, "distillation batch (default 4)"),
    "lr": (float, "distillation learning rate (default 5e-5)"),
    "lr_schedule": (str, "constant (default) or cosine, after the warm-up"),
    "warmup_steps": (int, "distillation warm-up steps (default 0)"),
    "ema_decay": (float, "EMA of the distilled weights (default 0.9999; 0: off)"),
    "checkpoint_every": (int, "distillation steps between checkpoints (default 100)"),
    "exporter": (str, "torch.onnx exporter: dynamo (default) or torchscript"),
    "verify_steps": (int, "denoising steps of the parity check (default 10)"),
    "min_psnr": (float, "verify's PSNR floor in dB (default: verify's own gate)"),
    "bench_iterations": (int, "timed calls per round (default 10)"),
    "bench_repeats": (int, "interleaved teacher/student rounds (default 3)"),
    "threads": (int, "intra-op threads of the runtime for verify and bench"),
    "grid_prompts": (int, "prompts in the sample grid (default 4; 0: no grid)"),
    "quality_per_prompt": (int, "toy: seeds per held-out prompt for the judged quality (default 2; 0: none)"),
    "report_steps": (int, "sampler steps of the report's samples (default 20)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to None, so the handler can tell what was typed (flags override --config)."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="recipe.toml with any of these settings")
    parser.add_argument("--model", metavar="M", help="the teacher: toy, random:<preset>, a folder or a file")
    parser.add_argument("--budget", metavar="KIND=R",
                        help="remove the fraction R of the teacher's params, macs or latency, e.g. params=0.5")
    parser.add_argument("--target", metavar="NAME", help="export target: onnx (default), ort-mobile, trt, coreml")
    parser.add_argument("--runtime", metavar="NAME", help="runtime for verify and bench (default: by target)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), help="artifact precision (default fp32)")
    parser.add_argument("--pipeline", action="store_const", const=True, help="export an app bundle (every part)")
    parser.add_argument("--data", type=Path, metavar="DIR", help="captioned images for distillation")
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="prompts, one per line (data-free distillation "
                                                                      "and calibration)")
    parser.add_argument("--distill-steps", type=int, metavar="N", help="distillation steps (default 0: none)")
    parser.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                        help="latent size (default: the U-Net's sample_size)")
    parser.add_argument("--out", type=Path, metavar="RUN", help="run folder (rerun the command to resume)")
    for key, (kind, text) in FLAG_HELP.items():
        parser.add_argument("--" + key.replace("_", "-"), type=kind, help=text)


def compress(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ..compress.recipe import KEYS, build_recipe, load_config, validate
    from ..compress.stages import open_run_folder, run_stages
    from ..compress.steps import Hooks, plan_stages
    from .commands import _counter_bar, _step_bar

    flags = {k: v for k, v in vars(args).items() if k in KEYS and v is not None}
    recipe = build_recipe(load_config(args.config) if args.config else {}, flags)
    checked = validate(recipe)  # bad settings: exit 2 here, nothing written
    stages = plan_stages(recipe, checked, Hooks(bar=_counter_bar, steps=_step_bar()), recipe.out)
    open_run_folder(recipe.out, [s.name for s in stages], recipe.to_toml())
    outcomes = run_stages(recipe.out, stages, log=lambda line: print(f"compress {line}", file=sys.stderr,
                                                                       flush=True))
    results = {o.name: o.result for o in outcomes}
    verify = results.get("verify", {})
    report = recipe.out / "report" / "report.md"
    data: dict[str, Any] = {
        "out": str(recipe.out), "report": str(report), "verify_passed": verify.get("passed"),
        "stages": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 2)} for o in outcomes],
        "rows": results.get("report", {}).get("rows"), "quality": results.get("report", {}).get("quality")}
    if not verify.get("passed"):
        data["exit_code"] = 1
    return data, _text(data)


def _text(data: dict[str, Any]) -> str:
    lines = []
    for row in data["rows"] or []:
        if row["teacher"] and row["student"] is not None:
            lines.append(f"{row['what']:<18} student / teacher = {row['student'] / row['teacher']:.3f}")
    quality = data.get("quality")
    if quality:
        lines.append(f"judged alignment   teacher {quality['teacher']['alignment']:.3f}, student "
                     f"{quality['student']['alignment']:.3f}")
    lines.append(f"verify {'PASSED' if data['verify_passed'] else 'FAILED'}; report: {data['report']}")
    return "\n".join(lines)
