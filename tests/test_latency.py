"""Latency tables (`profile`) and pruning to a latency budget (`prune --cost latency`) on the tiny presets: the
table's schema and refusal rules, the knapsack on measured costs, prediction against measurement, `profile
ARTIFACT` on an ONNX export, and bad inputs (exit 2, one line, nothing written)."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from deploy_fixtures import torch_threads
from laptop_deploy.cli.main import main
from laptop_deploy.deploy.latency_table import (LatencyTable, LatencyTableError, UnitTime, check_table,
                                                load_table, save_table)
from laptop_deploy.deploy.manifest import read_manifest
from laptop_deploy.deploy.profile import ProfileOptions, predicted_ms, profile_unet
from laptop_deploy.models.layers import Layer, discover_layers
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.prune.latency_cost import measure_student, latency_summary, unit_costs
from laptop_deploy.prune.plan import select_layers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):  # OpenMP busy-waiting on a shared 2-core machine slows 2-thread tiny forwards ~100x
        yield


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("random:tiny-sd15")


@pytest.fixture(scope="module")
def torch_table(tiny):
    return profile_unet(tiny.unet, model=tiny.describe(), options=ProfileOptions(runtime="torch", repeats=5))


def test_table_schema_round_trips_and_accounts_for_the_step(torch_table, tiny, tmp_path):
    data = json.loads(save_table(torch_table, tmp_path / "t.json").read_text())
    assert data["format"] == "laptop-deploy-latency-table" and data["version"] == 1
    setting = data["setting"]
    assert (setting["runtime"], setting["precision"], setting["latent_size"], setting["batch"]) == \
        ("torch", "fp32", [16, 16], 1)
    assert setting["threads"] == 1 and data["machine"]["load_average"]["before"]
    assert len(data["step_ms"]["runs"]) == 5
    assert data["step_ms"]["min"] <= data["step_ms"]["median"] <= data["step_ms"]["max"]
    layers, _ = discover_layers(tiny.unet)
    assert [u["name"] for u in data["units"]] == [layer.name for layer in layers]
    assert all(u["ms_min"] <= u["ms"] <= u["ms_max"] and u["ms"] > 0 for u in data["units"])
    top = [u for u in data["units"] if u["parent"] is None]
    # hooks time disjoint top-level units inside the timed call: their sum cannot exceed the step
    assert 0 < data["units_ms"] <= data["step_ms"]["max"]
    assert sum(u["params"] for u in top) < data["model"]["params"] == 8_525_412
    assert sum(u["macs_share"] for u in top) < 1
    assert set(data["op_types"]) == {"conv", "matmul/attention", "norm", "elementwise", "other"}
    assert data["op_types"]["conv"] > 0 and data["op_types"]["matmul/attention"] > 0
    again = load_table(tmp_path / "t.json")
    assert again.as_dict() == data


def test_refusals_name_the_difference(torch_table, tiny):
    layers, _ = discover_layers(tiny.unet)
    params = sum(p.numel() for p in tiny.unet.parameters())
    check_table(torch_table, latent_size=(16, 16), batch=1, precision="fp32", runtime="torch", layers=layers,
                total_params=params)  # its own setting passes
    cases = [({"latent_size": (32, 32)}, "latent size 16x16 (asked 32x32)"), ({"batch": 2}, "batch 1 (asked 2)"),
             ({"precision": "fp16"}, "precision fp32 (asked fp16)"), ({"runtime": "ort"}, "runtime torch (asked ort)")]
    for change, words in cases:
        asked = {"latent_size": (16, 16), "batch": 1, "precision": "fp32", "runtime": "torch", **change}
        with pytest.raises(LatencyTableError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_table(torch_table, **asked)
    other = resolve_model("random:tiny-sdxl", materialize=False).unet
    with pytest.raises(LatencyTableError, match="another model"):
        check_table(torch_table, latent_size=(16, 16), batch=1, precision="fp32",
                    layers=discover_layers(other)[0], total_params=sum(p.numel() for p in other.parameters()))
    with pytest.raises(LatencyTableError, match="not a laptop-deploy latency table"):
        LatencyTable.from_dict({"format": "something-else"})


def _synthetic(ms: dict[str, float], step: float) -> LatencyTable:
    units = [UnitTime(name=n, kind="resnet", stage="down.0", prunable=True, params=1, macs=1, ms=v, ms_min=v,
                      ms_max=v) for n, v in ms.items()]
    return LatencyTable(model={"params": len(ms)}, method="synthetic", units=units, op_types={},
                        setting={"runtime": "torch", "precision": "fp32", "latent_size": [8, 8], "batch": 1},
                        step_ms={"median": step, "min": step, "max": step, "runs": [step] * 3})


def test_knapsack_spends_the_budget_in_measured_milliseconds():
    ms = {"a": 30.0, "b": 20.0, "c": 25.0, "d": 5.0, "e": 12.5}
    scores = {"a": 0.9, "b": 0.1, "c": 0.3, "d": 0.05, "e": 0.2}
    table = _synthetic(ms, step=100.0)  # 7.5 ms outside the units

    class Entry:
        def __init__(self, name):
            self.layer = Layer(name, "resnet", "down.0", 1, True)

    costs, total = unit_costs([Entry(n) for n in ms], table)
    assert costs == {"a": 30_000, "b": 20_000, "c": 25_000, "d": 5_000, "e": 12_500} and total == 100_000
    layers = [Entry(n).layer for n in ms]
    removed = {x.name for x in select_layers(layers, scores, costs, total, 0.4, [])}
    # brute force: remove ≥ 40 ms while losing the least summed importance
    best = min((set(c) for k in range(len(ms) + 1) for c in itertools.combinations(ms, k)
                if sum(ms[n] for n in c) >= 40), key=lambda c: (sum(scores[n] for n in c), -sum(ms[n] for n in c)))
    assert removed == best == {"b", "c"}
    summary = latency_summary(table, sorted(removed))
    assert summary["predicted_ms"] == pytest.approx(55.0) and summary["predicted_ratio"] == pytest.approx(0.55)
    assert predicted_ms(table, ["a"]) == pytest.approx(70.0)


def test_prediction_matches_a_measured_student_loosely(torch_table, tiny):
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 2 * cores:  # measured: at load ~20 on 2 cores tiny kernels (µs) time as scheduler quanta (~50 ms)
        pytest.skip(f"machine overloaded (1-min load {load:.1f} on {cores} cores): a tiny model's timings measure "
                    f"the scheduler, not the model; the benchmark checks predictions on SD-1.5")
    # remove the slowest prunable top-level units until about half of the step is predicted gone
    rows = sorted((u for u in torch_table.units if u.prunable and u.parent is None), key=lambda u: -u.ms)
    removed, gone = [], 0.0
    for unit in rows:
        if gone + unit.ms <= 0.5 * torch_table.step:
            removed.append(unit.name)
            gone += unit.ms
    summary = latency_summary(torch_table, removed)
    assert 0.45 <= summary["predicted_ratio"] <= 0.75
    measured = measure_student(tiny.unet, removed, summary, repeats=3, calls=5)  # median of 5: preemption
    assert measured["teacher"]["median_ms"] > measured["student"]["median_ms"]
    # loose: timing on a shared machine; the benchmark measures the bound that matters (10%) on SD-1.5
    assert abs(measured["prediction_error"]) < 0.5, measured
    assert discover_layers(tiny.unet)[1] == []  # measured through bypassed: the teacher is intact


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_artifact_maps_kernels_to_units(tiny_onnx_fp32, tmp_path, capsys):
    _, folder = tiny_onnx_fp32
    code, out, err = run(capsys, "profile", str(folder), "--out", str(tmp_path / "p"), "--repeats", "3",
                         "--threads", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["setting"]["runtime"] == "ort" and data["setting"]["providers"] == ["CPUExecutionProvider"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == \
        [".laptop-deploy.json", "latency_shares.png", "latency_table.json", "latency_table.md"]
    units = {u["name"]: u for u in data["units"]}
    top = [u for u in data["units"] if u["parent"] is None]
    assert all(u["ms"] > 0 for u in top)  # every unit received kernels
    # kernels inside a transformer block also count for its Transformer2DModel
    block = units["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert 0 < block["ms"] < units["down_blocks.0.attentions.0"]["ms"]
    # (no lower bound on the units' sum: at a 16x16 latent the kernels take microseconds and a loaded machine's
    # preemption, which lands on random kernels, can outweigh them; the SD-1.5 benchmark checks the predictions)
    assert 0 < data["units_ms"] <= data["step_ms"]["max"]
    assert data["inferred_ms_median"] >= 0 and "name scopes" in data["method"]


def test_prune_cost_latency_end_to_end(torch_table, tmp_path, capsys):
    table = save_table(torch_table, tmp_path / "t.json")
    code, out, err = run(capsys, "prune", "--model", "random:tiny-sd15", "--ratio", "0.3", "--cost", "latency",
                         "--latency-table", str(table), "--calib", "2", "--additivity-sets", "0", "--out",
                         str(tmp_path / "s"), "--json")
    assert code == 0, err
    result = json.loads(out)
    latency = result["latency"]
    assert latency["predicted_ratio"] <= 0.7 + 0.02
    assert result["ratio_achieved"] == pytest.approx(1 - latency["predicted_ratio"], abs=1e-6)
    assert latency["measured"]["teacher"]["median_ms"] > 0 and "prediction_error" in latency["measured"]
    plan = json.loads((tmp_path / "s" / "pruning_plan.json").read_text())
    assert plan["cost"] == "latency" and plan["latency"]["predicted_ms"] == latency["predicted_ms"]


@pytest.mark.parametrize("case", ["missing", "foreign", "setting", "not-json", "no-table"])
def test_prune_bad_latency_inputs_exit_2(case, torch_table, tmp_path, capsys):
    table = save_table(torch_table, tmp_path / "t.json")
    argv = ["prune", "--model", "random:tiny-sd15", "--ratio", "0.3", "--cost", "latency",
            "--out", str(tmp_path / "s")]
    if case == "missing":
        argv += ["--latency-table", str(tmp_path / "none.json")]
    elif case == "foreign":
        argv = [a.replace("tiny-sd15", "tiny-sdxl") for a in argv] + ["--latency-table", str(table)]
    elif case == "setting":
        argv += ["--latency-table", str(table), "--batch", "2"]
    elif case == "not-json":
        (tmp_path / "bad.json").write_text("{nope")
        argv += ["--latency-table", str(tmp_path / "bad.json")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err
    assert not (tmp_path / "s").exists()


def test_profile_runtime_not_installed_exits_2(tiny_onnx_fp32, tmp_path, capsys, monkeypatch):
    from laptop_deploy import runtimes

    monkeypatch.setitem(runtimes.RUNTIMES, "ort", ("laptop_deploy_no_such_module:Runner", "onnx"))
    code, out, err = run(capsys, "profile", str(tiny_onnx_fp32[1]), "--out", str(tmp_path / "p"))
    assert code == 2 and "laptop_deploy_no_such_module" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    code, _, err = run(capsys, "profile", "--model", "random:tiny-sd15", "--runtime", "trt", "--out",
                       str(tmp_path / "p"))
    assert code == 2 and "valid: torch, ort" in err and not (tmp_path / "p").exists()


def test_fresh_process_timing_interleaves_rounds_and_names_a_failing_child(tiny_onnx_fp32, tmp_path):
    """measure_fresh (prune --cost latency's ORT check, bench_int8): one child process per (round, variant),
    the measure_interleaved result format; a child that cannot load its model fails with its own last line."""
    from laptop_deploy.deploy.fresh_timing import measure_fresh, time_in_child

    _, folder = tiny_onnx_fp32
    manifest = read_manifest(folder)
    model = folder / manifest.model_file
    seen: list[str] = []
    times = measure_fresh({"a": (model, manifest.spec), "b": (model, manifest.spec)}, repeats=1, threads=1,
                          progress=seen.append)
    assert seen == ["round 1/1: a (fresh process)", "round 1/1: b (fresh process)"]
    for t in times.values():
        assert t["min_ms"] == t["median_ms"] == t["max_ms"] == t["rounds_ms"][0] > 0
    with pytest.raises(RuntimeError, match=r"fresh process failed \(exit 1\).*no such model file"):
        time_in_child(tmp_path / "missing.onnx", manifest.spec)
