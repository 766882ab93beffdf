"""``laptop-deploy profile``: time one U-Net step per prunable unit and per op type, on the runtime that will run
it, and write a :mod:`latency_table <laptop_deploy.deploy.latency_table>`.

How a unit is timed, so that the time agrees with what removing it saves:

* **torch** — forward pre/post hooks on exactly the modules :class:`~laptop_deploy.models.layers.Removed`
  replaces (the same ``discover_layers`` names), wall-clock around each call (the device is synchronised on CUDA).
  What removal leaves behind (an up-block ResNet's ``cat`` lives in its parent; ``Removed`` keeps a slice) is
  outside the timed module in both cases.
* **ort** — one profiled session of the exported graph (:mod:`.ort_profile`): kernel times summed per module path.

Either way the prediction for a student is ``step − Σ removed units`` and it is *checked*:
:func:`measure_interleaved` times the teacher and students in one interleaved run (``prune --cost latency`` reports the error; the benchmark
``benchmarks/bench_latency.py`` measures it for every student).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LaptopDeployError
from .latency_table import LatencyTable, UnitTime
from .ort_profile import node_scopes, op_category, read_profile

RUNTIMES = ("torch", "ort")


@dataclass(frozen=True)
class ProfileOptions:
    """What to profile on: ``latent_size`` (H, W) in latent pixels (None: the config's), ``batch`` images per call
    (classifier-free guidance doubles it), ``repeats`` timed calls after ``warmup`` untimed ones."""

    runtime: str = "ort"
    precision: str = "fp32"
    latent_size: tuple[int, int] | None = None
    batch: int = 1
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    providers: str = "cpu"

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise LaptopDeployError(f"profile --runtime {self.runtime}: valid: {', '.join(RUNTIMES)} (an artifact "
                                    f"profiles with its own runtime)")
        if self.precision not in ("fp32", "fp16"):
            raise LaptopDeployError(f"--precision must be fp32 or fp16, got {self.precision}")
        if self.runtime == "torch" and self.precision == "fp16":
            raise LaptopDeployError("--precision fp16 in torch needs a GPU; profile an fp16 ONNX export instead")
        if self.batch < 1 or self.repeats < 3 or self.warmup < 0:
            raise LaptopDeployError(f"--batch must be ≥ 1, --repeats ≥ 3 and --warmup ≥ 0 (got {self.batch}, "
                                    f"{self.repeats}, {self.warmup})")


def profile_torch(unet: nn.Module, spec: Any, *, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Per timed call: ``run_ms``, ``units`` {name: inclusive ms}, ``ops`` {category: ms}. Hooks sit on every
    ``discover_layers`` module; the op breakdown comes from one extra call under ``torch.profiler``."""
    from ..models.layers import discover_layers
    from .spec import torch_inputs, wrap_unet

    layers, _ = discover_layers(unet)
    wrapper = wrap_unet(unet, spec)
    args = torch_inputs(spec, spec.example_feeds(seed=0))
    current: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    sync = torch.cuda.synchronize if next(unet.parameters()).is_cuda else (lambda: None)

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            sync()
            starts[name] = time.perf_counter()
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            sync()
            current[name] += (time.perf_counter() - starts.pop(name)) * 1e3
        return hook

    handles = []
    for layer in layers:
        module = unet.get_submodule(layer.name)
        handles += [module.register_forward_pre_hook(pre(layer.name)), module.register_forward_hook(post(layer.name))]
    runs = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                current.clear()
                start = time.perf_counter()
                wrapper(*args)
                sync()
                if i >= warmup:
                    runs.append({"run_ms": (time.perf_counter() - start) * 1e3, "units": dict(current)})
            ops = _torch_ops(wrapper, args)
    finally:
        for handle in handles:
            handle.remove()
    for run in runs:
        run["ops"] = ops
    return runs


def _torch_ops(wrapper: nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Self time per op category of one call under ``torch.profiler`` (aten ops), in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wrapper(*args)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ops[op_category(event.key)] += event.self_cpu_time_total / 1e3
    return dict(ops)


def profile_onnx(path: Path, spec: Any, *, repeats: int, warmup: int, providers: str = "cpu",
                 threads: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per timed call of one profiled ONNX Runtime session (see :mod:`.ort_profile`), and the runner's
    description (providers actually used, threads)."""
    by_node, by_tensor = node_scopes(path)
    units = sorted({p for paths in by_node.values() for p in paths})
    with tempfile.TemporaryDirectory(prefix="ld-profile.") as tmp:
        runner = _profiling_ort_runner()(path, spec=spec, providers=providers, intra_op_threads=threads,
                                     prefix=str(Path(tmp) / "ort"))
        feeds = spec.example_feeds(seed=0)
        with runner:
            for _ in range(warmup + repeats):
                runner.infer(feeds)
            info = runner.describe()
            trace = runner.end_profiling()
        data = read_profile(Path(trace), by_node=by_node, by_tensor=by_tensor, units=units, skip_runs=warmup)
    info["inferred_ms_median"] = statistics.median(r["inferred_ms"] for r in data["runs"])
    return data["runs"], info


def _profiling_ort_runner() -> type:
    """The class below, made on first use (onnxruntime is imported only when an ort profile runs)."""
    from ..runtimes.ort import OrtRunner

    class ProfilingOrtRunner(OrtRunner):
        """An :class:`OrtRunner` whose session writes ONNX Runtime's profile (kernel events) under ``prefix``."""

        def __init__(self, *args: Any, prefix: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.prefix = prefix

        def session_options(self):  # noqa: ANN201 - onnxruntime.SessionOptions
            options = super().session_options()
            options.enable_profiling = True
            options.profile_file_prefix = self.prefix
            return options

        def end_profiling(self) -> str:
            return self._session.end_profiling()

    return ProfilingOrtRunner


def summarise(runs: list[dict[str, Any]], *, unet: nn.Module, latent_size: tuple[int, int]) -> dict[str, Any]:
    """Median / min / max over runs of the step and of every unit, plus units with params and MACs (batch 1)."""
    from ..models.inventory import count_macs
    from ..models.layers import discover_layers

    layers, removed = discover_layers(unet)
    macs = count_macs(unet, height=latent_size[0], width=latent_size[1])
    step = [r["run_ms"] for r in runs]
    median_step = statistics.median(step)
    # A unit's time is its median *share* of each run (of the kernel time in ort, of the call in torch) times the
    # median step: on a shared machine preemption lands on random kernels, and per-unit medians of raw ms would
    # filter it out of every unit while the step keeps it, biasing "step − Σ removed" towards the teacher.
    bases = [r.get("kernel_ms") or r["run_ms"] for r in runs]
    units = []
    for layer in layers:
        shares = [r["units"].get(layer.name, 0.0) / base for r, base in zip(runs, bases)]
        units.append(UnitTime(name=layer.name, kind=layer.kind, stage=layer.stage, prunable=layer.prunable,
                              params=layer.params, macs=macs.get(layer.name, 0),
                              ms=round(statistics.median(shares) * median_step, 4),
                              ms_min=round(min(shares) * median_step, 4), ms_max=round(max(shares) * median_step, 4),
                              parent=layer.parent))
    categories = {k: round(statistics.median(r["ops"].get(k, 0.0) / base for r, base in zip(runs, bases))
                           * median_step, 4) for k in ("conv", "matmul/attention", "norm", "elementwise", "other")}
    return {"step_ms": {"median": round(statistics.median(step), 4), "min": round(min(step), 4),
                        "max": round(max(step), 4), "runs": [round(s, 4) for s in step]},
            "units": units, "op_types": categories, "removed": removed,
            "params": sum(p.numel() for p in unet.parameters()), "macs": macs[""]}


def make_table(runs: list[dict[str, Any]], *, unet: nn.Module, model: dict[str, Any], setting: dict[str, Any],
               method: str, load_before: tuple[float, ...], extra: dict[str, Any] | None = None) -> LatencyTable:
    """A :class:`LatencyTable` from per-run measurements (``profile_torch`` / ``profile_onnx``)."""
    from .bench import environment

    summary = summarise(runs, unet=unet, latent_size=tuple(setting["latent_size"]))
    machine = {**environment(), "load_average": {"before": [round(x, 2) for x in load_before],
                                                 "after": [round(x, 2) for x in os.getloadavg()]}}
    model = {**model, "params": summary["params"], "macs": summary["macs"], "removed": summary["removed"]}
    return LatencyTable(model=model, setting=setting, method=method, step_ms=summary["step_ms"],
                        units=summary["units"], op_types=summary["op_types"], machine=machine, extra=extra or {})


def profile_unet(unet: nn.Module, *, model: dict[str, Any], options: ProfileOptions,
                 progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Profile ``unet`` (weights loaded, on CPU) in ``options.runtime``; ort exports it once to a temporary
    folder (the dynamo exporter) and profiles that graph — no per-unit export."""
    from .spec import build_spec

    options.validate()
    say = progress or (lambda _: None)
    h, w = options.latent_size or (unet.config.sample_size, unet.config.sample_size)
    spec = build_spec(unet.config, batch=options.batch, height=h, width=w, precision=options.precision)
    setting = {"runtime": options.runtime, "precision": options.precision, "latent_size": [h, w],
               "batch": options.batch, "threads": options.threads or "default", "providers": [options.providers],
               "repeats": options.repeats, "warmup": options.warmup}
    load = os.getloadavg()
    if options.runtime == "torch":
        if options.threads:
            raise LaptopDeployError("--threads applies to ort; torch uses torch.get_num_threads() "
                                    "(set OMP_NUM_THREADS)")
        say(f"profiling {options.repeats} calls in torch")
        start = time.perf_counter()
        runs = profile_torch(unet, spec, repeats=options.repeats, warmup=options.warmup)
        setting.update(threads=torch.get_num_threads(), providers=["torch-cpu"])
        return make_table(runs, unet=unet, model=model, setting=setting, load_before=load,
                          method="torch forward hooks on the units Removed replaces (inclusive wall-clock share of "
                                 "each call x the median step)",
                          extra={"profile_s": round(time.perf_counter() - start, 2)})
    from ..exporters.onnx import OnnxOptions, export

    with tempfile.TemporaryDirectory(prefix="ld-profile-export.") as tmp:
        say("exporting to ONNX (dynamo) for profiling")
        start = time.perf_counter()
        manifest = export(unet, spec, Path(tmp), source=model, options=OnnxOptions())
        export_s = time.perf_counter() - start
        say(f"profiling {options.repeats} calls in onnxruntime")
        table = profile_artifact_file(Path(tmp) / manifest.model_file, spec, unet=unet, model=model,
                                      options=options, setting=setting, load_before=load)
    table.extra["export_s"] = round(export_s, 2)
    return table


def profile_artifact_file(path: Path, spec: Any, *, unet: nn.Module, model: dict[str, Any], options: ProfileOptions,
                          setting: dict[str, Any], load_before: tuple[float, ...]) -> LatencyTable:
    """Profile the ONNX file ``path`` (spec from its manifest) with ONNX Runtime; ``unet`` (meta is fine) names
    the units and counts params and MACs."""
    start = time.perf_counter()
    runs, info = profile_onnx(path, spec, repeats=options.repeats, warmup=options.warmup,
                              providers=options.providers, threads=options.threads)
    setting = {**setting, "providers": info["providers"], "threads": info["intra_op_threads"],
               "graph_optimization": info["graph_optimization"]}
    return make_table(runs, unet=unet, model=model, setting=setting, load_before=load_before,
                      method="onnxruntime profiler: kernel times summed per module path (exporter name scopes), "
                             "share of each run's kernel time x the median step",
                      extra={"profile_s": round(time.perf_counter() - start, 2),
                             "inferred_ms_median": round(info["inferred_ms_median"], 4)})


def measure_interleaved(variants: Mapping[str, Callable[[], AbstractContextManager[Any]]], feeds: Mapping[str, Any],
                        *, repeats: int = 3, calls: int = 1, warmup: int = 1,
                        progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time ``variants`` interleaved (A B C A B C ...): per round, each variant's context is entered (a loaded
    runner), ``warmup`` untimed calls, then ``calls`` timed calls (their median is the round's time), exited.

    Returns {name: {"median_ms", "min_ms", "max_ms", "rounds_ms"}} — median and range over ``repeats`` rounds."""
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, make in variants.items():
            if progress:
                progress(f"round {r + 1}/{repeats}: {name}")
            with make() as runner:
                cast = runner.spec.cast_feeds(feeds)
                for _ in range(warmup):
                    runner.infer(cast)
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    runner.infer(cast)
                    times.append((time.perf_counter() - start) * 1e3)
            rounds[name].append(float(np.median(times)))
    return {name: {"median_ms": round(statistics.median(v), 4), "min_ms": round(min(v), 4),
                   "max_ms": round(max(v), 4), "rounds_ms": [round(x, 4) for x in v]} for name, v in rounds.items()}


def predicted_ms(table: LatencyTable, removed: list[str]) -> float:
    """The table's prediction for the student without ``removed``: step − Σ their (inclusive) unit times."""
    return table.step - sum(table.unit(name).ms for name in removed if table.unit(name) is not None)
