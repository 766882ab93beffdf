"""Every model-spec route resolves to the same U-Net, and every bad spec is one clear ModelSourceError."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from laptop_deploy.errors import ModelSourceError
from laptop_deploy.models.presets import PRESETS
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.models.student import make_student, save_student


def _same_function(a, b, inputs) -> bool:
    with torch.no_grad():
        return torch.equal(a(**inputs).sample, b(**inputs).sample)


def test_presets_are_seeded_and_match_their_configs(inputs_for):
    a, b = resolve_model("random:tiny-sdxl", seed=3), resolve_model("random:tiny-sdxl", seed=3)
    other = resolve_model("random:tiny-sdxl", seed=4)
    inputs = inputs_for(a.unet)
    assert _same_function(a.unet, b.unet, inputs) and not _same_function(a.unet, other.unet, inputs)
    assert a.family == "sdxl" and a.unet.config.transformer_layers_per_block == [1, 2, 4]
    assert {n: resolve_model(f"random:{n}", materialize=False).family for n in PRESETS} == {
        "sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "tiny-sd15": "sd1", "tiny-sdxl": "sdxl"}


def test_unet_folder_pipeline_folder_and_student_folder(tmp_path, make_source, inputs_for, tiny_spec):
    source = make_source(tiny_spec)
    inputs = inputs_for(source.unet)
    pipe = source.pipeline()
    pipe.save_pretrained(tmp_path / "pipe")

    unet_folder = resolve_model(str(tmp_path / "pipe" / "unet"))
    assert unet_folder.kind == "unet-folder" and _same_function(unet_folder.unet, source.unet, inputs)

    pipeline_folder = resolve_model(str(tmp_path / "pipe"))
    assert pipeline_folder.kind == "pipeline-folder" and pipeline_folder.family == source.family
    assert set(pipeline_folder.available_parts()) == set(source.available_parts())
    assert type(pipeline_folder.part("text_encoder")).__name__ == type(source.part("text_encoder")).__name__
    assert _same_function(pipeline_folder.unet, source.unet, inputs)

    save_student(make_student(source.unet, ["mid_block.resnets.1"]), tmp_path / "student", teacher={})
    student = resolve_model(str(tmp_path / "student"))
    assert student.kind == "student" and student.removed == ["mid_block.resnets.1"]
    assert _same_function(student.unet, source.unet, inputs)


def test_meta_resolution_reads_no_weights(tmp_path, make_source):
    make_source().unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    source = resolve_model(str(tmp_path / "unet"), materialize=False)
    assert next(source.unet.parameters()).device.type == "meta"
    with pytest.raises(ModelSourceError, match="cannot load U-Net"):
        resolve_model(str(tmp_path / "unet"))


def test_unet_folder_with_a_missing_weight_is_an_error_not_a_random_init(tmp_path, make_source):
    make_source().unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_out.bias"]
    save_file(state, weights)
    with pytest.raises(ModelSourceError, match="conv_out.bias"):
        resolve_model(str(tmp_path / "unet"))


@pytest.mark.parametrize("spec,message", [
    ("random:nope", "unknown preset 'random:nope'; valid presets: random:sd15"),
    ("/no/such/path", "not found: no such file or folder"),
    ("./relative/missing", "not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(spec)


def test_folder_that_is_not_a_model_and_unknown_file_types(tmp_path):
    with pytest.raises(ModelSourceError, match="not a model folder"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="unsupported file type '.onnx'"):
        resolve_model(str(tmp_path / "weights.onnx"))


def test_hub_id_offline_is_a_clear_error_without_retries(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="hub is unreachable"):
        resolve_model("someone/some-model")


def test_parts_of_a_bare_unet_are_refused(tmp_path, make_source):
    make_source().unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ModelSourceError, match="has no vae"):
        resolve_model(str(tmp_path / "unet")).part("vae")
