"""Generate toy images from a pipeline for (prompt, seed) pairs and grade them with the judge.

The pieces a quality benchmark needs: :func:`eval_pairs` fixes which prompts and seeds are drawn (the same for
every model compared), :func:`generate` runs any toy-compatible diffusers pipeline on them (the teacher's, or the
same pipeline around a student U-Net) and :func:`score` applies the judge. :func:`psnr` compares two image sets
drawn from the same pairs (fidelity of a student to its teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
import time
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


def compare(reference: Alignment, reference_images: np.ndarray, images: np.ndarray,
            pairs: Sequence[EvalPair]) -> dict[str, float | int | None]:
    """The judge's verdict on ``images`` plus, against the reference model's images of the same ``pairs``, the
    alignment decline in percent (``(ref − this) / ref``; None when the reference scores 0) and the PSNR."""
    judged = score(images, pairs)
    decline = 100 * (reference.score - judged.score) / reference.score if reference.score else None
    return {**judged.as_dict(), "decline_pct": None if decline is None else round(decline, 2),
            "psnr_db": round(psnr(reference_images, images), 2)}


def quality(args) -> tuple[dict, str]:
    """``laptop-deploy quality --model M``: the toy teacher and ``M`` (a student pruned or distilled from it) draw
    the held-out prompts from the same seeds; the judge grades both, PSNR compares them."""
    from ..distill import check_student
    from ..errors import DistillError, LaptopDeployError
    from ..sources import resolve_model

    steps = DEFAULT_STEPS if args.steps is None else args.steps
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    if args.per_prompt < 1 or steps < 1:
        raise LaptopDeployError("--per-prompt and --steps must be at least 1")
    teacher = resolve_model("toy")
    model = resolve_model(args.model)
    try:
        check_student(teacher.unet, model.unet, student_name=args.model, teacher_name="toy")
    except DistillError as exc:
        raise LaptopDeployError(f"quality judges the toy teacher's students only: {exc}") from None
    pairs = eval_pairs(per_prompt=args.per_prompt)
    rows, reference = [], None
    for name, unet in (("toy", teacher.unet), (args.model, model.unet)):
        pipe = teacher.pipeline(unet.eval())
        pipe.set_progress_bar_config(disable=True)
        started = time.perf_counter()
        images = generate(pipe, pairs, steps=steps, guidance=guidance)
        seconds = round(time.perf_counter() - started, 1)
        if reference is None:
            reference = (score(images, pairs), images)
        row = compare(*reference, images, pairs)
        rows.append({"model": name, "params": sum(p.numel() for p in unet.parameters()), **row,
                     "generate_s": seconds})
    result = {"prompts": "held-out", "images": len(pairs), "steps": steps, "guidance": guidance,
              "models": rows}
    lines = [f"{len(pairs)} images: the 24 held-out prompts x {args.per_prompt} seeds, DPM-Solver++ {steps} "
             f"steps, guidance {guidance:g}",
             f"{'model':<28} {'params':>11} {'alignment':>9} {'shape':>6} {'colour':>6} {'place':>6} "
             f"{'decline':>8} {'PSNR dB':>8}"]
    for row in rows:
        decline = "—" if row["decline_pct"] is None else f"{row['decline_pct']:+.1f}%"
        psnr_db = "—" if row["model"] == "toy" else f"{row['psnr_db']:.2f}"
        lines.append(f"{row['model'][-28:]:<28} {row['params']:>11,} {row['alignment']:>9.3f} "
                     f"{row['shape_accuracy']:>6.2f} {row['colour_accuracy']:>6.2f} {row['position_accuracy']:>6.2f} "
                     f"{decline if row['model'] != 'toy' else '':>8} {psnr_db:>8}")
    return result, "\n".join(lines)
