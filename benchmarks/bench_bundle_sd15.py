"""Full-size random:sd15 app bundle: export within this machine's memory, then `generate` all-loaded and
`--sequential` in fresh processes; peak RSS against the largest part's weight bytes (target: sequential ≤ 1.3×).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py [--work /tmp/sd15_bundle_work]
    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_bundle_sd15.py --parity   # after the run above

``--parity`` reuses the two bundles in ``--work``: the sliced and the whole U-Net on the same batch-1 feeds
(t = 999 and 1, 64×64), then ``verify`` of the ``auto`` bundle (every part by the calibrated gate, one 1-step image
against the diffusers pipeline); writes ``benchmarks/results/bench_bundle_sd15_parity.json``.

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


def parity(work: Path) -> dict:
    """The ``auto`` bundle's U-Net against the ``off`` one's (ONNX Runtime, batch 1), then ``verify`` of it."""
    import gc

    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((work / "bundle-off" / "manifest.json").read_text())
    image, inputs = manifest["image"], {t["name"]: t["shape"] for t in manifest["parts"]["unet"]["inputs"]}
    latent = (2, image["latent_channels"], image["height"] // image["vae_scale_factor"],
              image["width"] // image["vae_scale_factor"])  # the export size: 64x64 for SD-1.5
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal(latent, dtype=np.float32),
             "timestep": np.array([999.0, 1.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, *inputs["encoder_hidden_states"][1:]),
                                                          dtype=np.float32)}
    outs = {}
    for variant in VARIANTS:
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        session = ort.InferenceSession(str(work / f"bundle-{variant}" / "unet" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        outs[variant] = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0].astype(np.float64)
                         for i in range(2)]
        del session
        gc.collect()
    unet = {f"t={feeds['timestep'][i]:.0f}": {
        "rel_l2": float(np.linalg.norm(outs["auto"][i] - outs["off"][i]) / np.linalg.norm(outs["off"][i])),
        "max_abs": float(np.abs(outs["auto"][i] - outs["off"][i]).max())} for i in range(2)}
    argv = [CLI, "verify", str(work / "bundle-auto"), "--steps", "1", "--prompt", "a photo of a cat", "--json"]
    run = subprocess.run(argv, capture_output=True, text=True)
    verify = json.loads(run.stdout) if run.stdout.strip() else {"exit_code": run.returncode,
                                                                  "stderr": run.stderr[-500:]}
    return {"command": COMMAND + " --parity", "unet_auto_vs_off_batch1": unet, "verify_auto": {
        "exit_code": run.returncode, "passed": verify.get("passed"), "cases": verify.get("cases"),
        "failures": verify.get("failures"),
        "parts": {name: {k: part.get(k) for k in ("passed", "rel_l2", "psnr_db", "judged_by")} |
                  {"factor_rel_l2": (part.get("gate") or {}).get("factor_rel_l2"),
                   "rel_l2_factor": (part.get("gate") or {}).get("rel_l2_factor")}
                  for name, part in (verify.get("parts") or {}).items()}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sd15_bundle_work"))
    parser.add_argument("--parity", action="store_true", help="check the two bundles already in --work")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.parity:
        result = {"load_average_before": os.getloadavg(), **parity(args.work), "load_average_after": os.getloadavg()}
        out = ROOT / "benchmarks" / "results" / "bench_bundle_sd15_parity.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), file=sys.stderr)
        return
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
