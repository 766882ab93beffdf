"""Runtime runners, imported as ``laptop_deploy.runtimes``: one small class per runtime with one lifecycle
(after Polygraphy's runners)::

    with OrtRunner(path, spec=spec) as runner:      # cheap constructor; the session is created on __enter__
        outputs = runner.infer({"sample": ..., ...}) # dict[str, np.ndarray] -> dict[str, np.ndarray]
    # released on __exit__

``TorchRunner`` is just another runner and is the parity reference. :data:`RUNTIMES` maps names to classes,
imported lazily so a missing optional package only breaks its own runtime.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LaptopDeployError
from ..deploy.spec import ExportSpec

# name -> ("module:Class", the pip extra that provides its package)
RUNTIMES: dict[str, tuple[str, str | None]] = {
    "torch": ("laptop_deploy.runtimes.pytorch:TorchRunner", None),
    "ort": ("laptop_deploy.runtimes.ort:OrtRunner", "onnx"),
    "trt": ("laptop_deploy.runtimes.tensorrt:TensorRTRunner", "trt"),
    "coreml": ("laptop_deploy.runtimes.coreml:CoreMLRunner", "coreml"),
    "executorch": ("laptop_deploy.runtimes.executorch:ExecuTorchRunner", "executorch"),
}
# which runtime loads a target's artifact when --runtime is not given
DEFAULT_RUNTIME = {"onnx": "ort", "ort-mobile": "ort", "trt": "trt", "coreml": "coreml",
                   "executorch": "executorch"}


class RuntimeMissing(LaptopDeployError):
    """A runtime that is unknown, or whose package is not installed."""


class RunnerError(LaptopDeployError):
    """A runner that cannot load its artifact or run it (unreadable or truncated file, unsupported provider)."""


class Runner:
    """Base class: ``__enter__`` loads (timed into ``load_s``), ``infer`` runs, ``__exit__`` releases.

    Subclasses implement ``_load()``, ``_infer(feeds)`` and ``_release()``; ``infer`` checks the feeds against the
    spec first, so every runtime rejects bad inputs with the same message.
    """

    name = "runner"

    def __init__(self, *, spec: ExportSpec) -> None:
        self.spec = spec
        self.load_s: float | None = None
        self.active = False

    def __enter__(self) -> Runner:
        start = time.perf_counter()
        self._load()
        self.load_s = time.perf_counter() - start
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        self._release()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: ``feeds`` keyed by input name, in the spec's dtypes; returns outputs keyed by name."""
        if not self.active:
            raise RunnerError(f"{self.name} runner used outside its `with` block (not loaded)")
        self.spec.check_feeds(feeds)
        return self._infer(feeds)

    def describe(self) -> dict[str, Any]:
        """Runtime name plus what decides its speed (device, provider, threads); extended by subclasses."""
        return {"runtime": self.name}

    @classmethod
    def check_available(cls) -> None:
        """Raise (one line) when this runtime cannot run on this machine at all (e.g. Core ML off macOS); cheap,
        called by :func:`runner_class` before any model is loaded. Default: always available."""

    def _load(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


def open_artifact(folder: Path, *, manifest: Any = None, runtime: str | None = None, **options: Any) -> Runner:
    """A (not yet entered) runner for the artifact in ``folder``: ``runtime`` defaults to the one for the
    manifest's target; ``options`` go to the runner's constructor (e.g. ``providers``, ``intra_op_threads``)."""
    from ..deploy.manifest import read_manifest

    manifest = manifest or read_manifest(folder)
    default = DEFAULT_RUNTIME.get(manifest.target)
    runtime = runtime or default
    if runtime is None or runtime == "torch":
        raise RuntimeMissing(f"runtime '{runtime}' cannot load a '{manifest.target}' artifact; "
                             f"use --runtime {default}" if default else
                             f"no runtime here loads '{manifest.target}' artifacts")
    return runner_class(runtime)(Path(folder) / manifest.model_file, spec=manifest.spec, **options)


def runner_class(name: str) -> type[Runner]:
    """The runner class registered as ``name``; unknown names list the valid ones, a missing package names the
    extra that installs it."""
    if name not in RUNTIMES:
        raise RuntimeMissing(f"unknown runtime '{name}'; valid: {', '.join(RUNTIMES)}")
    path, extra = RUNTIMES[name]
    module, _, cls = path.partition(":")
    try:
        runner = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or str(exc)).split(".")[0]
        hint = f"pip install 'laptop-deploy[{extra}]'" if extra else "reinstall laptop-deploy"
        raise RuntimeMissing(f"runtime '{name}' needs the package '{missing}', which is not installed: "
                             f"{hint}") from None
    runner.check_available()
    return runner
