"""The toy world: dataset determinism and sizes, the judge on ground truth, the `toy` teacher through resolve_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laptop_deploy.models.sources import resolve_model
from laptop_deploy.toy.dataset import (
    COLOURS,
    SHAPES,
    Attributes,
    all_prompts,
    held_out_prompts,
    is_held_out,
    make_dataset,
    parse_caption,
    train_prompts,
)
from laptop_deploy.toy.evaluate import eval_pairs, generate, psnr, score
from laptop_deploy.toy.judge import alignment, read_attributes
from laptop_deploy.toy.latent import SpaceToDepthVAE
from laptop_deploy.toy.model import UNET_CONFIG, caption_words, word_tokenizer


def test_prompt_sets_partition_the_216_combinations():
    assert (len(all_prompts()), len(train_prompts()), len(held_out_prompts())) == (216, 192, 24)
    assert not set(train_prompts()) & set(held_out_prompts())
    # every shape/colour pair is still trained at 8 of its 9 positions
    pairs = {(a.shape, a.colour) for a in train_prompts()}
    assert len(pairs) == len(SHAPES) * len(COLOURS)


def test_dataset_is_deterministic_distinct_and_never_draws_held_out_prompts():
    first, again, other = (make_dataset(600, seed=s) for s in (3, 3, 4))
    assert first.images.shape == (600, 32, 32, 3) and first.images.dtype == np.uint8
    assert np.array_equal(first.images, again.images) and first.captions == again.captions
    assert not np.array_equal(first.images, other.images)
    assert not any(is_held_out(a) for a in first.attributes)
    assert len({image.tobytes() for image in first.images}) == 600  # jitter makes every pair distinct
    assert all(parse_caption(c) == a for c, a in zip(first.captions, first.attributes))


def test_judge_reads_ground_truth_of_every_prompt():
    truth = make_dataset(432, seed=11, prompts=all_prompts())  # each of the 216 prompts twice
    result = alignment(truth.images, truth.attributes)
    assert result.score >= 0.98 and result.misses == 0


def test_judge_rejects_wrong_prompts_and_empty_images():
    truth = make_dataset(24, seed=5, prompts=all_prompts())
    wrong = [Attributes((a.shape + 1) % 4, a.colour, a.position) for a in truth.attributes]
    assert alignment(truth.images, wrong).score == 0.0
    assert read_attributes(np.full((32, 32, 3), 30, dtype=np.uint8)) is None
    with pytest.raises(ValueError, match="expects a"):
        read_attributes(np.zeros((16, 16, 3)))


def test_judge_survives_blur_and_noise():
    """Generated images are soft and hazy: a 3×3 binomial blur plus N(0, 8²) noise costs at most a few points."""
    truth = make_dataset(216, seed=2, prompts=all_prompts())
    blurred = truth.images.astype(np.float64)
    for axis in (1, 2):
        blurred = 0.25 * np.roll(blurred, -1, axis) + 0.5 * blurred + 0.25 * np.roll(blurred, 1, axis)
    noisy = np.clip(blurred + np.random.default_rng(0).normal(0, 8, blurred.shape), 0, 255)
    assert alignment(noisy, truth.attributes).score >= 0.93


def test_every_caption_word_is_one_token():
    tokenizer = word_tokenizer()
    for word in caption_words():
        assert len(tokenizer(word).input_ids) == 3, word  # <|startoftext|> word <|endoftext|>


def test_latent_map_is_exact_and_keeps_the_vae_contract(tmp_path):
    vae = SpaceToDepthVAE(offset=-0.75, scaling_factor=3.8)
    pixels = torch.from_numpy(make_dataset(4, seed=0).images).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = vae.encode(pixels).latent_dist.mean
    assert latents.shape == (4, 48, 8, 8)
    assert torch.allclose(vae.decode(latents).sample, pixels, atol=1e-6)
    assert torch.equal(vae.encode(pixels).latent_dist.sample(), latents)  # deterministic
    vae.save_pretrained(tmp_path / "vae")
    again = SpaceToDepthVAE.from_pretrained(tmp_path / "vae")
    assert (again.config.offset, again.config.scaling_factor) == (-0.75, 3.8)
    with pytest.raises(ValueError, match="factor 4"):
        SpaceToDepthVAE(latent_channels=4)


def test_wilson_interval_and_mcnemar_test():
    from laptop_deploy.toy.evaluate import mcnemar, wilson
    from laptop_deploy.toy.judge import Alignment

    assert wilson(0.0, 240) == [0.0, 0.0158] and wilson(1.0, 24)[1] == 1.0  # honest at the edges, unlike p ± 1.96·SE
    low, high = wilson(0.8, 240)
    assert low < 0.8 < high and high - low < 0.11
    first = Alignment(10, 0.8, 0, 0, 0, 0, [True] * 8 + [False] * 2)
    second = Alignment(10, 0.2, 0, 0, 0, 0, [False] * 8 + [True] * 2)
    assert mcnemar(first, second) == {"only_first": 8, "only_second": 2, "p": 0.1094}  # binomial(10, ½): P(≤2)·2
    assert mcnemar(first, first)["p"] == 1.0


def test_psnr():
    a = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[..., 0] = 255  # a third of the values off by 255: MSE = 255² / 3
    assert psnr(a, b) == pytest.approx(10 * np.log10(3))


@pytest.fixture
def monkeypatch_threads():
    """``torch.set_num_threads`` for one test, restored afterwards (global state must not leak between tests)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    return resolve_model("toy")


