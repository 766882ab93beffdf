"""``prune --cost latency``: the knapsack's cost of a unit is its measured time on the target runtime.

A :class:`~laptop_deploy.deploy.latency_table.LatencyTable` (``--latency-table T.json``, or profiled now with
``--runtime R``) gives each prunable unit its inclusive ms per U-Net call; costs are integer microseconds and the
total is the whole step (so the remainder and the non-prunable units are the fixed, always-kept part, as with
params and MACs). ``--ratio 0.5`` then asks for a student predicted to take at most half the teacher's step.

The prediction, ``step − Σ removed``, is checked after selection: :func:`measure_student` times teacher and
student interleaved in the table's runtime and reports the measured ratio and the prediction error.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError

US_PER_MS = 1000


def resolve_table(unet: Any, *, model: dict[str, Any], table: Any, runtime: str | None,
                  latent_size: tuple[int, int], batch: int, precision: str,
                  progress: Callable[[str], None] | None = None) -> Any:
    """The table to price units with: ``table`` checked against this setting and model, or a fresh profile of
    ``unet`` on ``runtime``; None when neither is given."""
    from ..deploy.latency_table import check_table
    from ..deploy.profile import ProfileOptions, profile_unet
    from ..models.layers import discover_layers

    if table is None and runtime is None:
        return None
    if table is None:
        return profile_unet(unet, model=model, progress=progress,
                            options=ProfileOptions(runtime=runtime, precision=precision, latent_size=latent_size,
                                                   batch=batch, repeats=3))
    layers, _ = discover_layers(unet)
    check_table(table, latent_size=latent_size, batch=batch, precision=precision, runtime=runtime,
                layers=layers, total_params=sum(p.numel() for p in unet.parameters()), where="--latency-table")
    return table


def unit_costs(entries: list[Any], table: Any) -> tuple[dict[str, int], int]:
    """({prunable unit: µs}, step µs) for inventory ``entries`` (a unit's inclusive time: removing it removes
    everything inside it)."""
    costs = {}
    for entry in entries:
        unit = table.unit(entry.layer.name)
        if unit is None:
            raise LaptopDeployError(f"latency table has no time for unit '{entry.layer.name}'")
        costs[entry.layer.name] = max(0, round(unit.ms * US_PER_MS))
    return costs, max(1, round(table.step * US_PER_MS))


def latency_summary(table: Any, removed: list[str]) -> dict[str, Any]:
    """What the table predicts for the student without ``removed`` (ms per call and the ratio to the step)."""
    from ..deploy.latency_table import describe_setting
    from ..deploy.profile import predicted_ms

    predicted = predicted_ms(table, removed)
    return {"setting": table.setting, "setting_text": describe_setting(table.setting),
            "teacher_ms": round(table.step, 4), "predicted_ms": round(predicted, 4),
            "predicted_ratio": round(predicted / table.step, 6),
            "removed_ms": round(table.step - predicted, 4), "method": table.method}


@contextmanager
def _torch_variant(unet: Any, spec: Any, layers: list[Any]) -> Iterator[Any]:
    from ..models.layers import bypassed
    from ..runtimes.pytorch import TorchRunner

    with bypassed(unet, layers), TorchRunner(unet, spec=spec) as runner:
        yield runner


def measure_student(unet: Any, removed: list[str], summary: dict[str, Any], *, repeats: int = 3, calls: int = 1,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the teacher ``unet`` and its student without ``removed`` interleaved (``repeats`` rounds) in the
    setting of ``summary`` (:func:`latency_summary`: the table's setting and its prediction); the student is the teacher with the units bypassed (the removal mechanism), so
    no copy is made. ort exports both graphs to a temporary folder first and times every call in a fresh process
    (:mod:`..deploy.fresh_timing`). Returns the measured ratio, the
    predicted one and the prediction error (predicted / measured − 1)."""
    from ..deploy.profile import measure_interleaved
    from ..deploy.spec import build_spec
    from ..models.layers import discover_layers

    setting = summary["setting"]
    h, w = setting["latent_size"]
    spec = build_spec(unet.config, batch=int(setting["batch"]), height=h, width=w, precision=setting["precision"])
    layers = [layer for layer in discover_layers(unet)[0] if layer.name in set(removed)]
    load_before = os.getloadavg()
    if setting["runtime"] == "torch":
        variants = {"teacher": lambda: _torch_variant(unet, spec, []),
                    "student": lambda: _torch_variant(unet, spec, layers)}
        times = measure_interleaved(variants, spec.example_feeds(seed=0), repeats=repeats, calls=calls,
                                    progress=progress)
    else:  # each measurement in a fresh process: this one holds the scorer's state (fresh_timing explains)
        from ..deploy.fresh_timing import measure_fresh

        with tempfile.TemporaryDirectory(prefix="ld-measure.") as tmp:
            paths, provider, threads = _ort_exports(unet, spec, layers, Path(tmp), setting, progress)
            times = measure_fresh({name: (path, spec) for name, path in paths.items()}, repeats=repeats,
                                  calls=calls, threads=threads, provider=provider, progress=progress)
    teacher, student = times["teacher"]["median_ms"], times["student"]["median_ms"]
    measured_ratio = student / teacher
    predicted_ratio = summary["predicted_ratio"]
    return {"teacher": times["teacher"], "student": times["student"], "measured_ratio": round(measured_ratio, 6),
            "predicted_ratio": round(predicted_ratio, 6),
            "prediction_error": round(predicted_ratio / measured_ratio - 1, 6), "repeats": repeats, "calls": calls,
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]}}


def _ort_exports(unet: Any, spec: Any, layers: list[Any], folder: Path, setting: dict[str, Any],
                 progress: Callable[[str], None] | None) -> tuple[dict[str, Path], str, int | None]:
    """Export teacher and student (the teacher with ``layers`` bypassed) once each; their model files, and the
    table setting's ORT provider and intra-op threads."""
    from ..exporters.onnx import OnnxOptions, export
    from ..models.layers import bypassed

    paths = {}
    for name, chosen in (("teacher", []), ("student", layers)):
        if progress:
            progress(f"exporting the {name} to ONNX to measure it")
        (folder / name).mkdir()
        with bypassed(unet, chosen):
            manifest = export(unet, spec, folder / name, source={"spec": name}, options=OnnxOptions())
        paths[name] = folder / name / manifest.model_file
    threads = setting.get("threads")
    threads = threads if isinstance(threads, int) else None
    providers = [p.removesuffix("ExecutionProvider").lower() for p in setting.get("providers", ["cpu"])]
    provider = providers[0] if providers and providers[0] in ("cpu", "cuda", "tensorrt") else "cpu"
    return paths, provider, threads


def latency_text(latency: dict[str, Any] | None) -> str:
    """One line for the prune summary: predicted (and measured) latency of the student against the teacher."""
    if not latency:
        return ""
    text = (f"latency ({latency['setting_text']}): predicted {latency['predicted_ratio']:.3f}x the teacher's "
            f"{latency['teacher_ms']:.1f} ms")
    measured = latency.get("measured")
    if measured:
        text += (f"; measured {measured['measured_ratio']:.3f}x ({measured['student']['median_ms']:.1f} vs "
                 f"{measured['teacher']['median_ms']:.1f} ms, median of {measured['repeats']} interleaved rounds), "
                 f"prediction error {measured['prediction_error']:+.1%}")
    return text
