"""The calibrated parity gate (deploy/noise_floor.py) and the mutations it must catch (deploy/mutants.py).

Default suite: the gate's arithmetic, then through the CLI the issue's own example (one up-block conv weight
×1.01 in a tiny-sd15 ONNX graph, its digests rewritten: the old fixed thresholds passed it) plus a timestep fed
scaled and an Inf in one node, on the session's shared export. The exhaustive sweep over models, targets and
precisions (what benchmarks/parity_mutations.py tabulates) is `-m slow`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from laptop_deploy.deploy.noise_floor import FACTORS, MIN_REL_L2_FLOOR, Gate, floor_row

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from deploy_fixtures import torch_threads

    with torch_threads(1):  # tiny widths: one thread is as fast, and immune to OpenMP spinning on a busy machine
        yield


def test_floor_row_is_the_ratio_of_errors_against_float64():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((1, 4, 8, 8))
    noise = rng.standard_normal(exact.shape)
    floor = exact + 1e-6 * noise
    good = exact + 1.5e-6 * rng.standard_normal(exact.shape)
    row = floor_row(exact, floor, good, gate=Gate(), case="c", output="o", reference="torch fp32")
    assert row.floor_rel_l2 == pytest.approx(1e-6 * np.linalg.norm(noise) / np.linalg.norm(exact))
    assert row.factor_rel_l2 == pytest.approx(np.linalg.norm(good - exact) / np.linalg.norm(floor - exact))
    assert 1 < row.factor_rel_l2 < 2 and row.passed
    bad = exact + 1e-5 * rng.standard_normal(exact.shape)  # 10x the floor
    row = floor_row(exact, floor, bad, gate=Gate(rel_l2_factor=4.0, max_abs_factor=None), case="c", output="o",
                    reference="torch fp32")
    assert not row.passed and row.factor_rel_l2 == pytest.approx(np.linalg.norm(bad - exact) /
                                                                 np.linalg.norm(floor - exact))
    assert row.failures[0].startswith("relative L2 vs float64 ") and "x the torch fp32 floor" in row.failures[0]
    # a floor of exactly 0 (reference bit-equal to float64) is clamped at fp32's unit roundoff, not divided by
    row = floor_row(exact, exact, exact * (1 + 1e-7), gate=Gate(), case="c", output="o", reference="torch fp32")
    assert row.factor_rel_l2 == pytest.approx(1e-7 / MIN_REL_L2_FLOOR) and row.passed
    # no floor when the reference itself overflows: fail and say how to judge it instead
    row = floor_row(exact, np.full(exact.shape, np.inf), exact, gate=Gate(), case="c", output="o",
                    reference="torch fp16")
    assert not row.passed and "--max-rel-l2" in row.failures[0]
    assert Gate.for_precision("fp16").rel_l2_factor == FACTORS["fp16"][0]
    assert Gate.for_precision("int8").rel_l2_factor == FACTORS["fp32"][0]


def test_fixed_overrides_replace_the_gate_and_polygraphy_rule_is_per_element():
    from laptop_deploy.deploy.verify import Tolerances, compare, parity_rules
    from laptop_deploy.errors import LaptopDeployError

    tol, gate = parity_rules("fp16")
    assert tol is None and gate == Gate.for_precision("fp16") and gate.enforced
    tol, gate = parity_rules("fp32", atol=1e-3, rtol=1e-2, factor=6)
    assert tol == Tolerances(None, None, 1e-3, 1e-2) and gate.rel_l2_factor == 6 and not gate.enforced
    with pytest.raises(LaptopDeployError, match="--factor 0: must be > 0"):
        parity_rules("fp32", factor=0)
    ref = {"x": np.array([1.0, 100.0, 0.0], np.float32)}
    out = {"x": np.array([1.0015, 100.5, 0.0009], np.float32)}  # |d| = 1.5e-3, 0.5, 9e-4
    report = compare(ref, out, tolerances=Tolerances(None, None, atol=1e-3, rtol=1e-2))
    assert report.failures == []  # bounds 1.01e-3 + ..., 1.001, 1e-3
    report = compare(ref, out, tolerances=Tolerances(None, None, atol=1e-3))
    assert report.failures == ["/x: 2 of 3 elements outside atol 0.001 + rtol 0·|ref|"]


def _run(capsys, *argv: str) -> tuple[int, dict]:
    from laptop_deploy.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert err == "", err
    return code, json.loads(out)


def _mutant(artifact: Path, source, out: Path, mutation) -> Path:
    """``artifact`` with ``mutation`` applied to its graph and its manifest's digests rewritten to match: what a
    wrong exporter writes (integrity passes; only parity can tell)."""
    import onnx

    from laptop_deploy.deploy.manifest import describe_files, read_manifest, write_manifest
    from laptop_deploy.deploy.mutants import mutate_onnx

    folder = shutil.copytree(artifact, out)
    model = mutate_onnx(onnx.load(str(artifact / "model.onnx")), source.unet, mutation)
    onnx.save_model(model, str(folder / "model.onnx"))
    manifest = read_manifest(folder, check_files=False)
    manifest.files, manifest.results = describe_files(folder), {}
    write_manifest(folder, manifest)
    return folder


def test_the_issues_example_fails_the_gate_where_fixed_thresholds_passed_it(capsys, tmp_path, tiny_onnx_fp32):
    from laptop_deploy.deploy.mutants import Mutation

    pytest.importorskip("onnxruntime")
    source, artifact = tiny_onnx_fp32
    verify = ["--model", "random:tiny-sd15", "--steps", "2", "--threads", "1", "--json"]
    code, good = _run(capsys, "verify", str(artifact), *verify)
    rows = good["gate"]["rows"]
    assert code == 0 and good["passed"] and good["gate"]["enforced"]
    assert [r["case"] for r in rows] == ["step 0 (t=501)", "step 1 (t=1)", "random", "end-to-end"]
    assert all(r["reference"] == "torch fp32" and 1e-8 < r["floor_rel_l2"] < 1e-5 for r in rows)
    assert max(r["factor_rel_l2"] for r in rows) < FACTORS["fp32"][0]

    scaled = Mutation("up-block conv x1.01", "scale", "up_blocks.0.resnets.0.conv1.weight", 1.01)
    folder = _mutant(artifact, source, tmp_path / "scaled", scaled)
    code, bad = _run(capsys, "verify", str(folder), *verify)
    assert code == 1 and not bad["passed"] and bad["exit_code"] == 1
    assert bad["gate"]["factor_rel_l2"] > 5 * FACTORS["fp32"][0]  # measured ~90x
    assert any("x the torch fp32 floor" in f for f in bad["failures"])
    # the old fixed thresholds (rel L2 <= 1e-4, PSNR >= 60 dB vs PyTorch fp32) pass it: the reason for this gate
    assert bad["rel_l2"] <= 1e-4 and bad["psnr_db"] >= 60 and bad["e2e_psnr_db"] >= 60
    assert bad["tolerances"] == {"max_rel_l2": None, "min_psnr_db": None, "atol": None, "rtol": None}


@pytest.mark.parametrize("kind,factor", [("timestep", 1.01), ("overflow", 1.0)])
def test_a_scaled_timestep_and_an_overflow_fail(tmp_path, tiny_onnx_fp32, kind, factor):
    from laptop_deploy.deploy.mutants import Mutation
    from laptop_deploy.deploy.verify import verify_artifact

    pytest.importorskip("onnxruntime")
    source, artifact = tiny_onnx_fp32
    folder = _mutant(artifact, source, tmp_path / kind, Mutation(kind, kind, factor=factor))
    result = verify_artifact(folder, source, steps=2, record=False, intra_op_threads=1)
    data = result.as_dict()
    assert not result.passed
    if kind == "overflow":  # Inf in conv_in's output turns into NaN/Inf downstream: fails on its own
        assert data["nan_count"] + data["inf_count"] > 0 and data["gate"]["factor_rel_l2"] is None
    else:
        assert data["gate"]["factor_rel_l2"] > 100 and math.isfinite(data["rel_l2"])


def test_mutants_apply_to_onnx_graphs_and_modules_alike(tiny_onnx_fp32):
    """Every mutation finds its place in the TorchScript graph and changes the computed function there."""
    import onnx
    import onnxruntime as ort

    from laptop_deploy.deploy.mutants import mutate_onnx, mutation_set
    from laptop_deploy.deploy.spec import build_spec

    source, artifact = tiny_onnx_fp32
    proto = onnx.load(str(artifact / "model.onnx"))
    feeds = build_spec(source.unet.config).example_feeds(seed=0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # 11 sessions: build them fast

    def infer(model) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    base = infer(proto)
    mutations = mutation_set(source.unet, "fp32")
    assert [m.kind for m in mutations] == ["scale"] * 5 + ["zero", "timestep", "swap", "drop_skip", "overflow"]
    for mutation in mutations:
        out = infer(mutate_onnx(proto, source.unet, mutation))
        changed = not np.isfinite(out).all() or np.abs(out - base).max() > 1e-6
        assert changed, mutation.name


@pytest.mark.slow
def test_every_mutation_caught_and_no_correct_export_failed(tmp_path):
    """The sweep of benchmarks/parity_mutations.py on every tiny model, ONNX at fp32 and fp16 (~30 min)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from parity_mutations import MODELS, run_model

    rows = []
    for i, model in enumerate(MODELS):
        rows += run_model(model, precisions=["fp32", "fp16"], targets=["onnx"], steps=3, work=tmp_path / str(i),
                          log=sys.stderr)
    correct = [r for r in rows if r["kind"] == "correct"]
    mutants = [r for r in rows if r["kind"] != "correct" and "gate_passed" in r]
    assert len(correct) == 12 and all(r["gate_passed"] for r in correct)
    fp32_missed = [r for r in mutants if r["precision"] == "fp32" and r["gate_passed"]]
    assert fp32_missed == []
    assert sum(not r["gate_passed"] for r in mutants if r["precision"] == "fp16") >= 0.9 * \
        sum(r["precision"] == "fp16" for r in mutants)
