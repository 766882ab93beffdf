"""ExportSpec: what an exported U-Net takes and returns, declared once from the U-Net's config.

Every exporter, runner, parity check and benchmark reads names, shapes, dtypes and dynamic axes from here; nothing
else builds them. Names follow Optimum's (and DESIGN.md); layouts are NCHW, sizes are *latent* pixels (image
pixels / 8)::

    sample                 [batch, in_channels, height, width]   float32 (float16 in an fp16 artifact)
    timestep               [batch]                               float32 in every precision
    encoder_hidden_states  [batch, 77, cross_attention_dim]      float32 (float16)
    text_embeds   (SDXL)   [batch, pooled text width]            float32 (float16)
    time_ids      (SDXL)   [batch, 6]                            float32 in every precision; image pixels
    out_sample             [batch, out_channels, height, width]  float32 (float16)

``timestep`` is float32, not int64: schedulers with fractional timesteps (Euler/DPM with Karras sigmas) feed
non-integer values, every integer timestep up to 2**24 is exact in float32, and the U-Net casts to float before its
sinusoidal embedding anyway. ``timestep`` and ``time_ids`` stay float32 in fp16 artifacts: both feed sinusoidal
embeddings with arguments up to ~1000 rad, where float16's spacing (0.5) would scramble the phase.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LaptopDeployError
from ..models.unet_io import TEXT_TOKENS, added_cond_dims, check_latent_size, downsample_factor, sdxl_time_ids

PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")  # int8 graphs keep float32 inputs and outputs
FP32_INPUTS = ("timestep", "time_ids")  # float32 in every precision (see the module docstring)
OUTPUT_NAME = "out_sample"
VAE_FACTOR = 8  # image pixels per latent pixel, for SDXL's time_ids


class SpecError(LaptopDeployError):
    """Inputs that do not fit an ExportSpec (names, ranks, sizes, dtypes), or an invalid spec request."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: ``shape`` holds ints for static axes and axis names (``batch``, ``height``, ``width``)
    for dynamic ones; ``dtype`` is a numpy dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def mismatch(self, array: np.ndarray) -> str | None:
        """Why ``array`` does not fit this tensor, or None when it does."""
        if array.ndim != len(self.shape):
            return f"{self.name}: rank {array.ndim}, expected {len(self.shape)} {list(self.shape)}"
        for axis, (got, want) in enumerate(zip(array.shape, self.shape)):
            if isinstance(want, int) and got != want:
                return f"{self.name}: axis {axis} is {got}, expected {want} (shape {list(self.shape)})"
        if array.dtype != np.dtype(self.dtype):
            return f"{self.name}: dtype {array.dtype}, expected {self.dtype}"
        return None


