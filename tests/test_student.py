"""The student format: exact round trip, loud failure on mismatch, and generation inside diffusers pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from laptop_deploy.errors import OutputError, StudentFormatError
from laptop_deploy.models.layers import removed_layers
from laptop_deploy.models.student import META_FILE, WEIGHTS_FILE, load_student, make_student, save_student

REMOVE = {
    "random:tiny-sd15": ["down_blocks.2.attentions.1", "mid_block.resnets.0", "up_blocks.1.resnets.1",
                         "up_blocks.3.resnets.2"],
    "random:tiny-sdxl": ["down_blocks.1.resnets.1", "down_blocks.2.attentions.0.transformer_blocks.2",
                         "up_blocks.0.attentions.2", "up_blocks.2.resnets.1"],
}


@pytest.fixture
def saved_student(tmp_path, make_source, tiny_spec):
    source = make_source(tiny_spec)
    student = make_student(source.unet, REMOVE[tiny_spec])
    save_student(student, tmp_path / "student", teacher={"spec": tiny_spec})
    return source, student, tmp_path / "student"


def test_round_trip_is_exact(saved_student, inputs_for):
    _, student, path = saved_student
    loaded = load_student(path)
    assert removed_layers(loaded) == removed_layers(student)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in student.parameters())
    inputs = inputs_for(student)
    with torch.no_grad():
        assert (loaded(**inputs).sample - student(**inputs).sample).abs().max().item() == 0.0
    meta = json.loads((path / META_FILE).read_text())
    assert meta["removed"] == removed_layers(student) and meta["params"] == sum(
        p.numel() for p in student.parameters())


def test_stock_diffusers_loader_fails_loudly_instead_of_random_init(saved_student):
    from diffusers import UNet2DConditionModel

    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        UNet2DConditionModel.from_pretrained(saved_student[2])


def test_weights_that_do_not_match_the_removal_set_are_an_error(saved_student):
    path = saved_student[2]
    state = load_file(path / WEIGHTS_FILE)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, path / WEIGHTS_FILE)
    with pytest.raises(StudentFormatError, match=f"1 missing \\({dropped}\\)"):
        load_student(path)


def test_truncated_weights_and_bad_metadata_are_errors(saved_student):
    path = saved_student[2]
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StudentFormatError, match="unreadable weights"):
        load_student(path)
    (path / META_FILE).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(StudentFormatError, match="expected 'laptop-deploy-student'"):
        load_student(path)


def test_save_refuses_files_and_non_empty_folders_and_leaves_nothing_on_failure(tmp_path, make_source):
    student = make_student(make_source().unet, ["mid_block.resnets.0"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        save_student(student, tmp_path / "file", teacher={})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(OutputError, match=r"did not write \(keep\)"):  # a user's folder: even with force
        save_student(student, tmp_path / "full", teacher={}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert (tmp_path / "full" / "keep").read_text() == "x"
    with pytest.raises(TypeError):  # a failure mid-write leaves no folder and no temporary
        save_student(student, tmp_path / "new", teacher={"not json": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_pruned_student_generates_inside_a_diffusers_pipeline(saved_student, tiny_spec):
    source, _, path = saved_student
    pipe = source.pipeline(unet=load_student(path))
    expected = "StableDiffusionXLPipeline" if tiny_spec.endswith("sdxl") else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected
    image = pipe("a red cube", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 0


@pytest.mark.slow
def test_full_size_bk_sdm_base_student_round_trip(tmp_path, inputs_for):
    """Opt-in (-m slow): real SD-1.5 weights shapes, ~2.3 GB student; exact reload and published size."""
    from laptop_deploy.prune.handcrafted import handcrafted_removal
    from laptop_deploy.models.sources import resolve_model

    unet = resolve_model("random:sd15").unet
    student = make_student(unet, handcrafted_removal("bk-sdm-base", unet.config))
    assert sum(p.numel() for p in student.parameters()) == 579_384_964
    save_student(student, tmp_path / "s", teacher={"spec": "random:sd15"})
    inputs = inputs_for(student, batch=1)
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "s")(**inputs).sample, student(**inputs).sample)
