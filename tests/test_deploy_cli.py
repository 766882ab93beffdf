"""`export` / `verify` / `bench` on the command line: bad inputs exit 2 with one line and write nothing; a parity
failure exits 1 with the report."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from deploy_fixtures import torch_threads  # noqa: E402
from laptop_deploy.cli.main import main  # noqa: E402
from laptop_deploy.deploy.manifest import describe_files, read_manifest, write_manifest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def artifact(tiny_onnx_fp32):
    """A static fp32 tiny-sd15 artifact (conftest's session export, shared with test_integrity / parity)."""
    return tiny_onnx_fp32[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("laptop-deploy: error: ") and message in err, err


@pytest.mark.parametrize("extra,message", [
    (["--target", "tflite"], "unknown target 'tflite'; valid: onnx, ort-mobile, trt, coreml"),
    (["--target", "onnx", "--height", "20"], "latent height 20 is not a positive multiple of 8 (this U-Net "
                                             "downsamples 3 times); nearest valid: 16 or 24"),
    (["--target", "onnx", "--width", "4", "--dynamic"], "nearest valid: 8"),
    (["--target", "onnx", "--precision", "int4"], "argument --precision: invalid choice: 'int4'"),
    (["--target", "onnx", "--opset", "17"], "opset 17 is below the minimum 18"),
    (["--target", "onnx", "--batch", "0"], "batch 0 must be at least 1"),
    (["--target", "onnx", "--exporter", "torchscript", "--opset", "25"],
     "torchscript exporter failed: RuntimeError: Unsupported onnx_opset_version: 25"),
])
def test_export_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, extra, message):
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["export", "--model", "random:tiny-sd15", *extra, "--out", str(out)], message)
    assert list(tmp_path.iterdir()) == []  # the failed export (the last case fails mid-way) left no trace


def test_export_into_a_users_folder_is_refused_even_with_force(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    _one_line_exit_2(capsys, ["export", "--model", "random:tiny-sd15", "--target", "onnx", "--force", "--out",
                              str(tmp_path / "out")], "holds files laptop-deploy did not write (keep.txt)")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_missing_onnxruntime_names_the_extra(capsys, tmp_path, artifact, monkeypatch):
    # What a machine without the [onnx] extra sees: importing onnxruntime (or any of its submodules) fails.
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for name in [m for m in sys.modules if m.startswith(("laptop_deploy.runtimes.ort", "laptop_deploy.exporters.o"))]:
        monkeypatch.delitem(sys.modules, name)
    _one_line_exit_2(capsys, ["verify", str(artifact), "--model", "random:tiny-sd15"],
                     "runtime 'ort' needs the package 'onnxruntime', which is not installed: "
                     "pip install 'laptop-deploy[onnx]'")
    _one_line_exit_2(capsys, ["export", "--model", "random:tiny-sd15", "--target", "ort-mobile", "--out",
                              str(tmp_path / "m")], "target 'ort-mobile' needs the package 'onnxruntime'")
    assert not (tmp_path / "m").exists()


def test_verify_a_folder_without_manifest_exits_2(capsys, tmp_path):
    _one_line_exit_2(capsys, ["verify", str(tmp_path), "--model", "random:tiny-sd15"],
                     f"{tmp_path}: no manifest.json; not an artifact written by `laptop-deploy export`")
    _one_line_exit_2(capsys, ["bench", str(tmp_path / "nope")], "not an artifact folder (no such directory)")


def test_truncated_onnx_exits_2(capsys, tmp_path, artifact):
    broken = shutil.copytree(artifact, tmp_path / "broken")
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])
    size = (broken / "model.onnx").stat().st_size
    _one_line_exit_2(capsys, ["verify", str(broken), "--model", "random:tiny-sd15"],
                     f"model.onnx: {size:,} bytes, manifest.json says {len(data):,} (truncated or modified)")
    code, _, err = run(capsys, "bench", str(broken))
    assert code == 2 and "(truncated or modified)" in err
    # Even with a manifest that agrees, onnxruntime's refusal is one line, exit 2.
    manifest = read_manifest(broken, check_files=False)
    manifest.files = describe_files(broken)
    write_manifest(broken, manifest)
    _one_line_exit_2(capsys, ["bench", str(broken)], "onnxruntime cannot load it")


def test_verify_against_another_model_exits_2(capsys, artifact):
    _one_line_exit_2(capsys, ["verify", str(artifact), "--model", "random:tiny-sd15", "--seed", "1"],
                     "is not the model")


def test_parity_failure_exits_1_with_the_report(capsys, tmp_path, artifact):
    """An artifact whose weights were altered after export (its manifest updated to match) must fail verify."""
    tampered = shutil.copytree(artifact, tmp_path / "tampered")
    model = onnx.load(str(tampered / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == "unet.conv_out.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.1), weight.name))
    onnx.save_model(model, str(tampered / "model.onnx"))
    manifest = read_manifest(tampered, check_files=False)
    manifest.files = describe_files(tampered)
    write_manifest(tampered, manifest)

    code, out, err = run(capsys, "verify", str(tampered), "--model", "random:tiny-sd15", "--steps", "3", "--json")
    result = json.loads(out)
    assert code == 1 and err == ""
    assert result["passed"] is False and result["exit_code"] == 1
    assert 1e-4 < result["rel_l2"] < 0.5 and result["nan_count"] == 0 and result["e2e_psnr_db"] < 60
    failing = {f.split("/")[0].split(":")[0] for f in result["failures"]}
    assert failing == {"step 0 (t=667)", "step 1 (t=334)", "step 2 (t=1)", "random", "end-to-end"}
    assert all("relative L2" in f or "PSNR" in f or "max abs" in f for f in result["failures"])
    assert read_manifest(tampered).results["parity"]["passed"] is False

    code, out, _ = run(capsys, "verify", str(tampered), "--model", "random:tiny-sd15", "--steps", "3")
    assert code == 1 and "FAILED:" in out and "step 0 (t=667)" in out and "end-to-end (3 steps)" in out


def test_verify_text_and_tolerance_override(capsys, artifact):
    code, out, err = run(capsys, "verify", str(artifact), "--model", "random:tiny-sd15", "--steps", "2")
    assert code == 0 and err == "" and "PASSED:" in out and "random" in out
    code, out, _ = run(capsys, "verify", str(artifact), "--model", "random:tiny-sd15", "--steps", "2",
                       "--max-rel-l2", "0", "--json")
    assert code == 1 and json.loads(out)["tolerances"]["max_rel_l2"] == 0.0


def test_verify_stage_lines_once_the_verb_runs_long(capsys):
    """verify's stage lines reach stderr on a terminal or after quiet_s; a quick run's stderr stays empty."""
    from laptop_deploy.cli.deploy_commands import _stage_printer

    quiet, loud = _stage_printer("verify"), _stage_printer("verify", quiet_s=0)
    quiet("case 1/3: random")
    assert capsys.readouterr().err == ""
    loud("case 1/3: random")
    assert capsys.readouterr().err.startswith("verify: case 1/3: random (0 s)")
