"""Test helper: rename a diffusers ``UNet2DConditionModel`` state dict to the original LDM (CompVis / SGM) layout.

This is the inverse of diffusers' ``convert_ldm_unet_checkpoint``. It works on any mapping (tensors or shapes), so
full-size architectures can be mapped from meta-device shapes without materialising weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

LDM_PREFIX = "model.diffusion_model."

_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def ldm_key(key: str, layers_per_block: int, up_with_attention: frozenset[int] = frozenset()) -> str:
    """The LDM name (no prefix) of diffusers key ``key``.

    ``up_with_attention`` holds the indices of up blocks that have attentions: their upsampler sits at slot 2.
    """
    per_block = layers_per_block + 1  # encoder: L ResBlocks + a downsampler; decoder: L + 1 ResBlocks
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    if found := _MID.fullmatch(key):
        kind, index, rest = found.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(index)}.{_resnet(rest)}"
    found = _BLOCK.fullmatch(key)
    if not found:
        raise KeyError(f"no LDM name for {key}")
    side, block, kind, index, rest = found.groups()
    block, index = int(block), int(index)
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
        slot = 1 + block * per_block + index
        return f"input_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    slot = block * per_block + index
    if kind == "upsamplers":
        return f"output_blocks.{block * per_block + layers_per_block}.{2 if block in up_with_attention else 1}.{rest}"
    return f"output_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"


def to_ldm(state: Mapping[str, V], layers_per_block: int, *, prefix: str = LDM_PREFIX) -> dict[str, V]:
    """The whole state dict (or {key: shape} map) renamed to LDM keys, each prefixed with ``prefix``."""
    up_attn = frozenset(int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k)
    return {prefix + ldm_key(key, layers_per_block, up_attn): value for key, value in state.items()}
