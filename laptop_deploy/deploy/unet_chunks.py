"""``--chunk-unet``: a U-Net (teacher or pruned student) split into two modules whose composition is the U-Net.

Apple's ml-stable-diffusion splits its converted U-Net in two (``UnetChunk1``/``UnetChunk2``) so each part stays
under the Neural Engine's per-model size limit: ``chunk_mlprogram.py`` (coremltools' ``bisect_model``) cuts the MIL
program at the first single-consumer op past half the weight bytes, makes every value crossing the cut an output of
chunk 1 / an input of chunk 2, and its Swift ``Unet`` feeds chunk 2 with chunk 1's outputs merged with the original
inputs *by name*. Here the cut is made on the PyTorch side, between whole stages, so it can be checked on any OS
against the eager U-Net (:func:`laptop_deploy.deploy.bundle_coreml.check_chunks`) and works on pruned students
(removed units are ``Removed`` modules inside the blocks; the skip bookkeeping counts them as diffusers does)::

    stages   down.0 … down.N-1, mid, up.0 … up.M-1   (time embedding + conv_in before, norm/act/conv_out after)
    chunk 1  sample, timestep, encoder_hidden_states (+ text_embeds, time_ids)
             -> chunk1_hidden [B, C, h, w], chunk1_emb [B, E], chunk1_skip_0 … chunk1_skip_{K-1}
    chunk 2  encoder_hidden_states (if a stage of chunk 2 attends to it), chunk1_* -> noise_pred

The split is the stage boundary that best halves the parameter count (Apple halves the weight bytes: the same
measure at one precision). The forward below is diffusers 0.42's ``UNet2DConditionModel.forward`` for the
configurations this project builds (SD-1.x/2.x, SDXL's ``text_time`` embedding); others are refused by
:func:`plan_chunks` rather than split wrongly. ``encoder_hidden_states`` may come in Apple's ``[B, C, 1, S]`` layout
(rank 4) or diffusers' ``[B, S, C]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LaptopDeployError

BOUNDARY_PREFIX = "chunk1_"
# UNet2DConditionModel options the staged forward does not implement (it refuses them instead of ignoring them)
UNSUPPORTED = {"class_embed_type": None, "time_cond_proj_dim": None, "encoder_hid_dim_type": None,
               "center_input_sample": False}


class ChunkError(LaptopDeployError):
    """A U-Net that cannot be chunked (a configuration the staged forward does not implement, or one stage)."""


@dataclass(frozen=True)
class ChunkPlan:
    """Where the U-Net is cut: ``stages`` in order, the first ``split`` of them in chunk 1; ``skips`` skip tensors
    cross the cut; ``params`` per chunk; ``cross_attention_in_chunk2`` whether chunk 2 needs
    ``encoder_hidden_states``."""

    stages: tuple[str, ...]
    split: int
    skips: int
    params: tuple[int, int]
    cross_attention_in_chunk2: bool

    @property
    def boundary(self) -> list[str]:
        """Names of chunk 1's outputs, which are chunk 2's inputs of the same names."""
        return [f"{BOUNDARY_PREFIX}hidden", f"{BOUNDARY_PREFIX}emb",
                *(f"{BOUNDARY_PREFIX}skip_{i}" for i in range(self.skips))]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunk1_stages": list(self.stages[:self.split]),
                "chunk2_stages": list(self.stages[self.split:]), "boundary": self.boundary}


def _stage_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = [(f"down.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid", unet.mid_block))
    return stages + [(f"up.{i}", block) for i, block in enumerate(unet.up_blocks)]


def _skips_after(unet: nn.Module, split: int) -> int:
    """Skip tensors on diffusers' ``down_block_res_samples`` stack after the first ``split`` stages."""
    count = 1  # conv_in's output
    for name, block in _stage_modules(unet)[:split]:
        if name.startswith("down"):
            count += len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
        elif name.startswith("up"):
            count -= len(block.resnets)
    return count


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_chunks(unet: nn.Module) -> ChunkPlan:
    """The stage boundary closest to half the U-Net's parameters (ties: the earlier cut)."""
    config = unet.config
    bad = [f"{key}={config.get(key)!r}" for key, ok in UNSUPPORTED.items() if config.get(key, ok) != ok]
    if config.get("addition_embed_type") not in (None, "text_time"):
        bad.append(f"addition_embed_type={config.get('addition_embed_type')!r}")
    if bad:
        raise ChunkError(f"--chunk-unet: this U-Net sets {', '.join(bad)}, which the chunked forward does not "
                         f"implement (SD-1.x/2.x and SDXL U-Nets only); export it unchunked")
    stages = _stage_modules(unet)
    if len(stages) < 2:
        raise ChunkError(f"--chunk-unet: the U-Net has {len(stages)} stage(s); nothing to split")
    total = _params(unet)
    head = total - sum(_params(block) for _, block in stages) - _params(unet.conv_out)
    best, best_gap = 1, None
    running = head
    for split in range(1, len(stages)):
        running += _params(stages[split - 1][1])
        gap = abs(2 * running - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = split, gap
    first = head + sum(_params(block) for _, block in stages[:best])
    cross = any(getattr(block, "has_cross_attention", False) for _, block in stages[best:])
    return ChunkPlan(stages=tuple(name for name, _ in stages), split=best, skips=_skips_after(unet, best),
                     params=(first, total - first), cross_attention_in_chunk2=cross)


def tokens_layout(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, S]`` (Apple's layout) → ``[B, S, C]`` (diffusers'); a rank-3 tensor is returned as it is."""
    if encoder_hidden_states.dim() == 4:
        return encoder_hidden_states.squeeze(2).transpose(1, 2)
    return encoder_hidden_states


def _run_stage(name: str, block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
               skips: list[torch.Tensor]) -> torch.Tensor:
    """One stage of diffusers' forward; ``skips`` is the ``down_block_res_samples`` stack (modified in place)."""
    cross = getattr(block, "has_cross_attention", False)
    if name.startswith("down"):
        if cross:
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        skips.extend(res)
        return hidden
    if name == "mid":
        return block(hidden, emb, encoder_hidden_states=context) if cross else block(hidden, emb)
    count = len(block.resnets)
    res, skips[:] = tuple(skips[-count:]), skips[:-count]
    if cross:
        return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                     upsample_size=None)
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=None)


