"""The toy dataset: 32×32 RGB images of one coloured shape at a grid position, with a caption in words.

Attributes: 4 shapes × 6 colours × 9 positions (3×3 grid) = 216 prompts such as ``"a red circle at the top
left"``. Every image also carries jitter drawn from the seed: the centre moves up to ±1 px, the size ``r`` is
uniform in [4, 5.5] px, the colour ±12 per channel, and the background is a uniform grey in [0, 50]; so every drawn
sample is a distinct (prompt, image) pair (the training set is 24,000 of them).

24 prompts are held out for evaluation and never drawn for training: the combinations with
``(shape + colour + position) % 9 == 0`` (indices into :data:`SHAPES`, :data:`COLOURS`, :data:`POSITIONS`), so every
shape/colour pair is still seen in training at 8 of its 9 positions.

Shapes are drawn with their area centroid at the object centre (so the judge can fit them from moments): a circle
of radius r, a square of half-side 0.85 r, an upward triangle (apex 1.2 r above, base 0.6 r below, half-width
1.04 r), a diamond ``|dx| + |dy| ≤ 1.2 r``. Rendering is 4×4 supersampled (anti-aliased). Images are HWC uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (150, 60, 205), "cyan": (40, 210, 220),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_WHERE = ("at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")
GRID_CENTRES = (6.5, 16.0, 25.5)  # px, per row/column; the judge's cell borders are at 32/3 and 64/3
JITTER_PX, RADIUS_PX, COLOUR_JITTER, BACKGROUND = 1.0, (4.0, 5.5), 12, (0, 50)
_SUPERSAMPLE = 4
# Shape area / r², used by the judge to size its templates: circle π, square (1.7)², triangle ½·2.08·1.8, diamond 2·1.2²
AREA_PER_R2 = {"circle": float(np.pi), "square": 1.7 ** 2, "triangle": 0.5 * 2.08 * 1.8, "diamond": 2 * 1.2 ** 2}


@dataclass(frozen=True)
class Attributes:
    """What a caption says: indices into :data:`SHAPES`, :data:`COLOURS` and :data:`POSITIONS`."""

    shape: int
    colour: int
    position: int

    @property
    def caption(self) -> str:
        return f"a {list(COLOURS)[self.colour]} {SHAPES[self.shape]} {_WHERE[self.position]}"


@dataclass
class Samples:
    """``images`` [N, 32, 32, 3] uint8; ``attributes`` and ``captions`` one per image; ``centres`` [N, 2] (x, y) px
    and ``radii`` [N] px as drawn."""

    images: np.ndarray
    attributes: list[Attributes]
    captions: list[str]
    centres: np.ndarray
    radii: np.ndarray


def all_prompts() -> list[Attributes]:
    return [Attributes(s, c, p) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for p in range(len(POSITIONS))]


def is_held_out(attributes: Attributes) -> bool:
    return (attributes.shape + attributes.colour + attributes.position) % 9 == 0


def train_prompts() -> list[Attributes]:
    return [a for a in all_prompts() if not is_held_out(a)]


def held_out_prompts() -> list[Attributes]:
    return [a for a in all_prompts() if is_held_out(a)]


def parse_caption(caption: str) -> Attributes:
    """The attributes a caption of :meth:`Attributes.caption` names (exact match; KeyError otherwise)."""
    return {a.caption: a for a in all_prompts()}[caption]


def shape_coverage(shape: str, centres: np.ndarray, radii: np.ndarray, size: int = SIZE) -> np.ndarray:
    """[N, size, size] float coverage in [0, 1] of ``shape`` centred at ``centres`` [N, 2] (x, y) px, radius ``radii``
    [N] px; pixel (i, j) spans [j, j+1) × [i, i+1), 4×4 supersampled."""
    ticks = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    dx = (ticks[None, None, :] - centres[:, 0, None, None]) / radii[:, None, None]
    dy = (ticks[None, :, None] - centres[:, 1, None, None]) / radii[:, None, None]
    if shape == "circle":
        inside = dx * dx + dy * dy <= 1.0
    elif shape == "square":
        inside = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    elif shape == "triangle":  # apex at dy = -1.2, base at dy = +0.6, half-width 1.04 at the base
        inside = (dy <= 0.6) & (np.abs(dx) <= (dy + 1.2) * (1.04 / 1.8))
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= 1.2
    else:
        raise KeyError(shape)
    n = len(centres)
    return inside.reshape(n, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))


def render(attributes: list[Attributes], rng: np.random.Generator) -> Samples:
    """Draw one jittered image per entry of ``attributes``; the draws come from ``rng`` in a fixed order
    (centres, radii, colour jitter, background)."""
    n = len(attributes)
    shape = np.array([a.shape for a in attributes])
    cells = np.array([[GRID_CENTRES[a.position % 3], GRID_CENTRES[a.position // 3]] for a in attributes])
    centres = cells + rng.uniform(-JITTER_PX, JITTER_PX, size=(n, 2))
    radii = rng.uniform(*RADIUS_PX, size=n)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    fg = palette[[a.colour for a in attributes]] + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(n, 3))
    bg = rng.uniform(*BACKGROUND, size=n)
    coverage = np.zeros((n, SIZE, SIZE))
    for index, name in enumerate(SHAPES):
        rows = np.flatnonzero(shape == index)
        if len(rows):
            coverage[rows] = shape_coverage(name, centres[rows], radii[rows])
    images = bg[:, None, None, None] * (1 - coverage[..., None]) + fg[:, None, None, :] * coverage[..., None]
    return Samples(np.clip(np.rint(images), 0, 255).astype(np.uint8), list(attributes),
                   [a.caption for a in attributes], centres, radii)


def make_dataset(count: int, *, seed: int, prompts: list[Attributes] | None = None) -> Samples:
    """``count`` samples of ``prompts`` (default: the training prompts), rendered in chunks of 2,000 from one
    ``np.random.default_rng(seed)``: the same arguments give the same bytes. The prompt list is repeated to
    ``count`` entries and shuffled, so each prompt appears ⌊count / len(prompts)⌋ or one more times (pass a
    multiple of ``len(prompts)`` for a balanced set; the first prompts get the remainder)."""
    chunk = 2000
    rng = np.random.default_rng(seed)
    prompts = prompts if prompts is not None else train_prompts()
    order = rng.permutation(np.resize(np.arange(len(prompts)), count))
    chosen = [prompts[i] for i in order]
    parts = [render(chosen[start:start + chunk], rng) for start in range(0, count, chunk)]
    return Samples(np.concatenate([p.images for p in parts]), chosen, [a.caption for a in chosen],
                   np.concatenate([p.centres for p in parts]), np.concatenate([p.radii for p in parts]))


def write_folder(samples: Samples, out: Path) -> Path:
    """Write ``samples`` as a captioned image folder — ``NNNNNN.png`` plus ``metadata.jsonl`` lines
    ``{"file_name": ..., "text": ...}``, the layout ``laptop-deploy distill --data`` and ``prune --images`` read.
    Written to a sibling temporary folder and renamed, so ``out`` is either complete or absent."""
    import json
    import shutil

    from PIL import Image

    if out.exists():
        raise FileExistsError(f"{out} already exists")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        lines = []
        for index, (image, caption) in enumerate(zip(samples.images, samples.captions)):
            name = f"{index:06d}.png"
            Image.fromarray(image).save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m laptop_deploy.toy.dataset --out DIR --count N``: a captioned training folder of the toy world."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[1].strip())
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--count", type=int, default=1920, help="images (default 1920: each training prompt 10×)")
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (the teacher was trained on seed 0)")
    parser.add_argument("--held-out", action="store_true", help="draw the 24 held-out prompts instead")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.count < 1:
        print(f"error: --count must be at least 1, got {args.count}", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"error: --out {args.out} already exists", file=sys.stderr)
        return 2
    samples = make_dataset(args.count, seed=args.seed, prompts=held_out_prompts() if args.held_out else None)
    try:
        write_folder(samples, args.out)
    except OSError as exc:
        print(f"error: cannot write --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"out": str(args.out), "count": args.count, "seed": args.seed, "held_out": args.held_out,
                          "format": "metadata.jsonl + PNG"}))
    else:
        print(f"wrote {args.count} captioned images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
