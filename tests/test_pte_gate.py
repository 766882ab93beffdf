"""ExecuTorch's size-aware gate factor (deploy/noise_floor.py: ``Gate.for_artifact``, ``sequential_factors``), used
by ``verify`` and by the export's own ``.pte`` check: against the committed measurements, on module shapes alone
(meta-device models: no weights, no ExecuTorch needed — this file runs without the extra)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from laptop_deploy.deploy.noise_floor import FACTORS, SEQUENTIAL_ERROR_PER_SQRT_L, Gate, longest_reduction
from laptop_deploy.deploy.verify import parity_rules
from laptop_deploy.models.layers import apply_removal
from laptop_deploy.models.sources import resolve_model

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def unets():
    """Meta-device U-Nets of the models the committed ExecuTorch measurements are on, and the full-size student."""
    models = {name: resolve_model(name, materialize=False).unet for name in ("toy", "random:tiny-sd15", "random:sd15")}
    student = resolve_model("random:sd15", materialize=False).unet
    apply_removal(student, json.loads((RESULTS / "executorch_sd15_student.json").read_text())["student_removed"])
    return {**models, "sd15 student": student}


def _pte_rows() -> list[dict]:
    rows = json.loads((RESULTS / "parity_mutations.json").read_text())["rows"]
    return [r for r in rows if r["target"] == "executorch" and r["precision"] == "fp32"]


def test_every_committed_executorch_mutant_is_still_caught_and_no_correct_pte_fails(unets):
    rows = _pte_rows()
    assert {r["model"] for r in rows} == {"toy", "random:tiny-sd15"} and len(rows) == 22
    for row in rows:
        gate = Gate.for_artifact("fp32", target="executorch", unet=unets[row["model"]])
        if row["factor_rel_l2"] is None:  # Inf in one node: the non-finite check fails it, no factor measured
            assert row["kind"] == "overflow" and not row["gate_passed"]
            continue
        inside = row["factor_rel_l2"] <= gate.rel_l2_factor and row["factor_max_abs"] <= gate.max_abs_factor
        assert inside == (row["kind"] == "correct"), (row["model"], row["mutation"], gate)
    # the weakest of them: the toy's up-block conv x1.01 at 6.6x the floor (its max abs 8x, inside any factor >= 4)
    toy = Gate.for_artifact("fp32", target="executorch", unet=unets["toy"])
    assert FACTORS["fp32"][0] <= toy.rel_l2_factor < 6.6


def test_full_size_factor_from_the_config_and_the_measured_student_passes(unets):
    assert longest_reduction(unets["random:sd15"]) == 2560 * 9  # up_blocks.1 conv1 over the concatenated skip
    assert Gate.for_artifact("fp32", target="executorch", unet=unets["random:sd15"]).rel_l2_factor >= 12
    measured = json.loads((RESULTS / "executorch_sd15_student.json").read_text())["pte_parity"][0]
    student = Gate.for_artifact("fp32", target="executorch", unet=unets["sd15 student"])
    assert longest_reduction(unets["sd15 student"]) == 1920 * 9  # its up_blocks.0/1 resnets are removed
    assert measured["factor_rel_l2"] * 2 <= student.rel_l2_factor  # the margin: twice the measurement
    assert measured["factor_max_abs"] * 2 <= student.max_abs_factor


def test_the_constant_covers_every_committed_measurement(unets):
    """SEQUENTIAL_ERROR_PER_SQRT_L is the largest measured factor / √L (correct .pte exports)."""
    points = [(r["model"], r["factor_rel_l2"]) for r in _pte_rows() if r["kind"] == "correct"]
    measured = json.loads((RESULTS / "executorch_sd15_student.json").read_text())["pte_parity"][0]
    points.append(("sd15 student", measured["factor_rel_l2"]))
    per_sqrt = [factor / math.sqrt(longest_reduction(unets[model])) for model, factor in points]
    assert max(per_sqrt) == pytest.approx(SEQUENTIAL_ERROR_PER_SQRT_L, abs=5e-4)


def test_verify_rules_pick_the_factor_by_target_and_model(unets):
    _, pte = parity_rules("fp32", target="executorch", unet=unets["random:sd15"])
    _, onnx = parity_rules("fp32", target="onnx", unet=unets["random:sd15"])
    assert pte.rel_l2_factor >= 12 and pte.enforced and onnx == Gate.for_precision("fp32")
    _, forced = parity_rules("fp32", target="executorch", unet=unets["random:sd15"], factor=5.0)
    assert forced.rel_l2_factor == 5.0 and forced.max_abs_factor == pte.max_abs_factor
    tol, int8 = parity_rules("int8", target="executorch", unet=unets["toy"])
    assert tol is not None and not int8.enforced  # int8 .pte: the PSNR floor judges, the gate is reported
