"""ExecuTorch app bundles (``export --pipeline --target executorch``) on toy and tiny models: what XNNPACK took,
each part's ``.pte`` against PyTorch (the calibrated gate), the image ``generate`` draws from the bundle against the
diffusers PyTorch pipeline, and ``generate``'s U-Net time per call beside the ONNX bundle of the same model.

    /tmp/etvenv/bin/python benchmarks/bench_bundle_executorch.py [--models toy,random:tiny-sd15] [--repeats 3]

(needs the ``[executorch]`` extra). Writes ``benchmarks/results/bench_bundle_executorch.json`` and ``.md``. Timing:
``laptop-deploy generate --json --threads 1`` in fresh subprocesses, the two bundles interleaved (ONNX, ExecuTorch,
ONNX, ...), median and min–max of the U-Net's ms per call over the repeats, under ``/tmp/ld-heavy.lock``; the load
average is recorded and a warning printed when the machine was busy.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "/tmp/etvenv/bin/python benchmarks/bench_bundle_executorch.py"
HEAVY_LOCK = "/tmp/ld-heavy.lock"
PROMPTS = ("a red circle at the top left", "a photo of a cat")


def export(spec: str, out: Path, target: str) -> dict:
    from laptop_deploy.deploy.bundle import BundleOptions, export_bundle, resolve_sources

    out.mkdir(parents=True)
    options = BundleOptions(target=target, exporter="torchscript") if target == "onnx" else \
        BundleOptions(target=target)
    return export_bundle(resolve_sources(spec), out, options).as_dict()


def parity(folder: Path) -> dict:
    from laptop_deploy.deploy.bundle_verify import verify_bundle

    result = verify_bundle(folder, prompts=PROMPTS, steps=10).as_dict()
    return {"passed": result["passed"], "worst_psnr_db": result["worst_psnr_db"],
            "parts": {name: {"rel_l2": p["rel_l2"], "factor_rel_l2": p["gate"]["factor_rel_l2"],
                             "allowed": p["gate"]["rel_l2_factor"]} for name, p in result["parts"].items()}}


def generate_ms(folder: Path, image: Path) -> float:
    """U-Net ms per call of one ``generate`` (8 steps, guidance: batch 2) in a fresh process, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "laptop_deploy", "generate", str(folder), "--prompt", PROMPTS[0],
                           "--steps", "8", "--guidance", "4", "--threads", "1", "--out", str(image), "--json"], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"generate {folder} failed ({done.returncode}): {done.stderr[-1500:]}")
    data = json.loads(done.stdout)
    return data["latency_ms"]["unet"] / data["calls"]["unet"]


def timing(folders: dict[str, Path], repeats: int, work: Path) -> dict:
    times: dict[str, list[float]] = {name: [] for name in folders}
    images = (work / f"image-{i}.png" for i in range(10_000))  # generate writes a new file each time
    loads = [os.getloadavg()[0]]
    with open(HEAVY_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, folder in folders.items():  # warm the page cache once
            generate_ms(folder, next(images))
        for _ in range(repeats):
            for name, folder in folders.items():
                print(f"timing {name}", file=sys.stderr, flush=True)
                times[name].append(generate_ms(folder, next(images)))
            loads.append(os.getloadavg()[0])
    rows = {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs": v}
            for name, v in times.items()}
    ratio = rows["executorch"]["median_ms"] / rows["onnx"]["median_ms"]
    return {"per_call": rows, "executorch_over_onnx": round(ratio, 3), "load_1min": loads,
            "busy": max(loads) > (os.cpu_count() or 1) * 0.75}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy,random:tiny-sd15")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ld-etbundle-") as tmp:
        work = Path(tmp)
        for spec in args.models.split(","):
            tag = spec.replace(":", "-")
            print(f"exporting {spec}", file=sys.stderr, flush=True)
            began = time.perf_counter()
            et = export(spec, work / tag / "executorch", "executorch")
            et_s = time.perf_counter() - began
            export(spec, work / tag / "onnx", "onnx")
            unet = et["parts"]["unet"]["delegation"]
            row = {"model": spec, "export_s": round(et_s, 1), "bytes": sum(f["bytes"] for f in et["files"].values()),
                   "unet_delegation": unet, "parity": parity(work / tag / "executorch"),
                   "timing": timing({"onnx": work / tag / "onnx", "executorch": work / tag / "executorch"},
                                    args.repeats, work)}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "export_s", "parity")}), file=sys.stderr, flush=True)
    result = {"command": f"{COMMAND} --models {args.models} --repeats {args.repeats}", "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_bundle_executorch.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "bench_bundle_executorch.md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    lines = ["# ExecuTorch app bundles", "", f"`{result['command']}` ({result['date']})", "",
             "| model | parts: worst factor of the fp32 floor (allowed) | image PSNR vs PyTorch (worst) | U-Net "
             "XNNPACK share, subgraphs, portable nodes | generate U-Net ms/call, ExecuTorch / ONNX (median; "
             "min–max ms) |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        parts = row["parity"]["parts"]
        worst = max(parts.values(), key=lambda p: p["factor_rel_l2"])
        unet, timing = row["unet_delegation"], row["timing"]
        spans = "; ".join(f"{n} {t['min_ms']:.1f}–{t['max_ms']:.1f}" for n, t in timing["per_call"].items())
        lines.append(f"| {row['model']} | {worst['factor_rel_l2']:.2f}× ({worst['allowed']:g}×) | "
                     f"{row['parity']['worst_psnr_db']:.1f} dB | {unet['compute_delegated_share']:.0%}, "
                     f"{unet['subgraphs']}, {unet['portable_nodes']} | **{timing['executorch_over_onnx']:.2f}×** "
                     f"({spans}){' — machine busy' if timing['busy'] else ''} |")
    lines += ["", "Load average (1 min) during timing: " + "; ".join(
        f"{row['model']} {min(row['timing']['load_1min']):.1f}–{max(row['timing']['load_1min']):.1f}"
        for row in result["rows"]), ""]
    if any(row["timing"]["busy"] for row in result["rows"]):
        lines.append("WARNING: the machine was busy during timing; the ratios are indicative.")
        print("WARNING: the machine was busy during timing", file=sys.stderr)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
