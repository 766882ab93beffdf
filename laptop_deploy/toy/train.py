"""Train the toy teacher from scratch on CPU: ``python -m laptop_deploy.toy.train --out DIR``.

One seed: the dataset is drawn, mapped once to scaled latents (the fixed space-to-depth of
:mod:`laptop_deploy.toy.latent`, nothing to train there), then U-Net + text encoder train jointly: MSE of the
U-Net's target (the scheduler's ``prediction_type``: the clean latent by default, or v, or ε; ``--prediction``) at
uniform timesteps of the linear β schedule, the caption replaced by the empty prompt 10% of the time (for
classifier-free guidance), AdamW with linear warm-up and cosine decay, EMA of the weights (what gets saved).

The output folder is a diffusers pipeline folder (the default sampler's scheduler inside), rewritten at every
``--save-every`` steps, so a stopped run still leaves its latest checkpoint. ``--threads`` defaults to 1 (share the
machine); the committed teacher's command and timing are in ``docs/TOY.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..distill.data import task_target
from ..errors import OutputError
from ..outputs import prepare_output, write_atomically
from .dataset import make_dataset
from .model import SCHEDULE, build_parts, save_teacher


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1] (the pipeline's VAE convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, *, batch: int = 500) -> torch.Tensor:
    """Unscaled latent means [N, 4, 8, 8]."""
    return torch.cat([vae.encode(to_pixels(images[i:i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_denoiser(parts: dict, latents: torch.Tensor, captions: list[str], *, steps: int, batch: int, lr: float,
                   warmup: int, ema_decay: float, drop_prompt: float, generator: torch.Generator,
                   log, checkpoint, low_noise_weight: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Trains parts["unet"] and parts["text_encoder"]; ``checkpoint(step, ema_unet, ema_text)`` saves; returns
    the EMA U-Net and text encoder."""
    from diffusers import DDPMScheduler

    unet, text = parts["unet"].train(), parts["text_encoder"].train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod
    prediction = parts["scheduler"].config.prediction_type
    tokenizer = parts["tokenizer"]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    started = time.time()
    for step in range(1, steps + 1):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0, tokens = latents[index], ids[index].clone()
        tokens[torch.rand(batch, generator=generator) < drop_prompt] = empty[0]
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=text(tokens)[0]).sample
        target = task_target(prediction, clean=x0, noise=noise, alpha_bar=a)
        if low_noise_weight:  # weight 1 + min(SNR, γ): more on low noise levels, where the shapes' edges are decided
            weight = 1 + (a / (1 - a)).view(-1).clamp(max=low_noise_weight)
            loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        else:
            loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scale = min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        optimizer.step()
        _ema_update(ema_unet, unet, min(ema_decay, (1 + step) / (10 + step)))
        _ema_update(ema_text, text, min(ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0 or step == steps:
            log({"phase": "unet", "step": step, "loss": round(loss.item(), 5),
                 "elapsed_s": round(time.time() - started, 1)})
        if checkpoint is not None and (step % checkpoint.every == 0 or step == steps):
            checkpoint(step, ema_unet, ema_text)
    return ema_unet, ema_text


def load_parts(folder: Path) -> dict:
    """The parts of a pipeline folder written by :func:`~laptop_deploy.toy.model.save_teacher`."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .latent import SpaceToDepthVAE

    return {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
            "vae": SpaceToDepthVAE.from_pretrained(folder / "vae").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            "scheduler": DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace an earlier teacher folder of ours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--low-noise-weight", type=float, default=0.0,
                        help="γ: weight each sample's loss by 1 + min(SNR(t), γ) (0: uniform); tuned for the x0 "
                             "target (a v loss already weighs the x0 error by 1 + SNR)")
    parser.add_argument("--prediction", choices=("sample", "v_prediction", "epsilon"),
                        help=f"what the U-Net predicts (default {SCHEDULE['prediction_type']}; with --init, the "
                             f"folder's)")
    parser.add_argument("--init", type=Path, help="continue from the weights of this pipeline folder")
    args = parser.parse_args(argv)
    try:
        args.out = prepare_output(args.out, force=args.force)  # before any work: never into a user's folder
    except OutputError as exc:
        parser.exit(2, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_file = (args.out.parent / f"{args.out.name}.log.jsonl").open("a")

    def log(record: dict) -> None:
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    log({"args": {k: str(v) for k, v in vars(args).items()}})
    started = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    data = make_dataset(args.samples, seed=args.seed)
    if args.init is None:
        parts = build_parts(seed=args.seed, prediction=args.prediction or SCHEDULE["prediction_type"])
    else:
        parts = load_parts(args.init)
        if args.prediction not in (None, parts["scheduler"].config.prediction_type):
            parser.error(f"--init {args.init} predicts {parts['scheduler'].config.prediction_type}, "
                         f"not {args.prediction}")
    latents = encode_latents(parts["vae"], data.images) * parts["vae"].config.scaling_factor
    log({"phase": "latents", "mean": round(latents.mean().item(), 4), "std": round(latents.std().item(), 4)})

    def checkpoint(step: int, ema_unet, ema_text) -> None:
        saving = time.time()
        # each checkpoint replaces the last atomically: a kill mid-save leaves the previous one whole
        write_atomically(args.out, lambda tmp: save_teacher({**parts, "unet": ema_unet, "text_encoder": ema_text},
                                                            tmp), force=True, kind="toy-teacher")
        log({"phase": "checkpoint", "step": step, "elapsed_s": round(time.time() - started, 1),
             "save_s": round(time.time() - saving, 1)})

    checkpoint.every = args.save_every
    unet, text = train_denoiser(parts, latents, data.captions, steps=args.steps, batch=args.batch, lr=args.lr,
                                warmup=200, ema_decay=args.ema, drop_prompt=0.1, generator=generator, log=log,
                                checkpoint=checkpoint, low_noise_weight=args.low_noise_weight)
    if args.steps == 0:
        checkpoint(0, unet, text)
    log({"phase": "done", "elapsed_s": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
