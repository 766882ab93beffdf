"""The reference app loop: text → image from a bundle, with onnxruntime, numpy, ``tokenizers`` and Pillow only.

What an app embeds, in the order it runs (``--sequential`` loads each part just before it runs and frees it after,
and runs the guidance pair through the U-Net one image at a time, as 4–6 GB phones need; otherwise every part is
loaded first)::

    tokenizer(s)   prompt → input_ids int32 [1, 77] (truncated, padded with the tokenizer's pad id)
    text encoder   SD-1.x/2.x: last_hidden_state; SDXL: penultimate hidden states of both encoders, concatenated,
                   plus text_embeds (pooled, encoder 2) and time_ids [H, W, 0, 0, H, W]
    U-Net × steps  classifier-free guidance: batch [uncond, cond], ε = ε_u + g·(ε_c − ε_u)
    scheduler      numpy (:mod:`.schedulers`) from scheduler/scheduler_config.json
    VAE decoder    latents / scaling_factor → image in [-1, 1] → uint8 RGB

Initial latents are ``numpy.random.default_rng(seed).standard_normal([1, C, h, w], float32)`` times the
scheduler's ``init_noise_sigma`` — the same draw ``verify`` hands to the PyTorch pipeline. This module must never
import torch or diffusers (a test runs it in a subprocess and checks ``sys.modules``) for ONNX and ORT Mobile
bundles; an ``executorch`` bundle's parts run in ExecuTorch's Python runtime, whose bindings take torch tensors (an
app links ExecuTorch's C++ runtime instead).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..memory import PhasePeaks, current_rss_mb
from .bundle_format import BundleError, BundleManifest, check_bundle
from .schedulers import make_scheduler

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
           "tensor(int64)": np.int64}


@dataclass(frozen=True)
class GenerateOptions:
    """One image: ``height``/``width`` in image pixels (default: the bundle's), ``guidance`` ≤ 1 disables CFG."""

    prompt: str
    negative_prompt: str | None = None
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    sequential: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    progress: bool = True
    phase_peaks: bool = False  # reset the process's VmHWM between phases (the CLI: a process of its own)


@dataclass
class GenerateResult:
    """``image``: float32 [H, W, 3] in [0, 1]; ``latency_ms``: total ms per part (load and run separately);
    ``peak_rss_mb``: the process's peak resident memory; ``rss_mb``: resident memory after each stage;
    ``peak_rss_mb_phases`` (with ``phase_peaks``, Linux): the peak within each phase — ``loaded`` (every part,
    all-loaded mode), ``text_encoder``, ``unet.load`` / ``vae_decoder.load`` (``--sequential``), ``unet`` (the
    denoising loop), ``vae_decoder``."""

    image: np.ndarray
    latency_ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_rss_mb_phases: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def uint8(self) -> np.ndarray:
        """The image as uint8 [H, W, 3], rounded as diffusers' ``numpy_to_pil``."""
        return (self.image * 255).round().astype(np.uint8)

    def as_dict(self) -> dict[str, Any]:
        return {**self.settings, "latency_ms": {k: round(v, 2) for k, v in self.latency_ms.items()},
                "calls": self.calls, "rss_mb": self.rss_mb, "peak_rss_mb": round(self.peak_rss_mb, 1),
                **({"peak_rss_mb_phases": self.peak_rss_mb_phases} if self.peak_rss_mb_phases else {})}


def initial_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, 1) float32 latents of ``shape`` from numpy's PCG64 (the draw both ``generate`` and ``verify`` use)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class OrtPart:
    """One part as an ONNX Runtime session: ``run(feeds)`` → outputs by name, feeds cast to the session's input
    dtypes (an fp16 part takes float16), float16 outputs returned as float32."""

    def __init__(self, path: Path, options: GenerateOptions) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if options.threads:
            opts.intra_op_num_threads = options.threads
        if options.sequential:  # the arena would keep a freed part's activations: low peak over speed
            opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), opts, providers=list(options.providers))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {i.name: np.ascontiguousarray(feeds[i.name], dtype=_DTYPES.get(i.type, np.float32))
                 for i in self.session.get_inputs()}
        values = self.session.run(None, typed)
        return {o.name: np.asarray(v, dtype=np.float32) if v.dtype == np.float16 else v
                for o, v in zip(self.session.get_outputs(), values)}

    def close(self) -> None:
        self.session = None


