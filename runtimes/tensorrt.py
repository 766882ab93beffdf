"""``TensorRTRunner``: a TensorRT engine (``model.plan``) behind the Runner interface, on one CUDA device.

Lifecycle (TensorRT ≥ 10, named-tensor API): ``__enter__`` checks TensorRT and the GPU against what the manifest
says the engine was built with, ``trt.Runtime.deserialize_cuda_engine``, one ``IExecutionContext`` and one CUDA
stream; ``infer`` copies the numpy feeds into torch CUDA tensors, ``set_input_shape`` per input (dynamic engines
take any shape inside their profile), allocates outputs from ``get_tensor_shape``, ``set_tensor_address`` for every
I/O tensor, ``execute_async_v3`` on the stream, synchronises and returns numpy arrays; ``__exit__`` frees it all.
Device buffers are torch tensors: torch is already a dependency, so no cuda-python is needed.

``cuda_graph=True`` (static engines only) captures the ``execute_async_v3`` call once into a CUDA graph with fixed
input/output buffers and replays it: less launch overhead per call, same numbers.

A dry-run artifact names ``model.onnx`` as its model file; the runner then loads the ``model.plan`` that the printed
build command writes beside it, and says how to build it when it is missing. ONNX Runtime's TensorRT execution
provider (``--runtime ort --provider tensorrt``) remains an alternative runner for the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporters.tensorrt_plan import (
    ENGINE_FILE,
    TensorRTError,
    check_compatible,
    collecting_logger,
    require_cuda,
    require_tensorrt,
)
from ..deploy.spec import ExportSpec
from . import Runner, RunnerError

# trt.DataType member name -> torch dtype (by name: this module imports without TensorRT)
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool}


class TensorRTRunner(Runner):
    """One engine file on CUDA device ``device``. ``providers`` / ``intra_op_threads`` / ``inter_op_threads`` are
    accepted only to refuse them clearly (``--provider``/``--threads`` configure ONNX Runtime)."""

    name = "trt"

    def __init__(self, path: str | Path, *, spec: ExportSpec, device: int = 0, cuda_graph: bool = False,
                 providers: Any = None, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None) -> None:
        super().__init__(spec=spec)
        if providers is not None or intra_op_threads or inter_op_threads:
            raise RunnerError("--provider and --threads configure ONNX Runtime; the TensorRT runner runs the "
                              "engine on the GPU (use --runtime ort for ONNX Runtime's providers)")
        if cuda_graph and spec.dynamic:
            raise RunnerError("cuda_graph needs a static engine (a CUDA graph replays fixed shapes)")
        self.path, self.device, self.cuda_graph = Path(path), device, cuda_graph
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._built: dict[str, Any] | None = None

    def _load(self) -> None:
        engine_path = engine_file(self.path)
        trt = require_tensorrt()
        here = {"tensorrt": trt.__version__, **require_cuda(self.device)}
        self._built = built_with(self.path.parent)
        if self._built:
            check_compatible(self._built, here, engine=str(engine_path))
        torch_device = torch.device("cuda", self.device)
        with torch.cuda.device(torch_device):
            self._runtime, self._engine = deserialize(engine_path.read_bytes(), trt=trt, label=str(engine_path))
            problem = io_mismatch(engine_io(self._engine, trt=trt), self.spec)
            if problem:
                raise RunnerError(f"{engine_path}: {problem}")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(torch_device)
        self._trt = trt

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            if self.cuda_graph:
                buffers = self._replay(feeds)
            else:  # inputs stay referenced here until the stream has run
                buffers = {**self._bind_inputs(feeds), **self._bind_outputs()}
                self._execute()
            self._stream.synchronize()
            return {name: buffers[name].cpu().numpy() for name in self.spec.output_names}

    def _bind_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.spec.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(f"cuda:{self.device}")
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                raise RunnerError(f"{name} {list(tensor.shape)} is outside the engine's profile: "
                                  f"{profile_text(self._engine, name)}")
            self._context.set_tensor_address(name, tensor.data_ptr())
            tensors[name] = tensor
        return tensors

    def _bind_outputs(self) -> dict[str, torch.Tensor]:
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = TORCH_DTYPES[self._engine.get_tensor_dtype(name).name]
            outputs[name] = torch.empty(shape, dtype=dtype, device=f"cuda:{self.device}")
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RunnerError(f"{self.path}: TensorRT execution failed (execute_async_v3 returned False)")

    def _replay(self, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Static engines: fixed buffers, one warm-up run, then capture once and replay on every call."""
        if self._graph is None:
            self._buffers = self._bind_inputs(feeds)
            self._buffers.update(self._bind_outputs())
            self._execute()  # TensorRT allocates lazily on its first run: not inside the capture
            self._stream.synchronize()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=self._stream):
                self._execute()
        for name in self.spec.input_names:
            self._buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(feeds[name])), non_blocking=False)
        self._graph.replay()
        return self._buffers

    def _release(self) -> None:
        self._graph, self._buffers = None, {}
        self._context = self._engine = self._runtime = self._stream = self._trt = None

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "device": f"cuda:{self.device}", "cuda_graph": self.cuda_graph,
                "engine": str(self.path.with_name(ENGINE_FILE) if self.path.suffix == ".onnx" else self.path)}
        if self._trt is not None:
            info.update(tensorrt=self._trt.__version__, gpu=torch.cuda.get_device_name(self.device))
        if self._built:
            info["built_on"] = self._built.get("gpu")
        return info


