"""TensorRT target: build plans and profiles for SD-1.5 / SDXL specs (static and dynamic), the polygraphy/trtexec
command lines, every error path, the dry-run export through the CLI; and, on a machine with TensorRT and an NVIDIA
GPU only, engine builds proved by verify and timed by bench."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import types

import numpy as np
import pytest
import torch
from deploy_fixtures import torch_threads
from laptop_deploy.exporters.tensorrt_plan import (
    ShapeRange,
    TensorRTError,
    check_compatible,
    commands,
    make_plan,
    polygraphy_command,
    require_cuda,
    require_tensorrt,
    resolve_typing,
    trtexec_command,
)
from laptop_deploy.runtimes import RunnerError
from laptop_deploy.runtimes.tensorrt import (
    TensorRTRunner,
    built_with,
    engine_file,
    io_mismatch,
)

from laptop_deploy.cli.main import main
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.deploy.spec import build_spec

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = HAS_TRT and torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs TensorRT >= 10 and an NVIDIA GPU (pip install "
                                             "'laptop-deploy[trt]' on a GPU machine)")


@pytest.fixture(scope="module")
def configs():
    """U-Net configs of the full-size and tiny presets (meta device: no weights drawn)."""
    return {name: dict(resolve_model(f"random:{name}", materialize=False).unet.config)
            for name in ("sd15", "sdxl", "tiny-sd15")}


def _shapes(plan, point):
    return {name: list(getattr(r, point)) for name, r in plan.profile.items()}


def test_static_profiles_are_the_spec_shapes(configs):
    for name, extra in (("sd15", {}), ("sdxl", {"text_embeds": [2, 1280], "time_ids": [2, 6]})):
        spec = build_spec(configs[name], batch=2)
        plan = make_plan(spec)
        size = configs[name]["sample_size"]
        cross = configs[name]["cross_attention_dim"]
        want = {"sample": [2, 4, size, size], "timestep": [2], "encoder_hidden_states": [2, 77, cross], **extra}
        assert _shapes(plan, "min") == _shapes(plan, "opt") == _shapes(plan, "max") == want
        assert plan.dynamic is False and plan.cfg is None and plan.typing == "weak" and plan.builder_flags == ()


def test_dynamic_sd15_profile_doubles_the_batch_for_guidance(configs):
    spec = build_spec(configs["sd15"], dynamic=True)  # opt: 1 image at 64x64 latent (512 px)
    plan = make_plan(spec, max_images=4)
    assert plan.profile["sample"] == ShapeRange((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert plan.profile["timestep"] == ShapeRange((1,), (2,), (8,))
    assert plan.profile["encoder_hidden_states"] == ShapeRange((1, 77, 768), (2, 77, 768), (8, 77, 768))
    unguided = make_plan(spec, cfg=False)  # max batch stays 2: verify feeds a dynamic artifact batch 2
    assert unguided.profile["sample"] == ShapeRange((1, 4, 32, 32), (1, 4, 64, 64), (2, 4, 128, 128))
    wide = make_plan(spec, min_latent=(48, 32), max_latent=(96, 160))
    assert wide.profile["sample"] == ShapeRange((1, 4, 48, 32), (2, 4, 64, 64), (2, 4, 96, 160))


def test_dynamic_sdxl_profile_covers_its_added_conditioning(configs):
    spec = build_spec(configs["sdxl"], batch=2, height=96, width=128, dynamic=True, precision="fp16")
    plan = make_plan(spec)
    assert plan.profile["sample"] == ShapeRange((1, 4, 48, 64), (4, 4, 96, 128), (4, 4, 192, 256))
    assert plan.profile["text_embeds"] == ShapeRange((1, 1280), (4, 1280), (4, 1280))
    assert plan.profile["time_ids"] == ShapeRange((1, 6), (4, 6), (4, 6))
    assert plan.profile["encoder_hidden_states"].max == (4, 77, 2048)
    assert list(plan.profile) == spec.input_names
    assert (plan.typing, plan.onnx_precision, plan.builder_flags) == ("strong", "fp16", ())


def test_tiny_dynamic_profile_holds_the_shapes_verify_feeds(configs):
    """verify feeds a dynamic artifact batch 1 at the spec's size and batch 2 at +1/+2 downsample steps."""
    spec = build_spec(configs["tiny-sd15"], dynamic=True)
    plan = make_plan(spec)
    low, high = plan.profile["sample"].min, plan.profile["sample"].max
    for shape in ((1, 4, 16, 16), (2, 4, 16 + 8, 16 + 16)):
        assert all(a <= b <= c for a, b, c in zip(low, shape, high)), (shape, low, high)


