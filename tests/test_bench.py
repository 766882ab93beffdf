"""The latency harness: percentiles, load time, peak RSS, ratios, one table for several runners."""

from __future__ import annotations

import numpy as np
import pytest

from deploy_fixtures import tiny_source, torch_threads
from laptop_deploy.deploy.bench import (RssSampler, bench_many, bench_runner, environment, format_table, matmul_gflops,
                                        ratios)
from laptop_deploy.errors import LaptopDeployError
from laptop_deploy.memory import current_rss_mb
from laptop_deploy.runtimes.pytorch import TorchRunner
from laptop_deploy.deploy.spec import build_spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_bench_runner_reports_consistent_statistics():
    source = tiny_source("random:tiny-sd15")
    spec = build_spec(source.unet.config)
    result = bench_runner(TorchRunner(source.unet, spec=spec), spec.example_feeds(), warmup=1, iterations=6)
    assert result.name == "torch" and result.iterations == 6 and len(result.times_ms) == 6
    assert min(result.times_ms) == result.min_ms <= result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.p99_ms <= max(result.times_ms)
    assert result.mean_ms == pytest.approx(np.mean(result.times_ms))
    assert result.load_s >= 0 and result.peak_rss_mb >= result.rss_before_mb > 0
    assert result.runner["runtime"] == "torch"
    assert set(result.as_dict()) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "load_s", "peak_rss_mb"}
    with pytest.raises(LaptopDeployError, match="iterations must be ≥ 1"):
        bench_runner(TorchRunner(source.unet, spec=spec), spec.example_feeds(), iterations=0)


def test_bench_many_compares_runners_in_one_run():
    teacher = tiny_source("random:tiny-sd15")
    student = tiny_source("random:tiny-sd15", student=True)
    spec = build_spec(teacher.unet.config)
    results = bench_many({"teacher": TorchRunner(teacher.unet, spec=spec),
                          "student": TorchRunner(student.unet, spec=spec)},
                         spec.example_feeds(), warmup=1, iterations=3)
    rel = ratios(results)
    assert list(rel) == ["teacher", "student"] and rel["teacher"] == 1.0
    assert rel["student"] == pytest.approx(results[1].p50_ms / results[0].p50_ms, rel=1e-3)
    assert ratios(results, baseline="student")["student"] == 1.0
    table = format_table(results, macs={"teacher": 10**9, "student": 5 * 10**8})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["runner", "p50", "ms"] and "GFLOP/s" in lines[0]
    gflops = 2 * 10**9 / (results[0].p50_ms / 1e3) / 1e9
    assert lines[2].startswith("teacher") and lines[2].split()[-1] == f"{gflops:.1f}"


def test_rss_sampler_sees_an_allocation():
    before = current_rss_mb()
    with RssSampler(interval_s=0.001) as rss:
        block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        del block
    assert rss.peak_mb >= before + 48


def test_environment_and_matmul_rate():
    env = environment()
    assert env["logical_cores"] >= 1 and env["torch_threads"] == 1 and "torch" in env["versions"]
    assert 0.1 < matmul_gflops(n=256, repeats=3) < 1e5
