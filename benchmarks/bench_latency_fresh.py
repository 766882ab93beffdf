"""Recheck of ``bench_latency.py``'s measured column with every measurement in a fresh process.

``bench_latency.py`` times all variants inside the one process that scored, exported and profiled them. On this
2-vCPU VM a standalone check of the same ``.onnx`` files disagreed with it (the ``--cost latency --ratio 0.5``
student: 0.77× the teacher inside the benchmark, 0.33–0.40× in a fresh process), so this script times the
exported variants again, each call in its own Python process (load, ``--warmup`` untimed calls, ``--calls`` timed
calls, median), interleaved over rounds (A B C … A B C …), and compares with the predictions
``bench_latency.json`` recorded.

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_latency_fresh.py --work DIR [--teacher DIR]

``--work`` is the ``--work`` folder a ``bench_latency.py`` run kept (one artifact folder per variant); writes
``results/bench_latency_fresh.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_once(folder: Path, args: argparse.Namespace) -> float:
    """One measurement of the artifact in ``folder`` in a new process (``laptop_deploy.deploy.fresh_timing``)."""
    from laptop_deploy.deploy.fresh_timing import time_in_child
    from laptop_deploy.deploy.manifest import read_manifest

    manifest = read_manifest(folder)
    return time_in_child(folder / manifest.model_file, manifest.spec, warmup=args.warmup, calls=args.calls,
                         threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench_latency.py --work folder")
    parser.add_argument("--teacher", type=Path, help="the teacher's artifact (default WORK/teacher)")
    parser.add_argument("--source", type=Path, default=RESULTS / "bench_latency.json",
                        help="the bench_latency.py result whose predictions are compared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    source = json.loads(args.source.read_text())
    rows = {r["variant"]: r for r in source["rows"]}
    folders = {name: args.work / name.replace("@", "_") for name in rows if name != "teacher"}
    folders = {"teacher": args.teacher or args.work / "teacher", **folders}
    missing = [str(f) for f in folders.values() if not (f / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"no artifact in {', '.join(missing)}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {name: [] for name in folders}
    for r in range(args.rounds):
        for name, folder in folders.items():
            say(f"round {r + 1}/{args.rounds}: {name}")
            times[name].append(time_once(folder, args))
    load_after = [round(x, 2) for x in os.getloadavg()]
    teacher = statistics.median(times["teacher"])
    out = []
    for name, values in times.items():
        measured = statistics.median(values) / teacher
        predicted = rows.get(name, {}).get("predicted_ratio", 1.0)
        inside = rows.get(name, {}).get("measured_ratio", 1.0)
        out.append({"variant": name, "rounds_ms": [round(v, 1) for v in values], "measured_ratio": round(measured, 4),
                    "min_max": [round(min(values) / teacher, 4), round(max(values) / teacher, 4)],
                    "predicted_ratio": predicted, "error": round(predicted / measured - 1, 4),
                    "in_process_ratio": inside})
    command = "python benchmarks/bench_latency_fresh.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "source": str(args.source.name), "rounds": args.rounds, "warmup": args.warmup,
              "calls": args.calls, "threads": args.threads, "load_average": {"before": load_before,
                                                                              "after": load_after},
              "cores": os.cpu_count(), "rows": out}
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    lines = ["# SD-1.5 students, ONNX Runtime CPU fp32: every measurement in a fresh process", "",
             f"Command: `{command}`", ""]
    if busy:
        lines += [f"**WARNING: the machine was busy (1-min load average {load_before[0]} before, {load_after[0]} "
                  f"after, on {os.cpu_count()} cores)**", ""]
    lines += [f"Each measurement: a new Python process loads the variant's `.onnx` (as `{args.source.name}`'s run "
              f"exported it), {args.warmup} untimed call(s), {args.calls} timed call(s), median; variants "
              f"interleaved over {args.rounds} rounds; {args.threads} intra-op thread(s), batch 1, 64x64 latent. "
              f"Load average before / after: {load_before} / {load_after}. Predicted: the latency table's "
              f"step − Σ removed units, as recorded in `{args.source.name}`; in-process: that run's measurement.",
              "", "| variant | measured × teacher (min–max) | predicted × | error | in-process measured × |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['measured_ratio']:.3f} ({r['min_max'][0]:.3f}–{r['min_max'][1]:.3f}) | "
              f"{r['predicted_ratio']:.3f} | {100 * r['error']:+.1f}% | {r['in_process_ratio']:.3f} |" for r in out]
    lines += ["", "Error = predicted / measured − 1 (negative: the table predicted it faster than measured)."]
    (RESULTS / "bench_latency_fresh.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_latency_fresh.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
