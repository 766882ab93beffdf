"""A compress recipe: every setting of one run, from flags and/or a TOML file, checked as a whole before anything runs.

Precedence: built-in defaults < ``--config recipe.toml`` (flat ``key = value`` pairs named like the flags, dashes as
underscores; relative paths are relative to the file) < flags given on the command line. The resolved recipe is
stored in the run folder as ``recipe.toml`` (pass it back with ``--config`` to repeat the run).

:func:`validate` does every check that can fail on bad input — target installed, runtime available, budget reachable
(against the inventory on the meta device), data readable, run folder usable — and raises a one-line
:class:`~laptop_deploy.errors.LaptopDeployError` (exit 2) with nothing written.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError

BUDGET_KINDS = ("params", "macs", "latency")
PATH_KEYS = ("data", "prompts", "out", "cache_dir")
RECIPE_HEADER = "# laptop-deploy compress recipe, resolved (flags > --config file > defaults)"


@dataclass
class Recipe:
    """One run's settings. ``budget`` is ``KIND=R``: remove the fraction R (0 < R < 1) of the teacher's parameters,
    MACs or measured latency. Sizes are latent pixels; ``distill_steps`` 0 skips distillation."""

    model: str = ""
    budget: str = ""
    target: str = "onnx"
    out: Path | None = None
    runtime: str | None = None  # None: the target's default runtime
    precision: str = "fp32"
    pipeline: bool = False
    data: Path | None = None
    prompts: Path | None = None
    seed: int = 0
    latent_size: list[int] | None = None
    # profile (latency budgets) and prune
    profile_repeats: int = 5
    criterion: str = "output-loss"
    granularity: str = "auto"
    calib: int = 8
    calib_batch_size: int = 8
    additivity_sets: int = 10
    # distill
    distill_steps: int = 0
    batch_size: int = 4
    lr: float = 5e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    lambda_feat: float = 1.0
    feature_norm: str = "l2"
    checkpoint_every: int = 100
    eval_samples: int = 8
    device: str | None = None
    cache_dir: Path | None = None
    # export, verify, bench
    exporter: str = "dynamo"
    opset: int = 18
    verify_steps: int = 10
    min_psnr: float | None = None  # verify's PSNR floor in dB (None: verify's own default gate)
    bench_iterations: int = 10
    bench_warmup: int = 2
    bench_repeats: int = 3
    threads: int | None = None
    # report
    grid_prompts: int = 4
    quality_per_prompt: int = 2
    report_steps: int = 20

    @property
    def budget_kind(self) -> str:
        return self.budget.partition("=")[0]

    @property
    def budget_ratio(self) -> float:
        return float(self.budget.partition("=")[2])

    def resolved_runtime(self) -> str:
        from ..runtimes import DEFAULT_RUNTIME

        return self.runtime or DEFAULT_RUNTIME.get(self.target, "ort")

    def as_dict(self) -> dict[str, Any]:
        """Paths absolute: the stored recipe is read back from inside the run folder."""
        return {k: (str(v.absolute()) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def to_toml(self) -> str:
        """The recipe as TOML (unset optional keys left out), readable back by :func:`load_config`."""
        lines = [RECIPE_HEADER]
        for key, value in self.as_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


KEYS = {f.name for f in fields(Recipe)}


def load_config(path: Path) -> dict[str, Any]:
    """``key = value`` pairs of a recipe file; unknown keys and unreadable files are errors (exit 2)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LaptopDeployError(f"--config {path}: cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LaptopDeployError(f"--config {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise LaptopDeployError(f"--config {path}: unknown key '{unknown[0]}'; valid: {', '.join(sorted(KEYS))}")
    for key in PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = str((path.parent / data[key]) if not Path(data[key]).is_absolute() else Path(data[key]))
    return data


def build_recipe(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Recipe:
    """Defaults < file < flags (flags hold only what the user typed). Types are checked here, values later."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    defaults = Recipe()
    values: dict[str, Any] = {}
    for f in fields(Recipe):
        if f.name not in merged:
            continue
        value, default = merged[f.name], getattr(defaults, f.name)
        if f.name in PATH_KEYS:
            value = Path(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise LaptopDeployError(f"recipe key '{f.name}' must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LaptopDeployError(f"recipe key '{f.name}' must be a number, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            raise LaptopDeployError(f"recipe key '{f.name}' must be an integer, got {value!r}")
        values[f.name] = value
    recipe = Recipe(**values)
    for name in ("model", "budget", "out"):
        if not getattr(recipe, name):
            raise LaptopDeployError(f"compress needs --{name} (on the command line or in --config)")
    return recipe


# ----------------------------------------------------------------------------------- what the stages need


def distill_options(r: Recipe) -> Any:
    from ..distill.options import DistillOptions

    return DistillOptions(steps=r.distill_steps, batch_size=r.batch_size, lr=r.lr, lr_schedule=r.lr_schedule,
                          warmup_steps=r.warmup_steps, ema_decay=r.ema_decay, lambda_feat=r.lambda_feat,
                          feature_norm=r.feature_norm, seed=r.seed, checkpoint_every=r.checkpoint_every,
                          eval_samples=r.eval_samples, device=r.device)



# --------------------------------------------------------------------------------------------- validation


@dataclass
class Checked:
    """What validation learnt and the stages reuse: the export options, the runtime, the teacher's sizes."""

    runtime: str
    export_options: Any
    total_params: int
    total_macs: int
    reachable: float
    notes: list[str] = field(default_factory=list)


def _check_numbers(r: Recipe) -> None:
    kind, equals, ratio = r.budget.partition("=")
    if kind not in BUDGET_KINDS or not equals:
        raise LaptopDeployError(f"--budget {r.budget}: expected KIND=R with KIND one of {', '.join(BUDGET_KINDS)}")
    try:
        value = float(ratio)
    except ValueError:
        raise LaptopDeployError(f"--budget {r.budget}: R must be a number (the fraction to remove)") from None
    if not 0 < value < 1 or not math.isfinite(value):
        raise LaptopDeployError(f"--budget {r.budget}: R is the fraction to remove, strictly between 0 and 1")
    counts = {"distill_steps": (r.distill_steps, 0), "verify_steps": (r.verify_steps, 2), "calib": (r.calib, 1),
              "calib_batch_size": (r.calib_batch_size, 1), "additivity_sets": (r.additivity_sets, 0),
              "bench_iterations": (r.bench_iterations, 1), "bench_warmup": (r.bench_warmup, 0),
              "bench_repeats": (r.bench_repeats, 1), "grid_prompts": (r.grid_prompts, 0),
              "quality_per_prompt": (r.quality_per_prompt, 0), "report_steps": (r.report_steps, 2)}
    for key, (value, low) in counts.items():
        if value < low:
            raise LaptopDeployError(f"--{key.replace('_', '-')} must be at least {low}, got {value}")
    if r.data is not None and r.prompts is not None:
        raise LaptopDeployError("give --data or --prompts, not both")
    if r.latent_size is not None and (len(r.latent_size) != 2 or not all(isinstance(v, int) for v in r.latent_size)):
        raise LaptopDeployError(f"latent_size must be two integers [H, W], got {r.latent_size!r}")
    if r.precision not in ("fp32", "fp16"):
        raise LaptopDeployError(f"--precision {r.precision}: expected fp32 or fp16")


def _check_bundle(r: Recipe) -> None:
    """An app bundle's target and precision, checked with the bundle exporter's own rules."""
    if r.pipeline:
        from ..deploy.bundle import BundleOptions

        BundleOptions(target=r.target, precision=r.precision).check()


def _export_options(r: Recipe) -> Any:
    """The target's Options as ``laptop-deploy export`` would build them (its parser's defaults + ours)."""
    from ..cli.main import build_parser
    from ..exporters import get_exporter

    exporter = get_exporter(r.target)
    args = build_parser().parse_args(["export", "--model", r.model, "--target", r.target, "--out", "unused",
                                      "--exporter", r.exporter, "--opset", str(r.opset)])
    options = exporter.Options.from_args(args)
    options.check()
    return options


def _check_data(r: Recipe, source: Any) -> None:
    from ..prune.calibration import read_prompts

    if r.prompts is not None:
        read_prompts(r.prompts)
    if r.data is not None:
        from ..distill.data import read_captions

        if not r.data.is_dir():
            raise LaptopDeployError(f"--data {r.data}: no such folder")
        pairs, _ = read_captions(r.data)
        if not pairs:
            raise LaptopDeployError(f"--data {r.data}: no captioned images (an image with a .txt beside it, or "
                                    f"metadata.jsonl)")
    if r.pipeline and "text_encoder" not in source.available_parts():
        raise LaptopDeployError(f"--pipeline: model '{r.model}' is a bare U-Net; a bundle needs its text encoder, "
                                f"VAE, tokenizer and scheduler (a pipeline folder, toy or random:<preset>)")
    if r.distill_steps > 0:
        if r.data is None and r.prompts is None:
            raise LaptopDeployError(f"--distill-steps {r.distill_steps} needs --data DIR or --prompts FILE "
                                    f"(or --distill-steps 0)")
        if "text_encoder" not in source.available_parts():
            raise LaptopDeployError(f"--distill-steps {r.distill_steps}: model '{r.model}' has no text encoder to "
                                    f"encode captions or prompts; give a pipeline folder, or --distill-steps 0")


def _check_options(r: Recipe) -> None:
    from ..distill.options import DistillOptions
    from ..prune.plan import PruneOptions

    latency = r.budget_kind == "latency"
    if latency:  # the profile stage measures on the run's runtime, which must be one the profiler knows
        from ..deploy.profile import ProfileOptions

        ProfileOptions(runtime=r.resolved_runtime(), precision=r.precision, repeats=r.profile_repeats,
                       threads=r.threads).validate()
    priced = {"runtime": r.resolved_runtime(), "precision": r.precision} if latency else {}
    PruneOptions(ratio=r.budget_ratio, criterion=r.criterion, cost=r.budget_kind, calib=r.calib,
                 batch_size=r.calib_batch_size, granularity=r.granularity, additivity_sets=r.additivity_sets,
                 **priced).validate()
    if r.distill_steps > 0:
        distill_options(r).validate()
    else:
        DistillOptions(steps=1).validate()


def validate(r: Recipe) -> Checked:
    """Every check that can fail on bad input, cheapest first; nothing is written and no weights are loaded."""
    from ..models.inventory import build_inventory
    from ..models.sources import resolve_model
    from ..models.unet_io import check_latent_size
    from ..runtimes import runner_class
    from .stages import check_run_folder

    _check_numbers(r)
    check_run_folder(r.out)
    options = _export_options(r)
    runtime = r.resolved_runtime()
    if runtime == "torch":
        raise LaptopDeployError("--runtime torch runs no exported artifact; give the artifact's runtime (e.g. ort)")
    runner_class(runtime)
    _check_bundle(r)
    _check_options(r)
    source = resolve_model(r.model, materialize=False, seed=r.seed)
    config = source.unet.config
    latent = tuple(r.latent_size) if r.latent_size else (config.sample_size, config.sample_size)
    check_latent_size(config, *latent)
    _check_data(r, source)
    inv = build_inventory(source.unet, granularity=r.granularity, latent_size=latent)
    reachable = 1.0  # latency: known once the profile stage has measured the units (prune checks it then)
    if r.budget_kind in ("params", "macs"):
        total = inv.total_params if r.budget_kind == "params" else inv.total_macs
        prunable = sum(e.layer.params if r.budget_kind == "params" else e.macs for e in inv.prunable)
        reachable = prunable / total
        if r.budget_ratio > reachable:
            raise LaptopDeployError(f"--budget {r.budget} is not reachable: only {reachable:.4f} of the teacher's "
                                    f"{r.budget_kind} lie in prunable layers (granularity {inv.granularity})")
    return Checked(runtime=runtime, export_options=options, total_params=inv.total_params,
                   total_macs=inv.total_macs, reachable=reachable)
