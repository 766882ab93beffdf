"""``report.md`` of a compress run and its pictures, from the results the stages recorded in their markers.

* ``sizes.png`` — teacher vs student as % of the teacher: parameters, MACs, measured latency (median, on the run's
  runtime), artifact bytes;
* ``samples.png`` — side-by-side samples from the same seeds and prompts (top row teacher, bottom row student):
  for the ``toy`` teacher the images the judge graded (PyTorch; parity with the artifact is the verify stage's
  job), for other models the teacher in PyTorch against the student *through its exported artifact*, decoded by
  the teacher's VAE (no classifier-free guidance: the U-Net exactly as exported).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from .recipe import Checked, Recipe

CELL = 128  # pixels per sample in the grid


def write_report(out: Path, r: Recipe, checked: Checked, results: dict[str, dict[str, Any]],
                 folders: dict[str, Path]) -> dict[str, Any]:
    """Write ``report.md``, ``report.json``, ``sizes.png`` and (when the model can draw) ``samples.png`` into
    ``out``; returns the summary stored in the stage's marker."""
    rows = _rows(results)
    quality: dict[str, Any] | None = None
    if r.model == "toy" and r.quality_per_prompt > 0:
        quality, images = _toy_quality(r, folders["student_model"])
    else:
        images = _artifact_samples(r, checked, folders) if r.grid_prompts > 0 else None
    if images is not None:
        _save_grid(images, out / "samples.png")
    _bar_chart(rows, out / "sizes.png")
    verify = results.get("verify", {})
    summary = {"rows": rows, "quality": quality, "verify_passed": verify.get("passed"),
               "samples": images is not None}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(r, checked, results, rows, quality, samples=images is not None))
    return summary


