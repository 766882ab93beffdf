"""Pipeline parts (text encoders, tokenizers, VAE, scheduler) and assembling a diffusers pipeline around a U-Net.

For ``random:`` presets the parts are built offline from the preset's configs with seeded random weights. Their
tokenizer is a byte-level CLIP BPE with no merges (every character is a token): real CLIP vocabularies cannot be
downloaded here, and later stages only need token ids of the right length and a working end-of-text token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .presets import Preset

PART_NAMES = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
_BOS, _EOS = 512, 513  # ids of <|startoftext|> and <|endoftext|> in the byte-level vocabulary below


def _byte_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (256 symbols)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def byte_level_tokenizer():
    """A CLIPTokenizer over single bytes (plus word-final forms), built without any file or download."""
    from transformers import CLIPTokenizer

    symbols = _byte_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = _BOS, _EOS
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Each part its own seeded stream, independent of the U-Net's; the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + PART_NAMES.index(name) + 1)
        yield


def build_preset_part(preset: Preset, name: str, *, seed: int) -> Any:
    """One pipeline part of ``preset`` with seeded random weights; None when the preset's family lacks it."""
    index = {"text_encoder": 0, "text_encoder_2": 1, "tokenizer": 0, "tokenizer_2": 1}.get(name)
    if index is not None and index >= len(preset.text_encoders):
        return None
    if name.startswith("tokenizer"):
        return byte_level_tokenizer()
    if name.startswith("text_encoder"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = CLIPTextConfig(**{**preset.text_encoders[index], "bos_token_id": _BOS, "eos_token_id": _EOS,
                                   "pad_token_id": _EOS})
        model_class = CLIPTextModelWithProjection if "projection_dim" in preset.text_encoders[index] \
            else CLIPTextModel
        with _seeded(seed, name):
            return model_class(config).eval()
    if name == "vae":
        from diffusers import AutoencoderKL

        with _seeded(seed, name):
            return AutoencoderKL(**preset.vae).eval()
    if name == "scheduler":
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, prediction_type=preset.prediction_type,
                                      timestep_spacing="leading", steps_offset=1)
    raise KeyError(name)


def build_pipeline(unet: nn.Module, parts: dict[str, Any], *, family: str):
    """A StableDiffusionPipeline (sd1/sd2) or StableDiffusionXLPipeline (sdxl) around ``unet``, on the CPU."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=unet, scheduler=parts["scheduler"])
    return StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
