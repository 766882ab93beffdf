"""Compression quality on the toy teacher: LAPTOP-Diff's claims measured where images can be judged.

The `toy` teacher (docs/TOY.md) draws "a red circle at the top left" and the like, and an analytic judge reads
shape, colour and position back from the pixels. Every variant below draws the same images — the 24 held-out
prompts × ``--per-prompt`` seeds, DPM-Solver++ at the teacher's default steps and guidance — and is reported as:

* **alignment** (fraction of images whose shape, colour and position all match the prompt) and its **decline**
  relative to the teacher's, in percent;
* **PSNR** (dB) of its images against the teacher's images from the same prompts and seeds (fidelity);
* params and MACs (batch 1, 8×8 latent), and the ratios removed.

Variants:

1. one-shot students (no retraining) for every ratio × criterion (``output-loss`` = LAPTOP-Diff, ``feature-loss``,
   ``magnitude``, ``random``), through the same :func:`~laptop_deploy.prune.plan.plan_pruning` as ``laptop-deploy
   prune``; the handcrafted presets (BK-SDM Base/Small, which on the 3-stage toy remove 10 and 13 of its 28 units)
   at their own ratios;
2. at ratio 0.5, retraining under one fixed budget for ``output-loss`` and the best baseline (the best other
   criterion at 0.5, or a preset within 0.05 of it), each with normalized (``--feature-norm l2``, LAPTOP-Diff) and
   plain (``none``, BK-SDM) feature KD — through the same :func:`~laptop_deploy.distill.train.distill` as ``laptop-deploy
   distill``, on a captioned folder of toy training images;
3. additivity: for each ratio, the output loss of the chosen set and of ``--additivity-sets`` random sets of similar
   cost against the sum of their single-unit losses (Pearson and Spearman r), and pooled over all ratios.

Calibration is ``--calib`` toy training images with their own captions (``prune --images DIR --prompts FILE``).

    python benchmarks/bench_quality.py            # the committed results (see the .md for the time it took)
    python benchmarks/bench_quality.py --quick    # ratio 0.5, 48 images, 40 distillation steps: a few minutes
    python benchmarks/bench_quality.py --matched-macs   # only: output-loss --cost macs at each preset's MAC ratio

writes benchmarks/results/bench_quality[_quick].json, .md, .png (plots) and _samples.png (images).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laptop_deploy.prune.report import format_value
from laptop_deploy.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

RESULTS = Path(__file__).parent / "results"
CRITERIA = ("output-loss", "feature-loss", "magnitude", "random")
PRESETS = ("bk-sdm-base", "bk-sdm-small")
RETRAIN_RATIO = 0.5
PRESET_WINDOW = 0.05  # a preset competes as the best baseline at 0.5 when its params ratio lies this close
FULL = {"ratios": [0.3, 0.5, 0.7], "per_prompt": 10, "calib": 32, "additivity_sets": 10, "distill_steps": 400,
        "distill_batch": 32, "data_count": 1920}
QUICK = {"ratios": [0.5], "per_prompt": 2, "calib": 8, "additivity_sets": 4, "distill_steps": 40,
         "distill_batch": 16, "data_count": 384}


@dataclass
class Variant:
    """One model judged: how it was made, its size, and what its images are worth."""

    name: str
    kind: str  # teacher | one-shot | preset | retrained
    criterion: str | None = None
    target_ratio: float | None = None
    params: int = 0
    macs: int = 0
    params_ratio: float = 0.0
    macs_ratio: float = 0.0
    removed: list[str] = field(default_factory=list)
    alignment: dict[str, Any] = field(default_factory=dict)
    decline_pct: float | None = None
    psnr_db: float | None = None
    joint_output_loss: float | None = None
    additivity: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    seconds: float = 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from laptop_deploy.models.inventory import build_inventory
        from laptop_deploy.models.sources import resolve_model
        from laptop_deploy.toy.dataset import make_dataset, write_folder
        from laptop_deploy.toy.evaluate import eval_pairs

        self.args, self.work = args, work
        self.teacher = resolve_model("toy")
        self.inventory = build_inventory(self.teacher.unet)
        self.pairs = eval_pairs(per_prompt=args.per_prompt)
        # training images for calibration and retraining: seed 1, so not the teacher's own training draw
        data = make_dataset(args.data_count, seed=1)
        self.data = write_folder(data, work / "data")
        calib = make_dataset(args.calib, seed=2)
        self.calib_images = write_folder(calib, work / "calib")
        self.calib_prompts = calib.captions
        self.encoded = None  # the retraining data, encoded on first use
        self.judged: dict[str, Any] = {}  # name → toy.evaluate.Judged
        self.variants: list[Variant] = []

    # -- judging ---------------------------------------------------------------------------------------------
    def judge(self, variant: Variant, unet: torch.nn.Module) -> Variant:
        from laptop_deploy.models.inventory import count_macs
        from laptop_deploy.toy.evaluate import judge_model

        judged = judge_model(self.teacher, unet, self.pairs, steps=self.args.steps, guidance=self.args.guidance)
        reference = self.judged.get("teacher")
        self.judged[variant.name] = judged
        row = judged.row(reference)
        variant.decline_pct, variant.psnr_db = row.pop("decline_pct"), row.pop("psnr_db")
        variant.params = row.pop("params")
        variant.alignment = row
        size = self.inventory.latent_size
        variant.macs = count_macs(unet, height=size[0], width=size[1])[""]
        variant.params_ratio = round(1 - variant.params / self.inventory.total_params, 4)
        variant.macs_ratio = round(1 - variant.macs / self.inventory.total_macs, 4)
        variant.seconds = round(variant.seconds + judged.seconds, 1)
        self.variants.append(variant)
        _say(f"{variant.name}: alignment {row['alignment']:.3f}"
             + (f", decline {_pct(variant.decline_pct)}, PSNR {variant.psnr_db:.2f} dB" if reference else "")
             + f", params -{100 * variant.params_ratio:.1f}% ({variant.seconds:.0f} s)")
        return variant

    def paired(self, first: str, second: str) -> dict[str, Any] | None:
        """Exact McNemar test of two variants on the same images (None if either is missing)."""
        from laptop_deploy.toy.evaluate import mcnemar

        if first not in self.judged or second not in self.judged:
            return None
        return {"first": first, "second": second,
                **mcnemar(self.judged[first].alignment, self.judged[second].alignment)}

    # -- one-shot students -------------------------------------------------------------------------------------
    def plan(self, **choice: Any):
        from laptop_deploy.prune.plan import PruneOptions, plan_pruning

        options = PruneOptions(calib=self.args.calib, batch_size=self.args.calib, seed=self.args.seed,
                               images=self.calib_images, prompts=self.calib_prompts, **choice)
        return plan_pruning(self.teacher, options)

    def one_shot(self, name: str, kind: str, plan, *, criterion: str | None, ratio: float | None) -> Variant:
        from laptop_deploy.models.student import make_student

        student = make_student(copy.deepcopy(self.teacher.unet), plan.removed)
        variant = Variant(name, kind, criterion=criterion, target_ratio=ratio, removed=list(plan.removed),
                          joint_output_loss=plan.joint_output_loss, seconds=plan.scoring_seconds)
        if plan.additivity:
            variant.additivity = {k: v for k, v in plan.additivity.items() if k != "singles"}
        return self.judge(variant, student)

    # -- retraining --------------------------------------------------------------------------------------------
    def retrain(self, base: Variant, feature_norm: str) -> Variant:
        from laptop_deploy.distill.train import distill, prepare_run
        from laptop_deploy.distill.data import image_data
        from laptop_deploy.models.sources import ModelSource
        from laptop_deploy.models.student import make_student

        args = self.args
        student = ModelSource(base.name, "student", make_student(copy.deepcopy(self.teacher.unet), base.removed),
                              self.teacher.family, removed=list(base.removed))
        if self.encoded is None:  # VAE + text encoding once, shared by every retrained variant
            self.encoded = image_data(self.teacher, self.data, latent_size=self.inventory.latent_size,
                                      cache_dir=self.work / "cache")
        options = distill_options(args, feature_norm)
        started = time.perf_counter()
        out = self.work / f"distill-{base.name}-{feature_norm}"
        summary = distill(prepare_run(self.teacher, student, self.encoded, options, out))
        evals = summary["eval"]
        variant = Variant(f"{base.name} + KD {'normalized' if feature_norm == 'l2' else 'plain'}", "retrained",
                          criterion=base.criterion, target_ratio=base.target_ratio, removed=list(base.removed),
                          seconds=time.perf_counter() - started,
                          distill={"feature_norm": feature_norm, "steps": summary["steps"],
                                   "batch_size": args.distill_batch, "lr": args.distill_lr,
                                   "ema_decay": args.distill_ema, "seconds": round(summary["seconds"], 1),
                                   "eval_start": evals.get("start"), "eval_end": evals.get("end_ema", evals["end"])})
        return self.judge(variant, student.unet.cpu())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from laptop_deploy.prune.additivity import AdditivityReport, SetMeasurement
    from laptop_deploy.errors import LaptopDeployError

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        bench = Bench(args, Path(tmp))
        reachable = sum(e.layer.params for e in bench.inventory.prunable) / bench.inventory.total_params
        if max(args.ratios) > reachable:
            raise LaptopDeployError(f"--ratios {max(args.ratios):g}: at most {reachable:.3f} of the toy teacher's "
                                    f"params lie in prunable units")
        bench.judge(Variant("teacher", "teacher"), bench.teacher.unet)
        for ratio in args.ratios:
            for criterion in args.criteria:
                sets = args.additivity_sets if criterion == "output-loss" else 0
                plan = bench.plan(ratio=ratio, criterion=criterion, additivity_sets=sets)
                bench.one_shot(f"{criterion}@{ratio:g}", "one-shot", plan, criterion=criterion, ratio=ratio)
        for preset in args.presets:
            plan = bench.plan(preset=preset, additivity_sets=0)
            bench.one_shot(preset, "preset", plan, criterion=None, ratio=None)
        one_shot = [v for v in bench.variants if v.kind in ("one-shot", "preset")]
        baseline = best_baseline(one_shot)
        ours = next((v for v in one_shot if v.criterion == "output-loss" and v.target_ratio == RETRAIN_RATIO), None)
        if args.distill_steps and ours is not None:
            for base in [ours] + ([baseline] if baseline is not None else []):
                for norm in ("l2", "none"):
                    bench.retrain(base, norm)
        variants = bench.variants
        samples = _sample_grid(bench)
        tests = [bench.paired(a, b) for a, b in paired_comparisons(variants, baseline)]
    pooled = AdditivityReport([SetMeasurement(s["label"], tuple(s["names"]), s["cost_ratio"], s["joint"], s["summed"])
                               for v in variants for s in (v.additivity or {}).get("sets", [])])
    return {
        "command": " ".join(["python benchmarks/bench_quality.py", *args.argv]).strip(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "out_dir", "name")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "teacher": {"spec": "toy", "params": bench.inventory.total_params, "macs": bench.inventory.total_macs},
        "eval": {"prompts": "24 held-out", "images": len(bench.pairs), "seeds_per_prompt": args.per_prompt},
        "best_baseline": baseline.name if baseline else None,
        "paired_tests": [t for t in tests if t],
        "additivity_pooled": {"sets": len(pooled.sets), "pearson": pooled.pearson, "spearman": pooled.spearman,
                              "mean_joint_over_sum": pooled.as_dict()["mean_joint_over_sum"]},
        "seconds": round(time.perf_counter() - started, 1),
        "variants": [asdict(v) for v in variants],
        "_samples": samples,
    }


def best_baseline(one_shot: list[Variant]) -> Variant | None:
    """The best non-LAPTOP-Diff student near the retraining ratio: highest alignment, then PSNR."""
    near = [v for v in one_shot if v.target_ratio == RETRAIN_RATIO
            or (v.kind == "preset" and abs(v.params_ratio - RETRAIN_RATIO) <= PRESET_WINDOW)]
    candidates = [v for v in near if v.criterion != "output-loss"]
    return max(candidates, key=lambda v: (v.alignment["alignment"], v.psnr_db or 0.0), default=None)


def paired_comparisons(variants: list[Variant], baseline: Variant | None) -> list[tuple[str, str]]:
    """The pairs the claims rest on: at every ratio output-loss against each other criterion (one-shot); then
    LAPTOP-Diff retrained against the baseline retrained both ways, and normalized against plain KD for each."""
    pairs = []
    one_shot = [v for v in variants if v.kind == "one-shot"]
    for ours in (v for v in one_shot if v.criterion == "output-loss"):
        pairs += [(ours.name, v.name) for v in one_shot if v.target_ratio == ours.target_ratio and v is not ours]
    ours = f"output-loss@{RETRAIN_RATIO:g}"
    if baseline is not None:
        pairs += [(f"{ours} + KD normalized", f"{baseline.name} + KD {norm}") for norm in ("plain", "normalized")]
    for name in [ours] + ([baseline.name] if baseline else []):
        pairs.append((f"{name} + KD normalized", f"{name} + KD plain"))
    return pairs


def _sample_grid(bench: Bench) -> tuple[np.ndarray, list[str]]:
    """Rows: teacher, then every variant at the retraining ratio and the retrained ones; 12 images each."""
    names = [v.name for v in bench.variants
             if v.kind in ("teacher", "retrained") or v.target_ratio == RETRAIN_RATIO]
    count = min(12, len(bench.pairs))
    return np.stack([bench.judged[n].images[:count] for n in names]), names


# -- reports ---------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    variants, settings = result["variants"], result["settings"]
    teacher = variants[0]
    judged = teacher["alignment"]
    lines = ["# Compression quality on the toy teacher", "", f"`{result['command']}`", "",
             f"{result['eval']['images']} images per variant: the 24 held-out prompts × "
             f"{result['eval']['seeds_per_prompt']} seeds, DPM-Solver++ {settings['steps']} steps, guidance "
             f"{settings['guidance']:g}. Decline = (teacher alignment − variant alignment) / teacher "
             f"alignment; [brackets]: its Wilson 95% interval. PSNR against the teacher's "
             f"image from the same prompt and seed. Whole run "
             f"{result['seconds'] / 60:.1f} min on {result['machine']['cpus']} CPUs ({result['machine']['threads']} "
             f"torch threads).", "",
             f"Teacher: alignment **{judged['alignment']:.3f}** (shape {judged['shape_accuracy']:.3f}, colour "
             f"{judged['colour_accuracy']:.3f}, position {judged['position_accuracy']:.3f}); {teacher['params']:,} "
             f"params, {teacher['macs'] / 1e6:.1f} MMACs.", "",
             "| variant | kind | params removed | MACs removed | alignment | decline | PSNR dB "
             "| shape / colour / position |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for v in variants[1:]:
        a = v["alignment"]
        lines.append(f"| {v['name']} | {v['kind']} | {100 * v['params_ratio']:.1f}% | {100 * v['macs_ratio']:.1f}% | "
                     f"{_ci(a)} | {_pct(v['decline_pct'])} | {v['psnr_db']:.2f} | "
                     f"{a['shape_accuracy']:.2f} / {a['colour_accuracy']:.2f} / {a['position_accuracy']:.2f} |")
    retrained = [v for v in variants if v["kind"] == "retrained"]
    if retrained:
        d = retrained[0]["distill"]
        lines += ["", f"Retraining budget (every retrained row): {d['steps']} steps, batch {d['batch_size']}, AdamW lr "
                  f"{d['lr']:g} cosine, EMA {d['ema_decay']}, on {result['settings']['data_count']} captioned toy "
                  f"training images (seed 1); best baseline at {RETRAIN_RATIO}: **{result['best_baseline']}**.", "",
                  "| retrained | distillation loss before → after (EMA) | alignment | decline | PSNR dB |",
                  "|---|---:|---:|---:|---:|"]
        for v in retrained:
            d = v["distill"]
            start, end = (d.get("eval_start") or {}).get("total"), (d.get("eval_end") or {}).get("total")
            lines.append(f"| {v['name']} | {format_value(start)} → {format_value(end)} | {_ci(v['alignment'])} | "
                         f"{_pct(v['decline_pct'])} | {v['psnr_db']:.2f} |")
    lines += ["", "## The paper's claims, as measured here", "", *claims(result)]
    lines += ["", "Additivity of the output loss (chosen set + random sets of similar cost; L(S) vs Σ single losses):",
              "", "| ratio | sets | Pearson r | Spearman r | L(S) / Σ sᵢ (chosen) |", "|---:|---:|---:|---:|---:|"]
    for v in variants:
        add = v.get("additivity")
        if add:
            lines.append(f"| {v['target_ratio']:g} | {len(add['sets'])} | {format_value(add['pearson'])} | "
                         f"{format_value(add['spearman'])} | {format_value(add['chosen_joint_over_sum'])} |")
    pooled = result["additivity_pooled"]
    lines.append(f"| all sets pooled (r mostly reflects set size) | {pooled['sets']} | "
                 f"{format_value(pooled['pearson'])} | {format_value(pooled['spearman'])} | |")
    return "\n".join(lines) + "\n"


def claims(result: dict[str, Any]) -> list[str]:
    """One line per LAPTOP-Diff claim with the numbers that test it. A difference in alignment is called a
    difference only when the paired (same images) McNemar test gives p < 0.05; otherwise "not resolved"."""
    by_name = {v["name"]: v for v in result["variants"]}
    tests = {(t["first"], t["second"]): t for t in result["paired_tests"]}
    ours_name, base_name = f"output-loss@{RETRAIN_RATIO:g}", result["best_baseline"]
    out = []

    def verdict(first: str, second: str) -> str:
        test = tests.get((first, second))
        if test is None:
            return "not tested"
        a, b = by_name[first]["alignment"]["alignment"], by_name[second]["alignment"]["alignment"]
        p = "p < 0.0001" if test["p"] < 1e-4 else f"p = {test['p']:.2g}"
        split = f"{test['only_first']}:{test['only_second']} images right only with the first:second"
        if test["p"] >= 0.05:
            return f"not resolved (McNemar {p}, {split})"
        return f"{'first' if a > b else 'second'} better (McNemar {p}, {split})"

    ours, base = by_name.get(f"{ours_name} + KD normalized"), by_name.get(f"{base_name} + KD plain")
    if ours and base:
        out.append(f"- Retrained at {RETRAIN_RATIO:g} (paper, on SD-1.5 with PickScore: 4.0% decline for LAPTOP-Diff "
                   f"vs 8.2% for the best baseline; here judge alignment): output-loss + normalized KD "
                   f"{_pct(ours['decline_pct'])} vs {base_name} ({100 * base['params_ratio']:.1f}% of params "
                   f"removed vs {100 * ours['params_ratio']:.1f}%) + plain KD {_pct(base['decline_pct'])} — "
                   f"{verdict(ours['name'], base['name'])}.")
    for name in (ours_name, base_name):
        l2, plain = by_name.get(f"{name} + KD normalized"), by_name.get(f"{name} + KD plain")
        if l2 and plain:
            out.append(f"- Normalized vs plain feature KD on {name}: alignment {_ci(l2['alignment'])} vs "
                       f"{_ci(plain['alignment'])}, PSNR {l2['psnr_db']:.2f} vs {plain['psnr_db']:.2f} dB — "
                       f"{verdict(l2['name'], plain['name'])}.")
    one_shot = [v for v in result["variants"] if v["kind"] == "one-shot"]
    for ratio in sorted({v["target_ratio"] for v in one_shot}):
        rows = sorted((v for v in one_shot if v["target_ratio"] == ratio),
                      key=lambda v: (-v["alignment"]["alignment"], -v["psnr_db"]))
        ours = next((v for v in rows if v["criterion"] == "output-loss"), None)
        line = f"- One-shot at {ratio:g}, best first: " + ", ".join(
            f"{v['criterion']} {v['alignment']['alignment']:.3f} / {v['psnr_db']:.1f} dB" for v in rows)
        if ours is not None and len(rows) > 1:
            runner = next(v for v in rows if v is not ours)
            line += f" — output-loss vs {runner['criterion']}: {verdict(ours['name'], runner['name'])}"
        out.append(line + ".")
    per_ratio = [(v["target_ratio"], v["additivity"]["pearson"]) for v in one_shot if v.get("additivity")]
    if per_ratio:
        rs = [r for _, r in per_ratio if r is not None]
        held = bool(rs) and len(rs) == len(per_ratio) and min(rs) >= 0.9
        out.append("- Additivity (the output loss of a set ≈ the sum of its units' losses; the issue's target: "
                   "Pearson r ≥ 0.9 at each ratio): " + ", ".join(f"r = {format_value(r, '.3f')} at {t:g}"
                                                                 for t, r in per_ratio)
                   + f" — {'holds' if held else 'not at every ratio'}; mean L(S)/Σsᵢ over all sets "
                   f"{format_value(result['additivity_pooled']['mean_joint_over_sum'], '.3f')}.")
    return out


def _ci(judged: dict[str, Any]) -> str:
    """Alignment and its Wilson 95% interval."""
    low, high = judged["alignment_95"]
    return f"{judged['alignment']:.3f} [{low:.2f}, {high:.2f}]"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}%"


def plots(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for criterion in result["settings"]["criteria"]:
        rows = sorted((v for v in variants if v["kind"] == "one-shot" and v["criterion"] == criterion),
                      key=lambda v: v["params_ratio"])
        xs = [100 * v["params_ratio"] for v in rows]
        axes[0].plot(xs, [v["decline_pct"] for v in rows], "o-", label=criterion)
        axes[1].plot(xs, [v["psnr_db"] for v in rows], "o-", label=criterion)
    for v in variants:
        if v["kind"] in ("preset", "retrained"):
            marker = "s" if v["kind"] == "preset" else "*"
            for axis, key in ((axes[0], "decline_pct"), (axes[1], "psnr_db")):
                axis.plot([100 * v["params_ratio"]], [v[key]], marker, markersize=9, label=v["name"])
    axes[0].set(xlabel="params removed (%)", ylabel="alignment decline vs teacher (%)", title="quality lost")
    axes[1].set(xlabel="params removed (%)", ylabel="PSNR vs teacher (dB)", title="fidelity to the teacher")
    for v in variants:
        add = v.get("additivity")
        if add:
            sets = add["sets"]
            axes[2].scatter([s["summed"] for s in sets], [s["joint"] for s in sets],
                            label=f"ratio {v['target_ratio']:g} (r = {format_value(add['pearson'])})")
    axes[2].set(xlabel="Σ single-unit output losses", ylabel="joint output loss L(S)", title="additivity",
                xscale="log", yscale="log")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_png(samples: tuple[np.ndarray, list[str]], path: Path) -> None:
    """One row of images per variant, labelled, 3× nearest-neighbour upscaled."""
    from PIL import Image, ImageDraw

    images, names = samples
    label = 200
    rows, count, size = images.shape[0], images.shape[1], images.shape[2] * 3
    canvas = Image.new("RGB", (label + count * (size + 2), rows * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((4, r * (size + 2) + size // 2 - 6), name, fill="black")
        for c in range(count):
            tile = Image.fromarray(images[r, c]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label + c * (size + 2), r * (size + 2)))
    canvas.save(path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ratio 0.5, 48 images, 40 distillation steps")
    parser.add_argument("--ratios", type=float, nargs="+")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--presets", nargs="*", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--per-prompt", type=int, help="seeds per held-out prompt (24 prompts)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps (default: the teacher's)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance (default: the teacher's)")
    parser.add_argument("--calib", type=int, help="calibration images for scoring")
    parser.add_argument("--additivity-sets", type=int, help="random sets per ratio for the additivity check")
    parser.add_argument("--distill-steps", type=int, help="retraining budget in steps (0: no retraining)")
    parser.add_argument("--distill-batch", type=int)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--distill-ema", type=float, default=0.99)
    parser.add_argument("--data-count", type=int, help="captioned toy images to retrain on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--name", help="file stem (default bench_quality, bench_quality_quick or "
                                       "bench_quality_matched)")
    parser.add_argument("--matched-macs", action="store_true",
                        help="only the matched-compute comparison: output-loss --cost macs at each preset's MAC "
                             "ratio vs the preset (benchmarks/quality_matched.py)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not all(0 < r < 1 for r in args.ratios) or min(args.per_prompt, args.calib, args.data_count) < 1 \
            or args.distill_steps < 0 or args.steps < 1 or args.additivity_sets < 0 or args.distill_batch < 1 \
            or (args.threads is not None and args.threads < 1):
        parser.error("ratios must lie in (0, 1); --per-prompt, --calib, --data-count, --distill-batch, --threads, "
                     "--steps ≥ 1; --distill-steps, --additivity-sets ≥ 0")
    try:  # every failure that can be foreseen, before minutes of work
        import matplotlib  # noqa: F401  (the plots; in the dev extra)
    except ImportError:
        parser.error("the plots need matplotlib: pip install -e '.[dev]'")
    from laptop_deploy.errors import LaptopDeployError

    try:
        if args.distill_steps:
            distill_options(args, "l2").validate()
    except LaptopDeployError as exc:
        parser.error(str(exc))
    args.name = args.name or ("bench_quality_matched" if args.matched_macs else
                              "bench_quality_quick" if args.quick else "bench_quality")
    args.argv = argv
    return args


def distill_options(args: argparse.Namespace, feature_norm: str):
    """The one retraining budget every retrained variant gets."""
    from laptop_deploy.distill.options import DistillOptions

    return DistillOptions(steps=args.distill_steps, batch_size=args.distill_batch, lr=args.distill_lr,
                          lr_schedule="cosine", warmup_steps=max(1, args.distill_steps // 20),
                          feature_norm=feature_norm, ema_decay=args.distill_ema, seed=args.seed,
                          checkpoint_every=10**9, eval_samples=8)


def main(argv: list[str] | None = None) -> int:
    from laptop_deploy.errors import LaptopDeployError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matched_macs:
        return _matched(args)
    try:
        result = run(args)
    except LaptopDeployError as exc:
        print(f"bench_quality: error: {exc}", file=sys.stderr)
        return 2
    samples = result.pop("_samples")
    text = markdown(result)
    # all four files are written aside and moved into place together: no half-written result set
    args.out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.name}-", dir=args.out_dir))
    try:
        (staging / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (staging / f"{args.name}.md").write_text(text)
        plots(result, staging / f"{args.name}.png")
        sample_png(samples, staging / f"{args.name}_samples.png")
        for path in staging.iterdir():
            path.replace(args.out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(text)
    return 0


def _matched(args: argparse.Namespace) -> int:
    from quality_matched import matched_markdown, run_matched  # benchmarks/ is on sys.path

    result = run_matched(args)
    text = matched_markdown(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