def engine_file(path: Path) -> Path:
    """The engine to load: ``path`` itself, or for a dry-run artifact (``model.onnx``) the ``model.plan`` built
    beside it; a one-line error says how to build one."""
    if path.suffix == ".onnx":
        engine = path.with_name(ENGINE_FILE)
        if not engine.is_file():
            raise RunnerError(f"{path.parent} is a TensorRT dry run without an engine: on an NVIDIA GPU run the "
                              f"command under export.commands in its manifest.json there (it writes "
                              f"{ENGINE_FILE}), or `laptop-deploy export --target trt`; --runtime ort runs its "
                              f"ONNX graph")
        return engine
    if not path.is_file():
        raise RunnerError(f"{path}: no such engine file")
    return path


def built_with(folder: Path) -> dict[str, Any] | None:
    """What the manifest in ``folder`` says the engine was built with (TensorRT version, GPU, compute
    capability), or None (an engine built by the printed commands, or no manifest)."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    engine = json.loads(path.read_text()).get("export", {}).get("engine")
    return engine if isinstance(engine, dict) and {"tensorrt", "compute_capability"} <= set(engine) else None


def deserialize(data: bytes, *, trt: Any, label: str) -> tuple[Any, Any]:
    """``(runtime, engine)`` from ``trt.Runtime.deserialize_cuda_engine`` (keep the runtime as long as the
    engine). TensorRT returns None and logs why (another TensorRT version, another GPU, a truncated file): that
    reason becomes the one-line error."""
    logger = collecting_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        reason = logger.errors[0].splitlines()[0][:300] if logger.errors else "no reason given"
        raise TensorRTError(f"{label}: TensorRT {trt.__version__} cannot load this engine ({reason}); engines "
                            f"run only with the TensorRT version and GPU kind that built them: rebuild it here")
    return runtime, engine


def engine_io(engine: Any, *, trt: Any) -> list[tuple[str, str, str]]:
    """``(name, "input"|"output", trt dtype name)`` of every I/O tensor of ``engine``, in its order."""
    rows = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        rows.append((name, mode, engine.get_tensor_dtype(name).name))
    return rows


def io_mismatch(rows: list[tuple[str, str, str]], spec: ExportSpec) -> str | None:
    """Why an engine's I/O (from :func:`engine_io`) differs from ``spec`` — names, direction, dtype — or None."""
    got = {name: (mode, dtype) for name, mode, dtype in rows}
    want = {t.name: ("input", t.dtype) for t in spec.inputs} | {t.name: ("output", t.dtype) for t in spec.outputs}
    if set(got) != set(want):
        return f"engine tensors {sorted(got)}, the spec's {sorted(want)}"
    for name, (mode, dtype) in want.items():
        trt_dtype = got[name][1]
        if got[name][0] != mode or TORCH_DTYPES.get(trt_dtype) != getattr(torch, dtype):
            return f"{name} is an {got[name][0]} of type {trt_dtype} in the engine, an {mode} of {dtype} in the spec"
    return None


def profile_text(engine: Any, name: str) -> str:
    """``min [..], opt [..], max [..]`` of input ``name`` in the engine's profile 0."""
    low, opt, high = engine.get_tensor_profile_shape(name, 0)
    return f"min {list(low)}, opt {list(opt)}, max {list(high)}"
