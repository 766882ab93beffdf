"""What a ``UNet2DConditionModel`` takes as input, derived from its config alone.

Every stage that needs U-Net inputs (MAC counting, calibration, parity checks, export specs) builds them here, so
the names, shapes and SDXL's added conditioning are declared once. Layouts are NCHW latents; ``timestep`` is a
``[batch]`` tensor; ``encoder_hidden_states`` is ``[batch, tokens, cross_attention_dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import LaptopDeployError

TEXT_TOKENS = 77  # CLIP's context length, the sequence length every SD text encoder produces
SDXL_TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


def downsample_factor(config: Mapping[str, Any]) -> int:
    """How many times the U-Net halves the latent: 2 ** (number of down blocks with a downsampler)."""
    return 2 ** (len(config["down_block_types"]) - 1)


def check_latent_size(config: Mapping[str, Any], height: int, width: int) -> None:
    """Reject a latent size the U-Net cannot take, naming the nearest valid sizes."""
    factor = downsample_factor(config)
    for label, size in (("height", height), ("width", width)):
        if size <= 0 or size % factor:
            below = size // factor * factor
            above = below + factor
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            raise LaptopDeployError(
                f"latent {label} {size} is not a positive multiple of {factor} (this U-Net downsamples "
                f"{len(config['down_block_types']) - 1} times); nearest valid: {nearest}")


def added_cond_dims(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """SDXL's ``text_time`` conditioning as (text_embeds width, time_ids width), or None for SD-1.x/2.x."""
    if config.get("addition_embed_type") != "text_time":
        return None
    time_width = SDXL_TIME_IDS * config["addition_time_embed_dim"]
    return config["projection_class_embeddings_input_dim"] - time_width, SDXL_TIME_IDS


def sdxl_time_ids(height_px: int, width_px: int, batch: int) -> torch.Tensor:
    """SDXL micro-conditioning [batch, 6]: (original h, w, crop top, crop left, target h, w) in pixels, uncropped."""
    return torch.tensor([[height_px, width_px, 0, 0, height_px, width_px]], dtype=torch.float32).repeat(batch, 1)


def example_inputs(config: Mapping[str, Any], *, batch: int = 1, height: int | None = None,
                   width: int | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Seeded keyword arguments for ``unet(**inputs)``; height and width are latent pixels (default: sample_size).

    Timesteps are spread over [0, 1000) so one batch covers high and low noise levels.
    """
    height = height or config["sample_size"]
    width = width or config["sample_size"]
    check_latent_size(config, height, width)

    def randn(*shape: int) -> torch.Tensor:
        # Draw on the CPU so the same generator gives the same numbers on every device (meta included).
        if torch.device(device).type == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta")
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    inputs: dict[str, Any] = {
        "sample": randn(batch, config["in_channels"], height, width),
        "timestep": torch.linspace(999, 0, batch).round().long().to(device),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, config["cross_attention_dim"]),
    }
    dims = added_cond_dims(config)
    if dims is not None:
        text_width, _ = dims
        time_ids = sdxl_time_ids(height * 8, width * 8, batch).to(device=device, dtype=dtype)
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_width), "time_ids": time_ids}
    return inputs
