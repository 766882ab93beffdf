"""Peak RSS of loading a model through ``resolve_model``, each spec in a fresh process (ru_maxrss), with or
without ``accelerate`` importable — the measurement behind making ``accelerate`` a dependency (issue 14).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/load_rss.py --label before \\
        --spec random:sdxl --spec toy --spec PIPELINE_FOLDER --out benchmarks/results/load_rss.json

Each label's rows are merged into ``--out`` (run once before ``pip install accelerate`` and once after). A pipeline
folder of random SD-1.5 weights is written with ``--write-pipeline DIR`` (U-Net, VAE and text encoder, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import resource, sys, time
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


def measure(spec: str) -> dict:
    """One fresh process loads ``spec`` (U-Net, plus VAE and text encoder when it has them)."""
    result = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, check=True)
    params, peak_mb, seconds = result.stdout.split()[-3:]
    noise = [line for line in result.stderr.splitlines() if line.strip()]
    return {"spec": spec, "unet_params": int(params), "peak_rss_mb": round(float(peak_mb), 1),
            "seconds": round(float(seconds), 1), "stderr_lines": len(noise), "stderr_first": noise[:2]}


def write_pipeline(folder: Path) -> None:
    from laptop_deploy.models.sources import resolve_model

    source = resolve_model("random:sd15")
    source.pipeline().save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="e.g. before / after (pip install accelerate)")
    parser.add_argument("--spec", action="append", default=[], help="model spec to load (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load_rss.json"))
    parser.add_argument("--write-pipeline", type=Path, metavar="DIR", help="write a random:sd15 pipeline folder")
    args = parser.parse_args()
    if args.write_pipeline:
        write_pipeline(args.write_pipeline)
    try:
        import accelerate
        version = accelerate.__version__
    except ImportError:
        version = None
    rows = [measure(spec) for spec in args.spec]
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    data["command"] = ("flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/load_rss.py --label LABEL "
                       + " ".join(f"--spec {s}" for s in args.spec))
    data["runs"][args.label] = {"accelerate": version, "rows": rows, "load_average": list(os.getloadavg()),
                                "machine": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime())}
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    for row in rows:
        print(f"{args.label:>7} accelerate={version}: {row['spec']:<32} peak RSS {row['peak_rss_mb']:>9,.0f} MiB "
              f"({row['seconds']} s, {row['stderr_lines']} stderr lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