def _rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher and student figures side by side; None where a stage did not measure it."""
    prune, bench = results.get("prune", {}), results.get("bench", {}).get("latency", {})
    predicted = prune.get("latency")  # latency budgets: the profile's prediction for the student
    export, teacher_export = results.get("export", {}), results.get("export-teacher", {})
    return [
        {"what": "parameters", "teacher": prune.get("params_before"), "student": prune.get("params_after"),
         "unit": ""},
        {"what": "MACs", "teacher": prune.get("macs_before"), "student": prune.get("macs_after"), "unit": ""},
        {"what": "latency (median)", "teacher": bench.get("teacher", {}).get("median_ms"),
         "student": bench.get("student", {}).get("median_ms"), "unit": "ms"},
        *([{"what": "latency (predicted)", "teacher": predicted["teacher_ms"], "student": predicted["predicted_ms"],
            "unit": "ms"}] if predicted else []),
        {"what": "artifact size", "teacher": teacher_export.get("bytes"), "student": export.get("bytes"),
         "unit": "bytes"},
    ]


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "bytes":
        return f"{value / 1e6:,.2f} MB"
    return f"{value:,}"


def _markdown(r: Recipe, checked: Checked, results: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
              quality: dict[str, Any] | None, *, samples: bool) -> str:
    verify, bench, prune = results.get("verify", {}), results.get("bench", {}), results.get("prune", {})
    verdict = "PASSED" if verify.get("passed") else "FAILED"
    lines = [f"# Compress report: {r.model}, budget {r.budget}", "",
             f"Target `{r.target}`{' app bundle' if r.pipeline else ''} ({r.precision}), runtime "
             f"`{checked.runtime}`, latent "
             f"{'x'.join(map(str, prune.get('latent_size') or []))}, distillation steps {r.distill_steps}. "
             f"The recipe is `../recipe.toml`.", "",
             f"**Verify: {verdict}**" + ("" if verify.get("passed") else
                                         " — " + "; ".join((verify.get("failures") or [])[:3])), "",
             "| | teacher | student | student / teacher |", "|---|---:|---:|---:|"]
    for row in rows:
        ratio = (f"{row['student'] / row['teacher']:.3f}" if row["teacher"] and row["student"] is not None
                 else "n/a")
        lines.append(f"| {row['what']} | {_fmt(row['teacher'], row['unit'])} | {_fmt(row['student'], row['unit'])} "
                     f"| {ratio} |")
    additivity = prune.get("additivity")
    lines += ["", f"Removed {len(prune.get('removed') or [])} layers; joint output loss "
              f"{_num(prune.get('joint_output_loss'), '.4g')}; additivity "
              + (f"Pearson {_num(additivity.get('pearson'), '.3f')}, Spearman {_num(additivity.get('spearman'), '.3f')}"
                 if additivity else "not measured") + ".", ""]
    if "parts" in verify:  # an app bundle: every part, then images against the diffusers pipeline
        parts = ", ".join(f"{name} PSNR {_num(part.get('psnr_db'))} dB" for name, part in verify["parts"].items())
        lines += [f"Parity of the bundle ({verify.get('steps')} steps): {parts}; worst image PSNR against the "
                  f"PyTorch pipeline {_num(verify.get('e2e_psnr_db'))} dB (floor {verify.get('min_image_psnr_db')} "
                  f"dB).", ""]
    else:
        lines += [f"Parity of the student artifact against the PyTorch student ({verify.get('steps')} steps): "
                  f"worst relative L2 {_num(verify.get('rel_l2'), '.3g')}, worst PSNR {_num(verify.get('psnr_db'))} "
                  f"dB, end-to-end PSNR {_num(verify.get('e2e_psnr_db'))} dB.", ""]
    if bench:
        lines.append(f"Latency: {bench.get('repeats')} interleaved rounds (teacher, student, ...) of "
                     f"{bench.get('iterations')} calls after {bench.get('warmup')} warm-up; median of the rounds' "
                     f"medians, min-max {_span(bench, 'teacher')} / {_span(bench, 'student')} ms; load average "
                     f"{bench.get('load_before', [0])[0]:.2f} before, {bench.get('load_after', [0])[0]:.2f} after.")
        if bench.get("busy"):
            lines.append("**Warning: the machine was busy while timing; trust the ratio more than the times.**")
        lines.append("")
    if quality is not None:
        lines += [f"Judged quality (toy judge, {quality['images']} images: the held-out prompts x "
                  f"{r.quality_per_prompt} seeds, {r.report_steps} steps): alignment teacher "
                  f"{quality['teacher']['alignment']:.3f}, student {quality['student']['alignment']:.3f} "
                  f"(decline {quality['student']['decline_pct']}%), PSNR student vs teacher "
                  f"{quality['student']['psnr_db']} dB.", ""]
    lines.append("![sizes](sizes.png)")
    if samples:
        lines += ["", "Samples from the same seeds and prompts, top row teacher, bottom row student"
                  + (" (judged images)." if quality is not None else " through its exported artifact."), "",
                  "![samples](samples.png)"]
    return "\n".join(lines) + "\n"


def _num(value: Any, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _span(bench: dict[str, Any], name: str) -> str:
    entry = bench.get("latency", {}).get(name)
    return f"{entry['min_ms']:.2f}-{entry['max_ms']:.2f}" if entry else "n/a"


def _toy_quality(r: Recipe, student_dir: Path) -> tuple[dict[str, Any], np.ndarray]:
    from ..models.sources import resolve_model
    from ..toy.evaluate import eval_pairs, judge_model
    from ..toy.model import DEFAULT_GUIDANCE

    teacher = resolve_model("toy")
    student = resolve_model(str(student_dir))
    pairs = eval_pairs(per_prompt=r.quality_per_prompt, first_seed=r.seed)
    judged_teacher = judge_model(teacher, teacher.unet, pairs, steps=r.report_steps, guidance=DEFAULT_GUIDANCE)
    judged_student = judge_model(teacher, student.unet, pairs, steps=r.report_steps, guidance=DEFAULT_GUIDANCE)
    quality = {"images": len(pairs), "teacher": judged_teacher.row(), "student": judged_student.row(judged_teacher)}
    count = min(max(r.grid_prompts, 1) * 2, len(pairs))
    return quality, np.stack([judged_teacher.images[:count], judged_student.images[:count]])


def _artifact_samples(r: Recipe, checked: Checked, folders: dict[str, Path]) -> np.ndarray | None:
    """[2, N, H, W, 3] uint8: the teacher (PyTorch) and the student artifact from the same seeds and prompts."""
    import torch

    from ..deploy.manifest import check_integrity
    from ..deploy.verify import denoise, make_scheduler
    from ..models.conditioning import DEFAULT_PROMPTS, encode_prompts, has_text_encoders
    from ..models.sources import resolve_model
    from ..runtimes import open_artifact
    from ..runtimes.pytorch import TorchRunner

    teacher = resolve_model(r.model, seed=r.seed)
    if "vae" not in teacher.available_parts() or not has_text_encoders(teacher):
        return None
    manifest = check_integrity(folders["student_artifact"])
    spec = manifest.spec
    if spec.dynamic:  # a bundle's U-Net: one image per call here
        spec = dataclasses.replace(spec, batch=1)
    vae = teacher.part("vae")
    rows: list[list[np.ndarray]] = [[], []]
    candidate = open_artifact(folders["student_artifact"], manifest=manifest, runtime=checked.runtime)
    with TorchRunner(teacher.unet, spec=spec.with_precision("fp32")) as reference, candidate:
        for index in range(r.grid_prompts):
            prompt = DEFAULT_PROMPTS[index % len(DEFAULT_PROMPTS)]
            cond = encode_prompts(teacher, [prompt], height_px=spec.height * 8, width_px=spec.width * 8)
            flat = {"encoder_hidden_states": cond["encoder_hidden_states"], **(cond.get("added_cond_kwargs") or {})}
            feeds = {k: v.detach().float().numpy() for k, v in flat.items() if k in spec.input_names}
            for row, (runner, run_spec) in enumerate(((reference, reference.spec), (candidate, spec))):
                latents = denoise(runner, run_spec, scheduler=make_scheduler(teacher), cond=feeds,
                                  steps=r.report_steps, seed=r.seed + index)
                rows[row].append(_decode(vae, torch.from_numpy(latents)))
    return np.stack([np.stack(row) for row in rows])


def _decode(vae: Any, latents: Any) -> np.ndarray:
    """One uint8 [H, W, 3] image from [1, C, h, w] latents, as diffusers' pipelines decode (scaling factor)."""
    import torch

    with torch.no_grad():
        scale = getattr(vae.config, "scaling_factor", 1.0)
        image = vae.decode(latents / scale, return_dict=False)[0]
    image = (image[0].clamp(-1, 1) + 1) * 127.5
    return image.permute(1, 2, 0).round().to(torch.uint8).numpy()


