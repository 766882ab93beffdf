"""One tiny-U-Net fixture family for every test: the SD-1.5 and SDXL topologies at widths that run in ms."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from laptop_deploy.models.sources import ModelSource, resolve_model
from laptop_deploy.models.unet_io import example_inputs


@pytest.fixture(params=["random:tiny-sd15", "random:tiny-sdxl"], ids=["sd15", "sdxl"])
def tiny_spec(request) -> str:
    return request.param


@pytest.fixture
def make_source() -> Callable[..., ModelSource]:
    """Fresh seeded tiny source per call (tests remove layers in place, so nothing is shared)."""

    def make(spec: str = "random:tiny-sd15", seed: int = 0) -> ModelSource:
        return resolve_model(spec, seed=seed)

    return make


@pytest.fixture
def inputs_for() -> Callable[..., dict]:
    def make(unet, batch: int = 2, seed: int = 0) -> dict:
        return example_inputs(unet.config, batch=batch, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tmp_path_factory):
    """(source, folder): a static fp32 random:tiny-sd15 ONNX artifact (TorchScript exporter, the fastest valid
    one: ~10 s), exported once per session and shared by every module. Read-only: copy it before changing it."""
    pytest.importorskip("onnxruntime")
    from deploy_fixtures import export_artifact, tiny_source, torch_threads

    with torch_threads(1):
        source = tiny_source("random:tiny-sd15")
        return source, export_artifact(source, tmp_path_factory.mktemp("shared") / "onnx", exporter="torchscript")
