"""One latency harness for every runner: load (timed), warm up, time N calls, report percentiles and peak RSS.

Runners are measured one after another, each released before the next loads, so a runner's peak RSS is its own
(plus whatever the process already held, reported as ``rss_before_mb``) and no idle thread pool of one runtime
competes with another. Times are wall-clock per ``infer`` call in ms (``time.perf_counter``); runners synchronise
their device before returning. Compare variants measured **in the same run** (ratios), not across runs.
"""

from __future__ import annotations

import gc
import os
import platform
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import LaptopDeployError
from ..memory import current_rss_mb
from .manifest import tool_versions

PERCENTILES = (50, 90, 99)


@dataclass
class BenchResult:
    """Latency of one runner: ``*_ms`` over ``iterations`` timed calls after ``warmup`` untimed ones; ``load_s``
    is runner creation (session creation / weight loading); RSS figures are process-wide, in MiB."""

    name: str
    runner: dict[str, Any]
    iterations: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    std_ms: float
    load_s: float
    peak_rss_mb: float
    rss_before_mb: float
    times_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()} | \
            {"times_ms": [round(t, 3) for t in self.times_ms]}


class RssSampler:
    """Context manager sampling RSS every ``interval_s`` on a background thread; ``peak_mb`` after exit.
    Spikes shorter than the interval can be missed."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def bench_runner(runner: Any, feeds: Mapping[str, np.ndarray], *, warmup: int = 3, iterations: int = 20,
                 name: str | None = None) -> BenchResult:
    """Enter ``runner`` (timed), call it ``warmup`` times, then time ``iterations`` calls; release it.
    ``feeds`` (float32 is fine) are cast to the runner's spec dtypes first."""
    if iterations < 1 or warmup < 0:
        raise LaptopDeployError(f"iterations must be ≥ 1 and warm-up ≥ 0 (got {iterations}, {warmup})")
    feeds = runner.spec.cast_feeds(feeds)
    gc.collect()
    before = current_rss_mb()
    times: list[float] = []
    with RssSampler() as rss:
        with runner:
            for _ in range(warmup):
                runner.infer(feeds)
            for _ in range(iterations):
                start = time.perf_counter()
                runner.infer(feeds)
                times.append((time.perf_counter() - start) * 1e3)
            info = runner.describe()
    arr = np.asarray(times)
    p50, p90, p99 = (float(np.percentile(arr, q)) for q in PERCENTILES)
    return BenchResult(name or runner.name, info, iterations, warmup, p50, p90, p99, float(arr.mean()),
                       float(arr.min()), float(arr.std()), float(runner.load_s or 0.0), rss.peak_mb, before, times)


def bench_many(runners: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *, warmup: int = 3,
               iterations: int = 20) -> list[BenchResult]:
    """:func:`bench_runner` on each named runner in order, all on the same ``feeds``."""
    return [bench_runner(runner, feeds, warmup=warmup, iterations=iterations, name=name)
            for name, runner in runners.items()]


def ratios(results: list[BenchResult], *, baseline: str | None = None) -> dict[str, float]:
    """Median latency of each result divided by the baseline's (default: the first); < 1 means faster."""
    base = next((r for r in results if r.name == baseline), results[0]) if results else None
    return {r.name: round(r.p50_ms / base.p50_ms, 4) for r in results} if base else {}


def environment() -> dict[str, Any]:
    """Where the numbers were taken: CPU model, cores, thread settings, OS and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "versions": tool_versions()}


def matmul_gflops(*, n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul rate of this machine with torch's current thread count, in GFLOP/s (2·n³ per
    product, best of ``repeats`` after a warm-up): the compute roof for the achieved-GFLOP/s column."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def format_table(results: list[BenchResult], *, baseline: str | None = None,
                 macs: Mapping[str, int] | None = None) -> str:
    """Fixed-width table: one row per runner, ratios against the baseline, achieved GFLOP/s when MACs given."""
    rel = ratios(results, baseline=baseline)
    head = f"{'runner':<28} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'mean ms':>10} {'load s':>8} " \
           f"{'peak RSS MiB':>12} {'x base':>7}"
    lines = [head + ("  GFLOP/s" if macs else ""), "-" * (len(head) + (9 if macs else 0))]
    for r in results:
        row = f"{r.name:<28} {r.p50_ms:>10.2f} {r.p90_ms:>10.2f} {r.p99_ms:>10.2f} {r.mean_ms:>10.2f} " \
              f"{r.load_s:>8.2f} {r.peak_rss_mb:>12.0f} {rel[r.name]:>7.3f}"
        if macs and r.name in macs:
            row += f"  {2 * macs[r.name] / (r.p50_ms / 1e3) / 1e9:>7.1f}"
        lines.append(row)
    return "\n".join(lines)
