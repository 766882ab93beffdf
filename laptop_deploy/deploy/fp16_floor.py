"""PyTorch's fp16 noise floor at a CPU cost an fp32 forward pays: fp16 storage, fp32 accumulation.

An fp16 artifact is judged against the error PyTorch's own fp16 run makes (:mod:`.noise_floor`). On CPU, PyTorch's
fp16 convolutions and matrix products have no fast kernels: measured here, a 3×3 convolution over 320 channels at
64×64, batch 2, takes 82 s in fp16 against 0.39 s in fp32 (a linear 1280→5120 over 2×4096 tokens: 14.6 s against
2.4 s), so one fp16 forward of a full-size SD-1.5 U-Net takes hours and ``verify`` of a full-size fp16 export never
finished (``benchmarks/results/sd15_gate_fp16.json``).

:class:`Fp16ViaFp32` computes those ops — convolutions, linears and matrix products on float16 tensors — in
float32 on the same fp16 inputs and weights and rounds the result to float16: what the fp16 kernels compute (PyTorch accumulates fp16 products in float, ``acc_type<Half>``; cuDNN/cuBLAS fp16 default to fp32
accumulation too), up to the order of the sums. Every other op (norms, softmax, attention, activations) still runs
in fp16. Measured against PyTorch's own fp16 run (``tests/test_fp16_floor.py``, seeded inputs, distance to
float64): toy 0.67e-3 vs 0.59e-3, tiny-sd15 1.55e-3 vs 1.61e-3, tiny-sdxl 1.98e-3 vs 1.81e-3 — two realizations of
the same rounding, within ±15%.

It is used only for modules above :data:`EMULATE_ABOVE_PARAMS` (full-size U-Nets and their students), where the real
fp16 run cannot finish: the fp16 factor (2×) was calibrated on PyTorch's real fp16 run over the tiny zoo
(``benchmarks/results/parity_mutations.md``, where the weakest caught fp16 mutant sits at 2.2×), and those models
keep it. The floor's label says which ran: ``torch fp16`` or ``torch fp16 (fp32-accumulated)``.
:class:`Fp16FloorRunner` is the TorchRunner ``verify`` uses for the fp16 floor; ``verify BUNDLE`` enters
:func:`fp16_floor_context` around its parts' fp16 runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..runtimes.pytorch import TorchRunner

EMULATE_ABOVE_PARAMS = 100_000_000  # tiny presets and the toy: < 10M; SD-1.5's U-Net 860M, a 50% student ~430M
_aten = torch.ops.aten
# the ops as a dispatch mode sees them: decomposed under no_grad (convolution, mm, addmm, bmm...), whole under
# inference_mode (conv2d, linear, matmul: TorchRunner's calls)
UPCAST_OPS = frozenset({_aten.convolution.default, _aten.conv1d.default, _aten.conv2d.default, _aten.linear.default,
                        _aten.matmul.default, _aten.mm.default, _aten.bmm.default, _aten.addmm.default,
                        _aten.baddbmm.default})


def _up(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value


class Fp16ViaFp32(TorchDispatchMode):
    """While entered: fp16 convolutions and matrix products computed in float32, their results rounded to fp16;
    ``upcasts`` counts them."""

    upcasts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - TorchDispatchMode's protocol
        kwargs = kwargs or {}
        if func in UPCAST_OPS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args):
            args, kwargs = tree_map(_up, (args, kwargs))
            self.upcasts += 1
            return func(*args, **kwargs).to(torch.float16)
        return func(*args, **kwargs)


def emulates(module: torch.nn.Module) -> bool:
    """Whether ``module``'s fp16 floor is computed with :class:`Fp16ViaFp32` (more than
    :data:`EMULATE_ABOVE_PARAMS` parameters)."""
    return sum(p.numel() for p in module.parameters()) > EMULATE_ABOVE_PARAMS


def fp16_floor_context(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:class:`Fp16ViaFp32` for a module that :func:`emulates`, else nothing (PyTorch's own fp16 kernels)."""
    return Fp16ViaFp32() if emulates(module) else contextlib.nullcontext()


def floor_label(module: torch.nn.Module) -> str:
    return "torch fp16 (fp32-accumulated)" if emulates(module) else "torch fp16"


class Fp16FloorRunner(TorchRunner):
    """The U-Net ``model`` (an nn.Module) in float16, each call under :func:`fp16_floor_context`; ``floor_name``
    is its :func:`floor_label`."""

    name = "torch-fp16-floor"

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(model, dtype=torch.float16, **kwargs)
        self.floor_name, self._context = floor_label(model), lambda: fp16_floor_context(model)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._context():
            return super()._infer(feeds)
