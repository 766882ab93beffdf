"""Attention over query chunks, for exported graphs whose peak memory is one attention's score tensor.

SD-1.5's U-Net at a 64×64 latent (512×512 image) runs self-attention over 4096 tokens: its scores are
heads × 4096 × 4096 fp32 = 512 MiB per image, and the softmax writes a second tensor of that size — the largest
transient of ``generate --sequential`` (the weights stay resident). Softmax is over the key axis, so each query row
is independent: splitting the queries into ``chunks`` parts and concatenating the outputs computes the same numbers
while one chunk's scores are 1/chunks the size. The ONNX graph gets ``chunks`` Slice → attention → Concat paths
(slice bounds are computed from the dynamic token count, so every image size still works).

:func:`sliced_attention` swaps the processor of every diffusers self-attention module (``Attention`` with
``is_cross_attention`` False: the U-Net's ``attn1`` and the VAE's mid-block attention; cross-attention scores are
tokens × 77 and stay whole) for :class:`QueryChunkedAttnProcessor` while a part is traced, and restores the model's
own processors afterwards. diffusers' ``SlicedAttnProcessor`` slices the batch × heads axis instead, in a Python
loop over its (dynamic) length, which a dynamic-shape export cannot keep.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LaptopDeployError

SCORE_BUDGET_BYTES = 64 * 2**20  # "auto": every chunk's fp32 scores for one image at the default size ≤ 64 MiB
MAX_CHUNKS = 64


@dataclass(frozen=True)
class AttentionSlice:
    """``chunks``: query chunks per self-attention (1 = whole); ``auto``: per module, the fewest chunks that keep
    its batch-1 fp32 score tensor at the export size within :data:`SCORE_BUDGET_BYTES`."""

    chunks: int = 1
    auto: bool = False

    @classmethod
    def parse(cls, value: str | int | None) -> AttentionSlice | None:
        """``auto``, ``off`` / ``1`` (whole attention), or a chunk count 2..MAX_CHUNKS; None stays None (the
        caller's default); else exit 2."""
        if value is None:
            return None
        if str(value) in ("off", "1"):
            return cls()
        if str(value) == "auto":
            return cls(auto=True)
        try:
            chunks = int(str(value))
        except ValueError:
            chunks = 0
        if not 1 <= chunks <= MAX_CHUNKS:
            raise LaptopDeployError(f"--attention-slice {value}: expected auto, off, or a number of query chunks "
                                    f"from 1 to {MAX_CHUNKS}")
        return cls(chunks=chunks)

    @property
    def label(self) -> str:
        return "auto" if self.auto else ("off" if self.chunks == 1 else str(self.chunks))

    @property
    def enabled(self) -> bool:
        return self.auto or self.chunks > 1


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """``scaled_dot_product_attention`` of query [B, heads, T, d] against key/value [B, heads, S, d], computed
    over ``chunks`` slices of the T axis (mask [B, heads, T or 1, S] sliced alike); returns [B, heads, T, d]."""
    if chunks <= 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    tokens = query.shape[2]
    size = (tokens + chunks - 1) // chunks  # symbolic in a dynamic export: slice bounds follow the image size
    outs = []
    for index in range(chunks):
        rows = slice(index * size, (index + 1) * size)
        part_mask = None if mask is None else (mask if mask.shape[2] == 1 else mask[:, :, rows])
        outs.append(F.scaled_dot_product_attention(query[:, :, rows], key, value, attn_mask=part_mask,
                                                   dropout_p=0.0, is_causal=False))
    return torch.cat(outs, dim=2)


class QueryChunkedAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :func:`chunked_attention` in place of one whole-sequence call."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # the VAE's attention takes [B, C, H, W]
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = chunked_attention(query, key, value, attention_mask, self.chunks)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attentions(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers ``Attention`` modules that attend over their own tokens, with their names."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    found = []
    for name, child in module.named_modules():
        if isinstance(child, Attention) and not child.is_cross_attention:
            if not isinstance(child.processor, (AttnProcessor, AttnProcessor2_0)):
                raise LaptopDeployError(f"--attention-slice: {name} uses {type(child.processor).__name__}; only "
                                        f"diffusers' default attention processors can be sliced")
            found.append((name, child))
    return found


def token_counts(module: nn.Module, run: Callable[[], Any]) -> dict[str, tuple[int, int, int]]:
    """(heads, query tokens, key tokens) of each self-attention module during ``run()`` (one forward pass)."""
    counts: dict[str, tuple[int, int, int]] = {}
    handles = []
    for name, attn in self_attentions(module):
        def hook(mod, args, kwargs, name=name):
            states = args[0] if args else kwargs["hidden_states"]
            tokens = states.shape[2] * states.shape[3] if states.ndim == 4 else states.shape[1]
            counts[name] = (mod.heads, int(tokens), int(tokens))
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def plan_chunks(option: AttentionSlice, counts: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """Chunks per self-attention module: ``option.chunks`` for all, or (auto) the fewest that keep each batch-1
    fp32 score tensor (heads × T × S × 4 bytes) within the budget."""
    if not option.auto:
        return {name: option.chunks for name in counts}
    return {name: min(MAX_CHUNKS, max(1, math.ceil(heads * t * s * 4 / SCORE_BUDGET_BYTES)))
            for name, (heads, t, s) in counts.items()}


@contextlib.contextmanager
def sliced_attention(module: nn.Module, chunks: dict[str, int]) -> Iterator[int]:
    """Within the block, the named self-attention modules of ``module`` compute over query chunks; yields how many
    were sliced (chunks > 1). The model's own processors come back afterwards, also on error."""
    if not any(count > 1 for count in chunks.values()):
        yield 0
        return
    modules = dict(self_attentions(module))
    saved = {name: attn.processor for name, attn in modules.items()}
    sliced = 0
    try:
        for name, count in chunks.items():
            if count > 1:
                modules[name].set_processor(QueryChunkedAttnProcessor(count))
                sliced += 1
        yield sliced
    finally:
        for name, processor in saved.items():
            modules[name].set_processor(processor)
