"""Built-in model presets: the real U-Net architectures of SD-1.5, SD-2.1 and SDXL, and tiny copies of their topology.

A preset is a config, never weights: ``random:<name>`` builds the U-Net from it with seeded random weights. The
full-size configs are the published diffusers ``unet/config.json`` files of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0 (only keys that differ from the
``UNet2DConditionModel`` defaults are listed). The tiny presets keep every block type, the layer counts per block,
the positions of the channel-changing ResNets, and (SDXL) the ``text_time`` added conditioning and multi-block
transformers, at widths that run in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelSourceError

_SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class Preset:
    """One architecture: the U-Net config plus what the rest of a pipeline needs to be built around it.

    ``family`` is ``sd1``, ``sd2`` or ``sdxl`` and decides the pipeline class and the text-encoder layout.
    ``text_encoders`` holds one CLIP text config per encoder (SDXL: two, the second with a projection).
    """

    name: str
    family: str
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...] = ()
    vae: dict[str, Any] = field(default_factory=dict)
    prediction_type: str = "epsilon"


def _clip(hidden: int, layers: int, heads: int, intermediate: int, *, act: str = "quick_gelu",
          projection: int | None = None) -> dict[str, Any]:
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": intermediate, "hidden_act": act, "vocab_size": 49408,
              "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    if projection is not None:
        config["projection_dim"] = projection
    return config


_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "sample_size": 512, "scaling_factor": 0.18215}
_TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "sample_size": 32, "scaling_factor": 0.18215}

PRESETS: dict[str, Preset] = {
    "sd15": Preset(
        name="sd15", family="sd1",
        unet={"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "down_block_types": list(_SD15_DOWN), "up_block_types": list(_SD15_UP),
              "cross_attention_dim": 768, "attention_head_dim": 8},
        text_encoders=(_clip(768, 12, 12, 3072),), vae=_SD_VAE),
    "sd21": Preset(
        name="sd21", family="sd2", prediction_type="v_prediction",
        unet={"sample_size": 96, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "down_block_types": list(_SD15_DOWN), "up_block_types": list(_SD15_UP),
              "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
              "use_linear_projection": True, "upcast_attention": True},
        text_encoders=(_clip(1024, 23, 16, 4096, act="gelu"),), vae={**_SD_VAE, "sample_size": 768}),
    "sdxl": Preset(
        name="sdxl", family="sdxl",
        unet={"sample_size": 128, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
              "down_block_types": list(_SDXL_DOWN), "up_block_types": list(_SDXL_UP),
              "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
              "cross_attention_dim": 2048, "use_linear_projection": True,
              "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
              "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
        text_encoders=(_clip(768, 12, 12, 3072), _clip(1280, 32, 20, 5120, act="gelu", projection=1280)),
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}),
    "tiny-sd15": Preset(
        name="tiny-sd15", family="sd1",
        unet={"sample_size": 16, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
              "down_block_types": list(_SD15_DOWN), "up_block_types": list(_SD15_UP),
              "cross_attention_dim": 32, "attention_head_dim": 8},
        text_encoders=(_clip(32, 2, 4, 64),), vae=_TINY_VAE),
    "tiny-sdxl": Preset(
        name="tiny-sdxl", family="sdxl",
        unet={"sample_size": 16, "block_out_channels": [32, 64, 128], "layers_per_block": 2,
              "down_block_types": list(_SDXL_DOWN), "up_block_types": list(_SDXL_UP),
              "transformer_layers_per_block": [1, 2, 4], "attention_head_dim": [2, 4, 8],
              "cross_attention_dim": 64, "use_linear_projection": True,
              "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80},
        text_encoders=(_clip(32, 2, 4, 64), _clip(32, 2, 4, 64, act="gelu", projection=32)), vae=_TINY_VAE),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is rejected with the list of valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        valid = ", ".join(f"random:{n}" for n in PRESETS)
        raise ModelSourceError(f"unknown preset 'random:{name}'; valid presets: {valid}") from None
