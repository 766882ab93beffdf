"""Text conditioning for U-Net calls: real prompts through a source's text encoder(s), or seeded stand-ins.

Returned tensors follow the U-Net's keyword layout: ``encoder_hidden_states`` ``[batch, 77, cross_attention_dim]``
and, for SDXL, ``added_cond_kwargs = {"text_embeds": [batch, pooled width], "time_ids": [batch, 6]}``. The encoding
matches diffusers' pipelines: SD-1.x/2.x take the last hidden state; SDXL concatenates the penultimate hidden states
of both encoders and takes the pooled projection of the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .unet_io import TEXT_TOKENS, added_cond_dims, sdxl_time_ids

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red bicycle leaning against a brick wall",
    "a bowl of ramen with chopsticks, studio lighting",
    "an oil painting of a lighthouse in a storm",
    "a close-up portrait of a tabby cat",
    "a watercolor of a mountain village at dawn",
    "a futuristic city skyline at night, neon lights",
    "a plate of pancakes with strawberries and syrup",
)


def has_text_encoders(source: Any) -> bool:
    parts = set(source.available_parts())
    return {"text_encoder", "tokenizer"} <= parts


@torch.no_grad()
def encode_prompts(source: Any, prompts: Sequence[str], *, height_px: int, width_px: int) -> dict[str, Any]:
    """U-Net conditioning for ``prompts`` through the source's text encoder(s) (CPU, fp32)."""
    pairs = [("tokenizer", "text_encoder")]
    if source.family == "sdxl":
        pairs.append(("tokenizer_2", "text_encoder_2"))
    hidden, pooled = [], None
    for tokenizer_name, encoder_name in pairs:
        tokenizer, encoder = source.part(tokenizer_name), source.part(encoder_name)
        ids = tokenizer(list(prompts), padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        if source.family == "sdxl":
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projection model's text_embeds (second encoder wins)
        else:
            hidden.append(out[0])
    result: dict[str, Any] = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
    if source.family == "sdxl":
        result["added_cond_kwargs"] = {"text_embeds": pooled.float(),
                                       "time_ids": sdxl_time_ids(height_px, width_px, len(prompts))}
    return result


def seeded_conditioning(config: Any, batch: int, *, height_px: int, width_px: int,
                        generator: torch.Generator) -> dict[str, Any]:
    """Stand-in conditioning of the right shapes, N(0, 1), for sources without text encoders."""
    hidden = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator)
    result: dict[str, Any] = {"encoder_hidden_states": hidden}
    dims = added_cond_dims(config)
    if dims is not None:
        result["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, dims[0], generator=generator),
                                       "time_ids": sdxl_time_ids(height_px, width_px, batch)}
    return result
