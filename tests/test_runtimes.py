"""Runners: one lifecycle (cheap constructor, load on enter, infer by name, release on exit), the registry, and the
ONNX Runtime runner's providers, options and errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from deploy_fixtures import export_artifact, tiny_source, torch_threads
from laptop_deploy.runtimes import RunnerError, RuntimeMissing, open_artifact, runner_class
from laptop_deploy.runtimes.pytorch import TorchRunner
from laptop_deploy.deploy.spec import SpecError, build_spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_registry_lists_valid_runtimes_and_names_the_missing_extra(monkeypatch):
    assert runner_class("torch") is TorchRunner
    with pytest.raises(RuntimeMissing, match="unknown runtime 'tflite'; valid: torch, ort"):
        runner_class("tflite")
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "laptop_deploy.runtimes.ort", raising=False)
    with pytest.raises(RuntimeMissing, match=r"runtime 'ort' needs the package 'onnxruntime', which is not "
                                             r"installed: pip install 'laptop-deploy\[onnx\]'"):
        runner_class("ort")


def test_torch_runner_lifecycle(make_source):
    source = make_source("random:tiny-sd15")
    spec = build_spec(source.unet.config, batch=2)
    runner = TorchRunner("random:tiny-sd15", spec=spec)  # a spec string: nothing is built until __enter__
    assert runner.load_s is None and not runner.active
    feeds = spec.example_feeds(seed=3)
    with pytest.raises(RunnerError, match="outside its `with` block"):
        runner.infer(feeds)
    with runner:
        assert runner.active and runner.load_s > 0
        out = runner.infer(feeds)
        with pytest.raises(SpecError, match="missing input 'timestep'"):
            runner.infer({k: v for k, v in feeds.items() if k != "timestep"})
    assert not runner.active and runner._wrapper is None
    assert list(out) == ["out_sample"] and out["out_sample"].shape == (2, 4, 16, 16)
    with TorchRunner(source.unet, spec=spec) as same_model:  # the same seeded weights, given as a module
        np.testing.assert_array_equal(same_model.infer(feeds)["out_sample"], out["out_sample"])
    assert runner.describe() == {"runtime": "torch", "device": "cpu", "dtype": "float32", "threads": 1}


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")  # the ONNX Runtime tests need the [onnx] extra


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ort):
    source = tiny_source("random:tiny-sdxl", student=True)
    return source, export_artifact(source, tmp_path_factory.mktemp("rt") / "onnx", exporter="torchscript",
                                   batch=2)


def test_provider_selection(ort):
    from laptop_deploy.runtimes.ort import select_providers

    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto") == [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider") if p in ort.get_available_providers()]
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", gpu_build) == gpu_build
    assert select_providers(["cuda"], gpu_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RunnerError, match=r"provider 'cuda' is not available in this onnxruntime build \(install "
                                          r"onnxruntime-gpu\); available: CPUExecutionProvider"):
        select_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(RunnerError, match="unknown provider 'npu'; valid: auto, cpu, cuda, tensorrt, coreml"):
        select_providers("npu")


def test_ort_runner_matches_torch_and_reports_its_settings(artifact, ort):
    from laptop_deploy.runtimes.ort import OrtRunner

    source, folder = artifact
    runner = open_artifact(folder, intra_op_threads=1, graph_optimization="basic")
    assert isinstance(runner, OrtRunner) and not runner.active
    feeds = runner.spec.example_feeds(seed=1)
    with runner, TorchRunner(source.unet, spec=runner.spec) as reference:
        out, ref = runner.infer(feeds)["out_sample"], reference.infer(feeds)["out_sample"]
        info = runner.describe()
    assert out.shape == (2, 4, 16, 16) and runner.load_s > 0
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
    assert info["providers"] == ["CPUExecutionProvider"] and info["intra_op_threads"] == 1
    assert info["graph_optimization"] == "basic" and info["onnxruntime"] == ort.__version__
    with pytest.raises(RunnerError, match="graph optimisation 'max' is not one of disable, basic, extended, all"):
        OrtRunner(folder / "model.onnx", spec=runner.spec, graph_optimization="max")


def test_ort_runner_rejects_wrong_feeds_and_unreadable_files(artifact, tmp_path):
    from laptop_deploy.runtimes.ort import OrtRunner

    _, folder = artifact
    runner = open_artifact(folder, intra_op_threads=1)
    feeds = runner.spec.example_feeds()
    with runner:
        with pytest.raises(SpecError, match=r"sample: axis 0 is 1, expected 2"):
            runner.infer({**feeds, "sample": feeds["sample"][:1]})
        with pytest.raises(SpecError, match="text_embeds: dtype float64, expected float32"):
            runner.infer({**feeds, "text_embeds": feeds["text_embeds"].astype(np.float64)})
    (tmp_path / "cut.onnx").write_bytes((folder / "model.onnx").read_bytes()[:5000])
    with pytest.raises(RunnerError, match=r"cut.onnx: onnxruntime cannot load it: "):
        with OrtRunner(tmp_path / "cut.onnx", spec=runner.spec):
            pass
    with pytest.raises(RunnerError, match="no such model file"):
        with OrtRunner(tmp_path / "none.onnx", spec=runner.spec):
            pass
    with pytest.raises(RuntimeMissing, match="runtime 'torch' cannot load a 'onnx' artifact; use --runtime ort"):
        open_artifact(folder, runtime="torch")


def test_ort_runner_checks_the_graph_against_the_spec(artifact, make_source):
    from laptop_deploy.runtimes.ort import OrtRunner

    _, folder = artifact
    other = build_spec(make_source("random:tiny-sd15").unet.config)  # SD-1.5 names: no text_embeds/time_ids
    with pytest.raises(RunnerError, match=r"graph has inputs \['sample', 'timestep', 'encoder_hidden_states', "
                                          r"'text_embeds', 'time_ids'\]"):
        with OrtRunner(folder / "model.onnx", spec=other):
            pass
