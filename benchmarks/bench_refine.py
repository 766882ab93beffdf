"""One-shot vs interaction-aware refinement (``prune --refine``) on the toy teacher, under calibration draws.

For every ratio × cost unit × calibration source × calibration seed, one ``plan_pruning(..., refine=R)`` gives the
knapsack's one-shot set and the refined set (the plan records both, every round, joint output losses and forward
passes); both students are judged one-shot (no retraining) on the ``--sweep-per-prompt`` × 24 held-out prompts.
Calibration sources:

* ``noise`` — the CLI default: 8 N(0, I) latents, the built-in prompts, timesteps uniform over training's 1000;
* ``images`` — deployment-matched: ``--calib`` toy images (seed 2) conditioned on their own captions, timesteps
  from the teacher's 20-step DPM-Solver++ schedule (``prune --images DIR --steps 20``).

Headline (``--per-prompt`` × 24 images; 240 by default): at ratio 0.5 of params with the ``images`` source, seed 0,
the one-shot and the refined students and iterative greedy (``bench_prune.greedy``) on the same calibration (part
``headline``); the one-shot and refined sets each retrained under bench_quality's 400-step budget, normalized feature
KD (part ``retrain``; ``--retrain-only`` splits it over two processes). The parts run as separate processes with one
torch thread each (on a busy 2-core machine, two threads per process spin and run slower than one).

    python benchmarks/bench_refine.py --part sweep --threads 1                 # 0.5 of params, 5 seeds, then the rest
    python benchmarks/bench_refine.py --part sweep --seeds 0 --other-seeds 2 --name bench_refine_sweep_other
    python benchmarks/bench_refine.py --part headline --per-prompt 2 --threads 1
    python benchmarks/bench_refine.py --part retrain --per-prompt 2 --threads 1 [--retrain-only refined --name ...]
    python benchmarks/bench_refine.py --part sweep --quick                     # 0.5 params, 2 seeds: minutes

writes benchmarks/results/<name>.json and .md (default name bench_refine_<part>), rewritten after every row, so a
run that is stopped still leaves what it measured (the .md then says it is incomplete).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import Bench, Variant, _say, distill_options  # noqa: E402  (the shared toy harness)
from laptop_deploy.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SOURCES = ("noise", "images")
FULL = {"ratios": [0.5, 0.7], "costs": ["params", "macs"], "seeds": 5, "other_seeds": 3, "per_prompt": 10,
        "sweep_per_prompt": 1, "distill_steps": 400}
QUICK = {"ratios": [0.5], "costs": ["params"], "seeds": 2, "other_seeds": 1, "per_prompt": 1, "sweep_per_prompt": 1,
         "distill_steps": 0}
PARTS = ("sweep", "headline", "retrain")  # three processes side by side on a shared machine, one thread each


def plan_options(args: argparse.Namespace, bench: Bench, source: str, **choice: Any):
    from laptop_deploy.prune.plan import PruneOptions

    if source == "noise":
        return PruneOptions(calib=8, batch_size=8, additivity_sets=0, **choice)
    return PruneOptions(calib=args.calib, batch_size=args.calib, images=bench.calib_images, steps=args.steps,
                        additivity_sets=0, **choice)


class Sweep:
    """The judged one-shot students on the small held-out set; identical removal sets are judged once."""

    def __init__(self, bench: Bench, per_prompt: int) -> None:
        from laptop_deploy.toy.evaluate import eval_pairs, judge_model

        self.bench, self.pairs = bench, eval_pairs(per_prompt=per_prompt)
        self.teacher = judge_model(bench.teacher, bench.teacher.unet, self.pairs, steps=bench.args.steps,
                                   guidance=bench.args.guidance)
        self.cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def judge(self, removed: list[str]) -> dict[str, Any]:
        import copy

        from laptop_deploy.models.student import make_student
        from laptop_deploy.toy.evaluate import judge_model

        key = tuple(sorted(removed))
        if key not in self.cache:
            student = make_student(copy.deepcopy(self.bench.teacher.unet), list(removed))
            judged = judge_model(self.bench.teacher, student, self.pairs, steps=self.bench.args.steps,
                                 guidance=self.bench.args.guidance)
            row = judged.row(self.teacher)
            self.cache[key] = {k: row[k] for k in ("alignment", "alignment_95", "decline_pct", "psnr_db")}
        return self.cache[key]


def sweep_row(args: argparse.Namespace, bench: Bench, sweep: Sweep, ratio: float, cost: str, source: str,
              seed: int) -> dict[str, Any]:
    from laptop_deploy.prune.plan import plan_pruning

    started = time.perf_counter()
    plan = plan_pruning(bench.teacher, plan_options(args, bench, source, ratio=ratio, cost=cost, seed=seed,
                                                    refine=args.refine))
    r = plan.refinement
    row = {"ratio": ratio, "cost": cost, "source": source, "seed": seed, "ratio_achieved": plan.totals()["ratio_achieved"],
           "one_shot": {"removed": r["one_shot"], "joint": r["one_shot_joint"], "passes": r["one_shot_passes"],
                        **sweep.judge(r["one_shot"])},
           "refined": {"removed": r["final"], "joint": r["final_joint"], "passes": r["total_passes"],
                       **sweep.judge(r["final"])},
           "rounds": [{k: x[k] for k in ("index", "accepted", "joint", "passes")} for x in r["rounds"]],
           "stopped": r["stopped"], "seconds": round(time.perf_counter() - started, 1)}
    _say(f"{ratio:g} {cost} {source} seed {seed}: one-shot {row['one_shot']['alignment']:.3f} "
         f"(L {r['one_shot_joint']:.4g}, {r['one_shot_passes']} passes) -> refined {row['refined']['alignment']:.3f} "
         f"(L {r['final_joint']:.4g}, {r['total_passes']} passes) [{row['seconds']:.0f} s]")
    return row


def headline(args: argparse.Namespace, bench: Bench, result: dict[str, Any], save) -> None:
    """``--per-prompt`` held-out set at 0.5 params, images source, seed 0: one-shot, refined and greedy judged
    (part ``headline``), or the one-shot and refined sets retrained and judged (part ``retrain``)."""
    from bench_prune import greedy

    from laptop_deploy.prune.plan import plan_pruning
    from laptop_deploy.prune.calibration import build_calibration
    from laptop_deploy.prune.scoring import Scorer

    plan = plan_pruning(bench.teacher, plan_options(args, bench, "images", ratio=0.5, cost="params", seed=0,
                                                    refine=args.refine))
    r = plan.refinement
    out = result["headline"] = {"refinement": r}
    import copy

    from laptop_deploy.models.student import make_student

    one = Variant("one-shot@0.5", "one-shot", criterion="output-loss", target_ratio=0.5,
                  removed=list(r["one_shot"]), joint_output_loss=r["one_shot_joint"])
    refined = Variant(f"refined@0.5 (--refine {args.refine})", "refined", criterion="output-loss",
                      target_ratio=0.5, removed=list(r["final"]), joint_output_loss=r["final_joint"])
    if args.part == "retrain":  # the third process: the same two sets, retrained under one budget
        for base in (one, refined):
            if args.retrain_only in (None, base.kind):
                bench.retrain(base, "l2")
                save()
        return
    for variant in (one, refined):
        bench.judge(variant, make_student(copy.deepcopy(bench.teacher.unet), list(variant.removed)))
        save()
    inv = bench.inventory
    candidates = [e.layer for e in inv.prunable]
    cost_of = {e.layer.name: e.layer.params for e in inv.prunable}
    options = plan_options(args, bench, "images", ratio=0.5, seed=0)
    calib = build_calibration(bench.teacher, count=options.calib, seed=0, images=options.images, steps=options.steps)
    scorer = Scorer(bench.teacher.unet, calib, batch_size=options.batch_size)
    started = time.perf_counter()
    chosen = greedy(scorer, candidates, cost_of, inv.total_params, 0.5)
    out["greedy"] = {"passes": scorer.forward_passes, "seconds": round(time.perf_counter() - started, 1),
                     "joint": scorer.output_loss(chosen), "removed": [x.name for x in chosen]}
    bench.judge(Variant("greedy@0.5", "greedy", criterion="output-loss", target_ratio=0.5,
                        removed=out["greedy"]["removed"], joint_output_loss=out["greedy"]["joint"]),
                make_student(copy.deepcopy(bench.teacher.unet), out["greedy"]["removed"]))
    save()


def run(args: argparse.Namespace, save_to) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_refine.py", *args.argv]).strip(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "out_dir", "name")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_start": os.getloadavg()},
        "sweep": [], "variants": []}

    def save() -> None:
        result["machine"]["load_now"] = os.getloadavg()
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["variants"] = [v.__dict__ for v in bench.variants]
        save_to(result)

    with tempfile.TemporaryDirectory(prefix="bench-refine-") as tmp:
        if args.part != "retrain":
            args.data_count = 1  # no retraining in this part: the retraining images are not needed
        bench = Bench(args, Path(tmp))
        if args.part in ("headline", "retrain"):
            bench.judge(Variant("teacher", "teacher"), bench.teacher.unet)
            headline(args, bench, result, save)
        else:
            sweep = Sweep(bench, args.sweep_per_prompt)
            result["sweep_teacher_alignment"] = sweep.teacher.alignment.score
            # the target configuration first with every seed, then the others with fewer
            order = sorted(((r, c) for r in args.ratios for c in args.costs), key=lambda x: x != (0.5, "params"))
            for ratio, cost in order:
                seeds = args.seeds if (ratio, cost) == (0.5, "params") else args.other_seeds
                for source in args.sources:
                    for seed in range(seeds):
                        result["sweep"].append(sweep_row(args, bench, sweep, ratio, cost, source, seed))
                        save()
        result["done"] = True
        save()
    return result


# -- report ----------------------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (ratio, cost, source): alignment mean/min over seeds, mean joint loss, mean passes, distinct sets."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["cost"], row["source"]), []).append(row)
    out = []
    for (ratio, cost, source), group in groups.items():
        entry = {"ratio": ratio, "cost": cost, "source": source, "seeds": len(group)}
        for kind in ("one_shot", "refined"):
            align = [g[kind]["alignment"] for g in group]
            entry[kind] = {"alignment_mean": sum(align) / len(align), "alignment_min": min(align),
                           "joint_mean": sum(g[kind]["joint"] for g in group) / len(group),
                           "joint_max": max(g[kind]["joint"] for g in group),
                           "passes_mean": sum(g[kind]["passes"] for g in group) / len(group),
                           "distinct_sets": len({tuple(sorted(g[kind]["removed"])) for g in group})}
        out.append(entry)
    return out


def markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = ["# One-shot vs refined selection on the toy teacher", "", f"`{result['command']}`", "",
             f"Whole run {result['seconds'] / 60:.1f} min on {m['cpus']} CPUs ({m['threads']} torch threads); load "
             f"average at start {m['load_start'][0]:.1f}, at the last write {m['load_now'][0]:.1f}"
             + (" — **the machine was busy (shared); times are not comparable, pass counts are**"
                if max(m['load_start'][0], m['load_now'][0]) > (m['cpus'] or 1) else "") + "."
             + ("" if result.get("done") else " **Incomplete: the run was stopped before the end; rows present "
                "are final.**"), "",
             f"Refinement: `--refine {s['refine']}` (each round: one pass per candidate for the marginals, then the "
             f"re-solved set and up to 2 swaps, one pass each; stops early when no proposal lowers the measured "
             f"joint loss). One-shot passes = teacher + one per candidate + the joint loss of the set.", "",
             f"Calibration sources: **noise** = the CLI default (8 N(0, I) latents, built-in prompts, timesteps "
             f"uniform over training's); **images** = {s['calib']} toy images with their own captions, timesteps from "
             f"the teacher's {s['steps']}-step sampler schedule (`--images DIR --steps {s['steps']}`)."]
    if result["sweep"]:
        lines += sweep_markdown(result)
    return headline_markdown(result, lines)


def sweep_markdown(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = ["", f"## Seed sweep ({s['seeds']} calibration seeds at 0.5 of params, {s['other_seeds']} elsewhere; judged "
             f"on {24 * s['sweep_per_prompt']} held-out images per student (one seed per held-out prompt) — cut "
             f"from 240 to fit the shared machine; the teacher scores "
             f"{result.get('sweep_teacher_alignment', 0):.3f} on the same images)", "",
             "| ratio | cost | source | alignment one-shot mean / min | refined mean / min | joint loss one-shot "
             "mean (max) | refined mean (max) | passes one-shot | refined (total) | distinct sets one-shot / "
             "refined |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary(result["sweep"]):
        o, r = e["one_shot"], e["refined"]
        lines.append(f"| {e['ratio']:g} | {e['cost']} | {e['source']} | {o['alignment_mean']:.3f} / "
                     f"{o['alignment_min']:.3f} | {r['alignment_mean']:.3f} / {r['alignment_min']:.3f} | "
                     f"{o['joint_mean']:.4g} ({o['joint_max']:.4g}) | {r['joint_mean']:.4g} ({r['joint_max']:.4g}) | "
                     f"{o['passes_mean']:.0f} | {r['passes_mean']:.0f} | {o['distinct_sets']} / {r['distinct_sets']} |")
    lines += ["", "Per seed:", "", "| ratio | cost | source | seed | one-shot alignment | L | refined alignment | L | "
              "passes | rounds (accepted, L) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["sweep"]:
        o, r = row["one_shot"], row["refined"]
        rounds = "; ".join(f"{x['accepted'] or 'none'} {x['joint']:.3g}" for x in row["rounds"])
        lines.append(f"| {row['ratio']:g} | {row['cost']} | {row['source']} | {row['seed']} | {o['alignment']:.3f} | "
                     f"{o['joint']:.4g} | {r['alignment']:.3f} | {r['joint']:.4g} | {o['passes']} → {r['passes']} "
                     f"| {rounds} |")
    return lines


def headline_markdown(result: dict[str, Any], lines: list[str]) -> str:
    s = result["settings"]
    if result["variants"]:
        lines += ["", f"## Headline: 0.5 of params, images calibration, seed 0, {24 * s['per_prompt']} held-out "
                  "images", "", "| variant | params removed | MACs removed | joint output loss | alignment "
                  "[Wilson 95%] | decline | PSNR dB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for v in result["variants"]:
            a = v["alignment"]
            lines.append(f"| {v['name']} | {100 * v['params_ratio']:.1f}% | {100 * v['macs_ratio']:.1f}% | "
                         f"{v['joint_output_loss'] if v['joint_output_loss'] is None else format(v['joint_output_loss'], '.4g')} | "
                         f"{a['alignment']:.3f} [{a['alignment_95'][0]:.2f}, {a['alignment_95'][1]:.2f}] | "
                         f"{'—' if v['decline_pct'] is None else format(v['decline_pct'], '+.1f') + '%'} | "
                         f"{'—' if v['psnr_db'] is None else format(v['psnr_db'], '.2f')} |")
        h = result.get("headline", {})
        if "refinement" in h:
            ref = h["refinement"]
            lines += ["", f"Forward passes: one-shot {ref['one_shot_passes']}, refined {ref['total_passes']}"
                      + (f", greedy {h['greedy']['passes']}" if "greedy" in h else "") + f". Rounds: "
                      + "; ".join(f"{x['index']}: {x['accepted'] or 'none accepted'} → L {x['joint']:.4g} "
                                  f"({x['passes']} passes)" for x in ref["rounds"]) + "."]
        retrained = [v for v in result["variants"] if v["kind"] == "retrained"]
        if retrained:
            d = retrained[0]["distill"]
            lines += ["", f"Retrained rows: {d['steps']} steps, batch {d['batch_size']}, AdamW lr {d['lr']:g} "
                      f"cosine, EMA {d['ema_decay']}, normalized feature KD (bench_quality's budget)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.5 params, 2 seeds, 48 images, no retraining")
    parser.add_argument("--ratios", type=float, nargs="+")
    parser.add_argument("--costs", nargs="+", choices=("params", "macs"))
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--part", choices=PARTS, required=True, help="the seed sweep or the headline comparison")
    parser.add_argument("--seeds", type=int, help="calibration seeds 0..K-1 at ratio 0.5 of params")
    parser.add_argument("--other-seeds", type=int, help="calibration seeds at the other ratio / cost pairs")
    parser.add_argument("--retrain-only", choices=("one-shot", "refined"),
                        help="part retrain: only this set (two processes side by side halve the wall time)")
    parser.add_argument("--refine", type=int, default=2, help="refinement rounds (default 2)")
    parser.add_argument("--per-prompt", type=int, help="seeds per held-out prompt for the headline (24 prompts)")
    parser.add_argument("--sweep-per-prompt", type=int, help="seeds per held-out prompt in the seed sweep")
    parser.add_argument("--calib", type=int, default=32, help="toy images for the images source")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--distill-steps", type=int)
    parser.add_argument("--distill-batch", type=int, default=32)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--distill-ema", type=float, default=0.99)
    parser.add_argument("--data-count", type=int, default=1920)
    parser.add_argument("--seed", type=int, default=0, help="retraining seed")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.refine < 1 or min(args.seeds, args.other_seeds) < 0 or min(args.per_prompt, args.sweep_per_prompt,
                                                                       args.calib) < 1:
        parser.error("--refine, --per-prompt, --sweep-per-prompt and --calib must be ≥ 1, --seeds and "
                     "--other-seeds ≥ 0 (0 skips those configurations)")
    if args.distill_steps:
        distill_options(args, "l2").validate()
    args.name = args.name or f"bench_refine_{args.part}" + ("_quick" if args.quick else "")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save_to(result: dict[str, Any]) -> None:
        for suffix, text in ((".json", json.dumps(result, indent=2, default=str) + "\n"), (".md", markdown(result))):
            staging = args.out_dir / f".{args.name}{suffix}.tmp"
            staging.write_text(text)
            staging.replace(args.out_dir / f"{args.name}{suffix}")

    result = run(args, save_to)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