def test_typing_and_precision_flags():
    assert resolve_typing("auto", "fp16") == "strong"
    assert resolve_typing("auto", "fp32") == "weak"
    assert resolve_typing("auto", "fp32", weak_available=False) == "strong"  # TensorRT 11: strong only
    assert resolve_typing("weak", "fp16", weak_available=True) == "weak"
    with pytest.raises(TensorRTError, match="no weak typing .* use --trt-typing strong"):
        resolve_typing("weak", "fp16", weak_available=False)
    with pytest.raises(TensorRTError, match="typing 'loose' is not one of auto, strong, weak"):
        resolve_typing("loose", "fp16")


def test_weak_fp16_builds_from_the_fp32_graph_with_the_flag(configs):
    spec = build_spec(configs["sd15"], precision="fp16")
    plan = make_plan(spec, typing="weak")
    assert (plan.precision, plan.onnx_precision, plan.builder_flags) == ("fp16", "fp32", ("FP16",))
    assert "--fp16" in polygraphy_command(plan) and "--fp16" in trtexec_command(plan)
    assert "--strongly-typed" not in polygraphy_command(plan) and "--stronglyTyped" not in trtexec_command(plan)
    strong = make_plan(spec)
    assert "--strongly-typed" in polygraphy_command(strong) and "--stronglyTyped" in trtexec_command(strong)
    assert "--fp16" not in polygraphy_command(strong) + trtexec_command(strong)


def _polygraphy_shapes(args, flag):
    values = args[args.index(flag) + 1:]
    values = values[:next((i for i, v in enumerate(values) if v.startswith("--")), len(values))]
    return {v.split(":")[0]: json.loads(v.split(":", 1)[1]) for v in values}


def _trtexec_shapes(args, flag):
    value = next(a for a in args if a.startswith(f"{flag}=")).split("=", 1)[1]
    return {item.split(":")[0]: [int(d) for d in item.split(":")[1].split("x")] for item in value.split(",")}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_dynamic_command_lines_carry_the_profile_shapes(configs, name):
    spec = build_spec(configs[name], dynamic=True, precision="fp16")
    plan = make_plan(spec, max_images=2, opt_level=5, workspace_mib=8192, load_timing_cache=True)
    lines = commands(plan)
    poly, trtexec = shlex.split(lines["polygraphy"]), shlex.split(lines["trtexec"])
    for point, poly_flag, exec_flag in (("min", "--trt-min-shapes", "--minShapes"),
                                        ("opt", "--trt-opt-shapes", "--optShapes"),
                                        ("max", "--trt-max-shapes", "--maxShapes")):
        assert _polygraphy_shapes(poly, poly_flag) == _trtexec_shapes(trtexec, exec_flag) == _shapes(plan, point)
    for shapes in (_shapes(plan, "min"), _shapes(plan, "max")):  # every input, static axes as in the spec
        assert list(shapes) == spec.input_names
        for tensor in spec.inputs:
            assert all(isinstance(d, str) or d == got for d, got in zip(tensor.shape, shapes[tensor.name]))
    assert poly[:7] == ["polygraphy", "convert", "model.onnx", "--convert-to", "trt", "-o", "model.plan"]
    assert poly[poly.index("--builder-optimization-level") + 1] == "5"
    assert poly[poly.index("--pool-limit") + 1] == "workspace:8192M"
    assert poly[poly.index("--load-timing-cache") + 1] == poly[poly.index("--save-timing-cache") + 1] == \
        "timing.cache"
    assert {"--onnx=model.onnx", "--saveEngine=model.plan", "--builderOptimizationLevel=5",
            "--memPoolSize=workspace:8192M", "--timingCacheFile=timing.cache"} <= set(trtexec)
    assert "'sample:[" in lines["polygraphy"]  # quoted: unquoted brackets are shell glob patterns


def test_fp32_engines_clear_tf32_which_tensorrt_enables_by_default(configs):
    """TF32 (10-bit mantissa) would make an fp32 engine miss verify's fp32 bounds; trtexec needs --noTF32."""
    fp32 = make_plan(build_spec(configs["sd15"]))
    fp16 = make_plan(build_spec(configs["sd15"], precision="fp16"))
    assert fp32.cleared_flags == ("TF32",) and fp32.as_dict()["cleared_flags"] == ["TF32"]
    assert "--noTF32" in trtexec_command(fp32) and fp16.cleared_flags == ()
    assert "--noTF32" not in trtexec_command(fp16)
    assert not any("tf32" in a.lower() for a in polygraphy_command(fp32))  # polygraphy keeps TF32 off already


def test_static_command_lines_pass_no_shapes(configs):
    plan = make_plan(build_spec(configs["sd15"]))
    poly, trtexec = polygraphy_command(plan), trtexec_command(plan)
    assert not [a for a in poly + trtexec if "Shapes" in a or "shapes" in a]  # trtexec refuses them
    assert "--load-timing-cache" not in poly and "--pool-limit" not in poly
    assert not [a for a in trtexec if a.startswith("--memPoolSize")]


