"""Runtime benchmark: the full-size SD-1.5 U-Net (random weights) and what pruning it really gives — LAPTOP-Diff's
own students (``--cost params`` and ``--cost macs`` at ratio 0.5) and BK-SDM-Small — in eager PyTorch and ONNX
Runtime (CPU, fp32, batch 1, 64×64 latent), all interleaved in one run (≥ 3 rounds, median and min–max, load
average recorded, a warning when the machine was busy).

The students come from ``sd15_students`` (output-loss scores computed once and cached, shared with
``bench_latency.py``, which runs this same measurement as part of its run and writes these result files too)::

    flock /tmp/ld-heavy.lock python benchmarks/bench_runtimes.py [--repeats 3] [--threads 1]

writes benchmarks/results/bench_runtimes.json and bench_runtimes.md (a table and the exact command).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from sd15_students import (RESULTS, busy_warning, export_variants, load_average, load_or_score, ort_factories,
                           removal_sets, say, torch_runner)

VARIANTS = ["teacher", "params@0.5", "macs@0.5", "bk-sdm-small"]


def write_results(run: dict, sets: dict[str, list[str]], sizes: dict[str, dict[str, int]],
                  torch_times: dict[str, dict], ort_times: dict[str, dict], out: Path) -> None:
    """bench_runtimes.{json,md} from one interleaved run (``run`` carries command, model, load, environment)."""
    rows = []
    names = [name for name in VARIANTS if name in torch_times and name in ort_times]
    for name in names:
        for runtime, times in (("torch eager", torch_times), ("onnxruntime cpu", ort_times)):
            base = times["teacher"]["median_ms"]
            rows.append({"variant": name, "runtime": runtime, **times[name],
                         "ratio_vs_teacher": round(times[name]["median_ms"] / base, 4),
                         "ratio_min_max": [round(times[name]["min_ms"] / base, 4),
                                           round(times[name]["max_ms"] / base, 4)],
                         "params": sizes[name]["params"], "macs": sizes[name]["macs"], "removed": sets[name]})
    data = {k: run[k] for k in ("command", "model", "latent", "batch", "threads", "load_average", "environment",
                                "warning")}
    data["score"] = run["score"]
    data["rows"] = rows
    data["ort_vs_torch"] = {name: round(ort_times[name]["median_ms"] / torch_times[name]["median_ms"], 4)
                            for name in names}
    (out / "bench_runtimes.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench_runtimes.md").write_text(_markdown(data))


def _markdown(data: dict) -> str:
    env = data["environment"]
    lines = ["# Runtime benchmark: SD-1.5 U-Net teacher vs LAPTOP-Diff's students and BK-SDM-Small, PyTorch eager "
             "vs ONNX Runtime CPU", "", f"Command: `{data['command']}`", ""]
    if data.get("warning"):
        lines += [f"**{data['warning']}**", ""]
    lines += [f"Machine: {env['cpu']}, {env['logical_cores']} logical cores, {data['threads']} thread(s) per "
              f"runtime; load average before / after {data['load_average']['before']} / "
              f"{data['load_average']['after']}; versions {json.dumps(env['versions'])}", "",
              f"Model `{data['model']}` batch {data['batch']}, latent {data['latent'][0]}x{data['latent'][1]}. "
              f"Students: the exact knapsack on output-loss scores (computed once: {data['score']['key']}) with "
              f"`--cost params` / `--cost macs` at ratio 0.5, and BK-SDM-Small's handcrafted set. Every runner is "
              f"loaded, warmed up once and timed once per round; the rounds interleave all variants.", "",
              "| variant | runtime | params | GMACs | median ms | min–max ms | × teacher (min–max) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lo, hi = r["ratio_min_max"]
        lines.append(f"| {r['variant']} | {r['runtime']} | {r['params']:,} | {r['macs'] / 1e9:.1f} | "
                     f"{r['median_ms']:.0f} | {r['min_ms']:.0f}–{r['max_ms']:.0f} | {r['ratio_vs_teacher']:.3f} "
                     f"({lo:.3f}–{hi:.3f}) |")
    lines += ["", "| variant | ORT / torch (median) |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in data["ort_vs_torch"].items()]
    lines += ["", "Removed units per variant: `bench_runtimes.json` (`rows[].removed`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--calib", type=int, default=2)
    parser.add_argument("--score-latent", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_runtimes.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    import torch

    from laptop_deploy.deploy.bench import environment
    from laptop_deploy.deploy.profile import measure_interleaved
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.models.sources import resolve_model
    from bench_latency import _sizes

    torch.set_num_threads(args.threads)
    before = load_average()
    source = resolve_model(args.model)
    unet = source.unet
    spec = build_spec(unet.config, batch=1)
    scored = load_or_score(source, model=args.model, seed=0, calib=args.calib, latent=tuple(args.score_latent))
    sets = removal_sets(unet, scored["scores"], table=None, latent=(spec.height, spec.width), variants=VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="bench_runtimes."))
    try:
        exports = export_variants(unet, spec, sets, work)
        feeds = spec.example_feeds(seed=0)
        say("timing in onnxruntime and torch, interleaved")
        ort_times = measure_interleaved(ort_factories({k: v["path"] for k, v in exports.items()}, spec,
                                                      args.threads), feeds, repeats=args.repeats, progress=say)
        torch_times = measure_interleaved({k: (lambda r=sets[k]: torch_runner(unet, spec, r)) for k in VARIANTS},
                                          feeds, repeats=args.repeats, progress=say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = load_average()
    env = environment()
    run = {"command": command, "model": args.model, "latent": [spec.height, spec.width], "batch": 1,
           "threads": args.threads, "load_average": {"before": before, "after": after}, "environment": env,
           "warning": busy_warning(before, after, env["logical_cores"]),
           "score": {k: scored[k] for k in ("key", "seconds", "forward_passes")}}
    write_results(run, sets, _sizes(unet, sets, (spec.height, spec.width)), torch_times, ort_times, RESULTS)
    print((RESULTS / "bench_runtimes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
