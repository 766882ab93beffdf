"""ONNX Runtime timing with every measurement in a fresh Python process, interleaved over rounds.

Why: on this project's 2-vCPU machine a long-lived process that had scored, exported and profiled SD-1.5 variants
ran the smaller ones up to 1.6× slower than a fresh process did (``benchmarks/results/bench_latency_fresh.md``: the
``--cost latency --ratio 0.5`` student measured 0.77× the teacher in-process, 0.48× fresh), while the teacher
agreed. A fresh process per measurement removes whatever state the long process carried (allocator, page cache
pressure, huge-page compaction — the cause was not pinned down) from the comparison.

One measurement = ``python -m laptop_deploy.deploy.fresh_timing MODEL SPEC_JSON WARMUP CALLS THREADS PROVIDER``: the child
opens the model in an :class:`~laptop_deploy.runtimes.ort.OrtRunner`, makes ``WARMUP`` untimed and ``CALLS``
timed calls on the spec's seeded example feeds (:func:`.profile.measure_interleaved` with one round) and prints
``{"median_ms": ...}``. :func:`measure_fresh` runs one child per (round, variant), A B C A B C ..., and returns
what :func:`.profile.measure_interleaved` returns.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .spec import ExportSpec


def time_in_child(model: Path, spec: ExportSpec, *, warmup: int = 1, calls: int = 1, threads: int | None = None,
                  provider: str = "cpu") -> float:
    """Median ms of ``calls`` timed calls of ``model`` in a new process (after ``warmup`` untimed ones) on the
    OrtRunner's ``provider`` (cpu, cuda, tensorrt)."""
    argv = [sys.executable, "-m", __name__, str(model), json.dumps(spec.as_dict()), str(warmup), str(calls),
            str(threads or 0), provider]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"timing {model} in a fresh process failed (exit {done.returncode}): {tail}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["median_ms"])


def measure_fresh(models: Mapping[str, tuple[Path, ExportSpec]], *, repeats: int = 3, calls: int = 1,
                  warmup: int = 1, threads: int | None = None, provider: str = "cpu",
                  progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time ``models`` ({name: (model file, spec)}) interleaved over ``repeats`` rounds, each measurement in a
    fresh process; {name: {"median_ms", "min_ms", "max_ms", "rounds_ms"}} over the rounds."""
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        for name, (model, spec) in models.items():
            if progress:
                progress(f"round {r + 1}/{repeats}: {name} (fresh process)")
            rounds[name].append(time_in_child(model, spec, warmup=warmup, calls=calls, threads=threads,
                                              provider=provider))
    return {name: {"median_ms": round(statistics.median(v), 4), "min_ms": round(min(v), 4),
                   "max_ms": round(max(v), 4), "rounds_ms": [round(x, 4) for x in v]} for name, v in rounds.items()}


def _child(argv: list[str]) -> None:
    from ..runtimes.ort import OrtRunner
    from .profile import measure_interleaved

    model, spec_json, warmup, calls, threads, provider = argv
    spec = ExportSpec.from_dict(json.loads(spec_json))
    make = lambda: OrtRunner(model, spec=spec, providers=provider, intra_op_threads=int(threads) or None)  # noqa: E731
    timed = measure_interleaved({"model": make}, spec.example_feeds(seed=0), repeats=1, calls=int(calls),
                                warmup=int(warmup))["model"]
    print(json.dumps({"median_ms": timed["median_ms"]}))


if __name__ == "__main__":
    _child(sys.argv[1:])
