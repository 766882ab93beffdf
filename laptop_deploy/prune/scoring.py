"""Layer-importance criteria: plain functions in one dict, each scoring every candidate layer on its own.

A higher score means a more important layer; selection keeps the layers whose summed score is largest.

* ``output-loss`` (LAPTOP-Diff, default): sᵢ = mean over the calibration set and all elements of
  (ε_{−i} − ε_teacher)², the U-Net's noise prediction with layer i removed against the full model's.
* ``feature-loss``: Σ over stage outputs (every down block, the mid block, every up block) of the MSE between the
  features with layer i removed and the teacher's.
* ``magnitude``: the layer's weight norm normalised by its size, ‖θᵢ‖₂ / √|θᵢ| (root mean square of its weights).
* ``random``: U[0, 1) per layer from the seed (the control baseline).

Removal goes through :func:`laptop_deploy.models.layers.bypassed` — the layer is toggled in place, no model is copied —
and the teacher's outputs are computed once, so one-shot scoring costs N + 1 passes over the calibration set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationSet
from ..errors import CheckFailed, LaptopDeployError
from ..models.layers import Layer, bypassed, tap_stages


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``; asking for CUDA without a usable GPU is a usage error, not a crash later."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LaptopDeployError(f"--device {name}: expected cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise LaptopDeployError(f"--device {name}: expected cpu, cuda or cuda:<index>")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LaptopDeployError(f"--device {name}: no CUDA GPU is available to this torch "
                                    f"({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LaptopDeployError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s), 0..{torch.cuda.device_count() - 1}")
    return device


@contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Full fp32 matmuls and convolutions on CUDA (TF32 off), so a GPU plan matches the CPU plan up to ties."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Scorer:
    """Runs the U-Net over the calibration set with layers removed and compares against the teacher.

    ``autocast`` (CUDA only) runs forwards in bf16 or fp16; losses are always accumulated in fp32.
    ``forward_passes`` counts passes over the whole calibration set (one per evaluated removal set, plus the
    teacher's).
    """

    unet: nn.Module
    calib: CalibrationSet
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 4
    autocast: torch.dtype | None = None
    progress: Callable[[int], None] | None = None
    forward_passes: int = 0
    _batches: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _outputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    _features: list[list[torch.Tensor]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.unet.to(self.device).eval()
        self._batches = list(self.calib.batches(self.batch_size, device=self.device))

    def _run(self, batch: dict[str, Any], taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        context = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast \
            else exact_fp32(self.device)
        handles = tap_stages(self.unet, taps) if taps is not None else []
        try:
            with torch.no_grad(), context:
                out = self.unet(**batch, return_dict=False)[0].float()
        finally:
            for handle in handles:
                handle.remove()
        if self.progress is not None:
            self.progress(1)
        return out

    def _reference(self, *, features: bool) -> None:
        if self._outputs and (self._features is not None or not features):
            return
        self._outputs, self._features = [], [] if features else None
        for batch in self._batches:
            taps: list[torch.Tensor] | None = [] if features else None
            out = self._run(batch, taps)
            if not torch.isfinite(out).all():
                raise CheckFailed("the teacher's own output is not finite on the calibration set; with --autocast "
                                  "fp16 this is usually an overflow: use bf16 or fp32")
            self._outputs.append(out)
            if features:
                self._features.append(taps)
        self.forward_passes += 1

    def output_loss(self, layers: Iterable[Layer]) -> float:
        """mean (ε_S − ε_T)² with the units ``layers`` removed together (one pass over the calibration set)."""
        self._reference(features=False)
        total, count = 0.0, 0
        with bypassed(self.unet, layers):
            for batch, reference in zip(self._batches, self._outputs):
                diff = self._run(batch) - reference
                total += diff.double().pow(2).sum().item()
                count += diff.numel()
        self.forward_passes += 1
        return _finite(total / count, layers)

    def feature_loss(self, layers: Iterable[Layer]) -> float:
        """Σ over stage outputs of the MSE against the teacher's stage outputs, ``layers`` removed together."""
        self._reference(features=True)
        per_stage: list[float] = []
        with bypassed(self.unet, layers):
            for batch, reference in zip(self._batches, self._features):
                taps: list[torch.Tensor] = []
                self._run(batch, taps)
                for i, (got, want) in enumerate(zip(taps, reference)):
                    value = (got - want).double().pow(2).sum().item() / want.numel() * want.shape[0]
                    per_stage += [0.0] * (i + 1 - len(per_stage))
                    per_stage[i] += value
        self.forward_passes += 1
        return _finite(sum(per_stage) / len(self.calib), layers)


def _finite(value: float, layers: Iterable[Layer]) -> float:
    """A NaN/Inf loss would rank a layer as unimportant and get it removed: refuse it instead."""
    if not math.isfinite(value):
        names = ", ".join(layer.name for layer in layers) or "none (the teacher)"
        raise CheckFailed(f"non-finite loss ({value}) with layers removed: {names}; with --autocast fp16 this is "
                          f"usually an overflow: use bf16 or fp32")
    return value


@dataclass
class ScoringContext:
    """What a criterion may use: the scorer (forwards), the candidate layers and the seed."""

    scorer: Scorer
    seed: int = 0


Criterion = Callable[[ScoringContext, list[Layer]], dict[str, float]]


def output_loss(ctx: ScoringContext, layers: list[Layer]) -> dict[str, float]:
    return {layer.name: ctx.scorer.output_loss([layer]) for layer in layers}


def feature_loss(ctx: ScoringContext, layers: list[Layer]) -> dict[str, float]:
    return {layer.name: ctx.scorer.feature_loss([layer]) for layer in layers}


def magnitude(ctx: ScoringContext, layers: list[Layer]) -> dict[str, float]:
    scores = {}
    for layer in layers:
        weights = [p.detach().double() for p in ctx.scorer.unet.get_submodule(layer.name).parameters()]
        squares = sum(w.pow(2).sum().item() for w in weights)
        scores[layer.name] = math.sqrt(squares / max(1, sum(w.numel() for w in weights)))
    return scores


def random_scores(ctx: ScoringContext, layers: list[Layer]) -> dict[str, float]:
    generator = torch.Generator().manual_seed(ctx.seed)
    values = torch.rand(len(layers), generator=generator, dtype=torch.float64).tolist()
    return {layer.name: value for layer, value in zip(layers, values)}


CRITERIA: dict[str, Criterion] = {
    "output-loss": output_loss,
    "feature-loss": feature_loss,
    "magnitude": magnitude,
    "random": random_scores,
}
NEEDS_FORWARD = {"output-loss": 1, "feature-loss": 1, "magnitude": 0, "random": 0}  # passes per layer


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise LaptopDeployError(f"unknown criterion '{name}'; valid: {', '.join(CRITERIA)}") from None
