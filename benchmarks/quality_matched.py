"""Matched compute for ``bench_quality.py --matched-macs``: LAPTOP-Diff (output-loss, ``--cost macs``) at exactly the
MAC ratio each BK-SDM preset removes from the toy teacher, judged against that preset on the same images.

The main table compares criteria at equal *parameters*; on this teacher that is unequal compute (output-loss@0.3
removes 7% of MACs, BK-SDM-Base 36%), because the knapsack spends a parameter budget on the cheap-in-MACs deep
units. Here each pair removes the same fraction of MACs (the knapsack target is the preset's achieved MAC ratio),
so the comparison is at equal compute.

    python benchmarks/bench_quality.py --matched-macs     # writes benchmarks/results/bench_quality_matched.{json,md}
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def run_matched(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, each preset, and output-loss --cost macs at the preset's MAC ratio; McNemar per pair."""
    from bench_quality import Bench, Variant  # this folder is on sys.path when bench_quality.py runs

    started = time.perf_counter()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-matched-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.judge(Variant("teacher", "teacher"), bench.teacher.unet)
        for preset in args.presets:
            plan = bench.plan(preset=preset, additivity_sets=0)
            handcrafted = bench.one_shot(preset, "preset", plan, criterion=None, ratio=None)
            target = round(handcrafted.macs_ratio, 4)
            plan = bench.plan(ratio=target, criterion="output-loss", cost="macs",
                              additivity_sets=args.additivity_sets)
            ours = bench.one_shot(f"output-loss macs@{target:g} (= {preset})", "one-shot", plan,
                                  criterion="output-loss", ratio=target)
            pairs.append(bench.paired(ours.name, handcrafted.name))
        variants = bench.variants
    return {
        "command": " ".join(["python benchmarks/bench_quality.py", *args.argv]).strip(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "out_dir", "name")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "eval": {"prompts": "24 held-out", "images": len(bench.pairs), "seeds_per_prompt": args.per_prompt},
        "paired_tests": [p for p in pairs if p],
        "seconds": round(time.perf_counter() - started, 1),
        "variants": [asdict(v) for v in variants],
    }


def matched_markdown(result: dict[str, Any]) -> str:
    by_name = {v["name"]: v for v in result["variants"]}
    lines = [
        "# Matched compute: LAPTOP-Diff at each BK-SDM preset's MAC ratio (toy teacher)", "",
        f"`{result['command']}` — {result['eval']['images']} images (24 held-out prompts × "
        f"{result['eval']['seeds_per_prompt']} seeds), {result['seconds'] / 60:.1f} min, "
        f"{result['machine']['threads']} threads; load average at the end {result['machine']['load_average_end']}.",
        "", "| model | params removed | MACs removed | alignment (95% CI) | decline | PSNR dB | units removed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in result["variants"]:
        a = v["alignment"]
        decline = "" if v["decline_pct"] is None else f"{v['decline_pct']:+.1f}%"
        psnr = "" if v["psnr_db"] is None else f"{v['psnr_db']:.2f}"
        lines.append(f"| {v['name']} | {100 * v['params_ratio']:.1f}% | {100 * v['macs_ratio']:.1f}% | "
                     f"{a['alignment']:.3f} ({a['alignment_95'][0]:.3f}–{a['alignment_95'][1]:.3f}) | {decline} | "
                     f"{psnr} | {len(v['removed'])} |")
    lines += ["", "Paired on the same images (exact McNemar; a difference is called only at p < 0.05):", ""]
    for t in result["paired_tests"]:
        first, second = by_name[t["first"]], by_name[t["second"]]
        a, b = first["alignment"]["alignment"], second["alignment"]["alignment"]
        p = "p < 0.0001" if t["p"] < 1e-4 else f"p = {t['p']:.2g}"
        verdict = "not resolved" if t["p"] >= 0.05 else ("LAPTOP-Diff better" if a > b else "the preset better")
        lines.append(f"- {t['first']} vs {t['second']}: {a:.3f} vs {b:.3f}, PSNR {first['psnr_db']:.2f} vs "
                     f"{second['psnr_db']:.2f} dB — {verdict} (McNemar {p}; {t['only_first']}:{t['only_second']} "
                     f"images right only with the first:second).")
    return "\n".join(lines) + "\n"
