"""Integrity before loading: `verify` and `bench` re-hash every file against manifest.json (exit 2 naming the
file), refuse a manifest without digests, and `--skip-digest` bypasses only the hashing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from laptop_deploy.cli.main import main  # noqa: E402
from laptop_deploy.deploy.manifest import (ArtifactError, MANIFEST, check_integrity, file_entry,  # noqa: E402
                                           read_manifest, write_manifest)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def scale_weight(folder, name: str, factor: float) -> None:
    """Scale one initializer in place: same byte size, different sha256 (what an edited graph looks like)."""
    model = onnx.load(str(folder / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), name))
    onnx.save_model(model, str(folder / "model.onnx"))


@pytest.fixture
def modified(tiny_onnx_fp32, tmp_path):
    _, artifact = tiny_onnx_fp32
    folder = shutil.copytree(artifact, tmp_path / "modified")
    before = (folder / "model.onnx").stat().st_size
    scale_weight(folder, "unet.up_blocks.0.resnets.0.conv1.weight", 1.01)  # the issue's own example
    assert (folder / "model.onnx").stat().st_size == before  # only the digest can tell
    return folder


def test_a_modified_file_exits_2_naming_it_before_loading(capsys, modified):
    # the shared session artifact may already carry results from other tests: nothing may be added to them
    recorded = read_manifest(modified).results
    for argv in (["verify", str(modified), "--model", "random:tiny-sd15"],
                 ["bench", str(modified), "--iterations", "1", "--warmup", "0"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, (argv, code, err)
        assert f"{modified / 'model.onnx'}: sha256 " in err and "modified after export" in err
    assert read_manifest(modified).results == recorded  # nothing recorded
    # --skip-digest: sizes still checked, hashing skipped; bench runs the file
    code, out, err = run(capsys, "bench", str(modified), "--iterations", "1", "--warmup", "0", "--skip-digest",
                         "--json")
    assert code == 0 and json.loads(out)["iterations"] == 1


def test_a_manifest_without_digests_is_refused_the_same_way(capsys, tiny_onnx_fp32, tmp_path):
    _, artifact = tiny_onnx_fp32
    folder = shutil.copytree(artifact, tmp_path / "nodigest")
    manifest = read_manifest(folder)
    manifest.files = {n: {"bytes": e["bytes"]} for n, e in manifest.files.items()}
    write_manifest(folder, manifest)
    code, out, err = run(capsys, "bench", str(folder), "--iterations", "1", "--warmup", "0")
    assert code == 2 and out == "" and f"{folder / 'model.onnx'}: {MANIFEST} lists no sha256" in err
    assert check_integrity(folder, skip_digest=True).files == manifest.files


def test_check_integrity_checks_sizes_first_and_every_file(tiny_onnx_fp32, tmp_path):
    _, artifact = tiny_onnx_fp32
    assert check_integrity(artifact).model_file == "model.onnx"
    folder = shutil.copytree(artifact, tmp_path / "extra")
    (folder / "notes.bin").write_bytes(b"abcd")
    manifest = read_manifest(folder)
    manifest.files["notes.bin"] = {"bytes": 4, "sha256": file_entry(folder / "notes.bin")["sha256"]}
    write_manifest(folder, manifest)
    check_integrity(folder)
    (folder / "notes.bin").write_bytes(b"abce")  # same size, other content: a file other than the model
    with pytest.raises(ArtifactError, match=r"notes\.bin: sha256 .* \(modified after export"):
        check_integrity(folder)
    (folder / "notes.bin").write_bytes(b"abc")
    with pytest.raises(ArtifactError, match=r"notes\.bin: 3 bytes, manifest\.json says 4"):
        check_integrity(folder, skip_digest=True)
