"""``ExecuTorchRunner``: an ExecuTorch program (``.pte``, e.g. lowered to XNNPACK by ``--target executorch``) in
ExecuTorch's own runtime through its Python API (``executorch.runtime``), behind the Runner interface, so ``verify``
and ``bench`` work on ``.pte`` artifacts unchanged. What runs here is the C++ runtime and the XNNPACK kernels an app
links; the Python layer only hands tensors across.

``intra_op_threads`` resizes ExecuTorch's process-wide thread pool (what XNNPACK uses) for as long as the runner is
entered, and restores the previous size on exit; default: the runtime's own choice. Inputs go in as torch tensors
in the spec's order and dtypes (float32 latents; int32 token ids for an app bundle's text encoder); outputs come
back as float32 numpy arrays keyed by the spec's names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import executorch  # noqa: F401 - the bare package: cheap, and a missing one fails here, naming the extra
import numpy as np

from ..deploy.spec import ExportSpec
from ..exporters.console import quiet
from . import Runner, RunnerError

METHOD = "forward"


class ExecuTorchRunner(Runner):
    """One ``executorch.runtime`` Program over ``path`` (a ``.pte`` file), its ``forward`` method loaded on enter."""

    name = "executorch"

    def __init__(self, path: str | Path, *, spec: ExportSpec, intra_op_threads: int | None = None,
                 **unsupported: Any) -> None:
        super().__init__(spec=spec)
        if unsupported:
            raise RunnerError(f"the executorch runtime takes no {', '.join(sorted(unsupported))} (execution "
                              f"providers are ONNX Runtime's; the .pte's delegates are fixed at export)")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise RunnerError(f"threads {intra_op_threads}: must be at least 1")
        self.path, self.intra_op_threads = Path(path), intra_op_threads
        self._program: Any = None
        self._method: Any = None
        self._saved_threads: int | None = None
        self._first_call = True

    def _load(self) -> None:
        if not self.path.is_file():
            raise RunnerError(f"{self.path}: no such program file")
        # the runtime's import pulls torchao (prints, adds warning filters) and its C++ side logs CPU probing
        with quiet("executorch", python_stderr=True):
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            if self.intra_op_threads:
                self._saved_threads = portable_lib._threadpool_get_thread_count()
                portable_lib._unsafe_reset_threadpool(self.intra_op_threads)
            try:
                self._program = Runtime.get().load_program(self.path)
                self._method = self._program.load_method(METHOD)
            except (RuntimeError, ValueError) as exc:  # the C++ loader's errors arrive as RuntimeError
                self._release()
                raise RunnerError(f"{self.path}: ExecuTorch cannot load it: {_first_line(exc)}") from None
        meta = self._method.metadata
        if (meta.num_inputs(), meta.num_outputs()) != (len(self.spec.inputs), len(self.spec.outputs)):
            counts = (meta.num_inputs(), meta.num_outputs())
            self._release()
            raise RunnerError(f"{self.path}: program takes {counts[0]} inputs and returns {counts[1]} outputs, the "
                              f"manifest's spec {len(self.spec.inputs)} and {len(self.spec.outputs)}")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name], dtype=t.dtype)) for t in self.spec.inputs]
        try:
            if self._first_call:  # XNNPACK probes the CPU on its first run and logs it from C++
                with quiet("executorch"):
                    values = self._method.execute(args)
                self._first_call = False
            else:
                values = self._method.execute(args)
        except RuntimeError as exc:  # wrong shapes beyond the planned bounds, kernel failures
            raise RunnerError(f"{self.path}: ExecuTorch inference failed: {_first_line(exc)}") from None
        return {name: np.array(value.numpy(), dtype=np.float32, copy=True)
                for name, value in zip(self.spec.output_names, values)}

    def _release(self) -> None:
        self._method = self._program = None
        if self._saved_threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(self._saved_threads)
            self._saved_threads = None

    def describe(self) -> dict[str, Any]:
        import importlib.metadata

        return {**super().describe(), "delegate": "XNNPACK (as lowered at export)",
                "intra_op_threads": self.intra_op_threads or "default",
                "executorch": importlib.metadata.version("executorch")}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
