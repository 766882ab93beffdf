"""``CoreMLRunner``: a Core ML ``.mlpackage`` behind the Runner interface, so ``verify`` and ``bench`` work on Core
ML artifacts unchanged. Core ML prediction exists only on macOS: elsewhere :meth:`CoreMLRunner.check_available`
refuses with one line before any model is loaded (exit 2), and coremltools is not even imported.

``compute_units`` (ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY) defaults to ALL, what an app gets by default. Feeds and
outputs are keyed by the ExportSpec's names; outputs come back as numpy arrays in the package's dtypes.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..deploy.spec import ExportSpec
from . import Runner, RunnerError, RuntimeMissing

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


class CoreMLRunner(Runner):
    """One ``coremltools.models.MLModel`` over ``path`` (a ``.mlpackage`` folder), compiled and loaded on enter."""

    name = "coreml"

    def __init__(self, path: str | Path, *, spec: ExportSpec, compute_units: str = "ALL",
                 **unsupported: Any) -> None:
        super().__init__(spec=spec)
        if unsupported:
            raise RunnerError(f"the coreml runtime takes no {', '.join(sorted(unsupported))} (execution providers "
                              f"and threads are ONNX Runtime's; Core ML picks from --compute-units)")
        if compute_units not in COMPUTE_UNITS:
            raise RunnerError(f"compute units '{compute_units}' is not one of {', '.join(COMPUTE_UNITS)}")
        self.path, self.compute_units = Path(path), compute_units
        self._model: Any = None

    @classmethod
    def check_available(cls) -> None:
        """Raise unless this machine can run Core ML predictions: macOS with coremltools installed."""
        if sys.platform != "darwin":
            raise RunnerError(f"Core ML prediction requires macOS (this is {platform.system()}); the artifact "
                              f"converts and inspects here, verify/bench it on a Mac")
        if importlib.util.find_spec("coremltools") is None:
            raise RuntimeMissing("runtime 'coreml' needs the package 'coremltools', which is not installed: "
                                 "pip install 'laptop-deploy[coreml]'")

    def _load(self) -> None:
        self.check_available()
        logging.getLogger("coremltools").setLevel(logging.ERROR)  # version chatter at import: stderr is one line
        import coremltools as ct

        if not (self.path / "Manifest.json").is_file():
            raise RunnerError(f"{self.path}: not an .mlpackage (no Manifest.json)")
        try:
            units = getattr(ct.ComputeUnit, self.compute_units)
            self._model = ct.models.MLModel(str(self.path), compute_units=units)
        except Exception as exc:  # Core ML's compile/load errors come as several types
            raise RunnerError(f"{self.path}: Core ML cannot load it: {_first_line(exc)}") from exc
        description = self._model.get_spec().description
        names = [i.name for i in description.input]
        outputs = [o.name for o in description.output]
        if names != self.spec.input_names or outputs != self.spec.output_names:
            raise RunnerError(f"{self.path}: package has inputs {names} and outputs {outputs}, the manifest's spec "
                              f"{self.spec.input_names} and {self.spec.output_names}")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._model.predict({name: np.asarray(value) for name, value in feeds.items()})
        except Exception as exc:  # coremltools raises plain Exception for prediction errors
            raise RunnerError(f"{self.path}: Core ML prediction failed: {_first_line(exc)}") from exc
        return {name: np.asarray(values[name]) for name in self.spec.output_names}

    def _release(self) -> None:
        self._model = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compute_units": self.compute_units, "macos": platform.mac_ver()[0] or None}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
