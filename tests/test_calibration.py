"""The calibration set draws what its docstring says: stratified timesteps, DDPM noising, real conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from laptop_deploy.prune.calibration import build_calibration, read_prompts
from laptop_deploy.errors import LaptopDeployError


def test_timesteps_cover_every_stratum_and_the_seed_fixes_everything(make_source):
    source = make_source()
    calib = build_calibration(source, count=10, seed=3)
    assert [t // 100 for t in calib.timestep.tolist()] == list(range(10))
    again = build_calibration(source, count=10, seed=3)
    assert torch.equal(calib.sample, again.sample)
    assert torch.equal(calib.cond["encoder_hidden_states"], again.cond["encoder_hidden_states"])
    assert not torch.equal(calib.sample, build_calibration(source, count=10, seed=4).sample)


def test_prompts_go_through_the_text_encoder(make_source, tmp_path):
    source = make_source("random:tiny-sdxl")
    (tmp_path / "p.txt").write_text("a red cube\n\na blue ball\n")
    prompts = read_prompts(tmp_path / "p.txt")
    calib = build_calibration(source, count=3, prompts=prompts)
    assert prompts == ["a red cube", "a blue ball"]
    assert "2 prompts (--prompts)" in calib.description["text"]
    hidden = calib.cond["encoder_hidden_states"]
    assert hidden.shape == (3, 77, 64) and torch.equal(hidden[0], hidden[2]) and not torch.equal(hidden[0], hidden[1])
    # 16x16 latents x the tiny VAE's factor 2 = 32 px (SD's real VAE would give 8x)
    assert calib.cond["added_cond_kwargs"]["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]


def test_noising_follows_the_ddpm_forward_process_in_the_documented_draw_order(make_source):
    from diffusers import DDPMScheduler

    calib = build_calibration(make_source(), count=6, seed=7)
    generator = torch.Generator().manual_seed(7)
    torch.rand(6, generator=generator)  # 1. timestep offsets
    clean = torch.randn(6, 4, 16, 16, generator=generator)  # 2. clean latents
    noise = torch.randn(6, 4, 16, 16, generator=generator)  # 3. noise
    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    abar = abar[calib.timestep].view(-1, 1, 1, 1)
    assert torch.allclose(calib.sample, abar.sqrt() * clean + (1 - abar).sqrt() * noise, atol=1e-6)


def test_images_are_vae_encoded(make_source, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    calib = build_calibration(make_source(), count=3, images=tmp_path)
    assert calib.sample.shape == (3, 4, 16, 16) and torch.isfinite(calib.sample).all()
    assert "VAE-encoded images" in calib.description["latents"] and "2 files" in calib.description["latents"]


def test_models_without_text_encoders_get_seeded_conditioning(tmp_path, make_source):
    make_source("random:tiny-sdxl").unet.save_pretrained(tmp_path / "unet")
    from laptop_deploy.models.sources import resolve_model

    calib = build_calibration(resolve_model(str(tmp_path / "unet")), count=2)
    assert "N(0, I) text embeddings" in calib.description["text"]
    assert calib.cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    with pytest.raises(LaptopDeployError, match="needs a VAE"):
        build_calibration(resolve_model(str(tmp_path / "unet")), count=2, images=tmp_path)
