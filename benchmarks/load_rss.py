"""Peak RSS of loading a model through ``resolve_model`` with and without ``accelerate`` — the measurement behind
making ``accelerate`` a dependency (issue 14).

Each (spec, variant) loads in a fresh process (U-Net, plus VAE and text encoder when the source has them, every
weight read once) and reports VmHWM. "without" hides the installed accelerate from diffusers
(``sys.modules["accelerate"] = None`` before anything imports, so ``importlib.util.find_spec`` reports it
missing, as on an install without it); "with" loads normally. Variants alternate per spec, ``--repeats`` times.

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/load_rss.py --spec random:sdxl --spec PIPELINE_FOLDER
    .venv/bin/python benchmarks/load_rss.py --spec toy

Rows are merged into ``--out`` (default benchmarks/results/load_rss.json) by spec. ``--write-pipeline DIR`` first
writes a pipeline folder of seeded random SD-1.5 weights (U-Net, VAE, text encoder; fp32, 4.1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys, time
if sys.argv[2] == "without":
    sys.modules["accelerate"] = None  # find_spec("accelerate") is None: diffusers sees no accelerate
start = time.perf_counter()
from laptop_deploy.models.sources import resolve_model
source = resolve_model(sys.argv[1])
parts = [source.part(name) for name in ("vae", "text_encoder") if name in source.available_parts()]
params = sum(p.numel() for p in source.unet.parameters())
# read every weight once: safetensors files are memory-mapped, and untouched pages are not resident yet
touched = sum(float(p.detach().float().abs().sum()) for m in [source.unet, *parts] for p in m.parameters())
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child would report its parent's peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(params, hwm / 1024, time.perf_counter() - start)
"""


def measure(spec: str, variant: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, spec, variant], capture_output=True, text=True, check=True)
    params, peak_mb, seconds = result.stdout.split()[-3:]
    noise = [line for line in result.stderr.splitlines() if line.strip()]
    return {"unet_params": int(params), "peak_rss_mb": round(float(peak_mb), 1), "seconds": round(float(seconds), 1),
            "stderr_lines": len(noise), "stderr_first": noise[:1]}


def write_pipeline(folder: Path) -> None:
    from laptop_deploy.models.sources import resolve_model

    resolve_model("random:sd15").pipeline().save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", default=[], help="model spec to load (repeatable)")
    parser.add_argument("--repeats", type=int, default=2, help="loads per (spec, variant), alternating")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_rss.json")
    parser.add_argument("--write-pipeline", type=Path, metavar="DIR", help="write a random:sd15 pipeline folder")
    args = parser.parse_args()
    if args.write_pipeline and not args.write_pipeline.exists():
        write_pipeline(args.write_pipeline)
    import accelerate

    data = json.loads(args.out.read_text()) if args.out.is_file() else {"specs": {}}
    data["method"] = __doc__.split("\n\n")[1].replace("\n", " ")
    for spec in args.spec:
        load = [round(x, 2) for x in os.getloadavg()]
        runs: dict[str, list[dict]] = {"without": [], "with": []}
        for _ in range(args.repeats):
            for variant in ("without", "with"):
                runs[variant].append(measure(spec, variant))
        row = {"command": f"{'flock /tmp/ld-heavy.lock ' if spec != 'toy' else ''}.venv/bin/python "
                          f"benchmarks/load_rss.py --spec {spec} --repeats {args.repeats}",
               "accelerate": accelerate.__version__, "load_average_at_start": load,
               "machine": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "unet_params": runs["with"][0]["unet_params"]}
        for variant, rows in runs.items():
            peaks = [r["peak_rss_mb"] for r in rows]
            row[variant] = {"peak_rss_mb_median": statistics.median(peaks), "peak_rss_mb": peaks,
                            "seconds": [r["seconds"] for r in rows], "stderr_lines": rows[0]["stderr_lines"],
                            "stderr_first": rows[0]["stderr_first"]}
        row["with_over_without"] = round(row["with"]["peak_rss_mb_median"] / row["without"]["peak_rss_mb_median"], 3)
        data = json.loads(args.out.read_text()) if args.out.is_file() else data  # another run may have added
        data["specs"][spec] = row
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{spec}: peak RSS {row['without']['peak_rss_mb_median']:,.0f} MiB without accelerate, "
              f"{row['with']['peak_rss_mb_median']:,.0f} MiB with ({row['with_over_without']}x); stderr lines "
              f"{row['without']['stderr_lines']} -> {row['with']['stderr_lines']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
