"""benchmarks/bench_quality.py end to end with tiny settings: every stage of the full benchmark runs (one-shot
criteria, a preset, retraining with both feature norms, additivity) and writes its four files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_quality.py"


def _load():
    if "bench_quality" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_quality"]


def test_quick_path_runs_every_stage_and_writes_the_reports(tmp_path):
    bench = _load()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--criteria", "output-loss", "magnitude", "--presets", "bk-sdm-small",
                           "--per-prompt", "1", "--steps", "4", "--calib", "4", "--additivity-sets", "3",
                           "--distill-steps", "2", "--distill-batch", "4", "--data-count", "24", "--threads", "1",
                           "--out-dir", str(tmp_path), "--name", "q"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "q.json").read_text())
    names = [v["name"] for v in result["variants"]]
    assert names[:4] == ["teacher", "output-loss@0.5", "magnitude@0.5", "bk-sdm-small"]
    baseline = result["best_baseline"]
    assert baseline in ("magnitude@0.5", "bk-sdm-small")
    assert names[4:] == [f"{base} + KD {norm}" for base in ("output-loss@0.5", baseline)
                         for norm in ("normalized", "plain")]
    teacher, ours = result["variants"][0], result["variants"][1]
    assert teacher["decline_pct"] is None and teacher["psnr_db"] is None  # no reference for the reference
    assert ours["params_ratio"] >= 0.48 and ours["psnr_db"] > 0
    assert len(ours["additivity"]["sets"]) == 4 and result["additivity_pooled"]["sets"] == 4
    retrained = result["variants"][4]
    assert retrained["distill"]["steps"] == 2 and retrained["removed"] == ours["removed"]
    assert result["command"].startswith("python benchmarks/bench_quality.py --quick")
    assert {(t["first"], t["second"]) for t in result["paired_tests"]} >= {
        ("output-loss@0.5", "magnitude@0.5"), ("output-loss@0.5 + KD normalized", "output-loss@0.5 + KD plain")}
    text = (tmp_path / "q.md").read_text()
    assert "| output-loss@0.5 | one-shot |" in text and "## The paper's claims" in text
    assert not list(tmp_path.glob(".q-*"))  # the staging folder is gone
    for png in ("q.png", "q_samples.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _variant(bench, name, kind, *, criterion=None, ratio=None, params_ratio=0.5, alignment=0.5, psnr=20.0):
    return bench.Variant(name, kind, criterion=criterion, target_ratio=ratio, params_ratio=params_ratio,
                         alignment={"alignment": alignment}, psnr_db=psnr)


def test_best_baseline_is_the_best_other_student_near_the_retraining_ratio():
    bench = _load()
    ours = _variant(bench, "output-loss@0.5", "one-shot", criterion="output-loss", ratio=0.5, alignment=0.9)
    far = _variant(bench, "random@0.3", "one-shot", criterion="random", ratio=0.3, alignment=0.8)
    tie_low = _variant(bench, "magnitude@0.5", "one-shot", criterion="magnitude", ratio=0.5, psnr=18.0)
    tie_high = _variant(bench, "feature-loss@0.5", "one-shot", criterion="feature-loss", ratio=0.5, psnr=19.0)
    preset_out = _variant(bench, "bk-sdm-base", "preset", params_ratio=0.32, alignment=0.7)
    preset_in = _variant(bench, "bk-sdm-small", "preset", params_ratio=0.46, alignment=0.6)
    assert bench.best_baseline([ours, far, tie_low, tie_high, preset_out]) is tie_high  # tie → higher PSNR
    assert bench.best_baseline([ours, far, tie_low, tie_high, preset_out, preset_in]) is preset_in
    assert bench.best_baseline([ours, far]) is None


def test_claims_call_a_difference_only_when_the_paired_test_resolves_it():
    bench = _load()
    row = {"alignment": 0.8, "alignment_95": [0.7, 0.9]}
    variants = [{"name": n, "kind": "retrained", "alignment": dict(row, alignment=a), "psnr_db": 25.0,
                 "decline_pct": d, "params_ratio": 0.5}
                for n, a, d in [("output-loss@0.5 + KD normalized", 0.8, 5.0),
                                ("output-loss@0.5 + KD plain", 0.7, 15.0), ("magnitude@0.5 + KD plain", 0.6, 25.0)]]
    result = {"variants": variants, "best_baseline": "magnitude@0.5", "additivity_pooled": {},
              "paired_tests": [
                  {"first": variants[0]["name"], "second": variants[2]["name"], "only_first": 30, "only_second": 5,
                   "p": 0.0001},
                  {"first": variants[0]["name"], "second": variants[1]["name"], "only_first": 12, "only_second": 8,
                   "p": 0.5}]}
    lines = bench.claims(result)
    assert "first better (McNemar p = 0.0001, 30:5 images" in lines[0]
    assert "not resolved (McNemar p = 0.5, 12:8 images" in lines[1]
