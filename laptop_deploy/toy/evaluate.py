"""Generate toy images from a pipeline for (prompt, seed) pairs and grade them with the judge.

The pieces a quality benchmark needs: :func:`eval_pairs` fixes which prompts and seeds are drawn (the same for
every model compared), :func:`generate` runs any toy-compatible diffusers pipeline on them (the teacher's, or the
same pipeline around a student U-Net) and :func:`score` applies the judge. :func:`psnr` compares two image sets
drawn from the same pairs (fidelity of a student to its teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .dataset import Attributes, held_out_prompts, train_prompts
from .judge import Alignment, alignment
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE


@dataclass(frozen=True)
class EvalPair:
    """One image to generate: the prompt's attributes and the seed of its initial noise."""

    attributes: Attributes
    seed: int

    @property
    def prompt(self) -> str:
        return self.attributes.caption


def eval_pairs(*, per_prompt: int, held_out: bool = True, first_seed: int = 0) -> list[EvalPair]:
    """``per_prompt`` seeds for every held-out prompt (24 prompts) or every training prompt (192); seeds
    ``first_seed + k`` for the k-th image of each prompt."""
    prompts = held_out_prompts() if held_out else train_prompts()
    return [EvalPair(a, first_seed + k) for k in range(per_prompt) for a in prompts]


@torch.no_grad()
def generate(pipe, pairs: Sequence[EvalPair], *, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             batch: int = 48) -> np.ndarray:
    """uint8 images [N, 32, 32, 3], one per pair; each image's initial noise comes from its own
    ``torch.Generator().manual_seed(seed)``, so an image does not depend on the batch it was drawn in."""
    images = [np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)]
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        out = pipe([p.prompt for p in chunk], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="np",
                   generator=[torch.Generator().manual_seed(p.seed) for p in chunk])
        images.append(np.clip(np.rint(out.images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(images)


def score(images: np.ndarray, pairs: Sequence[EvalPair]) -> Alignment:
    """The judge's alignment of ``images`` with the prompts of ``pairs``."""
    return alignment(images, [p.attributes for p in pairs])


def psnr(reference: np.ndarray, images: np.ndarray) -> float:
    """Mean over images of the PSNR (dB, peak 255) of ``images`` against ``reference`` (same shape, uint8)."""
    if reference.shape != images.shape:
        raise ValueError(f"PSNR needs equal shapes, got {list(reference.shape)} and {list(images.shape)}")
    diff = reference.astype(np.float64) - images.astype(np.float64)
    mse = np.maximum((diff ** 2).reshape(len(diff), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))
