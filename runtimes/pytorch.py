"""``TorchRunner``: the U-Net in eager PyTorch behind the Runner interface; the reference for every parity check.

It runs the same :class:`~laptop_deploy.deploy.spec.UNetExportWrapper` the exporters trace, so reference and artifact
differ only in the runtime. Inputs are taken in any float dtype and run in ``dtype`` (float32 by default);
outputs come back as float32 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deploy.spec import ExportSpec, torch_inputs, wrap_unet
from . import Runner


class TorchRunner(Runner):
    """``model`` is a U-Net module, or a model spec string resolved (weights read) on ``__enter__``."""

    name = "torch"

    def __init__(self, model: nn.Module | str, *, spec: ExportSpec, seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> None:
        super().__init__(spec=spec)
        self.model, self.seed, self.allow_pickle = model, seed, allow_pickle
        self.device, self.dtype = torch.device(device), dtype
        self._wrapper: nn.Module | None = None

    def _load(self) -> None:
        unet = self.model
        if isinstance(unet, str):
            from ..models.sources import resolve_model

            unet = resolve_model(unet, seed=self.seed, allow_pickle=self.allow_pickle).unet
        first = next(unet.parameters())
        if (first.device, first.dtype) != (self.device, self.dtype):  # .to() on a matching model warns needlessly
            unet = unet.to(device=self.device, dtype=self.dtype)
        self._wrapper = wrap_unet(unet, self.spec)

    @torch.inference_mode()
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = torch_inputs(self.spec, feeds, dtype=self.dtype, device=self.device)
        out = self._wrapper(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {self.spec.output_names[0]: out.to("cpu", torch.float32).numpy()}

    def _release(self) -> None:
        self._wrapper = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads()}
