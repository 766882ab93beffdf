"""The parts of a Core ML bundle in Apple's ml-stable-diffusion naming: file names, wrappers, ExportSpecs, references.

Apple's Swift ``StableDiffusionPipeline`` loads ``Resources/`` by file name and feeds some inputs by name
(``swift/StableDiffusion/pipeline/*.swift``, ``python_coreml_stable_diffusion/torch2coreml.py``); these follow it::

    TextEncoder     input_ids float32 [1, 77] -> last_hidden_state [1, 77, H], pooled_outputs [1, H]
                    (SDXL: hidden_embeds = the penultimate layer, as TextEncoderXL reads it, + pooled_outputs)
    TextEncoder2    SDXL: input_ids -> hidden_embeds [1, 77, H2], pooled_outputs = text_embeds [1, P]
    Unet            sample [2, C, h, w], timestep [2], encoder_hidden_states [2, D, 1, 77] (Apple's layout)
                    (+ text_embeds [2, P], time_ids [2, 6]) -> noise_pred [2, C, h, w]
    UnetChunk1/2    the same inputs split by :mod:`.unet_chunks`; chunk 2 reads chunk 1's outputs by name
    VAEDecoder      z [1, C, h, w] (latents / scaling_factor) -> image [1, 3, H, W] in [-1, 1]
    VAEEncoder      x [1, 3, H, W] -> latent [1, C, h, w]: the posterior *mean* (Apple's returns the 2C moments)

Every input and output is float32 (Swift feeds Float32 arrays; token ids are exact in float32 up to 2^24); an fp16
part computes in fp16 inside (coremltools' compute precision). Shapes are fixed: batch 2 for the U-Net
(classifier-free guidance), 1 for the other parts, at the bundle's latent size.

Each part also has a *reference*: the stock call of the PyTorch module it came from (transformers' and diffusers'
own calling conventions, not the wrapper), which the traced-module check compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bundle_parts import VaeDecoderWrapper, VaeEncoderWrapper
from ..models.unet_io import sdxl_time_ids
from .spec import ExportSpec, TensorSpec
from .unet_chunks import ChunkPlan, tokens_layout

FILE_NAMES = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "unet": "Unet",
              "unet_chunk1": "UnetChunk1", "unet_chunk2": "UnetChunk2", "vae_decoder": "VAEDecoder",
              "vae_encoder": "VAEEncoder"}
PACKAGE = ".mlpackage"
UNET_BATCH = 2  # classifier-free guidance: [uncond, cond], as Apple's Unet.swift feeds it


def package_name(part: str) -> str:
    return FILE_NAMES[part] + PACKAGE


@dataclass
class CoreMLPart:
    """One part to trace and convert: ``wrapper`` (traced) over ``module`` (copied to float64 for the gate),
    ``spec`` (names, fixed shapes, dtypes), ``reference(module, *args)`` the stock call, ``example`` the trace's
    inputs and ``check`` other seeded inputs for the traced-module check."""

    name: str
    module: nn.Module
    wrapper: nn.Module
    spec: ExportSpec
    reference: Callable[..., tuple[torch.Tensor, ...]]
    example: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]


def _spec(inputs: list[tuple[str, tuple[int, ...]]], outputs: list[tuple[str, tuple[int, ...]]], *,
          precision: str, batch: int, height: int = 1, width: int = 1, downsample: int = 1) -> ExportSpec:
    return ExportSpec(inputs=tuple(TensorSpec(n, s, "float32") for n, s in inputs),
                      outputs=tuple(TensorSpec(n, s, "float32") for n, s in outputs),
                      batch=batch, height=height, width=width, dynamic=False, precision=precision,
                      downsample=downsample)


class CoreMLTextEncoder(nn.Module):
    """``forward(input_ids float32 [1, T]) -> (last_hidden_state | hidden_embeds, pooled_outputs)``."""

    def __init__(self, encoder: nn.Module, *, penultimate: bool) -> None:
        super().__init__()
        self.encoder, self.penultimate = encoder, penultimate

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return text_reference(self.encoder, input_ids, penultimate=self.penultimate)


def text_reference(encoder: nn.Module, input_ids: torch.Tensor, *, penultimate: bool) -> tuple[torch.Tensor, ...]:
    """transformers' call: (hidden states, pooled) — the penultimate layer for SDXL, as its pipeline reads it."""
    out = encoder(input_ids=input_ids.to(torch.int64), output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return hidden, pooled


def text_part(name: str, encoder: nn.Module, *, tokens: int, sdxl: bool, precision: str) -> CoreMLPart:
    config = encoder.config
    hidden_name = "hidden_embeds" if sdxl else "last_hidden_state"
    pooled = config.projection_dim if hasattr(encoder, "text_projection") else config.hidden_size
    spec = _spec([("input_ids", (1, tokens))], [(hidden_name, (1, tokens, config.hidden_size)),
                                                ("pooled_outputs", (1, pooled))], precision=precision, batch=1)

    def ids(seed: int) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randint(0, config.vocab_size, (1, tokens), generator=generator).to(torch.float32),)

    return CoreMLPart(name, encoder, CoreMLTextEncoder(encoder, penultimate=sdxl).eval(), spec,
                      lambda module, input_ids: text_reference(module, input_ids, penultimate=sdxl), ids(0), ids(1))


