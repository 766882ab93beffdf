"""The fp16 noise floor computed with fp32 accumulation (deploy/fp16_floor.py) against PyTorch's own fp16 run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laptop_deploy.deploy.fp16_floor import Fp16ViaFp32
from laptop_deploy.deploy.noise_floor import copy_as
from laptop_deploy.deploy.spec import build_spec, torch_inputs, wrap_unet
from laptop_deploy.models.sources import resolve_model


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])  # ops decomposed or whole
def test_fp16_ops_are_computed_in_fp32_and_rounded_to_fp16(grad_mode):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=generator).half()
    conv = torch.nn.Conv2d(8, 4, 3, padding=1).half()
    linear = torch.nn.Linear(8, 5).half()
    tokens = torch.randn(2, 3, 8, generator=generator).half()
    with grad_mode():
        with Fp16ViaFp32() as mode:
            got_conv, got_linear, got_bmm = conv(x), linear(tokens), torch.bmm(tokens, tokens.transpose(1, 2))
        assert mode.upcasts == 3  # each op took the fp32 path (equal numbers alone could be fp16's own kernels)
        want_conv = torch.nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).half()
        want_linear = (tokens.float() @ linear.weight.float().T + linear.bias.float()).half()
        want_bmm = torch.bmm(tokens.float(), tokens.float().transpose(1, 2)).half()
    assert got_conv.dtype == got_linear.dtype == got_bmm.dtype == torch.float16
    assert torch.equal(got_conv, want_conv) and torch.equal(got_bmm, want_bmm)
    assert torch.allclose(got_linear.float(), want_linear.float(), atol=2e-3, rtol=0)  # addmm vs matmul + add
    with torch.no_grad(), Fp16ViaFp32():  # float32 tensors pass through untouched
        assert torch.equal(conv.float()(x.float()), torch.nn.functional.conv2d(x.float(), conv.weight, conv.bias,
                                                                                padding=1))


def test_the_floor_matches_pytorch_fp16_on_the_toy():
    """Both floors are one realization of fp16 rounding: their distance to float64 agrees within ±30% (measured:
    toy 0.67e-3 vs 0.59e-3, tiny-sd15 1.55e-3 vs 1.61e-3, tiny-sdxl 1.98e-3 vs 1.81e-3), 2,000x fp32's."""
    unet = resolve_model("toy").unet.eval()
    spec = build_spec(unet.config, batch=2)
    feeds = spec.example_feeds(seed=3)

    def run(model: torch.nn.Module, dtype: torch.dtype) -> np.ndarray:
        with torch.no_grad():
            return wrap_unet(model, spec)(*torch_inputs(spec, feeds, dtype=dtype)).double().numpy()

    exact = run(copy_as(unet, torch.float64), torch.float64)
    half = copy_as(unet, torch.float16)
    real = run(half, torch.float16)
    with Fp16ViaFp32():
        emulated = run(half, torch.float16)

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - exact) / np.linalg.norm(exact))

    assert 0.7 < rel(emulated) / rel(real) < 1.3
    assert rel(run(unet, torch.float32)) < rel(real) / 100


def test_only_full_size_unets_use_the_fp32_accumulated_floor():
    from laptop_deploy.deploy.fp16_floor import emulates, floor_label

    toy = resolve_model("toy").unet
    sd15 = resolve_model("random:sd15", materialize=False).unet  # shapes only, no weights
    assert not emulates(toy) and floor_label(toy) == "torch fp16"
    assert emulates(sd15) and floor_label(sd15) == "torch fp16 (fp32-accumulated)"