def test_plan_errors_quote_the_value(configs):
    spec = build_spec(configs["sd15"], dynamic=True)
    cases = [({"min_latent": (30, 32)}, "--trt-min-latent 30 32: latent sizes must be positive multiples of 8"),
             ({"min_latent": (72, 32)}, "latent height: min 72 ≤ opt 64 ≤ max 128 does not hold"),
             ({"max_latent": (64, 56)}, "latent width: min 32 ≤ opt 64 ≤ max 56 does not hold"),
             ({"max_images": 0}, "--trt-max-images 0 is below --batch 1"),
             ({"opt_level": 6}, "--trt-opt-level 6 is not in 0..5"),
             ({"workspace_mib": 0}, "--trt-workspace 0 MiB must be positive")]
    for kwargs, message in cases:
        with pytest.raises(TensorRTError, match=message):
            make_plan(spec, **kwargs)


def test_engine_from_another_tensorrt_or_gpu_is_refused():
    built = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    check_compatible(built, {**built, "tensorrt": "10.3.0.26"})  # build number: same release
    check_compatible(built, {**built, "gpu": "NVIDIA H200"})  # same compute capability: TensorRT only warns
    with pytest.raises(TensorRTError, match=r"e.plan was built by TensorRT 10.3.0; this machine has TensorRT "
                                            r"10.7.0, which cannot load it: rebuild it here"):
        check_compatible(built, {**built, "tensorrt": "10.7.0"}, engine="e.plan")
    with pytest.raises(TensorRTError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\); this "
                                            r"GPU is NVIDIA A10G \(8.6\), which cannot run it"):
        check_compatible(built, {"tensorrt": "10.3.0", "gpu": "NVIDIA A10G", "compute_capability": [8, 6]})


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_no_tensorrt_names_the_extra_and_the_gpu():
    with pytest.raises(TensorRTError, match=r"engines need the package 'tensorrt' \(≥ 10\), which is not installed: pip "
                                            r"install 'laptop-deploy\[trt\]' .*NVIDIA GPU.*--dry-run"):
        require_tensorrt()


def test_tensorrt_older_than_10_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(TensorRTError, match=r"TensorRT 8.6.1 is installed; the TensorRT target needs ≥ 10"):
        require_tensorrt()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_cuda_device_is_one_line():
    with pytest.raises(TensorRTError, match=r"no CUDA device: TensorRT needs an NVIDIA GPU, and torch .* sees none"):
        require_cuda()


def test_engine_io_is_checked_against_the_spec(configs):
    spec = build_spec(configs["tiny-sd15"], precision="fp16")
    rows = [("sample", "input", "HALF"), ("timestep", "input", "FLOAT"),
            ("encoder_hidden_states", "input", "HALF"), ("out_sample", "output", "HALF")]
    assert io_mismatch(rows, spec) is None
    assert "sample is an input of type FLOAT in the engine, an input of float16" in io_mismatch(
        [("sample", "input", "FLOAT"), *rows[1:]], spec)
    assert "engine tensors" in io_mismatch(rows[1:], spec)


def test_runner_refuses_onnx_runtime_options_and_graphs_on_dynamic_engines(configs, tmp_path):
    spec = build_spec(configs["tiny-sd15"])
    with pytest.raises(RunnerError, match="--provider and --threads configure ONNX Runtime"):
        TensorRTRunner(tmp_path / "model.plan", spec=spec, providers="cuda")
    with pytest.raises(RunnerError, match="cuda_graph needs a static engine"):
        TensorRTRunner(tmp_path / "model.plan", spec=build_spec(configs["tiny-sd15"], dynamic=True), cuda_graph=True)
    with pytest.raises(RunnerError, match="no such engine file"):
        engine_file(tmp_path / "model.plan")


def test_timing_cache_option_must_be_a_file(tmp_path):
    from laptop_deploy.exporters.tensorrt import TensorRTOptions

    with pytest.raises(TensorRTError, match="--trt-timing-cache .* is not a file"):
        TensorRTOptions(dry_run=True, timing_cache=tmp_path).check()
    TensorRTOptions(dry_run=True, timing_cache=tmp_path / "new.cache").check()  # created by the build


# --- the dry run through the CLI (one ONNX export of tiny-sd15, shared) ---------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("trt") / "d"
    with torch_threads(1), pytest.MonkeyPatch.context() as patch:
        captured = []
        patch.setattr("laptop_deploy.cli.main._emit", lambda result, text, as_json: captured.append((result, text)))
        code = main(["export", "--model", "random:tiny-sd15", "--target", "trt", "--dry-run", "--out", str(out),
                     "--json"])
    assert code == 0
    return out, captured[0]


