"""App bundles on toy and tiny models: end-to-end image PSNR against the diffusers PyTorch pipeline, diffusers'
own ONNX pipeline on an SD-1.x bundle, the toy judge on held-out prompts, and generate's memory (all parts loaded vs
``--sequential``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bundle.py [--quick]

The PSNR sections use tiny models only; the memory/latency section takes ``/tmp/ld-heavy.lock`` itself.

Writes ``benchmarks/results/bench_bundle.json`` and ``.md``. Memory and latency come from ``laptop-deploy generate
--json`` in fresh subprocesses (peak RSS is per process), the two modes interleaved (A B A B A B), median and
min–max over the repeats; the load average is recorded and a warning printed when the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bundle.py"
HEAVY_LOCK = "/tmp/ld-heavy.lock"  # the timing section holds it (one timing job on the machine at a time)
STUDENT_REMOVALS = {  # the same units tests/deploy_fixtures.py removes; toy: its first three prunable units
    "random:tiny-sd15": ["down_blocks.0.resnets.1", "mid_block.attentions.0", "up_blocks.3.attentions.2"],
    "random:tiny-sdxl": ["down_blocks.0.resnets.1", "mid_block.resnets.1", "up_blocks.2.resnets.1"],
}


def make_student(teacher: str, folder: Path) -> str:
    from laptop_deploy.models.layers import discover_layers
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.models.student import make_student as remove, save_student

    source = resolve_model(teacher)
    removed = STUDENT_REMOVALS.get(teacher) or [l.name for l in discover_layers(source.unet)[0] if l.prunable][:3]
    save_student(remove(source.unet, removed), folder, teacher={"spec": teacher})
    return str(folder)


def bundle(spec: str, out: Path, precision: str) -> Path:
    from laptop_deploy.deploy.bundle import BundleOptions, export_bundle, resolve_sources

    out.mkdir(parents=True)
    export_bundle(resolve_sources(spec), out, BundleOptions(precision=precision, exporter="torchscript"))
    return out


def psnr_rows(work: Path, quick: bool) -> list[dict]:
    from laptop_deploy.deploy.bundle_verify import verify_bundle

    cases = [(t, s, p) for t in ("toy", "random:tiny-sd15", "random:tiny-sdxl") for s in (False, True)
             for p in ("fp32", "fp16") if not (s and p == "fp16")]
    if quick:  # every kind once: fp32 teachers, fp16 toy and sd15, a toy student
        cases = [c for c in cases if (c[1] and c[0] == "toy") or (not c[1] and (c[2] == "fp32" or c[0] != "random:tiny-sdxl"))]
    rows = []
    for teacher, student, precision in cases:
        name = f"{teacher.removeprefix('random:')}{' student' if student else ''} {precision}"
        spec = make_student(teacher, work / f"{name}-s".replace(" ", "_")) if student else teacher
        start = time.perf_counter()
        folder = bundle(spec, work / name.replace(" ", "_"), precision)
        result = verify_bundle(folder, prompts=("a red circle at the top left", "a photo of a cat"), seeds=(0, 1),
                               steps=10, guidance=5.0)
        rows.append({"bundle": name, "min_psnr_db": min(c["psnr_db"] for c in result.cases),
                     "floor_db": result.min_psnr_db, "passed": result.passed,
                     "worst_part_rel_l2": max(p["rel_l2"] for p in result.parts.values()),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], file=sys.stderr)
    return rows


def diffusers_onnx_row(work: Path) -> dict:
    from diffusers import DPMSolverMultistepScheduler, OnnxStableDiffusionPipeline

    from laptop_deploy.deploy.bundle_verify import image_psnr
    from laptop_deploy.deploy.generate import GenerateOptions, generate, initial_latents

    folder = work / "tiny-sd15_fp32"
    pipe = OnnxStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
    # diffusers' ONNX loop multiplies numpy latents by Euler's tensor init_noise_sigma (a TypeError): DPM++ instead
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    values = []
    for seed in range(3):
        latents = initial_latents(seed, (1, 4, 16, 16))
        theirs = pipe("a photo of a cat", height=128, width=128, num_inference_steps=10, guidance_scale=7.5,
                      latents=latents.copy(), output_type="np").images[0]
        ours = generate(folder, GenerateOptions(prompt="a photo of a cat", steps=10, guidance=7.5, seed=seed,
                                                scheduler="dpm++", progress=False), latents=latents).image
        values.append(image_psnr(theirs, ours))
    return {"bundle": "tiny-sd15 fp32", "loader": "diffusers.OnnxStableDiffusionPipeline", "seeds": 3,
            "min_psnr_db": round(min(values), 2)}


def judge_row(work: Path, per_prompt: int) -> dict:
    """Held-out alignment of the toy bundle's images (numpy loop) and the PyTorch teacher's, same latents."""
    from laptop_deploy.deploy.generate import GenerateOptions, generate, initial_latents
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.toy.evaluate import eval_pairs, score
    from laptop_deploy.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    folder = work / "toy_fp32"
    pipe = resolve_model("toy").pipeline()
    pipe.set_progress_bar_config(disable=True)
    pairs = eval_pairs(per_prompt=per_prompt)
    ours, theirs = [], []
    for pair in pairs:
        latents = initial_latents(pair.seed, (1, 48, 8, 8))
        options = GenerateOptions(prompt=pair.prompt, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=pair.seed,
                                  progress=False)
        ours.append(generate(folder, options, latents=latents).uint8())
        with torch.no_grad():
            image = pipe(pair.prompt, height=32, width=32, num_inference_steps=DEFAULT_STEPS,
                         guidance_scale=DEFAULT_GUIDANCE, latents=torch.from_numpy(latents), output_type="np").images[0]
        theirs.append((image * 255).round().astype(np.uint8))
    a, b = score(np.stack(ours), pairs), score(np.stack(theirs), pairs)
    agree = float(np.mean([x == y for x, y in zip(a.matches, b.matches)]))
    return {"images": len(pairs), "bundle_alignment": a.as_dict(), "pytorch_alignment": b.as_dict(),
            "alignment_difference_pct": round(100 * (a.score - b.score), 2), "per_image_agreement": agree}


def memory_rows(work: Path, repeats: int) -> list[dict]:
    """generate in fresh processes, all-loaded and --sequential interleaved; peak RSS vs the largest part."""
    from laptop_deploy.deploy.bundle_format import read_bundle_manifest

    rows = []
    for name in ("toy_fp32", "tiny-sd15_fp32"):
        folder = work / name
        largest = max(p["weight_bytes"] for p in read_bundle_manifest(folder).parts.values())
        runs: dict[str, list[dict]] = {"loaded": [], "sequential": []}
        for _ in range(repeats):
            for mode in runs:
                argv = [sys.executable, "-m", "laptop_deploy", "generate", str(folder), "--prompt",
                        "a photo of a cat", "--steps", "10", "--out", str(work / "m.png"), "--force", "--json"]
                out = subprocess.run(argv + (["--sequential"] if mode == "sequential" else []), capture_output=True,
                                     text=True, check=True, cwd=ROOT).stdout
                runs[mode].append(json.loads(out))
        for mode, items in runs.items():
            rss = [r["peak_rss_mb"] for r in items]
            unet = [r["latency_ms"]["unet"] for r in items]
            rows.append({"bundle": name, "mode": mode, "peak_rss_mb_median": statistics.median(rss),
                         "peak_rss_mb_range": [min(rss), max(rss)], "unet_ms_median": statistics.median(unet),
                         "unet_ms_range": [min(unet), max(unet)], "largest_part_weight_mb": round(largest / 1e6, 2)})
    return rows


def timed_memory_rows(work: Path, result: dict) -> list[dict]:
    """:func:`memory_rows` while holding the heavy lock (one timing job on the machine at a time)."""
    import fcntl

    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        result["load_average_timing"] = os.getloadavg()
        return memory_rows(work, repeats=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp32 teachers, fp16 toy/sd15, a toy student; 1 seed per judge prompt")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the memory/latency section (it waits for /tmp/ld-heavy.lock)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_bundle.") as tmp:
        work = Path(tmp)
        flags = (" --quick" if args.quick else "") + (" --no-timing" if args.no_timing else "")
        result = {"command": COMMAND + flags, "load_average_before": load_before,
                  "psnr": psnr_rows(work, args.quick)}
        result["diffusers_onnx_pipeline"] = diffusers_onnx_row(work)
        result["judge"] = judge_row(work, per_prompt=1 if args.quick else 4)
        result["memory"] = [] if args.no_timing else timed_memory_rows(work, result)
    result["load_average_after"] = os.getloadavg()
    busy = max(result["load_average_before"][0], result["load_average_after"][0]) > (os.cpu_count() or 1)
    result["busy_warning"] = busy
    if busy:
        print("WARNING: the machine was busy (load average above the core count); timings are noisy",
              file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_bundle.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = report(result)
    (RESULTS / "bench_bundle.md").write_text(text)
    print(text)


def report(result: dict) -> str:
    """The markdown table of a result dict (also: python -c 'import bench_bundle; ...' to redo it from JSON)."""
    busy = result["busy_warning"]
    lines = [f"# bench_bundle\n\n`{result['command']}`\n", "| bundle | min image PSNR dB | floor | worst part rel L2 |",
             "|---|---|---|---|"]
    lines += [f"| {r['bundle']} | {r['min_psnr_db']:.2f} | {r['floor_db']:g} | {r['worst_part_rel_l2']:.2e} |"
              for r in result["psnr"]]
    lines.append("\nImage PSNR vs the diffusers PyTorch pipeline from the same numpy latents (2 prompts x 2 seeds, "
                 "10 steps, guidance 5); 120 dB is the cap (MSE < 1e-12).")
    d = result["diffusers_onnx_pipeline"]
    lines.append(f"\ndiffusers.OnnxStableDiffusionPipeline on the {d['bundle']} bundle: min PSNR {d['min_psnr_db']} dB "
                 f"vs generate ({d['seeds']} seeds, same latents)\n")
    j = result["judge"]
    lines.append(f"Toy judge, {j['images']} held-out images (20 steps, guidance 4, same latents): bundle alignment "
                 f"{j['bundle_alignment']['alignment']:.3f}, PyTorch teacher {j['pytorch_alignment']['alignment']:.3f} "
                 f"(difference {j['alignment_difference_pct']:+.2f} points; per-image agreement "
                 f"{j['per_image_agreement']:.3f})\n")
    if result["memory"]:
        lines += ["| bundle | mode | peak RSS MB (median, min-max) | U-Net ms (median, min-max) | largest part MB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['bundle']} | {r['mode']} | " + (
                  f"{r['peak_rss_mb_median']:.0f} ({r['peak_rss_mb_range'][0]:.0f}-{r['peak_rss_mb_range'][1]:.0f})"
                  if r["peak_rss_mb_median"] is not None else "n/a") +
                  f" | {r['unet_ms_median']:.0f} ({r['unet_ms_range'][0]:.0f}-{r['unet_ms_range'][1]:.0f}) | "
                  f"{r['largest_part_weight_mb']} |" for r in result["memory"]]
        lines += [f"\n{note}" for note in result.get("notes", [])]
    else:
        lines.append("Memory / latency section skipped (--no-timing).")
    lines.append(f"\nload average before {result['load_average_before']}, after {result['load_average_after']}"
                 f"{' (BUSY: timings noisy)' if busy else ''}")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
