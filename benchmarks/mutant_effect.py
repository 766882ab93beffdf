"""How large is a weight mutation's own effect on the U-Net's function, next to the reference's rounding noise?

A mutation whose exact effect (float64 mutant vs float64 model, same inputs) is below the rounding noise of the
precision an artifact runs at (PyTorch's own fp32 / fp16 output vs float64) is an *equivalent mutant* at that
precision: no comparison of outputs can tell it from a correct export, whatever the gate. This script measures
both for the ``WEIGHTS`` mutations of ``deploy/mutants.py`` on seeded inputs (``spec.example_feeds``, the verify
random case, plus the timesteps 999 and 1) and writes ``results/mutant_effect.json``.

    .venv/bin/python benchmarks/mutant_effect.py [--models toy random:tiny-sd15]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def outputs(unet: torch.nn.Module, spec, feeds: list[dict], dtype: torch.dtype) -> list[np.ndarray]:
    from laptop_deploy.deploy.noise_floor import copy_as
    from laptop_deploy.runtimes.pytorch import TorchRunner

    model = copy_as(unet, dtype) if dtype != torch.float32 else unet
    with TorchRunner(model, spec=spec, dtype=dtype) as runner:
        return [next(iter(runner.infer(f).values())).astype(np.float64) for f in feeds]


def measure(spec_str: str) -> list[dict]:
    from laptop_deploy.deploy.mutants import SCALE, mutate_module, mutation_set
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.models.sources import resolve_model

    unet = resolve_model(spec_str).unet.eval()
    spec = build_spec(unet.config)
    feeds = []
    for seed, t in ((0, None), (1, 999), (2, 1)):
        f = {k: v.astype(np.float32) for k, v in spec.example_feeds(seed=seed).items()}
        if t is not None:
            f["timestep"] = np.full_like(f["timestep"], t)
        feeds.append(f)
    exact = outputs(unet, spec, feeds, torch.float64)
    floor = {p: max(rel_l2(o, e) for o, e in zip(outputs(unet, spec, feeds, d), exact))
             for p, d in (("fp32", torch.float32), ("fp16", torch.float16))}
    rows = []
    for precision in ("fp32", "fp16"):
        for mutation in mutation_set(unet, precision):
            if mutation.kind != "scale":
                continue
            mutant = outputs(mutate_module(unet, mutation), spec, feeds, torch.float64)
            effect = max(rel_l2(m, e) for m, e in zip(mutant, exact))
            rows.append({"model": spec_str, "precision": precision, "mutation": mutation.name,
                         "param": mutation.param, "scale": SCALE[precision], "exact_effect_rel_l2": effect,
                         "floor_rel_l2": floor[precision], "effect_over_floor": round(effect / floor[precision], 3)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "random:tiny-sd15"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [row for model in args.models for row in measure(model)]
    command = "python benchmarks/mutant_effect.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mutant_effect.json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"{r['model']:18} {r['precision']} {r['mutation']:28} effect {r['exact_effect_rel_l2']:.2e}  "
              f"floor {r['floor_rel_l2']:.2e}  effect/floor {r['effect_over_floor']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
