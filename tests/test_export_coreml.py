"""Core ML export (``--target coreml``): conversion of tiny teachers and pruned students (SD-1.5 and SDXL topology)
on any OS, the package read back against the ExportSpec, parity of the traced module with PyTorch, fp32 time
path in fp16 packages, palettization, enumerated sizes, error paths. Prediction needs macOS: those tests skip
elsewhere, and elsewhere `verify` must refuse with exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("coremltools", reason="Core ML conversion needs the [coreml] extra: pip install '.[coreml]'")
pytest.importorskip("sklearn", reason="coremltools' k-means palettization needs scikit-learn (the [coreml] extra)")

from deploy_fixtures import assert_exit_2, tiny_source, torch_threads
from laptop_deploy.exporters import coreml
from laptop_deploy.runtimes import RunnerError
from laptop_deploy.runtimes.coreml import CoreMLRunner

from laptop_deploy.cli.main import main
from laptop_deploy.deploy.manifest import ArtifactError, model_hash, read_manifest
from laptop_deploy.deploy.spec import build_spec, torch_inputs, wrap_unet
from laptop_deploy.outputs import write_atomically

MACOS = sys.platform == "darwin"
FP16 = 10  # MIL proto DataType values of an op's output tensor
FP32 = 11


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _export(tmp_path_factory, spec: str, *, student: bool, precision: str = "fp16", **options):
    """What `laptop-deploy export --target coreml` does, from a resolved source (each costs 15-60 s)."""
    source = tiny_source(spec, student=student)
    export_spec = build_spec(source.unet.config, precision=precision)
    described = {**source.describe(), "sha256": model_hash(source.unet)}
    out = tmp_path_factory.mktemp("coreml") / "art"
    write_atomically(out, lambda tmp: coreml.export(source.unet, export_spec, tmp, source=described,
                                                    options=coreml.CoreMLOptions(**options)))
    return source, out


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The teacher through the CLI itself (`--json`), default options: fp16, ALL, iOS17."""
    out = tmp_path_factory.mktemp("cli") / "art"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", "--model", "random:tiny-sd15", "--target", "coreml", "--out", str(out), "--json"])
    assert code == 0
    return tiny_source("random:tiny-sd15"), out, json.loads(stdout.getvalue())


@pytest.fixture(scope="module")
def sd15_student_6bit(tmp_path_factory):
    return _export(tmp_path_factory, "random:tiny-sd15", student=True, palettize=6)


@pytest.fixture(scope="module")
def sdxl_student(tmp_path_factory):
    return _export(tmp_path_factory, "random:tiny-sdxl", student=True, sizes=((24, 16), (32, 32)))


@pytest.fixture(scope="module")
def sdxl_fp32(tmp_path_factory):
    # the SDXL topology's student (the teacher's conversion costs ~30 s more and adds no other path)
    return _export(tmp_path_factory, "random:tiny-sdxl", student=True, precision="fp32",
                   compute_units="CPU_AND_NE", deployment_target="macOS14")


# 6-bit palettization of the student: -m slow (the suite's slowest conversion, ~70 s on two cores)
ARTIFACTS = ["sd15", pytest.param("sd15_student_6bit", marks=pytest.mark.slow), "sdxl_student", "sdxl_fp32"]


@pytest.mark.parametrize("name", ARTIFACTS)
def test_package_declares_the_spec(request, name):
    source, folder, *_ = request.getfixturevalue(name)
    manifest = read_manifest(folder)
    spec = build_spec(source.unet.config, precision="fp32" if name.endswith("fp32") else "fp16")
    assert manifest.spec == spec and manifest.target == "coreml" and manifest.model_file == "model.mlpackage"
    summary = coreml.read_package(folder / "model.mlpackage")
    assert [(t["name"], t["shape"], t["dtype"]) for t in summary.inputs] == \
        [(t.name, list(t.shape), t.dtype) for t in spec.inputs]
    assert [t["name"] for t in summary.outputs] == ["out_sample"]
    assert summary.outputs[0]["dtype"] == ("float32" if name.endswith("fp32") else "float16")
    assert summary.ops["conv"] > 0 and summary.opset == "CoreML7"
    assert set(manifest.files) >= {"model.mlpackage/Manifest.json",
                                   "model.mlpackage/Data/com.apple.CoreML/model.mlmodel"}
    assert manifest.source.get("removed", []) == source.removed
    meta = summary.metadata
    assert meta["laptop_deploy.source_sha256"] == model_hash(source.unet) == manifest.source["sha256"]
    assert meta["laptop_deploy.precision"] == spec.precision
    ratio = float(meta["laptop_deploy.pruning_ratio"])
    assert (ratio > 0.05) if source.removed else ratio == 0.0


