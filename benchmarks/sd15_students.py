"""The SD-1.5 students shared by ``bench_latency.py`` and ``bench_runtimes.py``: scored once, selected per cost
unit and ratio, timed interleaved in torch and ONNX Runtime (not a benchmark itself).

Scoring full-size SD-1.5 costs ~5 s per calibration sample per pass at a 64×64 latent (N + 2 passes), so the
output-loss scores are computed once — at ``SCORE_LATENT`` with ``--calib`` samples and no additivity sets — and
cached in ``results/sd15_scores.json`` (keyed by model, seed, calibration count and latent size). Every cost unit
and ratio reuses them; the costs (params, MACs, measured ms) are those of the 64×64 deployment shape.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SCORES_FILE = RESULTS / "sd15_scores.json"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_or_score(source: Any, *, model: str, seed: int, calib: int, latent: tuple[int, int],
                  cache: Path = SCORES_FILE) -> dict[str, Any]:
    """Output-loss score of every prunable unit (auto granularity), from the cache when its key matches."""
    from laptop_deploy.models.inventory import build_inventory
    from laptop_deploy.prune.calibration import build_calibration
    from laptop_deploy.prune.scoring import Scorer, ScoringContext, output_loss

    key = {"model": model, "seed": seed, "calib": calib, "latent": list(latent), "criterion": "output-loss"}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            say(f"scores from {cache.name} ({cached['seconds']} s when computed)")
            return cached
    inv = build_inventory(source.unet, latent_size=latent)
    candidates = [e.layer for e in inv.prunable]
    calib_set = build_calibration(source, count=calib, seed=seed, latent_size=latent)
    scorer = Scorer(source.unet, calib_set, device=torch.device("cpu"), batch_size=calib)
    say(f"scoring {len(candidates)} units at {latent[0]}x{latent[1]}, {calib} calibration samples")
    start = time.perf_counter()
    scores = output_loss(ScoringContext(scorer=scorer, seed=seed), candidates)
    data = {"key": key, "scores": scores, "forward_passes": scorer.forward_passes,
            "seconds": round(time.perf_counter() - start, 1), "calibration": calib_set.description}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data, indent=2) + "\n")
    return data


def removal_sets(unet: Any, scores: dict[str, float], *, table: Any, latent: tuple[int, int],
                 variants: list[str]) -> dict[str, list[str]]:
    """{variant: removed units}. Variants: ``teacher``, ``params@R`` / ``macs@R`` / ``latency@R`` (the exact
    knapsack on that cost at the 64×64 shape), ``bk-sdm-base`` / ``bk-sdm-small`` (the handcrafted presets)."""
    from laptop_deploy.models.inventory import build_inventory
    from laptop_deploy.prune.handcrafted import handcrafted_removal
    from laptop_deploy.prune.latency_cost import unit_costs
    from laptop_deploy.prune.plan import select_layers

    inv = build_inventory(unet, latent_size=latent)
    layers = [e.layer for e in inv.prunable]
    costs = {"params": ({e.layer.name: e.layer.params for e in inv.prunable}, inv.total_params),
             "macs": ({e.layer.name: e.macs for e in inv.prunable}, inv.total_macs)}
    if table is not None:
        costs["latency"] = unit_costs(inv.prunable, table)
    sets: dict[str, list[str]] = {}
    for name in variants:
        if name == "teacher":
            sets[name] = []
        elif name.startswith("bk-sdm"):
            sets[name] = handcrafted_removal(name, unet.config)
        else:
            cost, ratio = name.split("@")
            cost_of, total = costs[cost]
            if float(ratio) > sum(cost_of.values()) / total:  # prune refuses it too: say so, do not fake it
                say(f"{name}: only {sum(cost_of.values()) / total:.3f} of the {cost} lies in prunable units; skipped")
                continue
            sets[name] = [x.name for x in select_layers(layers, scores, cost_of, total, float(ratio), [])]
    return sets


@contextmanager
def torch_runner(unet: Any, spec: Any, removed: list[str]) -> Iterator[Any]:
    """The teacher with ``removed`` bypassed (the removal mechanism, no copy), as a loaded TorchRunner."""
    from laptop_deploy.models.layers import bypassed, discover_layers
    from laptop_deploy.runtimes.pytorch import TorchRunner

    layers = [x for x in discover_layers(unet)[0] if x.name in set(removed)]
    with bypassed(unet, layers), TorchRunner(unet, spec=spec) as runner:
        yield runner


def export_variants(unet: Any, spec: Any, sets: dict[str, list[str]], folder: Path, *,
                    exporter: str = "torchscript") -> dict[str, dict[str, Any]]:
    """Export every variant (teacher with its set bypassed) to ``folder/<variant>``; seconds and bytes each.
    The TorchScript exporter by default: on a loaded 2-core machine the dynamo exporter's tracing takes minutes
    per variant, and all variants (teacher included) go through the same exporter, so they compare alike."""
    from laptop_deploy.exporters.onnx import OnnxOptions, export
    from laptop_deploy.models.layers import bypassed, discover_layers

    info = {}
    by_name = {x.name: x for x in discover_layers(unet)[0]}
    for name, removed in sets.items():
        out = folder / name.replace("@", "_")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        say(f"exporting {name} ({len(removed)} units removed)")
        start = time.perf_counter()
        with bypassed(unet, [by_name[n] for n in removed]):
            manifest = export(unet, spec, out, source={"spec": name}, options=OnnxOptions(exporter=exporter))
        info[name] = {"path": str(out / manifest.model_file), "export_s": round(time.perf_counter() - start, 1),
                      "bytes": sum(f["bytes"] for f in manifest.files.values())}
    return info


def ort_factories(paths: dict[str, str], spec: Any, threads: int | None) -> dict[str, Callable[[], Any]]:
    from laptop_deploy.runtimes.ort import OrtRunner

    return {name: (lambda p=path: OrtRunner(p, spec=spec, intra_op_threads=threads)) for name, path in paths.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_warning(before: list[float], after: list[float], cores: int) -> str | None:
    """A warning when the 1-minute load average exceeded the core count at either end of the run."""
    worst = max(before[0], after[0])
    if worst > cores:
        return (f"WARNING: the machine was busy (1-min load average {before[0]} before, {after[0]} after, on "
                f"{cores} logical cores): absolute times are inflated and noisy; compare the interleaved ratios")
    return None
