"""``verify BUNDLE``: every part against its PyTorch module, then the whole loop against the diffusers pipeline.

1. **Parts**: each part in the app loop's runtime (:class:`.generate.Bundle`: ONNX Runtime, or ExecuTorch's for
   an ``executorch`` bundle) and its PyTorch module (the same wrappers the exporter traced) on
   seeded inputs (token ids for text encoders), judged as ``verify`` judges a U-Net artifact
   (:func:`.verify.parity_rules`): by the calibrated gate (:mod:`.noise_floor`) — the part's error against a
   float64 copy of its module within ``Gate.for_precision(part precision)``'s factor of the floor reference's own
   (PyTorch fp32; PyTorch fp16 for fp16 parts) — unless fixed thresholds are given or the part is int8. A part
   whose module cannot run in fp16 on CPU is judged by its precision's fixed thresholds, and the result says so.
2. **End to end**: for each (prompt, seed) case, initial latents are drawn once with numpy
   (:func:`.generate.initial_latents`) and handed to both :func:`.generate.generate` (torch-free, the app loop) and
   the diffusers PyTorch pipeline (``latents=``), same scheduler config, steps and guidance; the two images
   (float, [0, 1]) are compared by PSNR (peak 1). Below ``min_psnr_db`` (fp32 40 dB, fp16 30 dB) is a failure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle_format import BundleManifest, check_bundle
from .bundle_parts import part_feeds, part_spec
from .generate import Bundle, GenerateOptions, generate, initial_latents
from .noise_floor import copy_as, floor_precision, judge_against_floor, summarize

MIN_PSNR = {"fp32": 40.0, "fp16": 30.0}
DEFAULT_PROMPTS = ("a red circle at the top left", "a photo of a cat")


@dataclass
class BundleVerifyResult:
    """``parts``: {part: parity summary}; ``cases``: one dict per end-to-end case with ``psnr_db``."""

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)
    min_psnr_db: float = 40.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        worst = min((c["psnr_db"] for c in self.cases), default=None)
        return {"passed": self.passed, "parts": self.parts, "cases": self.cases, "worst_psnr_db": worst,
                "min_psnr_db": self.min_psnr_db, "failures": self.failures}


def image_psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR (dB) of two float images in [0, 1] (peak 1), capped at 120 dB for identical images."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2))
    return 120.0 if mse == 0 else min(120.0, 10 * math.log10(1.0 / mse))


def reference_pipeline(manifest: BundleManifest, *, model: str | None = None, scheduler: str | None = None):
    """The diffusers PyTorch pipeline the bundle was exported from (U-Net from ``model`` or the recorded source;
    other parts from its teacher for a student), with the bundle's scheduler config (or ``scheduler``'s class)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from .bundle import resolve_sources

    sources = resolve_sources(model or manifest.source["spec"], seed=int(manifest.source.get("seed", 0)))
    pipe = sources.parts.pipeline(sources.unet.unet.eval())
    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler}
    if scheduler is not None:
        pipe.scheduler = classes[scheduler].from_config(manifest.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sources


@dataclass(frozen=True)
class PartOverrides:
    """``verify``'s fixed thresholds (any given one replaces the calibrated gate for every part, which is still
    measured) and ``--factor`` (the gate's relative-L2 factor). The image floor ``--min-psnr`` is not one of them:
    for a bundle it is the end-to-end check's."""

    max_rel_l2: float | None = None
    atol: float | None = None
    rtol: float | None = None
    factor: float | None = None


def verify_parts(folder: Path, manifest: BundleManifest, sources: Any,
                 overrides: PartOverrides = PartOverrides()) -> dict[str, dict[str, Any]]:
    """Parity of every part against its PyTorch module (see the module docstring): {part: parity summary with
    ``gate`` (floor, artifact error and factor of the worst output, every output's row) and ``judged_by``}."""
    image = manifest.image
    sizes = {"batch": 2, "height": image["height"] // image["vae_scale_factor"],
             "width": image["width"] // image["vae_scale_factor"], "image_height": image["height"],
             "image_width": image["width"]}
    generator = torch.Generator().manual_seed(0)
    runtime = Bundle(folder, manifest, GenerateOptions(prompt="", sequential=True))  # the app loop's runtime
    results: dict[str, dict[str, Any]] = {}
    for name, part in manifest.parts.items():
        feeds = part_feeds(part, sizes, generator)
        module = _part_module(name, part, manifest, sources, sizes)
        names = [o["name"] for o in part["outputs"]]
        out = runtime.run(name, {key: value.numpy() for key, value in feeds.items()})
        runtime.free(name)
        results[name] = judge_part(name, part["precision"], module, feeds, names, out, overrides,
                                   target=manifest.target)
    return results


def judge_part(name: str, precision: str, module: torch.nn.Module, feeds: dict[str, torch.Tensor],
               names: list[str], out: dict[str, np.ndarray], overrides: PartOverrides, *,
               target: str | None = None) -> dict[str, Any]:
    """One part: its runtime's outputs ``out`` against ``module`` (fp32), a float64 copy (the exact function) and the
    floor reference, by :func:`.verify.parity_rules`. Returns the JSON summary (``failures`` include the gate's)."""
    from .fp16_floor import floor_label, fp16_floor_context
    from .verify import Tolerances, compare, parity_rules

    tolerances, gate = parity_rules(precision, max_rel_l2=overrides.max_rel_l2, atol=overrides.atol,
                                    rtol=overrides.rtol, factor=overrides.factor, target=target, unet=module)
    ref = _run_part(module, feeds, torch.float32, names)
    exact = _run_part(copy_as(module, torch.float64), feeds, torch.float64, names)
    floor, reference, note = ref, "torch fp32", None
    if floor_precision(precision) == "fp16":
        reference = floor_label(module)
        try:
            with fp16_floor_context(module):  # full-size parts: fp32 accumulation (PyTorch's CPU fp16: hours)
                floor = _run_part(copy_as(module, torch.float16), feeds, torch.float16, names)
        except (RuntimeError, NotImplementedError) as exc:  # an op without a CPU fp16 kernel
            floor, note = None, f"PyTorch fp16 cannot run {name} on CPU ({str(exc).splitlines()[0][:120]})"
    if floor is None:  # no fp16 floor for this part: fixed thresholds (the given ones, else its precision's)
        tolerances, gate = tolerances or Tolerances.for_precision(precision), None
    judged = "fixed thresholds" if tolerances is not None else "calibrated gate"
    report = compare(ref, out, tolerances=tolerances or Tolerances(None, None), case=name)
    rows = [] if gate is None else judge_against_floor(exact, floor, out, gate=gate, case=name,
                                                        reference=reference)
    enforced = gate is not None and gate.enforced
    summary = report.summary()
    summary["failures"] += [f"{r.output}: {f}" for r in rows for f in r.failures] if enforced else []
    summary["passed"] = not summary["failures"]
    return {**summary, "precision": precision, "judged_by": judged, "note": note,
            "tolerances": None if tolerances is None else asdict(tolerances),
            "gate": None if gate is None else {**asdict(gate), **summarize(rows), "reference": reference,
                                               "rows": [r.as_dict() for r in rows]}}


def _run_part(module: torch.nn.Module, feeds: dict[str, torch.Tensor], dtype: torch.dtype,
              names: list[str]) -> dict[str, np.ndarray]:
    """``module``'s outputs on ``feeds`` (float inputs cast to ``dtype``, token ids kept) as float64 arrays named
    after the ONNX outputs, in order."""
    args = [v.to(dtype) if v.is_floating_point() else v for v in feeds.values()]
    with torch.no_grad():
        outputs = module(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {n: o.double().numpy() for n, o in zip(names, outputs)}


def _part_module(name: str, part: dict[str, Any], manifest: BundleManifest, sources: Any,
                 sizes: dict[str, int]) -> torch.nn.Module:
    """The PyTorch module a part was traced from (the exporter's own wrappers)."""
    from .bundle import _vae_wrapper
    from .bundle_parts import text_encoder_wrapper
    from .spec import wrap_unet

    if name.startswith("text_encoder"):
        return text_encoder_wrapper(sources.parts.part(name).eval(), hidden_states=manifest.unet["sdxl"])
    if name.startswith("vae"):
        return _vae_wrapper(name, sources.parts.part("vae"))
    return wrap_unet(sources.unet.unet.eval(), part_spec(part))


def verify_bundle(folder: Path, *, model: str | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                  seeds: tuple[int, ...] = (0,), steps: int = 10, guidance: float = 4.0,
                  scheduler: str | None = None, min_psnr_db: float | None = None,
                  skip_digest: bool = False, overrides: PartOverrides = PartOverrides()) -> BundleVerifyResult:
    """Parts (``overrides``: fixed thresholds or ``--factor`` for them), then end to end (see the module
    docstring)."""
    manifest = check_bundle(folder, skip_digest=skip_digest)
    pipe, sources = reference_pipeline(manifest, model=model, scheduler=scheduler)
    result = BundleVerifyResult(min_psnr_db=min_psnr_db if min_psnr_db is not None else
                                MIN_PSNR.get(manifest.precision, 40.0))
    result.parts = verify_parts(Path(folder), manifest, sources, overrides)
    result.failures += [f"{name}: {f}" for name, s in result.parts.items() for f in s["failures"]]
    image = manifest.image
    height, width = image["height"], image["width"]
    shape = (1, image["latent_channels"], height // image["vae_scale_factor"], width // image["vae_scale_factor"])
    for prompt in prompts:
        for seed in seeds:
            latents = initial_latents(seed, shape)
            options = GenerateOptions(prompt=prompt, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler,
                                      progress=False)
            ours = generate(folder, options, latents=latents, manifest=manifest).image
            with torch.no_grad():
                ref = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                           latents=torch.from_numpy(latents), output_type="np").images[0]
            psnr = image_psnr(ref, ours)
            result.cases.append({"prompt": prompt, "seed": seed, "psnr_db": round(psnr, 2),
                                 "max_abs": float(np.abs(ref - ours).max())})
            if not psnr >= result.min_psnr_db:
                result.failures.append(f"end to end '{prompt}' seed {seed}: PSNR {psnr:.2f} dB < "
                                       f"{result.min_psnr_db:g} dB")
    return result
