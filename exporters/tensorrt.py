"""``--target trt``: a TensorRT engine (``model.plan``) built from the U-Net's ONNX export, with ``manifest.json``.

Steps (into the caller's temporary folder; ``laptop-deploy export`` moves it into place at the end):

1. the ONNX graph, by :mod:`.onnx` with the same exporter options: fp16 only for a strongly typed fp16 build (the
   graph carries the precision), fp32 otherwise; kept as ``model.onnx``, the portable source of the engine;
2. the build plan (:mod:`.tensorrt_plan`): profile, typing, flags, workspace, optimisation level, timing cache;
3. the engine, through the TensorRT Python API: ``OnnxParser.parse_from_file``, ``IBuilderConfig`` (memory pool
   limit, ``builder_optimization_level``, ``BuilderFlag.FP16`` or a ``STRONGLY_TYPED`` network, one
   ``IOptimizationProfile`` for dynamic specs, the timing cache), ``build_serialized_network``; then deserialised
   once to check its I/O names and dtypes against the spec;
4. ``manifest.json``: the plan, the equivalent ``polygraphy``/``trtexec`` commands, the TensorRT version, GPU name
   and compute capability the engine is bound to.

The TensorRT API is used directly rather than through polygraphy's loaders: it is the one package a GPU box needs
(polygraphy only for its printed command), the calls are few, and errors come back through our own logger.

``--dry-run`` needs neither TensorRT nor a GPU: steps 1, 2 and 4 only. The folder then holds ``model.onnx``, the
plan and the commands; running either command inside it on a GPU machine writes ``model.plan`` beside the graph,
which the TensorRT runner loads (``manifest.json`` names ``model.onnx`` as the model file until then).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..deploy.manifest import Manifest, describe_files, tool_versions, write_manifest
from ..deploy.spec import ExportSpec
from ..memory import peak_rss_mb
from .onnx import DATA_FILE, MODEL_FILE, OnnxOptions
from .tensorrt_plan import (
    DEFAULT_OPT_LEVEL,
    TIMING_CACHE_FILE,
    BuildPlan,
    TensorRTError,
    collecting_logger,
    commands,
    make_plan,
    require_cuda,
    require_tensorrt,
)


@dataclass(frozen=True)
class TensorRTOptions:
    """``--target trt`` options: the ONNX exporter's, plus the build plan's (see :mod:`.tensorrt_plan`)."""

    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    dry_run: bool = False
    typing: str = "auto"
    cfg: bool = True
    max_images: int | None = None
    min_latent: tuple[int, int] | None = None
    max_latent: tuple[int, int] | None = None
    opt_level: int = DEFAULT_OPT_LEVEL
    workspace_mib: int | None = None
    timing_cache: Path | None = None  # read when it exists; the build's cache is written back to it
    device: int = 0

    @classmethod
    def from_args(cls, args: Any) -> TensorRTOptions:
        """The options of ``laptop-deploy export`` (its "TensorRT (--target trt)" group)."""
        pair = lambda value: tuple(value) if value else None
        return cls(onnx=OnnxOptions.from_args(args), dry_run=args.dry_run, typing=args.trt_typing,
                   cfg=not args.trt_no_cfg, max_images=args.trt_max_images, min_latent=pair(args.trt_min_latent),
                   max_latent=pair(args.trt_max_latent), opt_level=args.trt_opt_level,
                   workspace_mib=args.trt_workspace, timing_cache=args.trt_timing_cache)

    def check(self) -> None:
        """Cheap checks before any model is built: without ``dry_run``, TensorRT and a CUDA device must be here."""
        self.onnx.check()
        if self.timing_cache is not None and self.timing_cache.exists() and not self.timing_cache.is_file():
            raise TensorRTError(f"--trt-timing-cache {self.timing_cache} is not a file")
        if not self.dry_run:
            require_tensorrt()
            require_cuda(self.device)

    def plan(self, spec: ExportSpec, *, weak_available: bool | None = None) -> BuildPlan:
        has_cache = self.timing_cache is not None and self.timing_cache.is_file()
        return make_plan(spec, typing=self.typing, cfg=self.cfg, max_images=self.max_images,
                         min_latent=self.min_latent, max_latent=self.max_latent, opt_level=self.opt_level,
                         workspace_mib=self.workspace_mib, load_timing_cache=has_cache,
                         weak_available=weak_available)


Options = TensorRTOptions  # every exporter module names its options class `Options`


def export(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
           options: TensorRTOptions = TensorRTOptions()) -> Manifest:
    """Export ``unet`` per ``spec`` into the (empty) folder ``out_dir``: ONNX graph, build plan and commands, and
    (unless ``options.dry_run``) the engine; writes the manifest."""
    options.check()
    start = time.perf_counter()
    trt = None if options.dry_run else require_tensorrt()
    weak = None if trt is None else hasattr(trt.BuilderFlag, "FP16")
    plan = options.plan(spec, weak_available=weak)
    io_spec = spec.with_precision(plan.onnx_precision)  # the engine's I/O dtypes are the graph's
    onnx_info = _export_onnx(unet, io_spec, out_dir, source=source, options=options.onnx)
    if plan.load_timing_cache:
        shutil.copyfile(options.timing_cache, out_dir / TIMING_CACHE_FILE)
    info: dict[str, Any] = {"dry_run": options.dry_run, "plan": plan.as_dict(), "commands": commands(plan),
                            "onnx": onnx_info, "options": _describe(options)}
    model_file = MODEL_FILE
    if options.dry_run:
        info["notes"] = dry_run_notes(plan, info["commands"], io_spec, cfg=options.cfg)
    else:
        info["engine"] = build_into(out_dir, plan, io_spec, trt=trt, device=options.device)
        model_file = plan.engine_file
        if options.timing_cache is not None:
            _write_back(out_dir / TIMING_CACHE_FILE, options.timing_cache)
    info.update(seconds=round(time.perf_counter() - start, 2), peak_rss_mb=round(peak_rss_mb(), 1))
    manifest = Manifest(target="trt", precision=spec.precision, model_file=model_file, spec=io_spec, source=source,
                        files=describe_files(out_dir), tools=tool_versions(), export=info)
    write_manifest(out_dir, manifest)
    return manifest


def dry_run_notes(plan: BuildPlan, lines: dict[str, str], spec: ExportSpec, *, cfg: bool = True) -> list[str]:
    """What the CLI prints after a dry run: where the engine comes from, both command lines, and for a static
    spec the shapes the graph fixes (the commands pass none: ``trtexec`` refuses shapes for static models)."""
    head = (f"engine not built (--dry-run): on a machine with an NVIDIA GPU and TensorRT >= 10, run one of these "
            f"inside the artifact folder to write {plan.engine_file} beside {plan.onnx_file} (or run "
            f"`laptop-deploy export --target trt` there):")
    notes = [head, f"  {lines['polygraphy']}", f"  {lines['trtexec']}"]
    if not plan.dynamic:
        shapes = ", ".join(f"{t.name} {'x'.join(map(str, t.shape))}" for t in (*spec.inputs, *spec.outputs))
        notes.append(f"static engine, shapes fixed by the graph: {shapes}; --dynamic builds a min/opt/max profile")
        if cfg and spec.batch % 2:
            notes.append(f"batch {spec.batch}: a pipeline with classifier-free guidance calls the U-Net with "
                         f"batch {2 * spec.batch}; export with --batch {2 * spec.batch} or --dynamic for that")
    return notes


def _export_onnx(unet: nn.Module, spec: ExportSpec, out_dir: Path, *, source: dict[str, Any],
                 options: OnnxOptions) -> dict[str, Any]:
    """The ONNX artifact (through :mod:`.onnx`, checked against ``spec``) moved into ``out_dir``; its export
    info plus the graph's sha256."""
    from . import onnx as onnx_target

    stage = Path(tempfile.mkdtemp(prefix=".onnx.", dir=out_dir))
    try:
        manifest = onnx_target.export(unet, spec, stage, source=source, options=options)
        for name in (MODEL_FILE, DATA_FILE):
            if (stage / name).is_file():
                shutil.move(str(stage / name), out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {**manifest.export, "precision": spec.precision, "sha256": manifest.files[MODEL_FILE]["sha256"]}


def build_into(out_dir: Path, plan: BuildPlan, spec: ExportSpec, *, trt: Any, device: int = 0) -> dict[str, Any]:
    """Build ``plan`` from ``out_dir/model.onnx`` into ``out_dir/model.plan`` (and the timing cache beside it);
    returns what the engine is bound to (TensorRT version, GPU, compute capability) and its size and build time."""
    import torch

    here = require_cuda(device)
    cache_path = out_dir / plan.timing_cache_file
    start = time.perf_counter()
    with torch.cuda.device(device):
        engine, cache = build_engine(out_dir / plan.onnx_file, plan, trt=trt,
                                     timing_cache=cache_path.read_bytes() if cache_path.is_file() else None)
        check_engine_io(engine, spec, trt=trt)
    (out_dir / plan.engine_file).write_bytes(engine)
    cache_path.write_bytes(cache)
    return {"tensorrt": trt.__version__, **here, "bytes": len(engine),
            "build_seconds": round(time.perf_counter() - start, 2)}


def build_engine(onnx_path: Path, plan: BuildPlan, *, trt: Any,
                 timing_cache: bytes | None = None) -> tuple[bytes, bytes]:
    """The serialised engine and the updated timing cache for ``plan``, through the TensorRT API."""
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.typing == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the path: external weights are found beside it
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or logger.errors
        raise TensorRTError(f"TensorRT's ONNX parser rejects {onnx_path.name}: {_first(errors)}")
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.builder_optimization_level
    if plan.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:  # TF32 is on by default: an fp32 engine would compute in 10-bit mantissas
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if plan.dynamic:
        profile = builder.create_optimization_profile()
        try:
            for name, shapes in plan.profile.items():
                profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
        except (RuntimeError, TypeError) as exc:
            raise TensorRTError(f"TensorRT refuses the optimization profile: {_first([str(exc)])}") from None
        if config.add_optimization_profile(profile) < 0:
            raise TensorRTError(f"TensorRT refuses the optimization profile: {_first(logger.errors)}")
    cache = config.create_timing_cache(timing_cache or b"") or config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTError("the timing cache was written by another GPU or TensorRT version; delete it or pass "
                            "another --trt-timing-cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT engine build failed: {_first(logger.errors)}")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def check_engine_io(engine_bytes: bytes, spec: ExportSpec, *, trt: Any) -> None:
    """Deserialise the new engine once and compare its I/O tensor names, modes and dtypes with ``spec``."""
    from ..runtimes.tensorrt import deserialize, engine_io, io_mismatch

    _, engine = deserialize(engine_bytes, trt=trt, label="the new engine")
    problem = io_mismatch(engine_io(engine, trt=trt), spec)
    if problem:
        raise TensorRTError(f"the new engine does not match the spec: {problem}")


def _write_back(cache: Path, target: Path) -> None:
    """Copy the build's timing cache to the user's ``--trt-timing-cache`` file (atomically: builds may share it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    shutil.copyfile(cache, tmp)
    os.replace(tmp, target)


def _describe(options: TensorRTOptions) -> dict[str, Any]:
    data = asdict(options)
    data.pop("onnx")
    data["timing_cache"] = str(options.timing_cache) if options.timing_cache else None
    return data


def _first(errors: list[str]) -> str:
    return errors[0].splitlines()[0][:300] if errors else "no error message (run with --debug)"
