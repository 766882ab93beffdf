"""Calibration that matches deployment: the captions of calibration images, and the sampler's timesteps.

* :func:`image_captions` — when a ``--images`` folder is captioned the way ``distill --data`` reads it (a ``.txt``
  beside each image, or ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``), each calibration latent is
  conditioned on its own caption instead of unrelated prompts.
* :func:`sampler_timesteps` — the timesteps a ``steps``-step run of the source's own sampler calls the U-Net at
  (its scheduler's ``set_timesteps(steps)``; SD-1.5's PNDM "leading" schedule when the source has none). A
  calibration set drawn from this list, stratified over its positions, weights every timestep by how often
  inference visits it instead of uniformly over the 1000 training timesteps.

Kept apart from :mod:`.calibration` so that module stays the one place that draws; both are read-only helpers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LaptopDeployError

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the same list as calibration.IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name (the order calibration reads and cycles them in)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []


def image_captions(folder: Path, count: int) -> list[str] | None:
    """One caption per calibration sample (the images cycled to ``count`` as calibration cycles them), or None
    when any image lacks a caption (then calibration falls back to prompts)."""
    files = image_files(folder)
    if not files:
        return None
    by_name: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        try:
            for line in metadata.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    if isinstance(entry, dict) and isinstance(entry.get("text"), str):
                        by_name[str(entry.get("file_name"))] = entry["text"].strip()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LaptopDeployError(f"--images {metadata}: cannot read its captions ({exc})") from None
    else:
        for path in files:
            caption = path.with_suffix(".txt")
            if caption.is_file():
                by_name[path.name] = caption.read_text(encoding="utf-8", errors="replace").strip()
    if any(not by_name.get(path.name) for path in files):
        return None
    return [by_name[path.name] for path in (files * count)[:count]]


def sampler_timesteps(source: Any, steps: int) -> torch.Tensor:
    """[steps'] int64: the timesteps a ``steps``-step run of the source's sampler evaluates the U-Net at, in
    order (a timestep the sampler visits twice appears twice, e.g. PNDM's repeated first PLMS step)."""
    if steps < 1:
        raise LaptopDeployError(f"--steps must be at least 1, got {steps}")
    if "scheduler" in source.available_parts():
        template = source.part("scheduler")
        scheduler = type(template).from_config(template.config)  # a copy: set_timesteps mutates
    else:
        from diffusers import PNDMScheduler

        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    return torch.as_tensor(scheduler.timesteps).long().clone()


def describe_schedule(source: Any, steps: int) -> str:
    """How the timesteps were chosen, for the plan."""
    name = type(source.part("scheduler")).__name__ if "scheduler" in source.available_parts() else \
        "PNDMScheduler (SD-1.5 default; the source has no scheduler)"
    return f"stratified over the {steps}-step schedule of {name}"
