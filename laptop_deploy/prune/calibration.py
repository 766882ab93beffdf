"""The calibration set: K seeded (noisy latent, timestep, text conditioning) triples every criterion scores on.

What is drawn, in this order, from one ``torch.Generator`` seeded with ``seed`` (so a seed fixes the whole set):

1. timesteps, stratified over the training schedule: tᵢ = ⌊(i + uᵢ)·T/K⌋ with uᵢ ~ U[0, 1), i = 0..K−1, so every
   K-th of [0, T) is covered exactly once (T = 1000 for every SD model); with ``steps``, the same stratified
   positions index the timesteps a ``steps``-step run of the source's sampler visits instead
   (:func:`~laptop_deploy.prune.calib_sources.sampler_timesteps`), so each is weighted as inference weights it;
2. clean latents x₀: VAE-encoded images from ``images`` (resized to the latent size × the VAE factor, centre-cropped,
   scaled by the VAE's scaling factor; cycled if fewer than K), else N(0, I) — SD's scaled latents have roughly unit
   variance;
3. noise ε ~ N(0, I), and the U-Net input x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (the DDPM forward process with the source's
   β schedule, or SD's scaled-linear 0.00085→0.012 when the source has no scheduler);
4. text conditioning: prompts (``prompts``, else :data:`~laptop_deploy.models.conditioning.DEFAULT_PROMPTS`, cycled)
   through the source's text encoder(s) when it has them; otherwise N(0, I) stand-ins of the right shape (plus
   SDXL's pooled text embedding). SDXL's time_ids are (h, w, 0, 0, h, w) in pixels (latent size × the VAE's
   factor; 8 without a VAE).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .calib_sources import describe_schedule, image_captions, sampler_timesteps
from ..models.conditioning import DEFAULT_PROMPTS, encode_prompts, has_text_encoders, seeded_conditioning
from ..errors import LaptopDeployError
from ..outputs import as_path
from ..models.unet_io import check_latent_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAIN_TIMESTEPS = 1000


@dataclass
class CalibrationSet:
    """K U-Net inputs. ``sample`` is [K, C, H, W] (noisy latents), ``timestep`` [K] (int64), ``cond`` the text
    conditioning keyed as the U-Net takes it. ``description`` records what was drawn (for the pruning plan)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    cond: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sample.shape[0]

    def batches(self, batch_size: int, *, device: str | torch.device = "cpu") -> Iterator[dict[str, Any]]:
        """U-Net keyword arguments for consecutive slices of at most ``batch_size`` samples."""
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            yield {"sample": self.sample[part].to(device), "timestep": self.timestep[part].to(device),
                   **_slice_cond(self.cond, part, device)}


