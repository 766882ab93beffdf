"""One-shot LAPTOP-Diff scoring vs an iterative greedy baseline: wall time, forward passes, and the loss reached.

Greedy: remove the single layer with the lowest output loss given what is already removed, re-score the rest,
repeat until the target ratio is reached (N + (N−1) + … passes). One-shot: score every layer alone once (N + 1
passes), then the exact knapsack. Both use the same calibration batch and run in this one process, so their
times compare; the joint output loss of each final set says what the extra passes buy.

    .venv/bin/python benchmarks/bench_prune.py --models random:tiny-sd15 random:sd15 --sd15-latent 32

writes benchmarks/results/bench_prune.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from laptop_deploy.prune.calibration import build_calibration
from laptop_deploy.models.inventory import build_inventory
from laptop_deploy.prune.plan import select_layers
from laptop_deploy.prune.scoring import Scorer, ScoringContext, output_loss
from laptop_deploy.models.sources import resolve_model


def greedy(scorer: Scorer, candidates, cost_of, total: int, ratio: float):
    """Iterative greedy removal; returns the removed layers (in removal order)."""
    removed, removed_cost = [], 0
    remaining = list(candidates)
    while removed_cost < ratio * total and remaining:
        losses = {layer.name: scorer.output_loss(removed + [layer]) for layer in remaining
                  if removed_cost + cost_of[layer.name] <= total}
        best = min(remaining, key=lambda layer: (losses[layer.name], layer.name))
        removed.append(best)
        removed_cost += cost_of[best.name]
        remaining.remove(best)
    return removed


def bench(spec: str, *, ratio: float, calib: int, latent: int | None) -> dict:
    source = resolve_model(spec)
    size = (latent, latent) if latent else None
    inv = build_inventory(source.unet, latent_size=size)
    candidates = [e.layer for e in inv.prunable]
    cost_of = {e.layer.name: e.layer.params for e in inv.prunable}
    calibration = build_calibration(source, count=calib, latent_size=size)
    rows = {}
    for method in ("one-shot", "greedy"):
        scorer = Scorer(source.unet, calibration, batch_size=calib)
        start = time.perf_counter()
        if method == "one-shot":
            scores = output_loss(ScoringContext(scorer), candidates)
            chosen = select_layers(candidates, scores, cost_of, inv.total_params, ratio, [])
        else:
            chosen = greedy(scorer, candidates, cost_of, inv.total_params, ratio)
        seconds = time.perf_counter() - start
        passes = scorer.forward_passes
        rows[method] = {"seconds": round(seconds, 2), "forward_passes": passes,
                        "ratio_achieved": round(sum(cost_of[x.name] for x in chosen) / inv.total_params, 4),
                        "joint_output_loss": scorer.output_loss(chosen), "removed": [x.name for x in chosen]}
        print(f"  {spec} {method}: {seconds:.1f} s, {passes} passes", file=sys.stderr)
    return {"model": spec, "candidates": len(candidates), "latent": list(inv.latent_size),
            "calibration_samples": calib, **{f"{m}": r for m, r in rows.items()},
            "time_ratio_greedy_over_one_shot": round(rows["greedy"]["seconds"] / rows["one-shot"]["seconds"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["random:tiny-sd15", "random:sd15"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=2, help="samples in the one calibration batch")
    parser.add_argument("--sd15-latent", type=int, default=32, help="latent size for full-size models")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_prune.json")
    args = parser.parse_args()
    results = [bench(spec, ratio=args.ratio, calib=args.calib,
                     latent=None if "tiny" in spec else args.sd15_latent) for spec in args.models]
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "ratio": args.ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print("| model | latent | N | method | passes | time (s) | ratio | joint output loss |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        for method in ("one-shot", "greedy"):
            row = r[method]
            print(f"| {r['model']} | {r['latent'][0]}x{r['latent'][1]} | {r['candidates']} | {method} | "
                  f"{row['forward_passes']} | {row['seconds']} | {row['ratio_achieved']} | "
                  f"{row['joint_output_loss']:.4g} |")
        print(f"| {r['model']} | | | greedy / one-shot time | | {r['time_ratio_greedy_over_one_shot']}x | | |")


if __name__ == "__main__":
    main()
