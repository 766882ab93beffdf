"""The toy teacher's latent space: a fixed, exactly invertible space-to-depth, served with the VAE interface.

Layout: pixels ``[N, 3, 32, 32]`` in [-1, 1] ↔ latents ``[N, 48, 8, 8]``: every 4×4 pixel patch becomes 48 channels
(``torch.nn.functional.pixel_unshuffle``, channel order c·16 + dy·4 + dx), minus :attr:`offset` (the dataset's mean,
so latents are centred). ``decode(encode(x)) == x`` up to float rounding, so no image detail is lost and nothing
is trained. Pipelines see an ``AutoencoderKL``-shaped object: ``encode(x).latent_dist.mean`` / ``.sample()``,
``decode(z).sample``, ``config.scaling_factor`` and ``config.block_out_channels`` (length 3: diffusers derives the
pixel/latent factor 2³⁻¹ = 4 from it). It holds no weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import (
    DecoderOutput,
    DiagonalGaussianDistribution,
)
from diffusers.models.modeling_utils import ModelMixin

FACTOR = 4


class SpaceToDepthVAE(ModelMixin, ConfigMixin):
    """A parameter-free, invertible stand-in for a VAE (see the module docstring)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, *, in_channels: int = 3, latent_channels: int = 3 * FACTOR * FACTOR,
                 block_out_channels: tuple[int, ...] = (1, 1, 1), offset: float = 0.0,
                 scaling_factor: float = 1.0, force_upcast: bool = False) -> None:
        super().__init__()
        if latent_channels != in_channels * FACTOR * FACTOR or len(block_out_channels) != 3:
            raise ValueError(f"SpaceToDepthVAE maps {in_channels} channels to {in_channels * FACTOR ** 2} "
                             f"(factor {FACTOR}); got latent_channels={latent_channels}, "
                             f"{len(block_out_channels)} block_out_channels (expected 3)")
        # a (saved) buffer gives the module a device, a dtype and a weights file, as diffusers expects of a model
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, FACTOR) - self.config.offset
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = F.pixel_shuffle(z + self.config.offset, FACTOR)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(sample).latent_dist.mean, return_dict=return_dict)
