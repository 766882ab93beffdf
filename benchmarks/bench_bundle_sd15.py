"""Full-size random:sd15 app bundle: export within this machine's memory, then `generate` all-loaded and
`--sequential` in fresh processes; peak RSS against the largest part's weight bytes (target: sequential ≤ 1.3×).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py [--work /tmp/sd15_bundle_work]

Writes ``benchmarks/results/bench_bundle_sd15.json``. The export's peak RSS is the ``Maximum resident set size`` of
``/usr/bin/time -v``; generate's comes from its own ``--json`` (VmHWM of its process). Memory in MiB (2**20 bytes). Modes run
sequential, loaded, sequential (2 denoising steps, 512x512, guidance 7.5); the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / ".venv" / "bin" / "laptop-deploy")
COMMAND = "flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py"


def export(work: Path) -> dict:
    bundle = work / "bundle"
    run = subprocess.run(["/usr/bin/time", "-v", CLI, "export", "--pipeline", "--model", "random:sd15", "--target",
                          "onnx", "--out", str(bundle), "--force", "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return {"result": json.loads(run.stdout), "peak_rss_mb_time_v": round(peak_kib / 1024, 1)}


def generate(bundle: Path, work: Path, sequential: bool) -> dict:
    argv = [CLI, "generate", str(bundle), "--prompt", "a photo of a cat", "--steps", "2", "--guidance", "7.5",
            "--out", str(work / "sd15.png"), "--force", "--json"] + (["--sequential"] if sequential else [])
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def summarize(exported: dict, runs: list[dict]) -> dict:
    parts = exported["result"]["parts"]
    largest = max(p["weight_bytes"] for p in parts.values())
    rows = [{"sequential": r["sequential"], "peak_rss_mb": r["peak_rss_mb"], "rss_mb": r["rss_mb"],
             "latency_ms": r["latency_ms"], "peak_over_largest_part": round(r["peak_rss_mb"] * 2**20 / largest, 3)}
            for r in runs]
    return {"largest_part": max(parts, key=lambda n: parts[n]["weight_bytes"]),
            "largest_part_weight_mb": round(largest / 2**20, 1),
            "bundle_mb": round(exported["result"]["bytes"] / 2**20, 1),
            "export_seconds": exported["result"]["export"]["seconds"],
            "export_peak_rss_mb": exported["peak_rss_mb_time_v"], "generate": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sd15_bundle_work"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()
    exported = export(args.work)
    runs = [generate(args.work / "bundle", args.work, mode) for mode in (True, False, True)]
    result = {"command": COMMAND, "load_average_before": before, "load_average_after": os.getloadavg(),
              **summarize(exported, runs)}
    out = ROOT / "benchmarks" / "results" / "bench_bundle_sd15.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
