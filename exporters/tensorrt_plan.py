"""The build plan of a TensorRT engine, and every TensorRT check that needs only plain data.

Computed from the :class:`~laptop_deploy.deploy.spec.ExportSpec` and the ``--target trt`` options, with no TensorRT
installed: the optimisation profile (min/opt/max shape of every input), typing and precision flags, workspace
limit, builder optimisation level and timing cache; the equivalent ``polygraphy convert`` and ``trtexec`` command
lines; and the environment checks (is ``tensorrt`` importable, is there a CUDA device, was an engine built by this
TensorRT on this kind of GPU). :mod:`.tensorrt` builds engines from a plan, ``runtimes/tensorrt.py`` runs them.

Profiles. A static spec has one shape per input (min = opt = max) and the commands pass no shapes (``trtexec``
refuses explicit shapes for a static model). A dynamic spec gets one profile over ``batch``, ``height``, ``width``:

    batch   min 1, opt = spec.batch × g, max = max_images × g   (g = 2 with classifier-free guidance: a guided
            pipeline stacks the unconditional and conditional halves into one U-Net call)
    latent  min = opt / 2, opt = the spec's size, max = max(2 × opt, opt + 2 × downsample), multiples of the
            U-Net's downsample factor; ``--trt-min-latent`` / ``--trt-max-latent`` override them

Typing. ``strong`` (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, TensorRT ≥ 10; the only mode of TensorRT 11)
takes every tensor's type from the graph, so fp16 is the fp16 ONNX export with its fp32 block list, exactly the
graph ``verify`` checks under ONNX Runtime. ``weak`` builds from the fp32 graph with ``BuilderFlag.FP16``: TensorRT
picks fp16 per layer where faster, and the engine's inputs and outputs stay float32. ``auto`` is ``strong`` for fp16
and ``weak`` for fp32 (``strong`` where the installed TensorRT has no weak typing).
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LaptopDeployError
from ..deploy.spec import ExportSpec

ENGINE_FILE = "model.plan"
ONNX_FILE = "model.onnx"
TIMING_CACHE_FILE = "timing.cache"
TYPINGS = ("auto", "strong", "weak")
OPT_LEVELS = range(6)  # IBuilderConfig.builder_optimization_level; TensorRT's default is 3
DEFAULT_OPT_LEVEL = 3
INSTALL_HINT = ("pip install 'laptop-deploy[trt]' on a Linux or Windows machine with an NVIDIA GPU and driver "
                "(TensorRT builds and runs engines only on the GPU that will run them)")


class TensorRTError(LaptopDeployError):
    """TensorRT or a CUDA device missing, a plan that cannot be built, an engine this TensorRT/GPU cannot run."""


@dataclass(frozen=True)
class ShapeRange:
    """Min, opt and max shape of one input in an optimisation profile (``IOptimizationProfile.set_shape``)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildPlan:
    """Everything an engine build needs besides the ONNX file: written into ``manifest.json`` under
    ``export.plan``, turned into TensorRT API calls by :mod:`.tensorrt` and into command lines here."""

    precision: str                   # fp32 | fp16: what the engine computes in
    typing: str                      # strong | weak
    onnx_precision: str              # the ONNX graph the engine is built from (fp16 only when strongly typed)
    builder_flags: tuple[str, ...]   # trt.BuilderFlag names, e.g. ("FP16",)
    cleared_flags: tuple[str, ...]   # flags TensorRT sets by default that are cleared: ("TF32",) for fp32 engines
    dynamic: bool
    cfg: bool | None                 # dynamic batch counts two U-Net rows per image (None: static)
    profile: dict[str, ShapeRange]   # every input, in the spec's order
    builder_optimization_level: int = DEFAULT_OPT_LEVEL
    workspace_mib: int | None = None  # MemoryPoolType.WORKSPACE limit; None: TensorRT's default (device memory)
    load_timing_cache: bool = False   # the artifact holds a timing cache to start from
    onnx_file: str = ONNX_FILE
    engine_file: str = ENGINE_FILE
    timing_cache_file: str = TIMING_CACHE_FILE

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["builder_flags"] = list(self.builder_flags)
        data["cleared_flags"] = list(self.cleared_flags)
        data["profile"] = {name: {k: list(v) for k, v in asdict(r).items()} for name, r in self.profile.items()}
        return data


