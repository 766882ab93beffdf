"""Generate toy images from a pipeline for (prompt, seed) pairs and grade them with the judge.

The pieces a quality benchmark needs: :func:`eval_pairs` fixes which prompts and seeds are drawn (the same for
every model compared), :func:`generate` runs any toy-compatible diffusers pipeline on them (the teacher's, or the
same pipeline around a student U-Net) and :func:`score` applies the judge. :func:`psnr` compares two image sets
drawn from the same pairs (fidelity of a student to its teacher). :func:`judge_model` does all of it for one U-Net
(:class:`Judged`, whose ``row`` holds the numbers ``laptop-deploy quality`` and ``benchmarks/bench_quality.py``
report); :func:`wilson` and :func:`mcnemar` say how far a difference in alignment can be trusted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Judged:
    """One model's images of a fixed list of pairs, and the judge's verdict on them."""

    images: np.ndarray
    alignment: Alignment
    params: int
    seconds: float

    def row(self, reference: Judged | None = None) -> dict[str, Any]:
        """The judge's numbers, the Wilson 95% interval of the alignment and, against ``reference`` (the teacher's
        images of the same pairs), the alignment decline in percent and the PSNR; both None without a reference
        (a model compared with itself measures nothing) or, for the decline, when the reference scores 0."""
        row: dict[str, Any] = {**self.alignment.as_dict(),
                               "alignment_95": wilson(self.alignment.score, self.alignment.count),
                               "params": self.params, "decline_pct": None, "psnr_db": None,
                               "generate_s": round(self.seconds, 1)}
        if reference is not None:
            base = reference.alignment.score
            row["decline_pct"] = round(100 * (base - self.alignment.score) / base, 2) if base else None
            row["psnr_db"] = round(psnr(reference.images, self.images), 2)
        return row


def judge_model(teacher, unet: torch.nn.Module, pairs: Sequence[EvalPair], *, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE) -> Judged:
    """Draw ``pairs`` with the pipeline of ``teacher`` (a model source of the toy teacher) around ``unet`` — the
    teacher's own or a student's — and judge the images."""
    pipe = teacher.pipeline(unet.eval())
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    images = generate(pipe, pairs, steps=steps, guidance=guidance)
    return Judged(images, score(images, pairs), sum(p.numel() for p in unet.parameters()),
                  time.perf_counter() - started)


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval [low, high] of a proportion ``p`` observed on ``n`` images (honest at 0 and 1)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mcnemar(a: Alignment, b: Alignment) -> dict[str, Any]:
    """Exact two-sided McNemar test of two models judged on the same pairs: only the images where one matches and
    the other does not count. ``p`` is the chance of a split at least this uneven if both were equally good."""
    if len(a.matches) != len(b.matches):
        raise ValueError(f"paired test needs the same pairs, got {len(a.matches)} and {len(b.matches)} images")
    only_a = sum(x and not y for x, y in zip(a.matches, b.matches))
    only_b = sum(y and not x for x, y in zip(a.matches, b.matches))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_first": only_a, "only_second": only_b, "p": round(p, 4)}