def test_toy_resolves_with_sd_topology_and_pipeline_parts(toy):
    assert toy.kind == "toy" and toy.family == "sd1"
    assert list(toy.unet.config.block_out_channels) == UNET_CONFIG["block_out_channels"]
    assert toy.pipeline().vae_scale_factor == 4 and toy.unet.config.sample_size * 4 == 32
    assert toy.part("tokenizer")("a purple diamond").input_ids == word_tokenizer()("a purple diamond").input_ids
    assert set(toy.available_parts()) == {"text_encoder", "tokenizer", "vae", "scheduler"}
    meta = resolve_model("toy", materialize=False)
    assert meta.unet.conv_in.weight.is_meta
    assert sum(p.numel() for p in meta.unet.parameters()) == sum(p.numel() for p in toy.unet.parameters())


def test_toy_pipeline_generates_32px_images_that_depend_on_the_seed_only(toy, monkeypatch_threads):
    pipe = toy.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pairs = eval_pairs(per_prompt=1)[:3]
    monkeypatch_threads(1)
    images = generate(pipe, pairs, steps=3, batch=3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    alone = generate(pipe, pairs[1:2], steps=3)
    assert np.array_equal(alone[0], images[1])  # per-image generators: batch composition does not matter
    assert score(images, pairs).count == 3


def test_toy_saves_as_a_pipeline_folder_and_reloads(toy, tmp_path):
    toy.pipeline().save_pretrained(tmp_path / "toy")
    again = resolve_model(str(tmp_path / "toy"))
    assert again.kind == "pipeline-folder"
    for (name, p), (_, q) in zip(toy.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(p, q), name


def test_dataset_folder_is_read_by_distillation_and_calibration(tmp_path, capsys):
    from laptop_deploy.distill.data import read_captions
    from laptop_deploy.toy.dataset import main, write_folder

    samples = make_dataset(6, seed=3)
    folder = write_folder(samples, tmp_path / "data")
    pairs, skipped = read_captions(folder)
    assert [caption for _, caption in pairs] == samples.captions and skipped == {"no_caption": 0}
    assert not (tmp_path / ".data.tmp").exists()
    with pytest.raises(FileExistsError):
        write_folder(samples, folder)
    assert main(["--out", str(folder)]) == 2  # exists: one line, nothing touched
    assert "already exists" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "held"), "--count", "24", "--held-out"]) == 0
    assert {caption for _, caption in read_captions(tmp_path / "held")[0]} == {a.caption for a in held_out_prompts()}


def test_bk_sdm_presets_follow_the_rule_on_the_three_stage_toy(toy):
    from laptop_deploy.prune.handcrafted import handcrafted_removal
    from laptop_deploy.prune.plan import PruneOptions, plan_pruning

    base = handcrafted_removal("bk-sdm-base", toy.unet.config)
    assert base == ["down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.1.resnets.1",
                    "down_blocks.1.attentions.1", "down_blocks.2.resnets.1", "up_blocks.0.resnets.1",
                    "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.resnets.1",
                    "up_blocks.2.attentions.1"]
    small = handcrafted_removal("bk-sdm-small", toy.unet.config)
    assert small[:10] == base and len(small) == 13
    plan = plan_pruning(toy, PruneOptions(preset="bk-sdm-small", calib=2, additivity_sets=0))
    assert plan.removed == small and 0 < plan.totals()["params_ratio_achieved"] < 0.6


def test_quality_verb_compares_a_toy_student_with_the_teacher(tmp_path, capsys, monkeypatch_threads):
    import json

    from laptop_deploy.cli.main import main

    monkeypatch_threads(1)
    out = tmp_path / "toy-30"
    assert main(["prune", "--model", "toy", "--ratio", "0.3", "--calib", "2", "--additivity-sets", "0",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["quality", "--model", str(out), "--per-prompt", "1", "--steps", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    teacher, student = result["models"]
    assert result["images"] == 24 and teacher["model"] == "toy"
    assert teacher["decline_pct"] is None and teacher["psnr_db"] is None  # the reference is not compared with itself
    assert student["params"] < 0.75 * teacher["params"] and 0 <= student["alignment"] <= 1
    assert student["psnr_db"] > 0 and student["alignment_95"][0] <= student["alignment"] <= student["alignment_95"][1]
    test = result["paired_test"]
    assert 0 < test["p"] <= 1 and test["only_model_right"] + test["only_teacher_right"] <= 24
    assert main(["quality", "--model", "random:tiny-sd15"]) == 2
    err = capsys.readouterr().err.strip()
    assert "toy teacher's students only" in err and len(err.splitlines()) == 1
