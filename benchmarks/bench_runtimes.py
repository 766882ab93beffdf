"""Runtime benchmark: the full-size SD-1.5 U-Net (random weights) and a 50%-pruned student, each in eager PyTorch
and in ONNX Runtime (CPU), batch 1, 64x64 latent — one run, so the ratios compare like with like.

The student is the teacher minus BK-SDM-Small's removal set plus ``up_blocks.0.resnets.2`` (see STUDENT_EXTRA):
49.6% of the parameters removed, made with ``laptop_deploy.models.layers.apply_removal``. Achieved GFLOP/s (2 x MACs
per call / median latency) is set against this machine's fp32 matmul rate measured in the same run (the roof).

    python benchmarks/bench_runtimes.py [--iterations 10] [--warmup 2] [--model random:sd15]

writes benchmarks/results/bench_runtimes.json and bench_runtimes.md (a table and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from laptop_deploy.deploy.bench import bench_runner, environment, format_table, matmul_gflops
from laptop_deploy.exporters.onnx import OnnxOptions, export
from laptop_deploy.prune.handcrafted import handcrafted_removal
from laptop_deploy.models.inventory import count_macs
from laptop_deploy.models.layers import apply_removal
from laptop_deploy.runtimes.ort import OrtRunner
from laptop_deploy.runtimes.pytorch import TorchRunner
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.deploy.spec import build_spec

RESULTS = Path(__file__).parent / "results"
STUDENT_EXTRA = ["up_blocks.0.resnets.2"]  # BK-SDM-Small (44%) + one 49M-param low-resolution ResNet -> 49.6%


def _measure(label: str, unet, spec, folder: Path, *, iterations: int, warmup: int, threads: int | None):
    """Export ``unet`` to ``folder`` and time it in PyTorch and ONNX Runtime (one runner loaded at a time)."""
    folder.mkdir(parents=True)
    start = time.perf_counter()
    manifest = export(unet, spec, folder, source={"spec": label}, options=OnnxOptions())
    export_s = time.perf_counter() - start
    feeds = spec.example_feeds(seed=0)
    results = [bench_runner(TorchRunner(unet, spec=spec), feeds, warmup=warmup, iterations=iterations,
                            name=f"{label} / torch eager"),
               bench_runner(OrtRunner(folder / manifest.model_file, spec=spec, intra_op_threads=threads), feeds,
                            warmup=warmup, iterations=iterations, name=f"{label} / onnxruntime cpu")]
    shutil.rmtree(folder)
    # (The export's peak RSS is measured by `laptop-deploy export` in a fresh process, not here: this process
    # already holds the previous runners' peaks.)
    size = sum(f["bytes"] for f in manifest.files.values())
    return results, {"export_s": round(export_s, 1), "onnx_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_runtimes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    roofs = [matmul_gflops(n=4096, repeats=4)]  # measured again at the end; the roof is the better of the two
    source = resolve_model(args.model)
    spec = build_spec(source.unet.config, batch=1)
    teacher_params = sum(p.numel() for p in source.unet.parameters())
    macs = {"teacher": count_macs(source.unet, height=spec.height, width=spec.width)[""]}
    work = Path(tempfile.mkdtemp(prefix="bench_runtimes."))
    try:
        results, exports = _measure("teacher", source.unet, spec, work / "teacher", iterations=args.iterations,
                                    warmup=args.warmup, threads=args.threads)
        removed = handcrafted_removal("bk-sdm-small", source.unet.config) + STUDENT_EXTRA
        apply_removal(source.unet, removed)  # in place: the teacher's weights for these layers are freed
        student_params = sum(p.numel() for p in source.unet.parameters())
        macs["student"] = count_macs(source.unet, height=spec.height, width=spec.width)[""]
        student_results, student_exports = _measure("student", source.unet, spec, work / "student",
                                                    iterations=args.iterations, warmup=args.warmup,
                                                    threads=args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results += student_results
    roofs.append(matmul_gflops(n=4096, repeats=4))
    roof = max(roofs)
    p50 = {r.name: r.p50_ms for r in results}
    ratios = {
        "student_vs_teacher_torch": p50["student / torch eager"] / p50["teacher / torch eager"],
        "student_vs_teacher_ort": p50["student / onnxruntime cpu"] / p50["teacher / onnxruntime cpu"],
        "ort_vs_torch_teacher": p50["teacher / onnxruntime cpu"] / p50["teacher / torch eager"],
        "ort_vs_torch_student": p50["student / onnxruntime cpu"] / p50["student / torch eager"],
    }
    row_macs = {r.name: macs[r.name.split(" / ")[0]] for r in results}
    achieved = {r.name: 2 * row_macs[r.name] / (r.p50_ms / 1e3) / 1e9 for r in results}
    data = {
        "command": command, "model": args.model, "batch": 1, "latent": [spec.height, spec.width],
        "teacher_params": teacher_params, "student_params": student_params,
        "ratio_removed": round(1 - student_params / teacher_params, 4), "removed": removed,
        "macs": macs, "matmul_gflops": round(roof, 1),
        "matmul_gflops_start_end": [round(r, 1) for r in roofs],
        "achieved_gflops": {k: round(v, 1) for k, v in achieved.items()},
        "fraction_of_roof": {k: round(v / roof, 3) for k, v in achieved.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "exports": {"teacher": exports, "student": student_exports},
        "results": [r.as_dict() for r in results], "environment": environment(),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_runtimes.json").write_text(json.dumps(data, indent=2) + "\n")
    table = format_table(results, macs=row_macs)
    (args.out / "bench_runtimes.md").write_text(_markdown(data, table))
    print(table)
    print(json.dumps({"ratios": data["ratios"], "matmul_gflops": data["matmul_gflops"]}, indent=2))
    return 0


def _markdown(data: dict, table: str) -> str:
    env = data["environment"]
    lines = [
        "# Runtime benchmark: SD-1.5 U-Net teacher vs 50%-pruned student, PyTorch eager vs ONNX Runtime CPU", "",
        f"Command: `{data['command']}`", "",
        f"Machine: {env['cpu']}, {env['logical_cores']} logical cores, torch threads {env['torch_threads']}; "
        f"load average before/after {data['load_average']['before'][0]} / {data['load_average']['after'][0]}; "
        f"versions {json.dumps(env['versions'])}", "",
        f"Model `{data['model']}` batch 1, latent {data['latent'][0]}x{data['latent'][1]}; student: "
        f"{data['student_params']:,} of {data['teacher_params']:,} params ({data['ratio_removed']:.1%} removed), "
        f"{data['macs']['student'] / 1e9:.1f} of {data['macs']['teacher'] / 1e9:.1f} GMACs; removed "
        f"{', '.join(data['removed'])}.", "",
        "```", table, "```", "",
        "`load s`: ONNX Runtime session creation (graph optimisation included) from the file; 0 for eager PyTorch, "
        "whose module is already in memory. `peak RSS` is process-wide while the runner is loaded (the PyTorch "
        "model stays resident during the ONNX Runtime rows). GFLOP/s = 2 x MACs / p50.", "",
        f"Measured fp32 matmul rate (4096x4096 torch.mm, best of 4, before and after the runs: "
        f"{data['matmul_gflops_start_end']}): **{data['matmul_gflops']} GFLOP/s** (the roof).", "",
        "| ratio (median latency) | value |", "|---|---:|",
        *[f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in data["ratios"].items()], "",
        "| runner | achieved GFLOP/s | fraction of roof |", "|---|---:|---:|",
        *[f"| {k} | {v} | {data['fraction_of_roof'][k]:.1%} |" for k, v in data["achieved_gflops"].items()], "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