def test_dry_run_writes_the_graph_and_plan_and_prints_matching_commands(dry_run, configs):
    out, (result, text) = dry_run
    spec = build_spec(configs["tiny-sd15"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [".laptop-deploy.json", "manifest.json", "model.onnx"]
    assert (manifest["target"], manifest["model_file"], manifest["export"]["dry_run"]) == ("trt", "model.onnx", True)
    assert manifest["spec"] == spec.as_dict()
    plan = manifest["export"]["plan"]
    assert {name: r["opt"] for name, r in plan["profile"].items()} == {t.name: list(t.shape) for t in spec.inputs}
    assert result["export"]["commands"] == manifest["export"]["commands"]
    notes = result["export"]["notes"]
    assert notes[1].strip() == result["export"]["commands"]["polygraphy"]
    assert notes[2].strip() == result["export"]["commands"]["trtexec"]
    assert "sample 1x4x16x16, timestep 1, encoder_hidden_states 1x77x32, out_sample 1x4x16x16" in notes[3]
    assert "--batch 2 or --dynamic" in notes[4]
    assert text.splitlines()[1:] == notes


def test_dry_run_artifact_runs_its_graph_under_ort_and_explains_the_missing_engine(dry_run, capsys):
    from laptop_deploy.deploy.verify import verify_artifact

    out, _ = dry_run
    with torch_threads(1):
        result = verify_artifact(out, resolve_model("random:tiny-sd15"), runtime="ort", steps=2, record=False,
                                 intra_op_threads=1)
    assert result.passed and result.as_dict()["psnr_db"] > 100
    assert main(["bench", str(out), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a TensorRT dry run without an engine" in err and "--runtime ort" in err
    assert built_with(out) is None  # no engine: nothing to compare the machine against
    (out / "model.plan").write_bytes(b"built elsewhere")
    try:
        assert engine_file(out / "model.onnx") == out / "model.plan"
        if not HAS_TRT:  # the engine exists: now the runner needs TensorRT
            assert main(["bench", str(out), "--iterations", "1"]) == 2
            assert "laptop-deploy[trt]" in capsys.readouterr().err
    finally:
        (out / "model.plan").unlink()


@pytest.mark.skipif(HAS_GPU, reason="TensorRT and a GPU are here: the export would build")
def test_export_without_dry_run_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", "--model", "random:tiny-sd15", "--target", "trt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("laptop-deploy[trt]" in err or "no CUDA device" in err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_is_refused_for_other_targets(tmp_path, capsys):
    assert main(["export", "--model", "random:tiny-sd15", "--target", "onnx", "--dry-run",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--dry-run is supported by --target trt only, not 'onnx'" in capsys.readouterr().err


# --- on an NVIDIA GPU with TensorRT only ------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("extra", [[], ["--dynamic", "--precision", "fp16"], ["--precision", "fp16",
                                                                             "--trt-typing", "weak"]],
                         ids=["static-fp32", "dynamic-fp16-strong", "static-fp16-weak"])
def test_engine_builds_verifies_and_benches(tmp_path, capsys, extra):
    out = tmp_path / "engine"
    cache = tmp_path / "timing.cache"
    assert main(["export", "--model", "random:tiny-sd15", "--target", "trt", "--out", str(out),
                 "--trt-timing-cache", str(cache), *extra]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    engine = manifest["export"]["engine"]
    assert manifest["model_file"] == "model.plan" and engine["gpu"] == torch.cuda.get_device_name(0)
    assert cache.is_file() and (out / "timing.cache").read_bytes() == cache.read_bytes()
    capsys.readouterr()
    assert main(["verify", str(out), "--model", "random:tiny-sd15", "--steps", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert main(["bench", str(out), "--iterations", "5", "--json"]) == 0


@gpu
def test_cuda_graph_replay_matches_and_mismatched_engines_are_refused(tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["export", "--model", "random:tiny-sd15", "--target", "trt", "--out", str(out)]) == 0
    spec = build_spec(resolve_model("random:tiny-sd15", materialize=False).unet.config)
    feeds = spec.example_feeds(seed=1)
    with TensorRTRunner(out / "model.plan", spec=spec) as plain, \
            TensorRTRunner(out / "model.plan", spec=spec, cuda_graph=True) as graphed:
        want = plain.infer(feeds)["out_sample"]
        graphed.infer(spec.example_feeds(seed=2))
        np.testing.assert_array_equal(graphed.infer(feeds)["out_sample"], want)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["export"]["engine"]["tensorrt"] = "9.0.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["bench", str(out), "--iterations", "1"]) == 2
    assert "was built by TensorRT 9.0.0; this machine has TensorRT" in capsys.readouterr().err