def _save_grid(images: np.ndarray, path: Path) -> None:
    """``images`` [rows, N, H, W, 3] uint8 → one PNG, each sample scaled to :data:`CELL` pixels (nearest)."""
    from PIL import Image

    rows, count = images.shape[:2]
    grid = Image.new("RGB", (count * (CELL + 4) + 4, rows * (CELL + 4) + 4), "white")
    for row in range(rows):
        for col in range(count):
            cell = Image.fromarray(images[row, col]).resize((CELL, CELL), Image.NEAREST)
            grid.paste(cell, (4 + col * (CELL + 4), 4 + row * (CELL + 4)))
    grid.save(path)


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars, student as % of teacher (teacher = 100%), one per measured figure (Pillow only)."""
    from PIL import Image, ImageDraw

    shown = [row for row in rows if row["teacher"] and row["student"] is not None]
    width, left, bar_h = 640, 170, 22
    image = Image.new("RGB", (width, 40 + len(shown) * 2 * (bar_h + 6) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "student vs teacher (teacher = 100%)", fill="black")
    y = 40
    top = max([100.0] + [100 * row["student"] / row["teacher"] for row in shown])  # a slower student fits too
    scale = (width - left - 70) / top
    for row in shown:
        for who, colour in (("teacher", (150, 150, 150)), ("student", (40, 110, 200))):
            pct = 100 * row[who] / row["teacher"]
            draw.text((10, y + 5), f"{row['what']} ({who})", fill="black")
            draw.rectangle([left, y, left + max(1, int(pct * scale)), y + bar_h], fill=colour)
            draw.text((left + int(pct * scale) + 6, y + 5), f"{pct:.1f}%", fill="black")
            y += bar_h + 6
    image.save(path)
