"""Why a full-size ``.pte`` is further from float64 than PyTorch fp32 is: single ops at SD-1.5 sizes, each lowered to
XNNPACK alone the exporter's way (``exporters.executorch.lower``), run in ExecuTorch's runtime, and compared with a
float64 copy — beside eager PyTorch fp32's own error (the calibrated gate's floor).

    PYTHONPATH=. python benchmarks/executorch_op_error.py      # ~2-3 min; writes results/executorch_op_error.json

Finding (the file's numbers): ExecuTorch's kernels sum long reductions sequentially in float32 where PyTorch sums
pairwise/blocked, so their error relative to the floor grows with the reduction length — most for the portable
group norm (ExecuTorch's portable kernels; a two-pass decomposition helps only with a large mean: its means run
there too), less for XNNPACK's convolutions over 1280 channels; element-wise ops and softmax match PyTorch.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results"


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(q, k.transpose(1, 2)) * (q.shape[-1] ** -0.5)
        return torch.bmm(scores.softmax(-1), v)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class TwoPassGroupNorm(nn.Module):
    """GroupNorm as mean, centred mean of squares, rsqrt (what a numerically careful decomposition computes)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(x.shape[0], self.norm.num_groups, -1)
        centred = groups - groups.mean(-1, keepdim=True)
        y = (centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + self.norm.eps)).reshape(x.shape)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return y * self.norm.weight.reshape(shape) + self.norm.bias.reshape(shape)


def cases() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    norm = nn.GroupNorm(32, 320)
    return {
        "conv 3x3 1280->1280 at 8x8 (reduction 11520)": (nn.Conv2d(1280, 1280, 3, padding=1), (rand(1, 1280, 8, 8),)),
        "conv 3x3 320->320 at 64x64 (reduction 2880)": (nn.Conv2d(320, 320, 3, padding=1), (rand(1, 320, 64, 64),)),
        "linear 1280->1280 x256 tokens": (nn.Linear(1280, 1280), (rand(1, 256, 1280),)),
        "attention 4096 tokens, head dim 40": (Attention(), (rand(8, 4096, 40), rand(8, 4096, 40), rand(8, 4096, 40))),
        "softmax over 4096": (Fn(lambda x: x.softmax(-1)), (rand(8, 1024, 4096, scale=4),)),
        "silu": (Fn(F.silu), (rand(1, 320, 64, 64, scale=3),)),
        "gelu": (Fn(F.gelu), (rand(1, 4096, 1280, scale=3),)),
        "group norm 32x320 at 64x64, mean 0 (portable kernel)": (norm, (rand(1, 320, 64, 64, scale=2),)),
        "group norm 32x320 at 64x64, mean 4 (portable kernel)": (norm, (rand(1, 320, 64, 64, scale=2, shift=4),)),
        "group norm, two-pass decomposition, mean 4": (TwoPassGroupNorm(norm),
                                                       (rand(1, 320, 64, 64, scale=2, shift=4),)),
    }


def measure(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> dict:
    from executorch.runtime import Runtime

    from laptop_deploy.exporters import executorch as et

    module = module.eval()
    edge = et.lower(torch.export.export(module, args, strict=False))
    portable = et.delegation_summary(edge.exported_program().graph_module)["portable"]
    et.write_program(edge, path)
    out = Runtime.get().load_program(path).load_method("forward").execute(list(args))[0].numpy()
    with torch.no_grad():
        fp32 = module(*args).numpy().astype(np.float64)
        exact = copy.deepcopy(module).double()(*[a.double() for a in args]).numpy()
    norm = np.linalg.norm(exact)
    floor = float(np.linalg.norm(fp32 - exact) / norm)
    error = float(np.linalg.norm(out.astype(np.float64) - exact) / norm)
    return {"torch_fp32_rel_l2": floor, "pte_rel_l2": error, "factor": round(error / floor, 2),
            "portable_ops": portable}


def main() -> int:
    torch.set_num_threads(1)
    rows, start, load = {}, time.perf_counter(), os.getloadavg()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"executorch_op_error.{os.getpid()}.pte"
    try:
        for name, (module, args) in cases().items():
            rows[name] = measure(module, args, path)
            print(f"{name:<56} torch fp32 {rows[name]['torch_fp32_rel_l2']:.3g}  .pte {rows[name]['pte_rel_l2']:.3g}"
                  f"  factor {rows[name]['factor']:g}", file=sys.stderr, flush=True)
    finally:
        path.unlink(missing_ok=True)
    data = {"command": "PYTHONPATH=. python benchmarks/executorch_op_error.py", "threads": 1,
            "seconds": round(time.perf_counter() - start), "load_average": [list(load), list(os.getloadavg())],
            "what": "relative L2 vs a float64 copy of each op: eager PyTorch fp32 (the floor) and the op lowered to "
                    "XNNPACK alone in ExecuTorch's runtime; factor = .pte error / floor", "ops": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "executorch_op_error.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
