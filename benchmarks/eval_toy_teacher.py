"""Judge accuracy on ground truth and the toy teacher's prompt alignment; writes benchmarks/results/toy_teacher.*.

    python benchmarks/eval_toy_teacher.py                      # the committed numbers (model `toy`)
    python benchmarks/eval_toy_teacher.py --model path/to/pipeline --per-prompt 4

Measures, in one run: (1) the judge on freshly drawn ground-truth images of all 216 prompts, and on the same images
after a round trip through the teacher's latent map (encode → decode; lossless for the fixed space-to-depth); (2) the judge on ground truth of
the 24 held-out prompts; (3) the teacher's alignment on the held-out prompts and on the training prompts with the
default sampler, steps and guidance; plus a PNG of held-out samples.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from laptop_deploy.models.sources import resolve_model
from laptop_deploy.toy.dataset import all_prompts, held_out_prompts, make_dataset
from laptop_deploy.toy.evaluate import eval_pairs, generate, score
from laptop_deploy.toy.judge import alignment
from laptop_deploy.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS
from laptop_deploy.toy.train import encode_latents

RESULTS = Path(__file__).parent / "results"


def vae_round_trip(vae, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        decoded = vae.decode(encode_latents(vae, images)).sample
    return np.clip(np.rint((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, columns: int, path: Path) -> None:
    from PIL import Image

    rows = [np.concatenate(list(images[i:i + columns]), axis=1) for i in range(0, len(images), columns)]
    grid = np.concatenate(rows[: len(images) // columns], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--gt-samples", type=int, default=2000)
    parser.add_argument("--per-prompt", type=int, default=10, help="seeds per held-out prompt (24 prompts)")
    parser.add_argument("--train-per-prompt", type=int, default=1, help="seeds per training prompt (192)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--out", type=Path, default=RESULTS / "toy_teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = resolve_model(args.model)
    pipe = source.pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "model": args.model,
              "sampler": type(pipe.scheduler).__name__, "steps": args.steps, "guidance": args.guidance}
    truth = make_dataset(args.gt_samples, seed=1234, prompts=all_prompts())
    result["judge_ground_truth"] = alignment(truth.images, truth.attributes).as_dict()
    result["judge_latent_round_trip"] = alignment(vae_round_trip(source.part("vae"), truth.images),
                                               truth.attributes).as_dict()
    held = make_dataset(len(held_out_prompts()) * args.per_prompt, seed=4321, prompts=held_out_prompts())
    result["ground_truth_held_out"] = alignment(held.images, held.attributes).as_dict()
    for label, pairs in (("teacher_held_out", eval_pairs(per_prompt=args.per_prompt, held_out=True)),
                         ("teacher_train_prompts", eval_pairs(per_prompt=args.train_per_prompt, held_out=False))):
        if not pairs:
            continue
        started = time.time()
        images = generate(pipe, pairs, steps=args.steps, guidance=args.guidance)
        result[label] = {**score(images, pairs).as_dict(), "generate_s": round(time.time() - started, 1)}
        if label == "teacher_held_out":
            save_grid(images[: 24 * min(4, args.per_prompt)], 24, args.out.with_name(args.out.name + "_held_out.png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
