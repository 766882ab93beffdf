"""The analytic judge: reads shape, colour and position back from the pixels of a toy image.

It involves no model, so it is independent of every model it grades. For one HWC image (uint8 or float in
[0, 255]):

1. background = per-channel median of the 124 border pixels;
2. foreground colour = median of the pixels whose distance to the background is at least 60% of the largest one;
   no pixel 40 or more (RGB units) from the background means "no object" (a miss, never a match);
3. per-pixel coverage α = projection of (pixel − background) on (foreground − background), clipped to [0, 1], with
   α < 0.15 zeroed (the haze a generator leaves around an object);
4. colour = the palette colour nearest (RGB) to the foreground colour;
5. position = the 3×3 cell of α's centroid (cell borders at 32/3 and 64/3 px);
6. shape = the template (circle, square, triangle, diamond) with the highest soft IoU ``Σ min(α, t) / Σ max(α, t)``
   against α, each template rendered at α's centroid with the size that gives it α's area.

The ground-truth accuracy is measured by ``benchmarks/eval_toy_teacher.py`` and asserted by ``tests/test_toy.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .dataset import AREA_PER_R2, COLOURS, SHAPES, SIZE, Attributes, shape_coverage

MIN_CONTRAST = 40.0  # RGB distance below which nothing is drawn
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def read_attributes(image: np.ndarray) -> Attributes | None:
    """The attributes drawn in one [32, 32, 3] image, or None when it shows no object."""
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"judge expects a [{SIZE}, {SIZE}, 3] image, got {list(image.shape)}")
    image = image.astype(np.float64)
    background = np.median(_border(image), axis=0)
    distance = np.linalg.norm(image - background, axis=-1)
    if distance.max() < MIN_CONTRAST:
        return None
    foreground = np.median(image[distance >= 0.6 * distance.max()], axis=0)
    direction = foreground - background
    alpha = np.clip((image - background) @ direction / (direction @ direction), 0.0, 1.0)
    alpha[alpha < 0.15] = 0.0
    colour = int(np.argmin(np.linalg.norm(_PALETTE - foreground, axis=-1)))
    area = alpha.sum()
    ticks = np.arange(SIZE) + 0.5
    centre = np.array([(alpha.sum(axis=0) * ticks).sum() / area, (alpha.sum(axis=1) * ticks).sum() / area])
    column, row = (np.minimum(2, (centre // (SIZE / 3)).astype(int)))
    ious = []
    for name in SHAPES:
        template = shape_coverage(name, centre[None], np.array([np.sqrt(area / AREA_PER_R2[name])]))[0]
        ious.append(np.minimum(alpha, template).sum() / np.maximum(alpha, template).sum())
    return Attributes(shape=int(np.argmax(ious)), colour=colour, position=int(row * 3 + column))


@dataclass
class Alignment:
    """How many images show what their prompt asks: ``score`` = fraction with every attribute right; per-attribute
    accuracies; ``misses`` = images where no object was found."""

    count: int
    score: float
    shape: float
    colour: float
    position: float
    misses: int
    matches: list[bool] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "alignment": self.score, "shape_accuracy": self.shape,
                "colour_accuracy": self.colour, "position_accuracy": self.position, "no_object": self.misses}


def alignment(images: np.ndarray, expected: Sequence[Attributes]) -> Alignment:
    """Judge ``images`` [N, 32, 32, 3] (uint8, or float in [0, 255]) against the attributes their prompts asked for."""
    if len(images) != len(expected) or not len(images):
        raise ValueError(f"{len(images)} images for {len(expected)} prompts; expected the same, non-zero count")
    found = [read_attributes(image) for image in images]
    hits = {key: [f is not None and getattr(f, key) == getattr(e, key) for f, e in zip(found, expected)]
            for key in ("shape", "colour", "position")}
    matches = [f == e for f, e in zip(found, expected)]
    return Alignment(count=len(images), score=float(np.mean(matches)), shape=float(np.mean(hits["shape"])),
                     colour=float(np.mean(hits["colour"])), position=float(np.mean(hits["position"])),
                     misses=sum(f is None for f in found), matches=matches)
