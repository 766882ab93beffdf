"""The toy teacher's architecture and its pipeline parts, and where the trained weights live.

* **U-Net**: SD-1.5's topology at three stages — down ``CrossAttn, CrossAttn, Down``, up ``Up, CrossAttn,
  CrossAttn``, a mid block with attention, 2 layers per block — widths 64/64/64, 8-dim heads, cross-attention on
  64-wide text embeddings, x₀ ("sample") prediction, latent 8×8×48.
* **Latent space**: a fixed space-to-depth (:class:`~laptop_deploy.toy.latent.SpaceToDepthVAE`): 32×32×3 pixels ↔
  8×8×48 latents, exact and weight-free, behind the VAE interface so pipelines and calibration use it as on SD.
* **Text**: a 2-layer, 64-wide ``CLIPTextModel`` trained with the U-Net, behind the repository's offline byte-level
  CLIP tokenizer extended with one BPE merge chain per dataset word (every caption word is one token; any other
  text still tokenizes, by characters).
* **Scheduler**: DDPM's linear β schedule (0.0001 → 0.02, 1000 steps); default sampler DPM-Solver++
  (:data:`DEFAULT_STEPS` steps, classifier-free guidance :data:`DEFAULT_GUIDANCE`).

The trained teacher is a diffusers pipeline folder inside the package (``laptop_deploy/toy/teacher``), which the
model source ``toy`` resolves to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.pipeline import _BOS, _EOS, _byte_unicode
from .dataset import COLOURS, POSITIONS, SHAPES, SIZE

TEACHER_DIR = Path(__file__).parent / "teacher"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
IMAGE_SIZE = SIZE

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8, "in_channels": 48, "out_channels": 48, "layers_per_block": 2,
    "block_out_channels": [64, 64, 64],  # the first width must exceed the 48 latent channels (identity at t ≈ T)
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 32,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "hidden_act": "quick_gelu", "max_position_embeddings": 77,
    "bos_token_id": _BOS, "eos_token_id": _EOS, "pad_token_id": _EOS,
}
# DDPM's linear schedule, not SD's scaled-linear: SD's ends at ᾱ = 0.0047, where a 32-px object is still visible
# in the noise, so the object's position is fixed by the initial noise and never learned from the prompt.
# The U-Net predicts the clean latent ("sample"): predicting ε in a 48-channel pixel space means passing the noise
# through the whole U-Net (ε ≈ x_t at high t), which it had not learnt after 600 steps (ε-MSE 0.18 at t = 999)
SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                            "beta_schedule": "linear", "prediction_type": "sample", "steps_offset": 1}


# the training set's pixel mean in [-1, 1] (-0.755) and 1 / std of the centred pixels (3.82), rounded, as SD scales
# its latents to unit variance; constants, so the latent map never depends on a run
LATENT_OFFSET, LATENT_SCALE = -0.75, 3.8


def caption_words() -> list[str]:
    """Every word the dataset's captions use."""
    words = {"a", "at", "the", "on", "in", *SHAPES, *COLOURS}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def word_tokenizer(words: list[str] | None = None):
    """The offline byte-level CLIP tokenizer (:func:`laptop_deploy.models.pipeline.byte_level_tokenizer`) plus, for each of
    ``words``, the BPE merges that join its characters left to right into one token."""
    from transformers import CLIPTokenizer

    symbols = _byte_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = _BOS, _EOS
    merges: list[tuple[str, str]] = []
    for word in sorted(words or caption_words(), key=lambda w: (-len(w), w)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        joined = pieces[0]
        for piece in pieces[1:]:
            if (joined, piece) not in merges:
                merges.append((joined, piece))
            joined += piece
            vocab.setdefault(joined, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_parts(*, seed: int = 0, prediction: str = SCHEDULE["prediction_type"]) -> dict[str, Any]:
    """Freshly initialised (seeded) U-Net, VAE, text encoder, plus tokenizer and the default scheduler (whose
    ``prediction_type`` tells the U-Net's training target)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .latent import SpaceToDepthVAE

    tokenizer = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=len(tokenizer)))
    vae = SpaceToDepthVAE(offset=LATENT_OFFSET, scaling_factor=LATENT_SCALE)
    scheduler = DPMSolverMultistepScheduler(**{**SCHEDULE, "prediction_type": prediction})
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_teacher(parts: dict[str, Any], folder: Path) -> None:
    """Write ``parts`` as a diffusers StableDiffusionPipeline folder (safetensors weights)."""
    from ..models.pipeline import build_pipeline

    pipe = build_pipeline(parts["unet"], parts, family="sd1")
    pipe.save_pretrained(folder, safe_serialization=True)