def test_cli_json_reports_the_summary(sd15):
    _, folder, result = sd15
    assert result["target"] == "coreml" and result["precision"] == "fp16" and result["model_file"] == "model.mlpackage"
    summary = result["export"]["summary"]
    assert [t["name"] for t in summary["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert summary["weight_bytes"] == (folder / coreml.MODEL_DIR / coreml.WEIGHTS_DIR / "weight.bin").stat().st_size
    assert sum(summary["ops"].values()) > 1000 and any("ops (" in line for line in result["export"]["notes"])


@pytest.mark.parametrize("name", ["sd15", "sdxl_student"])
def test_fp16_weights_take_two_bytes_per_parameter(request, name):
    source, folder, *_ = request.getfixturevalue(name)
    params = sum(p.numel() for p in source.unet.parameters())
    weight_bytes = read_manifest(folder).export["summary"]["weight_bytes"]
    assert 2 * params <= weight_bytes <= 2 * params * 1.01  # + 64-byte alignment per tensor


@pytest.mark.slow
def test_palettized_6bit_is_at_least_2_4x_smaller_than_fp16(sd15_student_6bit):
    source, folder = sd15_student_6bit
    fp16_bytes = 2 * sum(p.numel() for p in source.unet.parameters())  # see the test above
    summary = coreml.read_package(folder / coreml.MODEL_DIR)
    assert fp16_bytes / summary.weight_bytes >= 2.4, (fp16_bytes, summary.weight_bytes)
    assert summary.ops["constexpr_lut_to_dense"] > 0
    assert summary.metadata["laptop_deploy.compression"] == "palettized 6-bit k-means"


def test_fp16_package_keeps_the_timestep_embedding_fp32(sd15):
    import coremltools as ct

    _, folder, _ = sd15
    spec = ct.models.MLModel(str(folder / coreml.MODEL_DIR), skip_model_load=True).get_spec()
    function = spec.mlProgram.functions["main"]
    ops = list(function.block_specializations[function.opset].operations)
    dtypes = {op.type: op.outputs[0].type.tensorType.dataType for op in ops if op.type in ("sin", "cos")}
    assert dtypes == {"sin": FP32, "cos": FP32}
    assert {op.outputs[0].type.tensorType.dataType for op in ops if op.type == "conv"} == {FP16}


def test_enumerated_sizes_are_declared(sdxl_student):
    _, folder = sdxl_student
    sample = coreml.read_package(folder / coreml.MODEL_DIR).inputs[0]
    assert sample["shape"] == [1, 4, 16, 16]  # the spec's size is the default
    assert sorted(tuple(s[2:]) for s in sample["sizes"]) == [(16, 16), (24, 16), (32, 32)]


def test_fp32_package_options(sdxl_fp32):
    _, folder = sdxl_fp32
    manifest = read_manifest(folder)
    assert manifest.export["compute_units"] == "CPU_AND_NE" and manifest.export["deployment_target"] == "macOS14"
    assert {t["dtype"] for t in manifest.export["summary"]["inputs"]} == {"float32"}
    assert manifest.export["traced_parity"]["rel_l2"] <= 1e-6


def test_traced_parity_catches_a_wrapper_that_drops_an_input():
    """SDXL: the wrapper with the most arguments (added_cond_kwargs rebuilt from two of them)."""
    source = tiny_source("random:tiny-sdxl")
    spec = build_spec(source.unet.config)
    good = coreml.trace_unet(source.unet, spec)
    assert coreml.traced_parity(good, source.unet, spec)["rel_l2"] <= 1e-6

    class FixedTimestep(torch.nn.Module):  # a wrapper bug: the timestep argument is ignored
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, sample, timestep, *rest):
            return self.inner(sample, torch.full_like(timestep, 500.0), *rest)

    args = torch_inputs(spec, spec.example_feeds(seed=0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' TracerWarnings
        bad = torch.jit.trace(FixedTimestep(wrap_unet(source.unet, spec)), args)
    with pytest.raises(coreml.CoreMLExportError, match="traced module differs from the U-Net"):
        coreml.traced_parity(bad, source.unet, spec)


def test_truncated_package_is_refused(sd15, tmp_path):
    _, folder, _ = sd15
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    weights = copy / coreml.MODEL_DIR / coreml.WEIGHTS_DIR / "weight.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="weight.bin: 1,000 bytes"):
        read_manifest(copy)


@pytest.mark.parametrize("extra, message", [
    (["--palettize", "5"], "--palettize 5: bits must be one of (4, 6, 8)"),
    (["--palettize", "6", "--quantize", "8"], "--palettize and --quantize are exclusive"),
    (["--quantize", "4"], "--quantize 4 (int4 weights) needs iOS18 or macOS15, not iOS17"),
    (["--deployment-target", "iOS15"], "deployment target 'iOS15' is not one of iOS16"),
    (["--compute-units", "NPU"], "argument --compute-units: invalid choice: 'NPU'"),
    (["--dynamic"], "Core ML takes a list of latent sizes, not --dynamic axes"),
    (["--coreml-sizes", "20x16"], "--coreml-sizes 20x16: latent sizes must be multiples of 8"),
    (["--coreml-sizes", "64"], "--coreml-sizes: '64' is not HxW"),
])
def test_bad_options_exit_2_and_write_nothing(capsys, tmp_path, extra, message):
    out = tmp_path / "art"
    argv = ["export", "--model", "random:tiny-sd15", "--target", "coreml", *extra, "--out", str(out)]
    assert_exit_2(capsys, argv, message)
    assert not out.exists()


def test_runner_refuses_onnx_runtime_options(sd15):
    _, folder, _ = sd15
    with pytest.raises(RunnerError, match="the coreml runtime takes no providers"):
        CoreMLRunner(folder / coreml.MODEL_DIR, spec=read_manifest(folder).spec, providers="cpu")


@pytest.mark.skipif(MACOS, reason="checks the refusal off macOS; on macOS verify runs (test below)")
@pytest.mark.parametrize("verb", ["verify", "bench"])
def test_verify_and_bench_off_macos_exit_2_with_the_reason(capsys, sd15, verb):
    _, folder, _ = sd15
    assert_exit_2(capsys, [verb, str(folder), "--model", "random:tiny-sd15"], "Core ML prediction requires macOS")


@pytest.mark.skipif(not MACOS, reason="Core ML prediction exists only on macOS")
@pytest.mark.parametrize("name", ARTIFACTS)
def test_verify_on_macos(request, name):
    from laptop_deploy.deploy.verify import verify_artifact

    source, folder, *_ = request.getfixturevalue(name)
    result = verify_artifact(folder, source, steps=4)
    assert result.passed, result.as_dict()["failures"]


def test_missing_coremltools_names_the_extra():
    """In a fresh interpreter where `import coremltools` fails, the target names the [coreml] extra."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'coremltools': raise ModuleNotFoundError(name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from laptop_deploy.exporters import get_exporter\n"
            "try:\n    get_exporter('coreml')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    assert out.strip() == ("TargetError target 'coreml' needs the package 'coremltools', which is not installed: "
                           "pip install 'laptop-deploy[coreml]'")


def test_parse_sizes():
    assert coreml.parse_sizes("64x64, 96X64,") == ((64, 64), (96, 64))
    with pytest.raises(coreml.CoreMLExportError, match="'0x8' is not HxW"):
        coreml.parse_sizes("0x8")
