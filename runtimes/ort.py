"""``OrtRunner``: ONNX Runtime behind the Runner interface, for ``.onnx`` files and ORT-format ``.ort`` files
(what ONNX Runtime Mobile loads).

Providers: ``cpu`` (always), ``cuda`` and ``tensorrt`` when the ``onnxruntime-gpu`` build is installed, ``auto``
(the fastest available: TensorRT, then CUDA, then CPU). ``intra_op_threads`` / ``inter_op_threads`` default to
ONNX Runtime's own choice (one thread per physical core); ``graph_optimization`` is one of ``disable``, ``basic``,
``extended``, ``all`` (default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from ..deploy.spec import ExportSpec
from . import Runner, RunnerError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# What onnxruntime raises for unreadable, truncated or invalid models (none derive from RuntimeError).
ORT_ERRORS = (RuntimeError, _state.Fail, _state.InvalidProtobuf, _state.InvalidGraph, _state.InvalidArgument,
              _state.NoSuchFile, _state.NotImplemented, _state.RuntimeException)


def select_providers(requested: str | Sequence[str] = "cpu",
                     available: Sequence[str] | None = None) -> list[str]:
    """Execution-provider names for ``requested`` (short names above, or ``auto``), CPU always last as fallback.

    A provider missing from this onnxruntime build is an error naming the ones it has.
    """
    available = list(available if available is not None else ort.get_available_providers())
    names = [requested] if isinstance(requested, str) else list(requested)
    if names == ["auto"]:
        names = [n for n in AUTO_ORDER if PROVIDERS[n] in available]
    chosen = []
    for name in names:
        full = PROVIDERS.get(name, name)
        if full not in PROVIDERS.values():
            raise RunnerError(f"unknown provider '{name}'; valid: auto, {', '.join(PROVIDERS)}")
        if full not in available:
            hint = " (install onnxruntime-gpu)" if name in ("cuda", "tensorrt") else ""
            raise RunnerError(f"provider '{name}' is not available in this onnxruntime build{hint}; "
                              f"available: {', '.join(available)}")
        chosen.append(full)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


class OrtRunner(Runner):
    """One ``onnxruntime.InferenceSession`` over ``path`` (``.onnx``, external data beside it, or ``.ort``)."""

    name = "ort"

    def __init__(self, path: str | Path, *, spec: ExportSpec, providers: str | Sequence[str] = "cpu",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization: str = "all", allow_fallback: bool = False) -> None:
        super().__init__(spec=spec)
        self.allow_fallback = allow_fallback
        if graph_optimization not in OPT_LEVELS:
            raise RunnerError(f"graph optimisation '{graph_optimization}' is not one of {', '.join(OPT_LEVELS)}")
        self.path, self.providers = Path(path), providers
        self.intra_op_threads, self.inter_op_threads = intra_op_threads, inter_op_threads
        self.graph_optimization = graph_optimization
        self._session: ort.InferenceSession | None = None

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPT_LEVELS[self.graph_optimization]
        options.log_severity_level = 3  # errors only: warnings would break the one-line stderr contract
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads:
            options.inter_op_num_threads = self.inter_op_threads
        if self.path.suffix == ".ort":
            options.add_session_config_entry("session.load_model_format", "ORT")
        return options

    def _load(self) -> None:
        providers = select_providers(self.providers)
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such model file")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=self.session_options(),
                                                 providers=providers)
        except ORT_ERRORS as exc:
            raise RunnerError(f"{self.path}: onnxruntime cannot load it: {_first_line(exc)}") from None
        self._check_active(providers)
        names = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if names != self.spec.input_names or outputs != self.spec.output_names:
            raise RunnerError(f"{self.path}: graph has inputs {names} and outputs {outputs}, the manifest's spec "
                              f"{self.spec.input_names} and {self.spec.output_names}")

    def _check_active(self, providers: list[str]) -> None:
        """ORT silently drops a provider it cannot create (CUDA without its libraries...) and runs on the CPU; a
        provider asked for by name and not active is an error unless ``allow_fallback`` (``auto`` asks for none)."""
        asked = [] if self.providers == "auto" else [p for p in providers if p != PROVIDERS["cpu"]]
        missing = [p for p in asked if p not in self._session.get_providers()]
        if missing and not self.allow_fallback:
            active = ", ".join(self._session.get_providers())
            self._session = None
            raise RunnerError(f"{self.path}: provider {', '.join(missing)} was asked for but is not active after "
                              f"the session was created (active: {active}); pass --allow-fallback to run anyway")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self.spec.output_names, {k: np.asarray(v) for k, v in feeds.items()})
        except ORT_ERRORS as exc:
            raise RunnerError(f"{self.path}: inference failed: {_first_line(exc)}") from None
        return dict(zip(self.spec.output_names, values))

    def _release(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        used = self._session.get_providers() if self._session is not None else select_providers(self.providers)
        return {**super().describe(), "providers": used, "providers_requested": self.providers,
                "allow_fallback": self.allow_fallback, "graph_optimization": self.graph_optimization,
                "intra_op_threads": self.intra_op_threads or "default",
                "inter_op_threads": self.inter_op_threads or "default", "onnxruntime": ort.__version__}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