@dataclass(frozen=True)
class ExportSpec:
    """The I/O contract of one exported U-Net (see the module docstring for the layout).

    ``batch``, ``height`` and ``width`` (latent pixels) are the static sizes, or the default sizes of a dynamic
    spec; ``downsample`` is the factor latent sizes must be multiples of.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: int
    height: int
    width: int
    dynamic: bool
    precision: str
    downsample: int

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def sdxl(self) -> bool:
        return "time_ids" in self.input_names

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: axis name}} over inputs and outputs (TorchScript exporter, manifests)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}

    def dynamic_shapes(self) -> dict[str, dict[int, str]] | None:
        """``torch.onnx.export(dynamo=True)``'s ``dynamic_shapes``, keyed by the wrapper's argument names."""
        if not self.dynamic:
            return None
        axes = self.dynamic_axes()
        return {name: axes.get(name, {}) for name in self.input_names}

    def example_feeds(self, *, batch: int | None = None, height: int | None = None, width: int | None = None,
                      seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded feeds in this spec's dtypes. Sizes default to the spec's; other sizes need a dynamic spec.

        Timesteps are spread over [1, 999] (the whole range a scheduler uses, not Optimum's [0, 32)).
        """
        batch, height, width = batch or self.batch, height or self.height, width or self.width
        if not self.dynamic and (batch, height, width) != (self.batch, self.height, self.width):
            raise SpecError(f"static spec takes batch {self.batch}, latent {self.height}x{self.width}; "
                            f"asked for batch {batch}, {height}x{width}")
        generator = torch.Generator().manual_seed(seed)
        sizes = {"batch": batch, "height": height, "width": width}
        feeds: dict[str, np.ndarray] = {}
        for tensor in self.inputs:
            shape = [sizes[d] if isinstance(d, str) else d for d in tensor.shape]
            shape[0] = batch
            if tensor.name == "timestep":
                value = torch.linspace(999, 1, batch).round()
            elif tensor.name == "time_ids":
                value = sdxl_time_ids(height * VAE_FACTOR, width * VAE_FACTOR, batch)
            else:
                value = torch.randn(*shape, generator=generator)
            feeds[tensor.name] = value.numpy()
        return self.cast_feeds(feeds)

    def cast_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` converted to this spec's dtypes (float32 reference inputs → an fp16 artifact's inputs)."""
        dtypes = {t.name: t.dtype for t in self.inputs}
        return {name: np.ascontiguousarray(value, dtype=dtypes.get(name, value.dtype))
                for name, value in feeds.items()}

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`SpecError` naming every input that is missing, unexpected or of the wrong shape/dtype."""
        problems = [f"missing input '{n}'" for n in self.input_names if n not in feeds]
        problems += [f"unexpected input '{n}' (expected {', '.join(self.input_names)})"
                     for n in feeds if n not in self.input_names]
        problems += [reason for t in self.inputs if t.name in feeds
                     for reason in [t.mismatch(np.asarray(feeds[t.name]))] if reason]
        batches = {np.asarray(feeds[n]).shape[0] for n in self.input_names if n in feeds}
        if len(batches) > 1:
            problems.append(f"inputs disagree on the batch size: {sorted(batches)}")
        if "sample" in feeds and not problems:
            _, _, height, width = np.asarray(feeds["sample"]).shape
            for label, size in (("height", height), ("width", width)):
                if size % self.downsample:
                    problems.append(f"sample {label} {size} is not a multiple of {self.downsample}")
        if problems:
            raise SpecError("; ".join(problems))

    def with_precision(self, precision: str) -> ExportSpec:
        """This spec with the dtypes of ``precision`` (the fp32 reference of an fp16 artifact)."""
        _check_precision(precision)
        retype = lambda t: replace(t, dtype=tensor_dtype(t.name, precision))  # noqa: E731
        return replace(self, inputs=tuple(map(retype, self.inputs)), outputs=tuple(map(retype, self.outputs)),
                       precision=precision)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [{**t, "shape": list(t["shape"])} for t in data["inputs"]]
        data["outputs"] = [{**t, "shape": list(t["shape"])} for t in data["outputs"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportSpec:
        try:
            tensors = {key: tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in data[key])
                       for key in ("inputs", "outputs")}
            return cls(**tensors, **{k: data[k] for k in ("batch", "height", "width", "dynamic", "precision",
                                                            "downsample")})
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed I/O spec in manifest ({type(exc).__name__}: {exc})") from None


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SpecError(f"precision '{precision}' is not supported; valid: {', '.join(PRECISIONS)}")


def tensor_dtype(name: str, precision: str) -> str:
    """numpy dtype name of tensor ``name`` in ``precision``: float16 in fp16 except :data:`FP32_INPUTS`."""
    return "float16" if precision == "fp16" and name not in FP32_INPUTS else "float32"


def build_spec(config: Mapping[str, Any], *, batch: int = 1, height: int | None = None, width: int | None = None,
               dynamic: bool = False, precision: str = "fp32") -> ExportSpec:
    """The one place an ExportSpec is made: from a ``UNet2DConditionModel`` config.

    ``height``/``width`` are latent pixels (default: the config's ``sample_size``) and must be multiples of
    2^(down blocks − 1); otherwise the error names the nearest valid sizes.
    """
    _check_precision(precision)
    if batch < 1:
        raise SpecError(f"batch {batch} must be at least 1")
    height, width = height or config["sample_size"], width or config["sample_size"]
    check_latent_size(config, height, width)
    b, h, w = ("batch", "height", "width") if dynamic else (batch, height, width)

    def tensor(name: str, *shape: int | str) -> TensorSpec:
        return TensorSpec(name, tuple(shape), tensor_dtype(name, precision))

    inputs = [tensor("sample", b, config["in_channels"], h, w), tensor("timestep", b),
              tensor("encoder_hidden_states", b, TEXT_TOKENS, config["cross_attention_dim"])]
    dims = added_cond_dims(config)
    if dims is not None:
        inputs += [tensor("text_embeds", b, dims[0]), tensor("time_ids", b, dims[1])]
    outputs = (tensor(OUTPUT_NAME, b, config["out_channels"], h, w),)
    return ExportSpec(inputs=tuple(inputs), outputs=outputs, batch=batch, height=height, width=width,
                      dynamic=dynamic, precision=precision, downsample=downsample_factor(config))


class UNetExportWrapper(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states) -> out_sample``: the U-Net with positional, named inputs
    (the names become the graph's input names) and a plain tensor output."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetExportWrapper(UNetExportWrapper):
    """SDXL's U-Net: ``added_cond_kwargs`` flattened into the ``text_embeds`` and ``time_ids`` inputs."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def wrap_unet(unet: nn.Module, spec: ExportSpec) -> nn.Module:
    """The wrapper whose ``forward`` arguments are exactly ``spec.input_names``, in eval mode."""
    return (SDXLUNetExportWrapper if spec.sdxl else UNetExportWrapper)(unet).eval()


def torch_inputs(spec: ExportSpec, feeds: Mapping[str, np.ndarray], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """``feeds`` as the wrapper's positional arguments, all ``dtype`` (the PyTorch reference runs in fp32)."""
    return tuple(torch.from_numpy(np.asarray(feeds[name], dtype=np.float32)).to(device=device, dtype=dtype)
                 for name in spec.input_names)


def feeds_from_unet_kwargs(spec: ExportSpec, kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``unet(**kwargs)``-style inputs (``added_cond_kwargs`` nested, timestep scalar or [batch]) as named float32
    feeds: the bridge from diffusers' calling convention to runners."""
    sample = kwargs["sample"]
    batch = sample.shape[0]
    flat = {"sample": sample, "encoder_hidden_states": kwargs["encoder_hidden_states"],
            "timestep": torch.as_tensor(kwargs["timestep"]).reshape(-1).expand(batch),
            **(kwargs.get("added_cond_kwargs") or {})}
    return {name: flat[name].detach().to("cpu", torch.float32).contiguous().numpy() for name in spec.input_names}
