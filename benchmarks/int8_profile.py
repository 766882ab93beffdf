"""Where an int8 QDQ U-Net's time goes on this CPU (ONNX Runtime's profiler, per kernel op type), and what the
graph-level levers chosen from it buy (held-out PSNR, fresh-process interleaved timing).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/int8_profile.py profile --model /tmp/i8/sd15-lat05
    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/int8_profile.py levers --model /tmp/i8/sd15-lat05

Both first ``prepare`` a ``--work`` folder (once; reused when there): the fp32 ONNX of ``--model`` at a static
``--latent`` (batch 1), calibration and held-out inputs captured from its own denoising loops
(:func:`laptop_deploy.exporters.int8_calib.capture`, pickled), ``quant_pre_process`` and the MinMax calibration
cache. Each int8 variant is then :func:`laptop_deploy.exporters.onnx_int8.quantize` of that graph with one
:class:`~laptop_deploy.exporters.onnx_int8.Int8Options` change (what ``export --precision int8 --min-psnr 0``
writes: everything quantized), its worst held-out PSNR against the fp32 PyTorch outputs measured as the gate does.

``profile``: one profiled OrtRunner session per graph (all graph optimisations, ORT's default threads — what
``bench`` and ``fresh_timing`` run), ``--warmup`` untimed calls, then ``--calls`` profiled ones; per kernel op
type the ms (median over the calls), the share of the kernel time and the kernel count. Shares, not absolute ms,
are what it is for: one session on a shared 2-core machine. → ``benchmarks/results/<name>.json``

``levers``: fp32 and the variants timed interleaved, each call in a fresh process
(:func:`laptop_deploy.deploy.fresh_timing.measure_fresh`, the protocol of ``bench_int8.py speed``), ``--repeats``
rounds; median and min-max, load average before and after. → ``benchmarks/results/<name>_levers.json``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QDQ = ("QuantizeLinear", "DequantizeLinear")
# label -> Int8Options fields changed from the defaults; "all-outputs" is the graph before FLOAT_OUTPUT_OPS
VARIANTS: dict[str, dict[str, Any]] = {
    "int8 all-outputs": {"float_outputs": ()},
    "int8 float-matmul": {"float_outputs": ("MatMul",)},
    "int8 float-matmul-gemm": {"float_outputs": ("MatMul", "Gemm")},
}


def prepare(model: str, work: Path, *, latent: int, prompts: int, steps: int) -> dict[str, Any]:
    """fp32 graph, captured inputs, preprocessed graph and calibration cache under ``work`` (made once);
    returns {"spec", "fp32", "pre", "cache", "data"}."""
    from laptop_deploy.deploy.spec import ExportSpec

    done = work / "prepared.json"
    if not done.exists():
        _prepare(model, work, latent=latent, prompts=prompts, steps=steps)
    info = json.loads(done.read_text())
    with open(work / "captured.pkl", "rb") as f:
        data = pickle.load(f)
    return {**{k: Path(v) for k, v in info["paths"].items()}, "spec": ExportSpec.from_dict(info["spec"]),
            "data": data, "model": info["model"]}


def _prepare(model: str, work: Path, *, latent: int, prompts: int, steps: int) -> None:
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.exporters.int8_calib import capture, read_prompts
    from laptop_deploy.exporters.int8_minmax import calibrate_minmax
    from laptop_deploy.exporters.onnx import OnnxOptions, export_fp32
    from laptop_deploy.exporters.onnx_int8 import preprocess
    from laptop_deploy.models.sources import resolve_model

    source = resolve_model(model)
    spec = build_spec(source.unet.config, precision="int8", height=latent, width=latent)
    (work / "fp32").mkdir(parents=True, exist_ok=True)
    fp32 = export_fp32(source.unet, spec.with_precision("fp32"), work / "fp32", options=OnnxOptions())
    data = capture(source.unet, spec, described=source.describe(), prompts=read_prompts(str(prompts)), steps=steps)
    del source
    gc.collect()
    pre = preprocess(fp32, work / "pre" / "model.onnx")
    cache = work / "calibration.json"
    calibrate_minmax(pre, data.calibration, cache)
    with open(work / "captured.pkl", "wb") as f:
        pickle.dump(data, f)
    paths = {"fp32": fp32, "pre": pre, "cache": cache}
    (work / "prepared.json").write_text(json.dumps({
        "model": model, "paths": {k: str(v) for k, v in paths.items()},
        "calibration": {"prompts": prompts, "steps": steps, "inputs": len(data.calibration),
                        "held_out": len(data.held_out)},
        "spec": spec.with_precision("fp32").as_dict()}, indent=1))


def variant(prepared: dict[str, Any], label: str) -> dict[str, Any]:
    """The int8 graph of :data:`VARIANTS` ``label`` (made once under the work folder) and its held-out PSNR."""
    from laptop_deploy.exporters.onnx_int8 import Int8Options, held_out_psnr, quantize

    folder = prepared["pre"].parent.parent / "variants" / label.replace(" ", "_")
    record = folder / "variant.json"
    if not record.exists():
        path = quantize(prepared["pre"], folder / "model.onnx", cache=prepared["cache"],
                        options=Int8Options(**VARIANTS[label]), feeds=None)
        psnr = held_out_psnr(path, prepared["data"])
        record.write_text(json.dumps({"path": str(path), "held_out_psnr_db": round(psnr, 2),
                                      "options": {k: list(v) for k, v in VARIANTS[label].items()}}))
    return json.loads(record.read_text())


def profile_graph(path: Path, spec: Any, *, warmup: int, calls: int) -> dict[str, Any]:
    """Per-op-type kernel ms (median over ``calls`` profiled calls of one session), shares, counts, run ms."""
    from laptop_deploy.deploy.ort_profile import read_profile
    from laptop_deploy.deploy.profile import _profiling_ort_runner
    from laptop_deploy.exporters.int8_graph import executed_ops

    feeds = spec.example_feeds(seed=0)
    with tempfile.TemporaryDirectory(prefix="ld-int8-profile.") as tmp:
        runner = _profiling_ort_runner()(path, spec=spec, providers="cpu", prefix=str(Path(tmp) / "ort"))
        with runner:
            for _ in range(warmup + calls):
                runner.infer(feeds)
            described = runner.describe()
            trace = runner.end_profiling()
        runs = read_profile(Path(trace), by_node={}, by_tensor={}, units=[], skip_runs=warmup)["runs"]
    types = sorted({t for r in runs for t in r["op_types"]})
    ms = {t: statistics.median(r["op_types"].get(t, 0.0) for r in runs) for t in types}
    kernel = sum(ms.values())
    counts = executed_ops(path, feeds)
    table = sorted(({"op_type": t, "ms": round(v, 1), "share": round(v / kernel, 4), "kernels": counts.get(t, 0)}
                    for t, v in ms.items()), key=lambda row: -row["ms"])
    return {"run_ms": round(statistics.median(r["run_ms"] for r in runs), 1), "kernel_ms": round(kernel, 1),
            "qdq_share": round(sum(ms.get(t, 0.0) for t in QDQ) / kernel, 4), "op_types": table,
            "runner": {k: described.get(k) for k in ("providers", "intra_op_threads", "graph_optimization")}}


def run_profile(prepared: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    graphs: dict[str, dict[str, Any]] = {}
    labels = ["fp32", *args.variants]
    for label in labels:
        print(f"profiling {label}", file=sys.stderr, flush=True)
        made = {"path": str(prepared["fp32"])} if label == "fp32" else variant(prepared, label)
        graphs[label] = {**profile_graph(Path(made["path"]), prepared["spec"], warmup=args.warmup, calls=args.calls),
                         "held_out_psnr_db": made.get("held_out_psnr_db")}
    base = graphs["fp32"]["kernel_ms"]
    return {"graphs": graphs, "fp32_over_kernel_ms": {k: round(base / g["kernel_ms"], 3) for k, g in graphs.items()}}


def run_levers(prepared: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from laptop_deploy.deploy.fresh_timing import measure_fresh

    made = {label: variant(prepared, label) for label in args.variants}
    models = {"fp32": (prepared["fp32"], prepared["spec"]),
              **{label: (Path(m["path"]), prepared["spec"]) for label, m in made.items()}}
    print(f"timing {', '.join(models)} interleaved, {args.repeats} rounds, fresh processes", file=sys.stderr)
    timing = measure_fresh(models, repeats=args.repeats, threads=None,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    fp32 = timing["fp32"]["median_ms"]
    return {"timing": timing, "speedup_over_fp32": {k: round(fp32 / t["median_ms"], 3) for k, t in timing.items()},
            "held_out_psnr_db": {k: m["held_out_psnr_db"] for k, m in made.items()},
            "options": {k: m["options"] for k, m in made.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("profile", "levers", "prepare"))
    parser.add_argument("--model", default="/tmp/i8/sd15-lat05", help="model spec or student folder")
    parser.add_argument("--work", default="/tmp/i8/prof", help="scratch folder, reused across runs")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--calib-prompts", type=int, default=1)
    parser.add_argument("--calib-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1, help="profile: untimed calls first")
    parser.add_argument("--calls", type=int, default=2, help="profile: profiled calls per graph")
    parser.add_argument("--repeats", type=int, default=5, help="levers: interleaved rounds")
    parser.add_argument("--name", default="int8_profile_sd15", help="result file stem under benchmarks/results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args.model, work, latent=args.latent, prompts=args.calib_prompts, steps=args.calib_steps)
    if args.part == "prepare":
        for label in args.variants:
            print(label, variant(prepared, label), flush=True)
        return
    load_before = os.getloadavg()
    body = (run_profile if args.part == "profile" else run_levers)(prepared, args)
    result = {"command": f"python benchmarks/int8_profile.py {' '.join(argv or sys.argv[1:])}",
              "model": prepared["model"], "latent": [args.latent, args.latent], "batch": 1,
              "calibration": json.loads((work / "prepared.json").read_text())["calibration"], **body,
              "load_avg": {"before": load_before, "after": os.getloadavg()},
              "seconds": round(time.perf_counter() - started, 1)}
    result["busy_warning"] = max(load_before[0], os.getloadavg()[0]) > 1.5
    if result["busy_warning"]:
        print(f"warning: load average up to {max(load_before[0], os.getloadavg()[0]):.1f} on {os.cpu_count()} "
              f"cores: the machine was busy; compare ratios and shares, not absolute times", file=sys.stderr)
    name = args.name if args.part == "profile" else f"{args.name}_levers"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / (name + '.json')}")
    if args.part == "levers":
        print(json.dumps({k: body[k] for k in ("speedup_over_fp32", "held_out_psnr_db")}))
        return
    for label, graph in body["graphs"].items():
        print(f"{label}: kernels {graph['kernel_ms']} ms ({body['fp32_over_kernel_ms'][label]}x fp32), "
              f"Q/DQ {graph['qdq_share']:.1%}, held-out PSNR {graph['held_out_psnr_db']}")
        for row in graph["op_types"][:12]:
            print(f"  {row['op_type']:24s} {row['ms']:8.1f} ms {row['share']:7.1%}  x{row['kernels']}")


if __name__ == "__main__":
    main()