def _slice_cond(cond: dict[str, Any], part: slice, device: str | torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cond.items():
        out[key] = _slice_cond(value, part, device) if isinstance(value, dict) else value[part].to(device)
    return out


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LaptopDeployError(f"--prompts {path}: cannot read ({exc})") from None
    if not prompts:
        raise LaptopDeployError(f"--prompts {path}: no prompts (the file has no non-empty line)")
    return prompts


def alphas_cumprod(source: Any) -> torch.Tensor:
    """ᾱ_t of the source's training schedule (SD's scaled-linear 0.00085→0.012 when it has no scheduler)."""
    from diffusers import DDPMScheduler

    if "scheduler" in source.available_parts():
        config = dict(source.part("scheduler").config)
        scheduler = DDPMScheduler(num_train_timesteps=config.get("num_train_timesteps", TRAIN_TIMESTEPS),
                                  beta_start=config.get("beta_start", 0.00085),
                                  beta_end=config.get("beta_end", 0.012),
                                  beta_schedule=config.get("beta_schedule", "scaled_linear"))
    else:
        scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    return scheduler.alphas_cumprod


NO_SCHEDULER = ("the model has no scheduler: SD-1's scaled-linear beta schedule 0.00085 -> 0.012 over 1000 "
                "steps and epsilon prediction are assumed")


def noise_schedule(source: Any) -> str:
    """Where ᾱ_t comes from, for the plan: the source's scheduler config, or :data:`NO_SCHEDULER`."""
    if "scheduler" not in source.available_parts():
        return NO_SCHEDULER
    return f"the model's {type(source.part('scheduler')).__name__} config"


def prediction_type(source: Any) -> str:
    """What the U-Net predicts: ``epsilon`` (SD-1.x, SDXL) or ``v_prediction`` (SD-2.x 768), from its scheduler."""
    if "scheduler" in source.available_parts():
        return source.part("scheduler").config.get("prediction_type", "epsilon")
    return "epsilon"


def vae_factor(source: Any) -> int:
    """Pixels per latent pixel: from the source's VAE when it has one, else SD's 8 (SDXL time_ids are pixels)."""
    if "vae" not in source.available_parts():
        return 8
    return 2 ** (len(source.part("vae").config.block_out_channels) - 1)


def _encode_images(source: Any, folder: Path, count: int, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """[count, C, h, w] scaled VAE latents of the images in ``folder`` (sorted, cycled); also how many were read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if "vae" not in source.available_parts():
        raise LaptopDeployError(f"--images needs a VAE to encode them, and model '{source.spec}' has none")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise LaptopDeployError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    vae = source.part("vae")
    factor = vae_factor(source)
    pixels = []
    for path in (files * count)[:count]:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise LaptopDeployError(f"--images: cannot read {path} ({exc})") from None
        pixels.append(np.asarray(resize_crop(image, size[0] * factor, size[1] * factor), dtype=np.float32))
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(batch).latent_dist.mean * vae.config.scaling_factor
    return latents, len(files)


def resize_crop(image: Any, height: int, width: int) -> Any:
    """``image`` scaled to cover height × width, then centre-cropped to it."""
    scale = max(height / image.height, width / image.width)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))))
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def build_calibration(source: Any, *, count: int = 8, seed: int = 0, prompts: Sequence[str] | None = None,
                      images: Path | None = None, latent_size: tuple[int, int] | None = None,
                      steps: int | None = None) -> CalibrationSet:
    """Draw the calibration set for ``source`` (see the module docstring for exactly what is drawn)."""
    if count < 1:
        raise LaptopDeployError(f"--calib must be at least 1, got {count}")
    images = None if images is None else as_path(images, what="--images")
    if prompts and not has_text_encoders(source):  # as --images without a VAE: never silently N(0, I) instead
        raise LaptopDeployError(f"--prompts needs a text encoder to encode them, and model '{source.spec}' has none")
    config = source.unet.config
    height, width = latent_size or (config.sample_size, config.sample_size)
    check_latent_size(config, height, width)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.rand(count, generator=generator)
    schedule = sampler_timesteps(source, steps) if steps else torch.arange(TRAIN_TIMESTEPS)
    timestep = schedule[((torch.arange(count) + offsets) * len(schedule) / count).floor().long()]
    if images is not None:
        clean, image_count = _encode_images(source, images, count, (height, width))
        latent_origin = f"VAE-encoded images from {images} ({image_count} files, cycled)"
    else:
        clean = torch.randn(count, config.in_channels, height, width, generator=generator)
        latent_origin = "N(0, I) clean latents"
    noise = torch.randn(clean.shape, generator=generator)
    alpha_bar = alphas_cumprod(source)[timestep].view(-1, 1, 1, 1)
    sample = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
    factor = vae_factor(source)
    captions = image_captions(images, count) if images is not None and not prompts else None
    chosen = captions or list(prompts or DEFAULT_PROMPTS)
    cycled = [chosen[i % len(chosen)] for i in range(count)]
    if has_text_encoders(source):
        cond = encode_prompts(source, cycled, height_px=height * factor, width_px=width * factor)
        text_origin = f"{len(chosen)} prompts ({'--prompts' if prompts else 'built-in'}) through the text encoder(s)"
        if captions:
            text_origin = "each image's own caption through the text encoder(s)"
    else:
        cond = seeded_conditioning(config, count, height_px=height * factor, width_px=width * factor,
                                   generator=generator)
        text_origin = "N(0, I) text embeddings (the model has no text encoder)"
    description = {"count": count, "seed": seed, "latent_size": [height, width],
                   "timesteps": timestep.tolist(), "latents": latent_origin,
                   "timestep_schedule": describe_schedule(source, steps) if steps else "stratified over the "
                   f"{TRAIN_TIMESTEPS} training timesteps",
                   "noise": "DDPM forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I)",
                   "text": text_origin, "noise_schedule": noise_schedule(source)}
    return CalibrationSet(sample=sample, timestep=timestep, cond=cond, description=description)
