"""Inputs for int8 calibration and for the quality gate, captured from real denoising loops of the model being
exported — the loop :func:`laptop_deploy.deploy.verify.denoise` runs for ``verify``, through the PyTorch fp32 model.

* calibration: every step of one loop per calibration prompt, plus one loop of the empty prompt (the
  unconditional branch classifier-free guidance runs beside every conditional call, whose activations differ);
* held out: a high-, a middle- and a low-noise step of loops on other prompts and seeds, with the fp32 outputs —
  the gate's PSNR is measured there, never on the calibration inputs.

Conditioning comes from the model's text encoder when it has one (a student uses its teacher's pipeline parts,
named in its metadata), else from seeded stand-ins of the right shapes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deploy.spec import ExportSpec
from ..errors import LaptopDeployError
from ..models.conditioning import DEFAULT_PROMPTS, encode_prompts, has_text_encoders, seeded_conditioning

HELD_OUT_SEED = 1000  # held-out loops draw their noise from seeds no calibration loop uses


@dataclass
class Captured:
    """float32 U-Net feeds: ``calibration`` (inputs only) and ``held_out`` (inputs, fp32 outputs)."""

    calibration: list[dict[str, np.ndarray]]
    held_out: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    prompts: list[str]
    held_out_prompts: list[str]
    seconds: float


def read_prompts(value: str) -> list[str]:
    """``--calib-prompts``: a count N (the first N built-in prompts) or a text file, one prompt a line."""
    if value.isdigit():
        count = int(value)
        if count < 1:
            raise LaptopDeployError(f"--calib-prompts {value}: need at least 1 prompt")
        return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(count)]
    path = Path(value)
    if not path.is_file():
        raise LaptopDeployError(f"--calib-prompts {value}: neither a count nor a readable prompt file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise LaptopDeployError(f"--calib-prompts {value}: the file holds no prompt")
    return prompts


def calibration_source(described: dict[str, Any], unet: nn.Module) -> Any:
    """A model source around ``unet`` with the pipeline parts (text encoder, scheduler) of the exported model —
    or of its teacher for a student — resolved on the meta device (no second copy of the weights)."""
    from ..models.sources import resolve_model
    from ..models.student import read_student_meta

    spec = described.get("spec")
    if not spec:
        return None
    source = resolve_model(spec, materialize=False, seed=described.get("seed", 0))
    if source.kind == "student" and not source.available_parts():
        teacher = read_student_meta(source.path).get("teacher", {})
        if teacher.get("spec"):
            try:
                parts = resolve_model(teacher["spec"], materialize=False, seed=teacher.get("seed", 0))
            except LaptopDeployError:  # the teacher moved: fall back to seeded conditioning
                parts = None
            if parts is not None:
                return dataclasses.replace(parts, unet=unet)
    return dataclasses.replace(source, unet=unet)


def _conditioning(source: Any, spec: ExportSpec, prompt: str, seed: int) -> dict[str, np.ndarray]:
    px = (spec.height * 8, spec.width * 8)
    if source is not None and has_text_encoders(source):
        cond = encode_prompts(source, [prompt] * spec.batch, height_px=px[0], width_px=px[1])
    else:
        config = source.unet.config if source is not None else None
        if config is None:
            feeds = spec.with_precision("fp32").example_feeds(seed=seed)
            return {k: v for k, v in feeds.items() if k not in ("sample", "timestep")}
        cond = seeded_conditioning(config, spec.batch, height_px=px[0], width_px=px[1],
                                   generator=torch.Generator().manual_seed(seed))
    flat = {"encoder_hidden_states": cond["encoder_hidden_states"], **(cond.get("added_cond_kwargs") or {})}
    return {k: v.detach().float().numpy() for k, v in flat.items() if k in spec.input_names}


def capture(unet: nn.Module, spec: ExportSpec, *, described: dict[str, Any], prompts: list[str], steps: int,
            held_out: int = 1, seed: int = 0) -> Captured:
    """Run ``len(prompts) + 1`` calibration loops (the last with the empty prompt) and ``held_out`` held-out
    loops of ``steps`` steps at the spec's batch and latent size; about ``(len(prompts) + 1 + held_out) * steps``
    fp32 U-Net calls. Held-out loop k uses prompt ``prompts[(len(prompts) + k) % len(prompts)]`` (the next
    built-in prompt for a count) and seed ``HELD_OUT_SEED + k``."""
    from ..deploy.verify import denoise, make_scheduler
    from ..runtimes.pytorch import TorchRunner

    started = time.perf_counter()
    fp32 = spec.with_precision("fp32")
    source = calibration_source(described, unet)
    calibration: list[dict[str, np.ndarray]] = []
    kept: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    pool = list(DEFAULT_PROMPTS) if all(p in DEFAULT_PROMPTS for p in prompts) else prompts
    others = [pool[(len(prompts) + k) % len(pool)] for k in range(held_out)]
    keep = {0, steps // 2, steps - 1}
    with TorchRunner(unet, spec=fp32) as runner:
        for index, prompt in enumerate([*prompts, ""]):
            cond = _conditioning(source, fp32, prompt, seed + index)
            denoise(runner, fp32, scheduler=make_scheduler(source), cond=cond, steps=steps, seed=seed + index,
                    record=lambda i, case: calibration.append(case.feeds))
        for k, prompt in enumerate(others):
            cond = _conditioning(source, fp32, prompt, HELD_OUT_SEED + k)
            denoise(runner, fp32, scheduler=make_scheduler(source), cond=cond, steps=steps, seed=HELD_OUT_SEED + k,
                    record=lambda i, case: kept.append((case.feeds, case.reference)) if i in keep else None)
    return Captured(calibration, kept, prompts, others, time.perf_counter() - started)
