"""benchmarks/bench_quality.py end to end with tiny settings: every stage of the full benchmark runs (one-shot
criteria, a preset, retraining with both feature norms, additivity) and writes its four files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_quality.py"


def test_quick_path_runs_every_stage_and_writes_the_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
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
    assert teacher["decline_pct"] in (0, None) and ours["params_ratio"] >= 0.48
    assert len(ours["additivity"]["sets"]) == 4 and result["additivity_pooled"]["sets"] == 4
    retrained = result["variants"][4]
    assert retrained["distill"]["steps"] == 2 and retrained["removed"] == ours["removed"]
    assert result["command"].startswith("python benchmarks/bench_quality.py --quick")
    assert "| output-loss@0.5 | one-shot |" in (tmp_path / "q.md").read_text()
    for png in ("q.png", "q_samples.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