class UNetChunk1(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> (hidden, emb, *skips)``."""

    def __init__(self, unet: nn.Module, plan: ChunkPlan) -> None:
        super().__init__()
        self.unet, self.plan = unet, plan

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unet = self.unet
        context = tokens_layout(encoder_hidden_states)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if added:  # SDXL's text_time embedding (latent sizes are multiples of the up factor: no upsample_size)
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context,
                                     added_cond_kwargs={"text_embeds": added[0], "time_ids": added[1]})
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips = [hidden]
        for name, block in _stage_modules(unet)[:self.plan.split]:
            hidden = _run_stage(name, block, hidden, emb, context, skips)
        return (hidden, emb, *skips)


class UNetChunk2(nn.Module):
    """``forward([encoder_hidden_states,] hidden, emb, *skips) -> noise_pred`` (``encoder_hidden_states`` only when
    ``plan.cross_attention_in_chunk2``)."""

    def __init__(self, unet: nn.Module, plan: ChunkPlan) -> None:
        super().__init__()
        self.unet, self.plan = unet, plan

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        context = tokens_layout(inputs[0]) if self.plan.cross_attention_in_chunk2 else None
        hidden, emb, *skips = inputs[1:] if self.plan.cross_attention_in_chunk2 else inputs
        skips = list(skips)
        for name, block in _stage_modules(unet)[self.plan.split:]:
            hidden = _run_stage(name, block, hidden, emb, context, skips)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def split_unet(unet: nn.Module, plan: ChunkPlan | None = None) -> tuple[UNetChunk1, UNetChunk2, ChunkPlan]:
    """Both chunks (sharing ``unet``'s modules: no copy) and the plan."""
    plan = plan or plan_chunks(unet)
    return UNetChunk1(unet, plan).eval(), UNetChunk2(unet, plan).eval(), plan
