"""Equal measured latency on the toy teacher: LAPTOP-Diff with ``--cost latency`` against BK-SDM-Small and against
``--cost params``, one-shot and after the same retraining, judged like ``bench_quality.py`` (held-out alignment,
decline, PSNR against the teacher, paired McNemar tests on the same images).

1. profile the toy teacher in eager PyTorch (latency table, hooks on the units ``Removed`` replaces);
2. BK-SDM-Small's student: its latency measured against the teacher (interleaved rounds) gives the budget
   ``R = 1 − measured ratio``;
3. LAPTOP-Diff ``--cost latency --ratio R`` (the knapsack in measured ms), and ``--cost params`` at the params ratio
   whose *predicted* latency lands closest to BK-SDM-Small's measured one (same output-loss scores);
4. teacher and the three students timed again, interleaved, to confirm the latencies match; judged one-shot; then
   each retrained with the same budget (normalized feature KD) and judged again.

    python benchmarks/bench_latency_toy.py [--per-prompt 4] [--distill-steps 150] [--threads 1]

writes benchmarks/results/bench_latency_toy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

import bench_quality as bq
from sd15_students import RESULTS, busy_warning, load_average, say, torch_runner


def _spec(bench):
    from laptop_deploy.deploy.spec import build_spec

    h, w = bench.inventory.latent_size
    return build_spec(bench.teacher.unet.config, batch=2, height=h, width=w)  # guidance doubles the batch


def _params_at_latency(bench, scores, table, target_ratio: float) -> tuple[float, list[str]]:
    """The ``--cost params`` ratio (0.01 grid) whose knapsack set is predicted closest to ``target_ratio``."""
    from laptop_deploy.deploy.profile import predicted_ms
    from laptop_deploy.prune.plan import select_layers

    inv = bench.inventory
    layers = [e.layer for e in inv.prunable]
    cost_of = {e.layer.name: e.layer.params for e in inv.prunable}
    reachable = sum(cost_of.values()) / inv.total_params
    best = None
    for step in range(1, int(reachable * 100)):
        ratio = step / 100
        removed = [x.name for x in select_layers(layers, scores, cost_of, inv.total_params, ratio, [])]
        gap = abs(predicted_ms(table, removed) / table.step - target_ratio)
        if best is None or gap < best[0] - 1e-9:
            best = (gap, ratio, removed)
    return best[1], best[2]


def run(args: argparse.Namespace) -> dict:
    from laptop_deploy.deploy.profile import ProfileOptions, measure_interleaved, predicted_ms, profile_unet

    before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-latency-toy-") as tmp:
        bench = bq.Bench(args, Path(tmp))
        unet = bench.teacher.unet
        spec = _spec(bench)
        h, w = bench.inventory.latent_size
        say("profiling the toy teacher in torch")
        table = profile_unet(unet, model=bench.teacher.describe(),
                             options=ProfileOptions(runtime="torch", latent_size=(h, w), batch=2, repeats=args.repeats))
        feeds = spec.example_feeds(seed=0)
        bench.judge(bq.Variant("teacher", "teacher"), unet)
        bk = bench.plan(preset="bk-sdm-small", additivity_sets=0)
        first = measure_interleaved({"teacher": lambda: torch_runner(unet, spec, []),
                                     "bk-sdm-small": lambda: torch_runner(unet, spec, bk.removed)}, feeds,
                                    repeats=args.repeats, calls=args.calls)
        budget = first["bk-sdm-small"]["median_ms"] / first["teacher"]["median_ms"]
        say(f"BK-SDM-Small measures {budget:.3f}x the teacher: the latency budget is {1 - budget:.3f}")
        ours = bench.plan(ratio=round(1 - budget, 4), cost="latency", latency_table=table, batch=2,
                          additivity_sets=0)
        p_ratio, p_removed = _params_at_latency(bench, ours.scores, table, budget)
        params_plan = SimpleNamespace(removed=p_removed, joint_output_loss=None, scoring_seconds=0.0, additivity=None)
        sets = {"teacher": [], "bk-sdm-small": bk.removed, "output-loss cost=latency": ours.removed,
                f"output-loss cost=params@{p_ratio:g}": p_removed}
        say("timing teacher and the three students, interleaved")
        times = measure_interleaved({k: (lambda r=v: torch_runner(unet, spec, r)) for k, v in sets.items()}, feeds,
                                    repeats=args.repeats, calls=args.calls)
        bases = [bench.one_shot("bk-sdm-small", "preset", bk, criterion=None, ratio=None),
                 bench.one_shot("output-loss cost=latency", "one-shot", ours, criterion="output-loss",
                                ratio=round(1 - budget, 4)),
                 bench.one_shot(f"output-loss cost=params@{p_ratio:g}", "one-shot", params_plan,
                                criterion="output-loss", ratio=p_ratio)]
        if args.distill_steps:
            for base in bases:
                bench.retrain(base, "l2")
        tests = [bench.paired(a, b) for a, b in (
            ("output-loss cost=latency", "bk-sdm-small"),
            ("output-loss cost=latency", f"output-loss cost=params@{p_ratio:g}"),
            ("output-loss cost=latency + KD normalized", "bk-sdm-small + KD normalized"),
            ("output-loss cost=latency + KD normalized", f"output-loss cost=params@{p_ratio:g} + KD normalized"))]
    teacher_ms = times["teacher"]["median_ms"]
    latency = {k: {**v, "ratio": round(v["median_ms"] / teacher_ms, 4),
                   "predicted_ratio": round(predicted_ms(table, sets[k]) / table.step, 4)} for k, v in times.items()}
    after = load_average()
    return {"command": "python benchmarks/bench_latency_toy.py " + " ".join(args.argv), "threads": args.threads,
            "batch": 2, "latent": [h, w], "budget_from_bk_sdm_small": round(1 - budget, 4),
            "bk_sdm_small_first_measure": first, "latency": latency, "params_ratio_at_equal_latency": p_ratio,
            "table_step_ms": table.step_ms, "table_method": table.method,
            "variants": [asdict(v) for v in bench.variants], "paired_tests": [t for t in tests if t],
            "eval": {"images": len(bench.pairs), "per_prompt": args.per_prompt, "steps": args.steps},
            "distill": {"steps": args.distill_steps, "batch": args.distill_batch, "lr": args.distill_lr,
                        "feature_norm": "l2"},
            "load_average": {"before": before, "after": after},
            "warning": busy_warning(before, after, os.cpu_count() or 1),
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(data: dict) -> str:
    lines = ["# Equal measured latency on the toy teacher: --cost latency vs BK-SDM-Small vs --cost params", "",
             f"Command: `{data['command']}` ({data['seconds']} s)", ""]
    if data.get("warning"):
        lines += [f"**{data['warning']}**", ""]
    lines += [f"Latency: eager PyTorch CPU, {data['threads']} thread(s), batch {data['batch']} (classifier-free "
              f"guidance), latent {data['latent'][0]}x{data['latent'][1]}; teacher and students interleaved "
              f"({len(next(iter(data['latency'].values()))['rounds_ms'])} rounds). Budget: BK-SDM-Small's measured "
              f"latency → `--ratio {data['budget_from_bk_sdm_small']}` with `--cost latency`; `--cost params` at "
              f"{data['params_ratio_at_equal_latency']} (predicted closest to the same latency). Quality: "
              f"{data['eval']['images']} held-out images ({data['eval']['per_prompt']} seeds × 24 prompts); "
              f"retraining: {data['distill']['steps']} steps, batch {data['distill']['batch']}, normalized KD, "
              f"the same for every student.", "",
              "| variant | latency × teacher (min–max) | predicted × | params removed | MACs removed | alignment | "
              "decline | PSNR dB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in data["variants"]:
        base = v["name"].replace(" + KD normalized", "")
        lat = data["latency"].get(base)
        if lat:
            t = data["latency"]["teacher"]["median_ms"]
            span = f"{lat['ratio']:.3f} ({lat['min_ms'] / t:.3f}–{lat['max_ms'] / t:.3f})"
            pred = f"{lat['predicted_ratio']:.3f}"
        else:
            span, pred = "", ""
        psnr = "" if v["psnr_db"] is None else f"{v['psnr_db']:.2f}"
        decline = "" if v["decline_pct"] is None else f"{v['decline_pct']:+.1f}%"
        lines.append(f"| {v['name']} | {span} | {pred} | {v['params_ratio']:.1%} | {v['macs_ratio']:.1%} | "
                     f"{v['alignment']['alignment']:.3f} | {decline} | {psnr} |")
    lines += ["", "Paired exact McNemar tests on the same images (first vs second):", ""]
    for t in data["paired_tests"]:
        lines.append(f"- {t['first']} vs {t['second']}: " + ", ".join(
            f"{k} {v}" for k, v in t.items() if k not in ("first", "second")))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--distill-batch", type=int, default=16)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    own = parser.parse_args(argv if argv is not None else sys.argv[1:])
    quality = ["--quick", "--per-prompt", str(own.per_prompt), "--calib", str(own.calib), "--distill-steps",
               str(own.distill_steps), "--distill-batch", str(own.distill_batch), "--threads", str(own.threads)]
    args = bq.parse_args(quality)
    for key in ("repeats", "calls", "out_dir"):
        setattr(args, key, getattr(own, key))
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(own.threads)
    data = run(args)
    own.out_dir.mkdir(parents=True, exist_ok=True)
    (own.out_dir / "bench_latency_toy.json").write_text(json.dumps(data, indent=2) + "\n")
    (own.out_dir / "bench_latency_toy.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
