"""Distillation data: conditioning (and clean latents) prepared once, then drawn per step as a function of the step.

Two sources, both ending in one :class:`DistillData`:

* **an image folder with captions** — a ``.txt`` beside each image, or ``metadata.jsonl`` lines
  ``{"file_name": ..., "text": ...}`` as diffusers' ImageFolder reads them. Images are resized and centre-cropped to
  the latent size × the VAE factor and encoded through the teacher's VAE (posterior mean and standard deviation,
  scaled by the VAE's scaling factor); captions through its text encoder(s). The result is cached on disk under a
  key that covers the files (names, sizes, modification times), the captions, the VAE and text-encoder weights and
  the latent size, so a second run reads one file. An image that cannot be read is skipped and counted, never fatal.
* **data-free** — a prompt file only: each prompt is a sample; its clean latent is drawn x₀ ~ N(0, I) per step.

Drawing is stateless: training consumes an endless stream of sample positions; position p is sample
order_e[p mod N] of epoch e = p div N (a permutation seeded by (seed, e)), and every random number of that position
(timestep, latent posterior sample, noise, empty-prompt coin) comes from a generator seeded by (seed, p). A step's
batch is a pure function of its positions, so a resumed run draws exactly what the uninterrupted run drew with no
data-loader state in the checkpoint, and how a step's samples are split — micro-batches, GPUs — changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..prune.calibration import IMAGE_SUFFIXES, TRAIN_TIMESTEPS, resize_crop, vae_factor
from ..models.conditioning import encode_prompts, has_text_encoders
from ..errors import LaptopDeployError
from ..outputs import as_path
from ..deploy.manifest import digest_tensors

CACHE_VERSION = 1
ENCODE_BATCH = 8


class DataError(LaptopDeployError):
    """A data folder or prompt file that cannot be used for distillation."""


@dataclass
class DistillData:
    """N training samples. ``cond`` holds the U-Net's text conditioning for every sample (``[N, ...]`` tensors in
    its keyword layout), ``uncond`` the same for the empty prompt (``[1, ...]``). ``latent_mean``/``latent_std``
    are the cached VAE posteriors ``[N, C, h, w]``, or None for data-free runs (x₀ ~ N(0, I))."""

    kind: str
    cond: dict[str, Any]
    uncond: dict[str, Any]
    latent_shape: tuple[int, int, int]
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    description: dict[str, Any] = field(default_factory=dict)
    _orders: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.cond["encoder_hidden_states"].shape[0]

    def indices(self, start: int, count: int, *, seed: int) -> torch.Tensor:
        """Sample indices at global positions ``start .. start+count-1`` of the endless epoch-permuted stream."""
        n = len(self)
        out = []
        for position in range(start, start + count):
            epoch = position // n
            if (seed, epoch) not in self._orders:
                if len(self._orders) > 4:
                    self._orders.clear()
                self._orders[(seed, epoch)] = torch.randperm(n, generator=torch.Generator().manual_seed(
                    _mix(seed, "epoch", epoch)))
            out.append(int(self._orders[(seed, epoch)][position % n]))
        return torch.tensor(out, dtype=torch.long)

    def draw(self, *, start: int, batch_size: int, seed: int, alphas_cumprod: torch.Tensor, prediction: str,
             uncond_prob: float = 0.0, stream: str = "train") -> tuple[dict[str, Any], torch.Tensor]:
        """U-Net keyword arguments and the task-loss target for the ``batch_size`` samples at global positions
        ``start`` onwards. Each position draws its own timestep, latent, noise and empty-prompt coin from a
        generator seeded by (seed, stream, position): a batch of 4 equals two micro-batches of 2, on one GPU or
        two."""
        index = self.indices(start, batch_size, seed=seed)
        timesteps, cleans, noises, drops = [], [], [], []
        for offset, sample in enumerate(index.tolist()):
            generator = torch.Generator().manual_seed(_mix(seed, stream, start + offset))
            timesteps.append(torch.randint(0, TRAIN_TIMESTEPS, (1,), generator=generator))
            if self.latent_mean is None:
                cleans.append(torch.randn(self.latent_shape, generator=generator))
            else:
                cleans.append(self.latent_mean[sample] + self.latent_std[sample] * torch.randn(
                    self.latent_shape, generator=generator))
            noises.append(torch.randn(self.latent_shape, generator=generator))
            drops.append(torch.rand(1, generator=generator) < uncond_prob)
        timestep, clean, noise = torch.cat(timesteps), torch.stack(cleans), torch.stack(noises)
        alpha_bar = alphas_cumprod[timestep].view(-1, 1, 1, 1).float()
        sample = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
        target = task_target(prediction, clean=clean, noise=noise, alpha_bar=alpha_bar)
        cond = _select(self.cond, index, self.uncond, torch.cat(drops))
        return {"sample": sample, "timestep": timestep, **cond}, target


def task_target(prediction: str, *, clean: torch.Tensor, noise: torch.Tensor,
                alpha_bar: torch.Tensor) -> torch.Tensor:
    """What a U-Net with the scheduler's ``prediction_type`` should output for ``sample = √ᾱ·clean + √(1−ᾱ)·noise``
    (``alpha_bar`` broadcastable to the latents)."""
    if prediction == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    if prediction == "sample":  # x0-prediction
        return clean
    if prediction == "epsilon":
        return noise
    raise DataError(f"the teacher's scheduler predicts {prediction!r}; distillation knows epsilon, v_prediction "
                    f"and sample")


def _select(cond: dict[str, Any], index: torch.Tensor, uncond: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            out[key] = _select(value, index, uncond[key], drop)
            continue
        picked = value[index].clone()
        if drop.any():
            picked[drop] = uncond[key].to(picked.dtype).expand(int(drop.sum()), *picked.shape[1:])
        out[key] = picked
    return out


def _mix(seed: int, *parts: Any) -> int:
    """A 63-bit generator seed from ``seed`` and a path of labels (independent streams, stable across runs)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def move_to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """U-Net keyword arguments with every tensor on ``device`` (nested ``added_cond_kwargs`` included)."""
    return {k: move_to(v, device) if isinstance(v, dict) else v.to(device) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------- building


def _uncond(source: Any, *, height_px: int, width_px: int) -> dict[str, Any]:
    """The empty prompt's conditioning: encoded "" for SD-1.x/2.x; zeros for SDXL, as its pipeline does for an
    empty negative prompt (``force_zeros_for_empty_prompt``)."""
    empty = encode_prompts(source, [""], height_px=height_px, width_px=width_px)
    if source.family != "sdxl":
        return empty
    added = empty["added_cond_kwargs"]
    return {"encoder_hidden_states": torch.zeros_like(empty["encoder_hidden_states"]),
            "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                  "time_ids": added["time_ids"]}}


def _check_text_encoders(source: Any, what: str) -> None:
    if not has_text_encoders(source):
        raise DataError(f"{what} needs the teacher's text encoder(s), and model '{source.spec}' has none: pass a "
                        f"pipeline folder or a random:<preset> as --teacher")


def _encode_texts(source: Any, texts: Sequence[str], *, height_px: int, width_px: int,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    parts = []
    for start in range(0, len(texts), ENCODE_BATCH):
        parts.append(encode_prompts(source, texts[start:start + ENCODE_BATCH], height_px=height_px,
                                    width_px=width_px))
        if progress is not None:
            progress(min(ENCODE_BATCH, len(texts) - start))
    return _cat(parts)


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: _cat([p[k] for p in parts]) if isinstance(parts[0][k], dict) else torch.cat([p[k] for p in parts])
            for k in parts[0]}


def prompt_data(source: Any, prompts: Sequence[str], *, latent_size: tuple[int, int]) -> DistillData:
    """Data-free distillation: one sample per prompt, x₀ ~ N(0, I) drawn per step."""
    _check_text_encoders(source, "distillation from --prompts")
    factor = vae_factor(source)
    size = {"height_px": latent_size[0] * factor, "width_px": latent_size[1] * factor}
    cond = _encode_texts(source, list(prompts), **size)
    channels = source.unet.config.in_channels
    return DistillData("prompts", cond, _uncond(source, **size), (channels, *latent_size),
                       description={"kind": "prompts", "samples": len(prompts),
                                    "latents": "x0 ~ N(0, I) per step (data-free)"})


def read_captions(folder: Path) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    """(image, caption) pairs of ``folder`` (sorted) and counts of images skipped for want of a caption."""
    if not folder.is_dir():
        raise DataError(f"--data {folder}: no such folder")
    metadata = folder / "metadata.jsonl"
    pairs: list[tuple[Path, str]] = []
    skipped = {"no_caption": 0}
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file_name"], entry.get("text", entry.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{metadata}:{number}: expected a JSON object with 'file_name' and 'text'") from None
            if not isinstance(text, str):
                skipped["no_caption"] += 1
                continue
            pairs.append((folder / name, text))
        return sorted(pairs), skipped
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            pairs.append((image, caption.read_text(encoding="utf-8", errors="replace").strip()))
        else:
            skipped["no_caption"] += 1
    return pairs, skipped


def _cache_key(source: Any, pairs: list[tuple[Path, str]], latent_size: tuple[int, int]) -> str:
    files = []
    for path, text in pairs:
        try:
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns, text])
        except OSError:
            files.append([path.name, None, None, text])
    encoders = [n for n in ("vae", "text_encoder", "text_encoder_2") if n in source.available_parts()]
    key = {"version": CACHE_VERSION, "files": files, "latent_size": list(latent_size), "family": source.family,
           "weights": {n: digest_tensors(hashlib.sha256(), source.part(n)).hexdigest() for n in encoders}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "laptop-deploy" / "distill"


def image_data(source: Any, folder: Path, *, latent_size: tuple[int, int], cache_dir: Path | None = None,
               progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> DistillData:
    """Captioned images of ``folder`` encoded through the teacher's VAE and text encoder(s), cached on disk."""
    folder, cache_dir = as_path(folder, what="--data"), None if cache_dir is None else as_path(cache_dir)
    pairs, skipped = read_captions(folder)
    if not pairs:
        raise DataError(f"--data {folder}: no captioned images ({'/'.join(IMAGE_SUFFIXES)} with a .txt beside "
                        f"each, or metadata.jsonl)")
    _check_text_encoders(source, "distillation from --data")
    if "vae" not in source.available_parts():
        raise DataError(f"--data needs the teacher's VAE to encode images, and model '{source.spec}' has none")
    factor = vae_factor(source)
    size = {"height_px": latent_size[0] * factor, "width_px": latent_size[1] * factor}
    cache = (cache_dir or default_cache_dir()) / f"{_cache_key(source, pairs, latent_size)}.safetensors"
    channels = source.unet.config.in_channels
    if cache.is_file():
        data = _read_cache(cache)
    else:
        data = _encode_folder(source, pairs, size, skipped, progress)
        _write_cache(cache, data)
    data.latent_shape = (channels, *latent_size)
    data.uncond = _uncond(source, **size)
    data.description.update({"folder": str(folder), "cache": str(cache)})
    return data


def _encode_folder(source: Any, pairs: list[tuple[Path, str]], size: dict[str, int], skipped: dict[str, int],
                   progress: Any) -> DistillData:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    vae = source.part("vae")
    pixels, captions, unreadable = [], [], []
    update = progress("reading images", len(pairs)) if progress else None
    for path, caption in pairs:
        try:
            with Image.open(path) as image:
                image = resize_crop(image.convert("RGB"), size["height_px"], size["width_px"])
                pixels.append(np.asarray(image, dtype=np.float32))
            captions.append(caption)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            unreadable.append(path.name)
        if update:
            update(1)
    if not pixels:
        raise DataError(f"--data: none of the {len(pairs)} captioned images could be read "
                        f"(first: {unreadable[0]})")
    means, stds = [], []
    update = progress("encoding latents", len(pixels)) if progress else None
    with torch.no_grad():
        for start in range(0, len(pixels), ENCODE_BATCH):
            batch = torch.from_numpy(np.stack(pixels[start:start + ENCODE_BATCH])).permute(0, 3, 1, 2) / 127.5 - 1
            posterior = vae.encode(batch).latent_dist
            means.append(posterior.mean * vae.config.scaling_factor)
            stds.append(posterior.std * vae.config.scaling_factor)
            if update:
                update(batch.shape[0])
    update = progress("encoding captions", len(captions)) if progress else None
    cond = _encode_texts(source, captions, progress=update, **size)
    description = {"kind": "images", "samples": len(captions), "images_found": len(pairs) + skipped["no_caption"],
                   "skipped_unreadable": len(unreadable), "unreadable": unreadable[:20],
                   "skipped_no_caption": skipped["no_caption"],
                   "latents": "VAE posterior sample per step (mean + std * N(0, I)), scaled"}
    return DistillData("images", cond, {}, (0, 0, 0), torch.cat(means), torch.cat(stds), description)


def _write_cache(path: Path, data: DistillData) -> None:
    from safetensors.torch import save_file

    tensors = {"latent_mean": data.latent_mean, "latent_std": data.latent_std,
               **{f"cond.{k}": v for k, v in _flatten(data.cond).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"description": json.dumps(data.description)})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the data cache {path} ({exc.strerror}); pass --cache-dir") from None


def _read_cache(path: Path) -> DistillData:
    from safetensors import safe_open

    from ..models.weights import read_safetensors

    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        description = json.loads(handle.metadata()["description"])
    cond = _unflatten({k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")})
    description["cached"] = True
    return DistillData("images", cond, {}, (0, 0, 0), tensors["latent_mean"], tensors["latent_std"], description)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree
