"""Core ML app bundles (``export --pipeline --target coreml``): Apple's Resources names, the manifest's digests of
every file inside every package, U-Net chunks that compose to the U-Net (traced PyTorch, calibrated gate), and the
refusals: prediction needs macOS, so ``generate`` and end-to-end ``verify`` exit 2 here (``verify`` after running
the per-part traced checks).

Every test that needs a converted bundle is ``slow``: one toy bundle (module-scoped, shared) costs ~30 s of CPU in
coremltools, over the default suite's budget. The default tests are the cheap logic around it: chunks composing to
the U-Net (traced PyTorch, no conversion), the chunk planner's refusals, and the bad-option exits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("coremltools", reason="Core ML bundles need the [coreml] extra: pip install '.[coreml]'")

from deploy_fixtures import tiny_source, torch_threads  # noqa: E402

from laptop_deploy.cli.main import main  # noqa: E402
from laptop_deploy.deploy.bundle import BundleSources  # noqa: E402
from laptop_deploy.deploy.bundle_coreml import build_parts, check_chunks, trace  # noqa: E402
from laptop_deploy.deploy.integrity import file_entry  # noqa: E402
from laptop_deploy.deploy.unet_chunks import plan_chunks  # noqa: E402
from laptop_deploy.errors import CheckFailed  # noqa: E402

MACOS = sys.platform == "darwin"
PACKAGES = {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _export(out: Path, model: str, *extra: str) -> dict:
    code = main(["export", "--pipeline", "--model", model, "--target", "coreml", "--out", str(out), "--quiet",
                 *extra])
    assert code == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    """The toy bundle through the CLI, default options (fp16 text encoder and U-Net, fp32 VAE)."""
    out = tmp_path_factory.mktemp("coreml-bundle") / "toy"
    return out, _export(out, "toy")


@pytest.mark.slow
def test_toy_bundle_has_apples_resource_names(toy):
    out, manifest = toy
    top = {p.name for p in out.iterdir()}
    assert top == PACKAGES | {"vocab.json", "merges.txt", "tokenizer", "scheduler", "manifest.json",
                              ".laptop-deploy.json"}
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # the toy's own tokenizer file, as the ONNX bundle has
    assert (out / "merges.txt").read_text().startswith("#version: 0.2\n")
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab[manifest["tokenizers"]["tokenizer"]["pad_token"]] == manifest["tokenizers"]["tokenizer"]["pad_id"]
    assert {p["model_file"] for p in manifest["parts"].values()} == PACKAGES
    assert manifest["target"] == "coreml" and manifest["precision"] == "fp16"


@pytest.mark.slow
def test_toy_manifest_declares_apples_io(toy):
    _, manifest = toy
    parts = manifest["parts"]

    def io(part: str, kind: str) -> list:
        return [(t["name"], t["shape"], t["dtype"]) for t in parts[part][kind]]

    assert io("text_encoder", "inputs") == [("input_ids", [1, 77], "float32")]
    assert [n for n, _, _ in io("text_encoder", "outputs")] == ["last_hidden_state", "pooled_outputs"]
    assert io("unet", "inputs") == [("sample", [2, 48, 8, 8], "float32"), ("timestep", [2], "float32"),
                                    ("encoder_hidden_states", [2, 64, 1, 77], "float32")]
    assert io("unet", "outputs") == [("noise_pred", [2, 48, 8, 8], "float32")]
    assert io("vae_decoder", "inputs") == [("z", [1, 48, 8, 8], "float32")]
    assert io("vae_decoder", "outputs") == [("image", [1, 3, 32, 32], "float32")]
    assert [parts[p]["precision"] for p in parts] == ["fp16", "fp16", "fp32", "fp32"]
    assert "overflows fp16" in parts["vae_decoder"]["note"]
    for part in parts.values():  # every part passed the traced check, at the traced gate's factors
        assert part["traced_parity"]["factor_rel_l2"] <= 2.0 and part["traced_parity"]["rel_l2"] < 1e-6


@pytest.mark.slow
def test_toy_manifest_digests_every_file_inside_each_package(toy):
    out, manifest = toy
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", ".laptop-deploy.json"}
    for package in PACKAGES:
        inside = [name for name in manifest["files"] if name.startswith(package + "/")]
        assert f"{package}/Manifest.json" in inside and f"{package}/Data/com.apple.CoreML/model.mlmodel" in inside
        if package in ("TextEncoder.mlpackage", "Unet.mlpackage"):  # the toy's VAE is a weightless space-to-depth
            assert f"{package}/Data/com.apple.CoreML/weights/weight.bin" in inside
    for name, entry in manifest["files"].items():
        assert file_entry(out / name) == entry


@pytest.mark.slow
def test_packages_read_back_with_the_manifest_io(toy):
    from laptop_deploy.exporters.coreml import read_package

    out, manifest = toy
    for part in manifest["parts"].values():
        summary = read_package(out / part["model_file"])
        assert [(t["name"], t["shape"]) for t in summary.inputs] == [(t["name"], t["shape"]) for t in part["inputs"]]
        assert [t["name"] for t in summary.outputs] == [t["name"] for t in part["outputs"]]
        assert summary.weight_bytes == part["weight_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["generate", "verify"])
def test_a_modified_package_file_exits_2(toy, tmp_path, capsys, verb):
    out, _ = toy
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    weights = copy / "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    weights.write_bytes(bytes(data))
    argv = (["generate", str(copy), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]
            if verb == "generate" else ["verify", str(copy)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "weight.bin" in err and "sha256" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(MACOS, reason="off macOS only: on a Mac the refusal names the Swift pipeline instead")
def test_generate_off_macos_exits_2_with_the_reason(toy, tmp_path, capsys):
    out, _ = toy
    assert main(["generate", str(out), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Core ML prediction requires macOS" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(MACOS, reason="off macOS only")
def test_verify_off_macos_runs_the_traced_checks_then_exits_2(toy, capsys):
    out, _ = toy
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "per-part traced checks passed (4 parts" in err and "requires macOS" in err
    recorded = json.loads((out / "manifest.json").read_text())["results"]["verify_traced"]
    assert set(recorded["parts"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(s["factor_rel_l2"] <= 2.0 for s in recorded["parts"].values())


@pytest.mark.slow
def test_verify_with_another_model_fails_the_source_check(toy, capsys):
    out, _ = toy
    assert main(["verify", str(out), "--model", "random:tiny-sd15"]) == 1
    assert "is not the one this bundle was exported from" in capsys.readouterr().err


# -- chunks: chunk 2 ∘ chunk 1 == the U-Net (traced PyTorch, calibrated gate) -------------------------------------

def _chunk_parts(source):
    size = source.unet.config["sample_size"]
    parts, plan = build_parts(BundleSources(unet=source, parts=source, provenance={}), precision="fp32",
                              height=size, width=size, chunk=True)
    first, second = (next(p for p in parts if p.name == name) for name in ("unet_chunk1", "unet_chunk2"))
    return first, second, plan


@pytest.mark.parametrize("spec,student", [("random:tiny-sd15", True),
                                          pytest.param("random:tiny-sdxl", False, marks=pytest.mark.slow)],
                         ids=["sd15-student", "sdxl"])
def test_chunks_compose_to_the_unet(spec, student):
    source = tiny_source(spec, student=student)
    first, second, plan = _chunk_parts(source)
    total = sum(p.numel() for p in source.unet.parameters())
    assert sum(plan["params"]) == total and 0 < plan["split"] < len(plan["stages"])
    assert abs(plan["params"][0] - plan["params"][1]) < 0.5 * total  # a split near the middle, by parameters
    assert first.spec.output_names == plan["boundary"]
    assert set(plan["boundary"]) < set(second.spec.input_names)
    traced1, traced2 = trace(first), trace(second)
    result = check_chunks(first, second, traced1, traced2)
    assert result["factor_rel_l2"] <= 2.0 and result["rel_l2"] < 1e-6

    def wrong_skip(*args):  # chunk 1 handing over its skips in another order: the gate must catch it
        hidden, emb, *skips = traced1(*args)
        return (hidden, emb, *skips[:-2], skips[-1], skips[-2])

    if first.spec.outputs[-1].shape == first.spec.outputs[-2].shape:
        with pytest.raises(CheckFailed, match="differs from PyTorch"):
            check_chunks(first, second, wrong_skip, traced2)


def test_plan_refuses_a_unet_it_cannot_split():
    source = tiny_source("random:tiny-sd15")
    source.unet.register_to_config(class_embed_type="timestep")
    with pytest.raises(Exception, match="class_embed_type='timestep'"):
        plan_chunks(source.unet)


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--pipeline", "--target", "onnx", "--chunk-unet"], "needs --target coreml"),
    (["--target", "coreml", "--chunk-unet"], "use it with --pipeline"),
    (["--pipeline", "--target", "coreml", "--coreml-sizes", "8x8"], "one fixed size"),
    (["--pipeline", "--target", "coreml", "--precision", "int8"], "fp32 or fp16"),
], ids=["chunk-onnx", "chunk-no-pipeline", "sizes", "int8"])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["export", "--model", "toy", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


# -- slow: SD-1.5 chunked, SDXL ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_sd15_chunked_bundle(tmp_path):
    out = tmp_path / "sd15"
    manifest = _export(out, "random:tiny-sd15", "--chunk-unet")
    assert {p.name for p in out.glob("*.mlpackage")} == {"TextEncoder.mlpackage", "UnetChunk1.mlpackage",
                                                         "UnetChunk2.mlpackage", "VAEDecoder.mlpackage",
                                                         "VAEEncoder.mlpackage"}
    chunks = manifest["unet"]["chunks"]
    assert chunks["files"] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert {k for k, v in chunks["feeds"].items() if v == "unet_chunk1"} == set(chunks["plan"]["boundary"])
    assert chunks["feeds"]["encoder_hidden_states"] == "input"
    assert manifest["parts"]["unet_chunk1"]["traced_parity"]["factor_rel_l2"] <= 2.0
    assert manifest["parts"]["unet_chunk1"]["params"] + manifest["parts"]["unet_chunk2"]["params"] == \
        manifest["source"]["params"] == sum(chunks["plan"]["params"])
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()


@pytest.mark.slow
def test_tiny_sdxl_bundle_has_two_text_encoders(tmp_path):
    out = tmp_path / "sdxl"
    manifest = _export(out, "random:tiny-sdxl", "--precision", "fp32")
    parts = manifest["parts"]
    assert parts["text_encoder_2"]["model_file"] == "TextEncoder2.mlpackage"
    assert [t["name"] for t in parts["text_encoder"]["outputs"]] == ["hidden_embeds", "pooled_outputs"]
    assert [t["name"] for t in parts["unet"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                            "text_embeds", "time_ids"]
    assert parts["unet"]["inputs"][2]["shape"][2] == 1  # Apple's [B, C, 1, S] hidden-states layout
    assert all(p["precision"] == "fp32" for p in parts.values())
    assert manifest["tokenizers"]["tokenizer_2"]["apple"]["vocab"] in ("vocab.json", "vocab_2.json")
