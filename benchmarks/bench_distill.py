"""Distillation cost: steps/s, samples/s and peak memory of one training step, per loss variant, in one run.

Variants (same teacher, student, data, batch and seed; only the loss differs):

* ``output-kd``: λ_feat = 0 — no feature taps at all (the baseline);
* ``feature-kd-plain``: + BK-SDM's plain feature KD over every stage output (--feature-norm none);
* ``feature-kd-l2``: + LAPTOP-Diff's normalized feature KD (--feature-norm l2, the default).

The difference between the first and the last is what feature taps plus normalization cost. Each variant runs in a
fresh process (so the CPU's peak RSS is its own); on CUDA the peak is ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_distill.py                                    # random:tiny-sd15 on the CPU
    python benchmarks/bench_distill.py --model random:sd15 --device cuda --mixed-precision bf16 --batch-size 8

writes benchmarks/results/bench_distill[_<model>_<device>].json and .md (a table and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"output-kd": {"lambda_feat": 0.0}, "feature-kd-plain": {"feature_norm": "none"},
            "feature-kd-l2": {"feature_norm": "l2"}}
PROMPTS = ["a photograph of an astronaut riding a horse", "a red bicycle leaning against a brick wall",
           "an oil painting of a lighthouse in a storm", "a close-up portrait of a tabby cat"]


def _one(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its summary numbers."""
    import copy

    from laptop_deploy.distill.options import DistillOptions
    from laptop_deploy.distill.train import prepare_run
    from laptop_deploy.distill.data import prompt_data
    from laptop_deploy.prune.handcrafted import handcrafted_removal
    from laptop_deploy.models.sources import ModelSource, resolve_model
    from laptop_deploy.models.student import make_student

    teacher = resolve_model(args.model)
    removed = handcrafted_removal("bk-sdm-small", teacher.unet.config)
    student = ModelSource("bk-sdm-small student", "student", make_student(copy.deepcopy(teacher.unet), removed),
                          teacher.family, removed=removed)
    size = tuple(args.latent_size) if args.latent_size else (teacher.unet.config.sample_size,) * 2
    data = prompt_data(teacher, PROMPTS, latent_size=size)
    options = DistillOptions(steps=args.steps, batch_size=args.batch_size, lr=1e-5, ema_decay=0.9999,
                             mixed_precision=args.mixed_precision, device=args.device,
                             checkpoint_every=10**9, eval_samples=1, **VARIANTS[args.variant])
    with tempfile.TemporaryDirectory() as tmp:
        summary = prepare_run(teacher, student, data, options, Path(tmp) / "run").run()
        log = [json.loads(line) for line in Path(summary["log"]).read_text().splitlines()]
    seconds = sorted(r["seconds"] for r in log if "event" not in r and r["step"] > 1)  # step 1 warms up
    median = seconds[len(seconds) // 2] if len(seconds) % 2 else sum(seconds[len(seconds) // 2 - 1:][:2]) / 2
    keys = ("cpu_peak_rss_mb", "cuda_peak_allocated_mb", "device")
    return {"variant": args.variant, "latent_size": list(size), "median_step_ms": 1000 * median,
            "steps_per_s": 1 / median, "samples_per_s": summary["samples_per_step"] / median,
            **{k: summary[k] for k in keys if k in summary},
            "student_params": student.describe()["params"], "teacher_params": teacher.describe()["params"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny-sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="steps per variant (the first is not timed)")
    parser.add_argument("--latent-size", type=int, nargs=2)
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_one(args)))
        return 0
    rows = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                "--variant", variant], capture_output=True, text=True, env=os.environ)
        if child.returncode:
            sys.stderr.write(child.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]}", file=sys.stderr)
    base = rows[0]["steps_per_s"]
    memory = "cuda_peak_allocated_mb" if "cuda_peak_allocated_mb" in rows[0] else "cpu_peak_rss_mb"
    command = "python benchmarks/bench_distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Distillation step cost — {args.model}, {rows[0]['device']}, batch {args.batch_size}, latent "
             f"{rows[0]['latent_size'][0]}×{rows[0]['latent_size'][1]}, "
             f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision + ' autocast'}",
             "", f"`{command.strip()}`", "",
             f"Student: BK-SDM-Small removal ({rows[0]['student_params']:,} of {rows[0]['teacher_params']:,} "
             f"params); {args.steps} steps per variant, the first untimed (steps/s = 1 / median step time); one "
             f"process per variant; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}.", "",
             f"| variant | median step ms | steps/s | samples/s | step time vs output-KD | peak memory MB ({memory}) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['median_step_ms']:.1f} | {row['steps_per_s']:.3f} | "
                     f"{row['samples_per_s']:.2f} | "
                     f"{base / row['steps_per_s']:.3f}× | {row[memory]:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if (args.model, args.device) == ("random:tiny-sd15", "cpu") else \
        f"_{args.model.split(':')[-1]}_{args.device.split(':')[0]}"
    (RESULTS / f"bench_distill{suffix}.json").write_text(json.dumps(
        {"command": command.strip(), "rows": rows}, indent=2) + "\n")
    (RESULTS / f"bench_distill{suffix}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
