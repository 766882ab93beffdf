"""Full-size random:sd15 app bundle: export within this machine's memory, then `generate` all-loaded and
`--sequential` in fresh processes; peak RSS against the largest part's weight bytes (target: sequential ≤ 1.3×).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py [--work /tmp/sd15_bundle_work]

Two bundles: ``--attention-slice off`` (each self-attention whole) and ``--attention-slice auto`` (the U-Net's
4096-token self-attentions over 8 query chunks at 512×512; see ``laptop_deploy/deploy/attention_slice.py``).
Writes ``benchmarks/results/bench_bundle_sd15.json``. The export's peak RSS is the ``Maximum resident set size`` of
``/usr/bin/time -v``; generate's comes from its own ``--json`` (VmHWM of its process, also per phase: the VmHWM is
reset between phases). Memory in MiB (2**20 bytes). ``--sequential`` runs interleaved off, auto, off, auto, off, auto
(2 denoising steps, 512×512, guidance 7.5), then all-loaded once per bundle; U-Net ms per call is compared as a
median ratio (min-max), with the load average recorded and a warning when the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / ".venv" / "bin" / "laptop-deploy")
COMMAND = "flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py"
VARIANTS = ("off", "auto")
REPEATS = 3


def export(work: Path, variant: str) -> dict:
    bundle = work / f"bundle-{variant}"
    run = subprocess.run(["/usr/bin/time", "-v", CLI, "export", "--pipeline", "--model", "random:sd15", "--target",
                          "onnx", "--attention-slice", variant, "--out", str(bundle), "--force", "--json"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return {"result": json.loads(run.stdout), "peak_rss_mb_time_v": round(peak_kib / 1024, 1)}


def generate(bundle: Path, work: Path, sequential: bool) -> dict:
    argv = [CLI, "generate", str(bundle), "--prompt", "a photo of a cat", "--steps", "2", "--guidance", "7.5",
            "--out", str(work / "sd15.png"), "--force", "--json"] + (["--sequential"] if sequential else [])
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def row(run: dict, variant: str, largest: int) -> dict:
    return {"attention_slice": variant, "sequential": run["sequential"], "peak_rss_mb": run["peak_rss_mb"],
            "peak_over_largest_part": round(run["peak_rss_mb"] * 2**20 / largest, 3),
            "peak_rss_mb_phases": run.get("peak_rss_mb_phases", {}), "rss_mb": run["rss_mb"],
            "latency_ms": run["latency_ms"], "unet_ms_per_call": round(run["latency_ms"]["unet"] /
                                                                        run["calls"]["unet"], 1)}


def summarize(exported: dict[str, dict], rows: list[dict]) -> dict:
    parts = exported["off"]["result"]["parts"]
    largest = max(p["weight_bytes"] for p in parts.values())
    table = [row(run, variant, largest) for variant, run in rows]
    per_call = {v: [r["unet_ms_per_call"] for r in table if r["attention_slice"] == v and r["sequential"]]
                for v in VARIANTS}
    ratios = [a / b for a, b in zip(per_call["auto"], per_call["off"])]
    return {"largest_part": max(parts, key=lambda n: parts[n]["weight_bytes"]),
            "largest_part_weight_mb": round(largest / 2**20, 1),
            "exports": {v: {"bundle_mb": round(e["result"]["bytes"] / 2**20, 1),
                            "export_seconds": e["result"]["export"]["seconds"],
                            "export_peak_rss_mb": e["peak_rss_mb_time_v"],
                            "unet_attention_slice": e["result"]["parts"]["unet"].get("attention_slice")}
                        for v, e in exported.items()},
            "sequential_peak_over_largest_part": {
                v: {"median": statistics.median(r["peak_over_largest_part"] for r in table
                                                if r["attention_slice"] == v and r["sequential"]),
                    "max": max(r["peak_over_largest_part"] for r in table if r["attention_slice"] == v and
                               r["sequential"])} for v in VARIANTS},
            "unet_ms_per_call_auto_over_off": {"median": round(statistics.median(ratios), 3),
                                               "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                                               "pairs": len(ratios)},
            "generate": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sd15_bundle_work"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()
    exported = {variant: export(args.work, variant) for variant in VARIANTS}
    rows = []
    for _ in range(REPEATS):  # interleaved: off, auto, off, auto, ...
        rows += [(v, generate(args.work / f"bundle-{v}", args.work, True)) for v in VARIANTS]
    rows += [(v, generate(args.work / f"bundle-{v}", args.work, False)) for v in VARIANTS]
    after = os.getloadavg()
    result = {"command": COMMAND, "load_average_before": before, "load_average_after": after,
              **summarize(exported, rows)}
    if max(before[0], after[0]) > 1.5:
        result["warning"] = (f"machine busy (load average {before[0]:.1f} before, {after[0]:.1f} after, 2 cores): "
                             f"peak RSS is per process and unaffected; the U-Net ms ratio is noisy")
        print(f"WARNING: {result['warning']}", file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / "bench_bundle_sd15.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
