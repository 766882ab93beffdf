"""Parity: the pure comparator (metrics, tolerances, every failure collected) and the scheduler-loop capture,
exercised with PyTorch runners only (the ONNX end of it is in test_export_onnx.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deploy_fixtures import tiny_source, torch_threads
from laptop_deploy.runtimes.pytorch import TorchRunner
from laptop_deploy.deploy.spec import build_spec
from laptop_deploy.deploy.verify import (PSNR_CAP, Tolerances, compare, conditioning, denoise, make_scheduler,
                                  output_metrics, random_cases, run_parity)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    out = ref + np.float32(0.01) * rng.standard_normal(ref.shape).astype(np.float32)
    m = output_metrics(ref, out)
    diff = out.astype(np.float64) - ref
    assert m.max_abs == pytest.approx(np.abs(diff).max()) and m.mean_abs == pytest.approx(np.abs(diff).mean())
    assert m.rel_l2 == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref.astype(np.float64)))
    assert m.psnr_db == pytest.approx(20 * math.log10(np.abs(ref).max() / np.sqrt((diff**2).mean())))
    assert 0.9999 < m.cosine < 1 and m.nan_count == m.inf_count == 0
    same = output_metrics(ref, ref.copy())
    assert (same.max_abs, same.rel_l2, same.psnr_db, same.cosine) == (0.0, 0.0, PSNR_CAP, pytest.approx(1.0))


def test_compare_collects_every_failing_output():
    ref = {"a": np.ones((4, 4), np.float32), "b": np.ones(8, np.float32), "c": np.ones(3, np.float32),
           "d": np.ones(2, np.float32)}
    out = {"a": ref["a"] * 1.1, "b": ref["b"].copy(), "c": np.array([1.0, np.nan, np.inf], np.float32),
           "d": np.ones(3, np.float32)}
    out["b"][0] = 1.0 + 1e-6
    report = compare(ref, {**out, "extra": np.zeros(1)}, tolerances=Tolerances(), case="x")
    assert not report.passed
    failures = report.failures
    assert "x/d: shape [3], reference [2]" in failures
    assert any(f.startswith("x/a: relative L2 0.1 > 0.0001") for f in failures)
    assert any(f.startswith("x/a: PSNR 20.00 dB < 60 dB") for f in failures)
    assert "x/c: 1 NaN and 1 Inf values" in failures
    assert not any(f.startswith("x/b") for f in failures)  # 1e-6 off: within fp32 tolerances
    report = compare({"missing": ref["a"]}, out, tolerances=Tolerances(), case="y")
    assert report.failures == ["y/missing: missing from the candidate's outputs (a, b, c, d)"]


def test_per_output_tolerances_and_precision_defaults():
    ref = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
    out = {"a": ref["a"] * 1.001, "b": ref["b"] * 1.001}  # rel L2 1e-3, PSNR 60 dB
    loose = {"a": Tolerances(max_rel_l2=1e-2, min_psnr_db=None), "*": Tolerances()}
    report = compare(ref, out, tolerances=loose)
    assert [m.output for m in report.outputs if not m.passed] == ["b"]
    assert Tolerances.for_precision("fp16") == Tolerances(max_rel_l2=None, min_psnr_db=35.0)
    assert Tolerances.for_precision("fp32") == Tolerances(max_rel_l2=1e-4, min_psnr_db=60.0)
    summary = report.summary()
    assert summary["passed"] is False and summary["rel_l2"] == pytest.approx(1e-3, rel=1e-3)


def test_nonfinite_output_fails_without_breaking_the_metrics():
    ref = {"x": np.ones(4, np.float32)}
    report = compare(ref, {"x": np.full(4, np.nan, np.float32)}, tolerances=Tolerances(None, None))
    assert not report.passed and report.outputs[0].nan_count == 4
    summary = report.summary()
    assert summary["max_abs"] is None and summary["psnr_db"] == -PSNR_CAP  # JSON-safe: no NaN/Infinity


def test_scheduler_loop_records_high_middle_low_timesteps(make_source):
    source = tiny_source("random:tiny-sdxl")
    spec = build_spec(source.unet.config)
    cond = conditioning(source, spec, seed=0)
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}  # through the text encoders
    assert cond["time_ids"].tolist() == [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]
    seen = []
    with TorchRunner(source.unet, spec=spec) as runner:
        final = denoise(runner, spec, scheduler=make_scheduler(source), cond=cond, steps=5, seed=0,
                        record=lambda i, case: seen.append(case))
        again = denoise(runner, spec, scheduler=make_scheduler(source), cond=cond, steps=5, seed=0)
    assert [c.feeds["timestep"][0] for c in seen] == [801.0, 601.0, 401.0, 201.0, 1.0]
    assert all(c.reference["out_sample"].shape == (1, 4, 16, 16) for c in seen)
    # Euler scales the model input by 1/sqrt(sigma^2 + 1): the first step sees the noise at sigma ~ 7
    assert seen[0].feeds["sample"].std() < 1.5
    np.testing.assert_array_equal(final, again)
    assert final.shape == (1, 4, 16, 16) and np.isfinite(final).all()


def test_sources_without_a_scheduler_get_stable_diffusions_euler(make_source, tmp_path):
    from diffusers import EulerDiscreteScheduler

    scheduler = make_scheduler(None)
    assert isinstance(scheduler, EulerDiscreteScheduler)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
    preset = make_scheduler(make_source("random:tiny-sd15"))
    assert preset is not make_source("random:tiny-sd15").part("scheduler")  # a fresh copy every call


def test_random_cases_cover_another_shape_for_dynamic_specs(make_source):
    config = make_source("random:tiny-sd15").unet.config
    assert [c.name for c in random_cases(build_spec(config), seed=0)] == ["random"]
    cases = random_cases(build_spec(config, dynamic=True), seed=0)
    assert [c.name for c in cases] == ["random", "random 2x24x32"]
    assert cases[1].feeds["sample"].shape == (2, 4, 24, 32)


def test_run_parity_passes_for_the_same_model_and_fails_for_another():
    source = tiny_source("random:tiny-sd15")
    spec = build_spec(source.unet.config)
    with TorchRunner(source.unet, spec=spec) as ref, TorchRunner(source.unet, spec=spec) as same:
        result = run_parity(ref, same, source=source, steps=3)
    assert result.passed and result.as_dict()["rel_l2"] == 0.0 and result.end_to_end.psnr_db == PSNR_CAP
    other = tiny_source("random:tiny-sd15", student=True)  # the student of the same teacher: a real mismatch
    with TorchRunner(source.unet, spec=spec) as ref, TorchRunner(other.unet, spec=spec) as candidate:
        result = run_parity(ref, candidate, source=source, steps=3)
    data = result.as_dict()
    assert not result.passed and data["rel_l2"] > 1e-2 and len(data["cases"]) == 4
    assert any(f.startswith("end-to-end: ") for f in data["failures"])
