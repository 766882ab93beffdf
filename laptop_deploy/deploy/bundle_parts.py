"""ExportSpecs and traceable wrappers of a pipeline's non-U-Net parts (the U-Net's come from :mod:`.spec`).

Names follow Optimum's ONNX export (and what ``diffusers.OnnxStableDiffusionPipeline`` feeds)::

    text_encoder    input_ids int32 [batch, 77] -> last_hidden_state [batch, 77, H], pooler_output [batch, H]
                    (+ hidden_states.0..L [batch, 77, H] for SDXL, whose pipeline reads the penultimate layer)
    text_encoder_2  input_ids int32 [batch, 77] -> text_embeds [batch, P], last_hidden_state, hidden_states.0..L
    vae_decoder     latent_sample [batch, C, height, width] -> sample [batch, 3, image_height, image_width]
    vae_encoder     sample [batch, 3, image_height, image_width] -> latent_sample [batch, C, height, width]

Every axis but the token axis is dynamic (CFG doubles the batch; the app picks the size). ``input_ids`` is int32
(diffusers' ONNX pipeline casts to it). The VAE stays fp32 in an fp16 bundle: SD's VAE decoder overflows fp16
(diffusers sets ``force_upcast`` for it), and the encoder shares its layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LaptopDeployError
from .spec import ExportSpec, TensorSpec

TEXT_PARTS = ("text_encoder", "text_encoder_2")
VAE_PARTS = ("vae_decoder", "vae_encoder")
FP32_PARTS = {"vae_decoder": "kept fp32: SD's VAE decoder overflows fp16 (diffusers' force_upcast)",
              "vae_encoder": "kept fp32: shares the VAE decoder's overflow-prone layers"}


class TextEncoderWrapper(nn.Module):
    """``forward(input_ids) -> (outputs...)`` in the order of :func:`text_encoder_outputs`."""

    def __init__(self, encoder: nn.Module, *, hidden_states: bool) -> None:
        super().__init__()
        self.encoder, self.hidden_states = encoder, hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids=input_ids, output_hidden_states=self.hidden_states)
        return (out[0], out[1], *(out.hidden_states if self.hidden_states else ()))


class VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(VaeDecoderWrapper):
    """The posterior's mean (deterministic: an app scales it by ``scaling_factor`` for img2img)."""

    def forward(self, sample: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.vae.encode(sample, return_dict=False)[0].mode()


def text_encoder_outputs(encoder: nn.Module, *, hidden_states: bool) -> list[tuple[str, int]]:
    """(name, width) of each output of a CLIP text encoder, in the wrapper's order."""
    config = encoder.config
    if hasattr(encoder, "text_projection"):  # CLIPTextModelWithProjection returns text_embeds first
        names = [("text_embeds", config.projection_dim), ("last_hidden_state", config.hidden_size)]
    else:
        names = [("last_hidden_state", config.hidden_size), ("pooler_output", config.hidden_size)]
    if hidden_states:
        names += [(f"hidden_states.{i}", config.hidden_size) for i in range(config.num_hidden_layers + 1)]
    return names


def text_encoder_spec(encoder: nn.Module, *, tokens: int, hidden_states: bool, precision: str) -> ExportSpec:
    """The ExportSpec of a CLIP text encoder part (see the module docstring)."""
    dtype = "float16" if precision == "fp16" else "float32"
    outputs = [TensorSpec(name, ("batch", width) if name in ("pooler_output", "text_embeds") else
                          ("batch", tokens, width), dtype)
               for name, width in text_encoder_outputs(encoder, hidden_states=hidden_states)]
    return ExportSpec(inputs=(TensorSpec("input_ids", ("batch", tokens), "int32"),), outputs=tuple(outputs),
                      batch=2, height=1, width=1, dynamic=True, precision=precision, downsample=1)


def text_encoder_wrapper(encoder: nn.Module, *, hidden_states: bool) -> nn.Module:
    """The wrapper whose outputs match :func:`text_encoder_outputs` (the projection model returns text_embeds
    first, the plain one last_hidden_state first — as transformers orders them)."""
    return TextEncoderWrapper(encoder, hidden_states=hidden_states).eval()


def vae_spec(part: str, *, latent_channels: int, height: int, width: int, factor: int) -> ExportSpec:
    """The ExportSpec of ``vae_decoder`` or ``vae_encoder`` (fp32 always; sizes are the default latent size)."""
    latent = TensorSpec("latent_sample", ("batch", latent_channels, "height", "width"), "float32")
    image = TensorSpec("sample", ("batch", 3, "image_height", "image_width"), "float32")
    inputs, outputs = ((latent,), (image,)) if part == "vae_decoder" else ((image,), (latent,))
    return ExportSpec(inputs=inputs, outputs=outputs, batch=1, height=height, width=width, dynamic=True,
                      precision="fp32", downsample=factor)


def vae_example(part: str, *, latent_channels: int, height: int, width: int, factor: int) -> tuple[torch.Tensor]:
    """Seeded example input of a VAE part at the default size (tracing only)."""
    generator = torch.Generator().manual_seed(0)
    if part == "vae_decoder":
        return (torch.randn(1, latent_channels, height, width, generator=generator),)
    return (torch.rand(1, 3, height * factor, width * factor, generator=generator) * 2 - 1,)


def vae_scale_factor(vae: Any) -> int:
    """Image pixels per latent pixel: 2^(VAE blocks − 1), as diffusers derives it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def save_tokenizer(tokenizer: Any, folder: Path) -> tuple[dict[str, Any], Any]:
    """Save ``tokenizer`` (transformers' files, including ``tokenizer.json``) and return its manifest entry and
    example ids (int32 [2, length]) for tracing."""
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise LaptopDeployError(f"{folder}: the tokenizer wrote no tokenizer.json (a slow-only tokenizer); the "
                                f"app loop reads that file")
    length = tokenizer.model_max_length
    ids = tokenizer(["a photo", ""], padding="max_length", max_length=length, truncation=True).input_ids
    entry = {"file": f"{folder.name}/tokenizer.json", "max_length": length, "pad_id": tokenizer.pad_token_id,
             "pad_token": tokenizer.pad_token}
    return entry, torch.tensor(ids, dtype=torch.int32)


def as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def module_check(run: Callable[[tuple[torch.Tensor, ...]], Any], module: nn.Module,
                 reference: Callable[..., tuple[torch.Tensor, ...]], args: tuple[torch.Tensor, ...],
                 names: list[str], *, case: str, gate: tuple[float, float] | None = None) -> dict[str, Any]:
    """``run(args)`` (a traced part, traced chunks composed, a ``.pte`` in ExecuTorch's runtime) against
    ``reference(module, *args)`` in fp32 and in float64 (a float64 copy of ``module``; token ids stay integers),
    judged per output by the calibrated gate at ``gate`` (rel L2, max abs factors of the torch fp32 noise floor;
    default :data:`~.noise_floor.TRACED_FACTORS`, the Core ML exporter's U-Net rule). Raises :class:`CheckFailed`
    (exit 1) on a mismatch; returns the worst metrics."""
    from ..errors import CheckFailed
    from .noise_floor import TRACED_FACTORS, Gate, copy_as, floor_row
    from .verify import Tolerances, compare

    factors = gate or TRACED_FACTORS
    wide = tuple(a.double() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        out = [t.double().numpy() for t in as_tuple(run(args))]
        ref = [t.double().numpy() for t in reference(module, *args)]
        exact = [t.numpy() for t in reference(copy_as(module, torch.float64), *wide)]
    report = compare(dict(zip(names, ref)), dict(zip(names, out)), tolerances=Tolerances(None, None), case=case)
    rows = [floor_row(e, r, o, gate=Gate(*factors), case=case, output=n, reference="torch fp32")
            for n, e, r, o in zip(names, exact, ref, out)]
    failures = report.failures + [f for row in rows for f in row.failures]
    if len(out) != len(names) or failures:
        raise CheckFailed(f"{case}: the exported part differs from PyTorch: {'; '.join(failures) or 'output count'}")
    summary = report.summary()
    return {"rel_l2": summary["rel_l2"], "psnr_db": summary["psnr_db"], "max_abs": summary["max_abs"],
            "factor_rel_l2": max(row.factor_rel_l2 for row in rows),
            "factor_max_abs": max(row.factor_max_abs for row in rows), "gate": list(factors)}


def part_spec(part: dict[str, Any]) -> ExportSpec:
    """The ExportSpec of a bundle manifest's part entry (its inputs and outputs; sizes are the axes' names)."""
    return ExportSpec.from_dict({"inputs": part["inputs"], "outputs": part["outputs"], "batch": 2, "height": 1,
                                 "width": 1, "dynamic": True, "precision": part["precision"], "downsample": 1})


def part_feeds(part: dict[str, Any], sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded fp32 inputs of one part (a bundle manifest's entry: named axes resolved by ``sizes``, which has
    ``batch``) in its input order: token ids in [0, 400), timesteps spread from 999 to 1, SDXL's time ids."""
    batch = sizes["batch"]
    feeds: dict[str, torch.Tensor] = {}
    for tensor in part["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in tensor["shape"]]
        if tensor["name"] == "input_ids":
            value = torch.randint(0, 400, shape, generator=generator, dtype=torch.int32)
        elif tensor["name"] == "timestep":
            value = torch.linspace(999, 1, batch).round()
        elif tensor["name"] == "time_ids":
            h, w = sizes["image_height"], sizes["image_width"]
            value = torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32)
        else:
            value = torch.randn(shape, generator=generator)
        feeds[tensor["name"]] = value
    return feeds