def latent_range(spec: ExportSpec, *, min_latent: tuple[int, int] | None = None,
                 max_latent: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...]:
    """``(min, opt, max)`` latent ``(height, width)`` of a dynamic profile; checked against the downsample
    factor and ordered min ≤ opt ≤ max."""
    step = spec.downsample
    opt = (spec.height, spec.width)
    low = min_latent or tuple(max(step, size // 2 // step * step) for size in opt)
    high = max_latent or tuple(max(2 * size, size + 2 * step) for size in opt)
    for label, sizes in (("--trt-min-latent", low), ("--trt-max-latent", high)):
        bad = [s for s in sizes if s < step or s % step]
        if bad:
            raise TensorRTError(f"{label} {sizes[0]} {sizes[1]}: latent sizes must be positive multiples of "
                                f"{step} (the U-Net's downsample factor)")
    for axis, name in enumerate(("height", "width")):
        if not low[axis] <= opt[axis] <= high[axis]:
            raise TensorRTError(f"latent {name}: min {low[axis]} ≤ opt {opt[axis]} ≤ max {high[axis]} does not "
                                f"hold (opt is --{name} or the U-Net's sample_size)")
    return tuple(low), opt, tuple(high)


def batch_range(spec: ExportSpec, *, cfg: bool = True, max_images: int | None = None) -> tuple[int, int, int]:
    """``(min, opt, max)`` U-Net batch of a dynamic profile: ``spec.batch`` images at opt, ``max_images`` at max
    (default ``spec.batch``), doubled with classifier-free guidance; max is at least 2, the batch ``verify``
    feeds a dynamic artifact."""
    rows = 2 if cfg else 1
    max_images = spec.batch if max_images is None else max_images
    if max_images < spec.batch:
        raise TensorRTError(f"--trt-max-images {max_images} is below --batch {spec.batch} (the profile's opt)")
    return 1, spec.batch * rows, max(2, max_images * rows)


def build_profile(spec: ExportSpec, *, cfg: bool = True, max_images: int | None = None,
                  min_latent: tuple[int, int] | None = None,
                  max_latent: tuple[int, int] | None = None) -> dict[str, ShapeRange]:
    """Shape range of every input of ``spec``: the static shapes (min = opt = max), or the dynamic profile of the
    module docstring. Axis names in the spec (``batch``, ``height``, ``width``) are what varies."""
    if not spec.dynamic:
        return {t.name: ShapeRange(*(tuple(int(d) for d in t.shape),) * 3) for t in spec.inputs}
    batches = batch_range(spec, cfg=cfg, max_images=max_images)
    latents = latent_range(spec, min_latent=min_latent, max_latent=max_latent)
    points = [{"batch": b, "height": hw[0], "width": hw[1]} for b, hw in zip(batches, latents)]
    return {t.name: ShapeRange(*(tuple(p[d] if isinstance(d, str) else d for d in t.shape) for p in points))
            for t in spec.inputs}


def resolve_typing(typing: str, precision: str, *, weak_available: bool | None = None) -> str:
    """``strong`` or ``weak`` for the requested typing; ``weak_available`` is False when the installed TensorRT
    has no ``BuilderFlag.FP16`` (TensorRT 11), None when unknown (a dry run: assume TensorRT 10)."""
    if typing not in TYPINGS:
        raise TensorRTError(f"typing '{typing}' is not one of {', '.join(TYPINGS)}")
    if typing == "auto":
        return "strong" if precision == "fp16" or weak_available is False else "weak"
    if typing == "weak" and weak_available is False:
        raise TensorRTError("--trt-typing weak: the installed TensorRT has no weak typing (no BuilderFlag.FP16); "
                            "use --trt-typing strong (fp16 then comes from the fp16 ONNX graph)")
    return typing


def make_plan(spec: ExportSpec, *, typing: str = "auto", cfg: bool = True, max_images: int | None = None,
              min_latent: tuple[int, int] | None = None, max_latent: tuple[int, int] | None = None,
              opt_level: int = DEFAULT_OPT_LEVEL, workspace_mib: int | None = None,
              load_timing_cache: bool = False, weak_available: bool | None = None) -> BuildPlan:
    """The build plan of ``spec`` (its ``precision`` is what the engine computes in)."""
    if opt_level not in OPT_LEVELS:
        raise TensorRTError(f"--trt-opt-level {opt_level} is not in {OPT_LEVELS.start}..{OPT_LEVELS.stop - 1}")
    if workspace_mib is not None and workspace_mib <= 0:
        raise TensorRTError(f"--trt-workspace {workspace_mib} MiB must be positive")
    resolved = resolve_typing(typing, spec.precision, weak_available=weak_available)
    fp16_graph = resolved == "strong" and spec.precision == "fp16"
    flags = ("FP16",) if resolved == "weak" and spec.precision == "fp16" else ()
    return BuildPlan(precision=spec.precision, typing=resolved, onnx_precision="fp16" if fp16_graph else "fp32",
                     builder_flags=flags, cleared_flags=("TF32",) if spec.precision == "fp32" else (),
                     dynamic=spec.dynamic, cfg=cfg if spec.dynamic else None,
                     profile=build_profile(spec, cfg=cfg, max_images=max_images, min_latent=min_latent,
                                           max_latent=max_latent),
                     builder_optimization_level=opt_level, workspace_mib=workspace_mib,
                     load_timing_cache=load_timing_cache)


def polygraphy_command(plan: BuildPlan) -> list[str]:
    """``polygraphy convert`` arguments that build ``plan.engine_file`` from ``plan.onnx_file`` (run inside the
    artifact folder). Shapes are ``name:[d0,d1,...]``, one argument per input after each flag."""
    args = ["polygraphy", "convert", plan.onnx_file, "--convert-to", "trt", "-o", plan.engine_file]
    args += ["--strongly-typed"] if plan.typing == "strong" else [f"--{f.lower()}" for f in plan.builder_flags]
    args += ["--builder-optimization-level", str(plan.builder_optimization_level)]
    if plan.workspace_mib:
        args += ["--pool-limit", f"workspace:{plan.workspace_mib}M"]
    if plan.load_timing_cache:
        args += ["--load-timing-cache", plan.timing_cache_file]
    args += ["--save-timing-cache", plan.timing_cache_file]
    if plan.dynamic:
        for flag, point in (("--trt-min-shapes", "min"), ("--trt-opt-shapes", "opt"), ("--trt-max-shapes", "max")):
            args += [flag, *(f"{name}:[{','.join(map(str, getattr(r, point)))}]" for name, r in plan.profile.items())]
    return args


def trtexec_command(plan: BuildPlan) -> list[str]:
    """``trtexec`` arguments for the same build. Shapes are ``name:d0xd1x...`` joined by commas; the timing cache
    file is read when present and written back."""
    args = ["trtexec", f"--onnx={plan.onnx_file}", f"--saveEngine={plan.engine_file}"]
    args += ["--stronglyTyped"] if plan.typing == "strong" else [f"--{f.lower()}" for f in plan.builder_flags]
    args += [f"--builderOptimizationLevel={plan.builder_optimization_level}"]
    if "TF32" in plan.cleared_flags:  # trtexec (like the API) enables TF32 by default; polygraphy does not
        args += ["--noTF32"]
    if plan.workspace_mib:
        args += [f"--memPoolSize=workspace:{plan.workspace_mib}M"]  # trtexec reads one unit letter: B, K, M, G
    args += [f"--timingCacheFile={plan.timing_cache_file}"]
    if plan.dynamic:
        for flag, point in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            shapes = ",".join(f"{name}:{'x'.join(map(str, getattr(r, point)))}" for name, r in plan.profile.items())
            args.append(f"{flag}={shapes}")
    return args


def commands(plan: BuildPlan) -> dict[str, str]:
    """Both command lines, shell-quoted (polygraphy's ``[..]`` shapes would otherwise be glob patterns)."""
    return {"polygraphy": shlex.join(polygraphy_command(plan)), "trtexec": shlex.join(trtexec_command(plan))}


def require_tensorrt() -> Any:
    """The ``tensorrt`` module (≥ 10), or a one-line error naming the extra and the GPU it needs."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise TensorRTError(f"TensorRT engines need the package 'tensorrt' (≥ 10), which is not installed: "
                            f"{INSTALL_HINT}; without a GPU, `export --target trt --dry-run` writes the ONNX "
                            f"graph and the build commands") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTError(f"TensorRT {trt.__version__} is installed; the TensorRT target needs ≥ 10 "
                            f"(named-tensor API, strongly typed networks): {INSTALL_HINT}")
    return trt


def require_cuda(device: int = 0) -> dict[str, Any]:
    """The CUDA device TensorRT will build or run on, as plain data (``gpu``, ``compute_capability``, ``cuda``);
    a one-line error when torch sees none (no GPU or driver, or a CPU-only torch build)."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise TensorRTError(f"no CUDA device: TensorRT needs an NVIDIA GPU, and torch {torch.__version__} "
                            f"({build} build) sees none")
    if device >= torch.cuda.device_count():
        raise TensorRTError(f"CUDA device {device} does not exist; this machine has {torch.cuda.device_count()}")
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": [major, minor],
            "cuda": torch.version.cuda}