class CoreMLUNet(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states [B, D, 1, S][, text_embeds, time_ids]) -> noise_pred``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        return unet_reference(self.unet, sample, timestep, encoder_hidden_states, *added)[0]


def unet_reference(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   *added: torch.Tensor) -> tuple[torch.Tensor]:
    """diffusers' call (``added_cond_kwargs`` nested), from Apple's hidden-states layout."""
    kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
    return (unet(sample, timestep, tokens_layout(encoder_hidden_states), return_dict=False, **kwargs)[0],)


def unet_inputs(config: Any, *, height: int, width: int, factor: int) -> list[tuple[str, tuple[int, ...]]]:
    """The U-Net's (name, shape) inputs in Apple's layout."""
    from ..models.unet_io import TEXT_TOKENS, added_cond_dims

    batch = UNET_BATCH
    inputs = [("sample", (batch, config["in_channels"], height, width)), ("timestep", (batch,)),
              ("encoder_hidden_states", (batch, config["cross_attention_dim"], 1, TEXT_TOKENS))]
    dims = added_cond_dims(config)
    if dims is not None:
        inputs += [("text_embeds", (batch, dims[0])), ("time_ids", (batch, dims[1]))]
    return inputs


def unet_feeds(inputs: list[tuple[str, tuple[int, ...]]], *, seed: int, image: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Seeded U-Net inputs: N(0, 1) tensors, timesteps drawn in [1, 999], SDXL time_ids of the image size."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for name, shape in inputs:
        if name == "timestep":
            values.append((torch.rand(shape, generator=generator) * 998 + 1).round())
        elif name == "time_ids":
            values.append(sdxl_time_ids(image[0], image[1], shape[0]).to(torch.float32))
        else:
            values.append(torch.randn(shape, generator=generator))
    return tuple(values)


def unet_part(unet: nn.Module, *, height: int, width: int, factor: int, downsample: int,
              precision: str) -> CoreMLPart:
    inputs = unet_inputs(unet.config, height=height, width=width, factor=factor)
    spec = _spec(inputs, [("noise_pred", inputs[0][1])], precision=precision, batch=UNET_BATCH, height=height,
                 width=width, downsample=downsample)
    image = (height * factor, width * factor)
    return CoreMLPart("unet", unet, CoreMLUNet(unet).eval(), spec, unet_reference,
                      unet_feeds(inputs, seed=0, image=image), unet_feeds(inputs, seed=1, image=image))


def chunk_specs(unet: nn.Module, plan: ChunkPlan, chunk1: nn.Module, *, height: int, width: int, factor: int,
                downsample: int, precision: str) -> tuple[ExportSpec, ExportSpec, tuple[torch.Tensor, ...]]:
    """Specs of both chunks and chunk 1's outputs on the example inputs (the boundary shapes come from them;
    they are chunk 2's example inputs)."""
    inputs = unet_inputs(unet.config, height=height, width=width, factor=factor)
    with torch.no_grad():
        boundary = chunk1(*unet_feeds(inputs, seed=0, image=(height * factor, width * factor)))
    crossing = [(name, tuple(t.shape)) for name, t in zip(plan.boundary, boundary)]
    common = {"precision": precision, "batch": UNET_BATCH, "height": height, "width": width,
              "downsample": downsample}
    first = _spec(inputs, crossing, **common)
    second_inputs = ([inputs[2]] if plan.cross_attention_in_chunk2 else []) + crossing
    second = _spec(second_inputs, [("noise_pred", inputs[0][1])], **common)
    return first, second, tuple(boundary)


def vae_part(name: str, vae: nn.Module, *, latent_channels: int, height: int, width: int, factor: int) -> CoreMLPart:
    """VAE decoder (``z`` -> ``image``) or encoder (``x`` -> ``latent``, the posterior mean), batch 1, fp32."""
    latent = (1, latent_channels, height, width)
    image = (1, 3, height * factor, width * factor)
    decoder = name == "vae_decoder"
    inputs, outputs = ([("z", latent)], [("image", image)]) if decoder else ([("x", image)], [("latent", latent)])
    spec = _spec(inputs, outputs, precision="fp32", batch=1, height=height, width=width, downsample=factor)
    wrapper = (VaeDecoderWrapper if decoder else VaeEncoderWrapper)(vae).eval()

    def feed(seed: int) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        if decoder:
            return (torch.randn(latent, generator=generator),)
        return (torch.rand(image, generator=generator) * 2 - 1,)

    def reference(module: nn.Module, value: torch.Tensor) -> tuple[torch.Tensor]:
        if decoder:
            return (module.decode(value, return_dict=False)[0],)
        return (module.encode(value, return_dict=False)[0].mode(),)

    return CoreMLPart(name, vae, wrapper, spec, reference, feed(0), feed(1))