class Bundle:
    """A checked bundle and its parts (:class:`OrtPart`, or :class:`~.bundle_executorch.PtePart` for an
    ``executorch`` bundle), loaded on demand (``load``) and freed (``free``); ``run`` times every call into
    ``latency_ms``."""

    def __init__(self, folder: Path, manifest: BundleManifest, options: GenerateOptions) -> None:
        self.folder, self.manifest, self.options = Path(folder), manifest, options
        self.sessions: dict[str, Any] = {}
        self.latency_ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, key: str, start: float) -> None:
        self.latency_ms[key] = self.latency_ms.get(key, 0.0) + (time.perf_counter() - start) * 1e3
        self.calls[key] = self.calls.get(key, 0) + 1

    def load(self, part: str) -> None:
        if part in self.sessions:
            return
        if part not in self.manifest.parts:
            raise BundleError(f"{self.folder}: the bundle has no part '{part}' (it has "
                              f"{', '.join(self.manifest.parts)})")
        start = time.perf_counter()
        path = self.folder / self.manifest.parts[part]["model_file"]
        if self.manifest.target == "executorch":  # ExecuTorch's Python runtime takes torch tensors: imports torch
            from .bundle_executorch import PtePart

            self.sessions[part] = PtePart(path, self.manifest.parts[part], threads=self.options.threads)
        else:
            self.sessions[part] = OrtPart(path, self.options)
        self._add(f"{part}.load", start)

    def free(self, part: str) -> None:
        session = self.sessions.pop(part, None)
        if session is not None:
            session.close()
        gc.collect()

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name (float32 for float outputs)."""
        self.load(part)
        start = time.perf_counter()
        out = self.sessions[part].run(feeds)
        self._add(part, start)
        return out


class PromptTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, truncated and padded to the encoder's length."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / info["file"]))
        self.tokenizer.enable_truncation(max_length=info["max_length"])
        self.tokenizer.enable_padding(length=info["max_length"], pad_id=info["pad_id"], pad_token=info["pad_token"])

    def __call__(self, text: str) -> np.ndarray:
        return np.asarray([self.tokenizer.encode(text).ids], dtype=np.int32)


def check_size(manifest: BundleManifest, height: int | None, width: int | None) -> tuple[int, int]:
    """Image height and width (pixels) the U-Net accepts: multiples of ``image.multiple_of``, or the bundle's one
    size when ``image.fixed`` (Core ML, ExecuTorch); else exit 2."""
    image = manifest.image
    height, width = height or image["height"], width or image["width"]
    if image.get("fixed") and (height, width) != (image["height"], image["width"]):
        raise BundleError(f"--height {height} --width {width}: this {manifest.target} bundle was exported at one "
                          f"size, {image['height']}x{image['width']} (export it again with --height/--width)")
    step = image["multiple_of"]
    for label, size in (("height", height), ("width", width)):
        if size <= 0 or size % step:
            low = max(step, size // step * step)
            raise BundleError(f"--{label} {size}: this bundle's U-Net takes image sizes that are multiples of "
                              f"{step} (e.g. {low} or {low + step})")
    return height, width


def encode_prompts(bundle: Bundle, options: GenerateOptions, height: int, width: int) -> dict[str, np.ndarray]:
    """The U-Net's conditioning feeds for [uncond, cond] (or [cond] without guidance): encoder_hidden_states,
    and for SDXL text_embeds and time_ids."""
    manifest, folder = bundle.manifest, bundle.folder
    cfg = options.guidance > 1.0
    sdxl = manifest.unet.get("sdxl", False)
    encoders = [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if sdxl else [])
    zero_negative = sdxl and options.negative_prompt is None and manifest.unet.get("force_zeros_for_empty_prompt")
    texts = ([options.negative_prompt or ""] if cfg else []) + [options.prompt]
    hidden: list[list[np.ndarray]] = [[] for _ in texts]
    pooled: list[np.ndarray] = [np.zeros(0)] * len(texts)
    for encoder, tok_name in encoders:
        tokenizer = PromptTokenizer(folder, manifest.tokenizers[tok_name])
        for row, text in enumerate(texts):
            out = bundle.run(encoder, {"input_ids": tokenizer(text)})
            if sdxl:
                states = sorted((k for k in out if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
                hidden[row].append(out[states[-2]])
                pooled[row] = out.get("text_embeds", pooled[row])
            else:
                hidden[row].append(out["last_hidden_state"])
        if options.sequential:
            bundle.free(encoder)
    embeds = [np.concatenate(h, axis=-1) for h in hidden]
    if zero_negative and cfg:
        embeds[0], pooled[0] = np.zeros_like(embeds[0]), np.zeros_like(pooled[1])
    feeds = {"encoder_hidden_states": np.concatenate(embeds, axis=0).astype(np.float32)}
    if sdxl:
        feeds["text_embeds"] = np.concatenate(pooled, axis=0).astype(np.float32)
        feeds["time_ids"] = np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (len(texts), 1))
    return feeds


def generate(folder: Path, options: GenerateOptions, *, latents: np.ndarray | None = None,
             manifest: BundleManifest | None = None, skip_digest: bool = False) -> GenerateResult:
    """Draw one image from the bundle in ``folder``. ``latents``: N(0, 1) initial latents [1, C, h, w] to use
    instead of :func:`initial_latents` (``verify`` passes the ones it hands to PyTorch)."""
    manifest = manifest or check_bundle(folder, skip_digest=skip_digest)
    scheduler = make_scheduler(options.scheduler, manifest.scheduler)
    height, width = check_size(manifest, options.height, options.width)
    if options.steps < 1:
        raise BundleError(f"--steps {options.steps}: need at least 1")
    image = manifest.image
    shape = (1, image["latent_channels"], height // image["vae_scale_factor"], width // image["vae_scale_factor"])
    if latents is None:
        latents = initial_latents(options.seed, shape)
    bundle = Bundle(folder, manifest, options)
    peaks = PhasePeaks(enabled=options.phase_peaks)
    if not options.sequential:
        for part in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
            if part in manifest.parts:
                bundle.load(part)
        peaks.mark("loaded")
    rss: dict[str, float] = {"loaded": round(current_rss_mb(), 1)}
    cond = encode_prompts(bundle, options, height, width)
    rss["text_encoder"] = round(current_rss_mb(), 1)
    peaks.mark("text_encoder")
    if options.sequential:  # load apart from the run, so each has its own peak
        bundle.load("unet")
        peaks.mark("unet.load")
    scheduler.set_timesteps(options.steps)
    x = (latents * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
    cfg = options.guidance > 1.0
    steps = _progress(range(len(scheduler.timesteps)), options.progress)
    for index in steps:
        model_in = scheduler.scale_model_input(np.concatenate([x, x]) if cfg else x, index)
        out = _unet(bundle, model_in, scheduler.timesteps[index], cond, one_by_one=options.sequential)
        if cfg:
            uncond, text = out[:1], out[1:]
            out = uncond + np.float32(options.guidance) * (text - uncond)
        x = scheduler.step(out, index, x)
    rss["unet"] = round(current_rss_mb(), 1)
    peaks.mark("unet")
    if options.sequential:
        bundle.free("unet")
        bundle.load("vae_decoder")
        peaks.mark("vae_decoder.load")
    shift = image.get("shift_factor") or 0.0
    decoded = bundle.run("vae_decoder", {"latent_sample": x / np.float32(image["scaling_factor"]) + np.float32(shift)})
    rss["vae_decoder"] = round(current_rss_mb(), 1)
    peaks.mark("vae_decoder")
    picture = np.clip(decoded["sample"][0].astype(np.float32) / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    settings = {"prompt": options.prompt, "negative_prompt": options.negative_prompt, "steps": options.steps,
                "guidance": options.guidance, "seed": options.seed, "height": height, "width": width,
                "scheduler": options.scheduler or manifest.scheduler.get("_class_name"),
                "sequential": options.sequential, "target": manifest.target, "precision": manifest.precision}
    return GenerateResult(image=picture, latency_ms=bundle.latency_ms, calls=bundle.calls, rss_mb=rss,
                          peak_rss_mb=peaks.peak(), peak_rss_mb_phases=peaks.phases, settings=settings)


def _unet(bundle: Bundle, sample: np.ndarray, timestep: float, cond: dict[str, np.ndarray], *,
          one_by_one: bool) -> np.ndarray:
    """ε for every row of ``sample`` [B, C, h, w] (float32). ``one_by_one`` (``--sequential``) runs the guidance
    pair as B calls of batch 1: the same numbers, and half the activation memory — at 512×512 each attention score
    tensor of SD-1.5's 4096-token layers is 8 heads × 4096² fp32 = 0.5 GiB per image, more than any other buffer."""
    rows = [slice(i, i + 1) for i in range(sample.shape[0])] if one_by_one else [slice(None)]
    outs = []
    for row in rows:
        part = sample[row]
        feeds = {"sample": part, "timestep": np.full(part.shape[0], timestep, np.float32),
                 **{name: value[row] for name, value in cond.items()}}
        outs.append(bundle.run("unet", feeds)["out_sample"].astype(np.float32))
    return np.concatenate(outs) if len(outs) > 1 else outs[0]


def _progress(items: range, show: bool):
    """tqdm on stderr, one tick per denoising step (tqdm is pure Python: no torch)."""
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="denoising", unit="step", file=sys.stderr, leave=False)


def save_png(result: GenerateResult, path: Path) -> Path:
    """Write the image as PNG (Pillow)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.uint8()).save(path, format="PNG")
    return path