def check_compatible(built: dict[str, Any], here: dict[str, Any], *, engine: str = "engine") -> None:
    """Refuse an engine TensorRT would not deserialize here: built by another TensorRT release (major.minor.patch)
    or for another compute capability. Both dicts have ``tensorrt``, ``gpu`` and ``compute_capability``. Another
    GPU model of the same compute capability loads (TensorRT only warns); re-build there for its best tactics."""
    def release(version: str) -> tuple[str, ...]:
        return tuple(str(version).split(".")[:3])

    if release(built["tensorrt"]) != release(here["tensorrt"]):
        raise TensorRTError(f"{engine} was built by TensorRT {built['tensorrt']}; this machine has TensorRT "
                            f"{here['tensorrt']}, which cannot load it: rebuild it here (`laptop-deploy export "
                            f"--target trt`) or install TensorRT {'.'.join(release(built['tensorrt']))}")
    if list(built["compute_capability"]) != list(here["compute_capability"]):
        cc = lambda info: ".".join(map(str, info["compute_capability"]))
        raise TensorRTError(f"{engine} was built for {built['gpu']} (compute capability {cc(built)}); this "
                            f"GPU is {here['gpu']} ({cc(here)}), which cannot run it: rebuild it on this GPU")


_LOGGERS: dict[int, Any] = {}


def collecting_logger(trt: Any) -> Any:
    """The process's one ``trt.ILogger``, keeping error messages (``.errors``, emptied on every call) instead of
    printing them: TensorRT reports a failed parse, build or deserialisation only through its logger, and stderr
    must stay one line. One per process because TensorRT keeps the first logger it is given while any builder or
    runtime lives (NVIDIA/TensorRT#1475): a second one would collect nothing."""
    if id(trt) not in _LOGGERS:
        errors = {trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR}

        class Collecting(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in errors:
                    self.errors.append(str(msg).strip())

        _LOGGERS[id(trt)] = Collecting()
    logger = _LOGGERS[id(trt)]
    logger.errors.clear()
    return logger
