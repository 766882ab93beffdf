"""int8 students on this CPU: speed of ORT fp32 vs int8 (SD-1.5-sized U-Nets) and quality (toy teacher + student).

speed   ``random:sd15`` and a 50% student of it at a 64×64 latent: the fp32 graph is exported once, quantized by
        :func:`laptop_deploy.exporters.onnx_int8.quantize_onnx` (what ``export --precision int8`` runs), then both
        are timed through the OrtRunner interleaved (fp32, int8, fp32, int8, ...; ``--repeats`` rounds, each
        measurement in a fresh process: one warm-up and one timed call); median and min-max, the load average before and after, the kept-float MAC share, the
        held-out PSNR and the kernels ORT ran. Run under ``flock /tmp/ld-heavy.lock`` (3.4 GB models).
quality the toy teacher and its 50% student (``laptop-deploy prune --model toy --ratio 0.5``), PyTorch fp32 vs the
        gated int8 ONNX (dynamic batch, through a diffusers pipeline): judge alignment on the held-out prompts,
        decline vs fp32, image PSNR vs fp32 from the same seeds, a sample grid.

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_int8.py speed --student /tmp/sd15-student
    .venv/bin/python benchmarks/bench_int8.py quality --student /tmp/toy-student
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def export_pair(spec_str: str, work: Path, *, dynamic: bool, int8: Any, latent: int | None = None,
                keep_source: bool = True) -> dict[str, Any]:
    """fp32 ONNX of ``spec_str`` and its int8 model (gate as in ``int8``); returns paths, source, info.
    ``keep_source=False`` hands the PyTorch U-Net over to the quantizer, which frees it after the capture: on
    SD-1.5 the 3.4 GB of torch weights beside quantize_static's copies of the graph reached the 24 GB OOM limit."""
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.errors import CheckFailed
    from laptop_deploy.exporters.onnx import OnnxOptions, export_fp32
    from laptop_deploy.exporters.onnx_int8 import quantize_onnx
    from laptop_deploy.models.sources import resolve_model

    source = resolve_model(spec_str)
    spec = build_spec(source.unet.config, precision="int8", dynamic=dynamic, height=latent, width=latent)
    started = time.perf_counter()
    (work / "fp32").mkdir(parents=True)
    fp32 = export_fp32(source.unet, spec.with_precision("fp32"), work / "fp32", options=OnnxOptions())
    export_s = time.perf_counter() - started
    described = source.describe()
    holder = [source.unet]
    if not keep_source:
        source = None
    try:
        path, info = quantize_onnx(fp32, holder.pop(), spec, work / "int8", source=described, options=int8)
        gate = "passed"
    except CheckFailed as exc:  # report the gate's verdict, then measure the all-int8 model
        from dataclasses import replace

        print(f"gate failed: {exc}", file=sys.stderr)
        shutil.rmtree(work / "int8", ignore_errors=True)
        path, info = quantize_onnx(fp32, (source or resolve_model(spec_str)).unet, spec, work / "int8",
                                   source=described, options=replace(int8, min_psnr=-1e9))
        gate = f"failed: {exc}"
    return {"source": source, "params": described["params"], "spec": spec, "fp32": fp32, "int8": path, "info": info, "gate": gate,
            "export_s": round(export_s, 1), "int8_s": round(time.perf_counter() - started - export_s, 1)}


def timed_fresh(pair: dict[str, Any], *, repeats: int, threads: int | None) -> dict[str, Any]:
    """fp32 and int8 ONNX timed interleaved (fp32 int8 fp32 int8 ...), each measurement in a fresh process (one
    warm-up and one timed call): this process held the PyTorch U-Net and the quantizer's copies, and a long-lived
    process timed SD-1.5 variants up to 1.6× slow here (``laptop_deploy/deploy/fresh_timing.py``)."""
    from laptop_deploy.deploy.fresh_timing import measure_fresh

    spec = pair["spec"].with_precision("fp32")  # the int8 graph takes and returns float32 as well
    print(f"timing fp32 and int8 interleaved, {repeats} rounds, fresh processes", file=sys.stderr, flush=True)
    return measure_fresh({"fp32": (pair["fp32"], spec), "int8": (pair["int8"], spec)}, repeats=repeats,
                         threads=threads, progress=lambda line: print(line, file=sys.stderr, flush=True))


STUDENT_ARGS = ("--ratio", "0.5", "--criterion", "magnitude", "--additivity-sets", "0", "--calib", "1",
                "--batch-size", "1")  # a 50%-of-params student without the output-loss scoring passes


def make_student(teacher: str, work: Path) -> str:
    """``--student auto``: ``laptop-deploy prune --model TEACHER`` + :data:`STUDENT_ARGS` into ``work``."""
    from laptop_deploy.cli.main import main as cli

    out = work / "bench_int8_student"
    if cli(["prune", "--model", teacher, *STUDENT_ARGS, "--out", str(out), "--force"]) != 0:
        raise SystemExit(f"prune of {teacher} failed")
    return str(out)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from laptop_deploy.exporters.onnx_int8 import Int8Options

    rows = []
    student = make_student(args.teacher, Path(args.work)) if args.student == "auto" else args.student
    for label, model in (("teacher", args.teacher), ("student 50%", student)):
        if model is None:
            continue
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            load_before = os.getloadavg()
            pair = export_pair(model, Path(tmp), dynamic=False, latent=args.latent, keep_source=False,
                               int8=Int8Options(calib_prompts=str(args.calib_prompts), calib_steps=args.calib_steps,
                                                min_psnr=args.min_psnr, max_float_share=args.max_float_share))
            load_mid = os.getloadavg()
            timing = timed_fresh(pair, repeats=args.repeats, threads=args.threads)
            info = pair["info"]
            label = "student" if Path(model).is_dir() else label  # --teacher may name a student folder too
            rows.append({"model": label, "spec": model, "params": pair["params"],
                         "latent": [pair["spec"].height, pair["spec"].width], "gate": pair["gate"],
                         "fp32": timing["fp32"], "int8": timing["int8"],
                         "speedup": round(timing["fp32"]["median_ms"] / timing["int8"]["median_ms"], 3),
                         "int8_psnr_db": info.get("int8_psnr_db"), "float_mac_share": info.get("int8_float_mac_share"),
                         "kept_float_groups": info.get("int8_kept_float_groups"), "macs": info.get("int8_macs"),
                         "int8_kernels": info.get("int8_kernels"), "calibration": info.get("int8_calibration"),
                         "export_s": pair["export_s"], "int8_s": pair["int8_s"],
                         "load_avg": {"before_export": load_before, "before_timing": load_mid,
                                      "after": os.getloadavg()}})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("calibration",)}), flush=True)
    return {"rows": rows}


class OrtUNet(torch.nn.Module):
    """An int8 ONNX U-Net behind the call diffusers' pipelines make (``unet(sample, t, encoder_hidden_states=...,
    return_dict=False)[0]``), through the OrtRunner; ``config`` is the PyTorch U-Net's."""

    def __init__(self, path: Path, spec: Any, config: Any) -> None:
        from laptop_deploy.runtimes.ort import OrtRunner

        super().__init__()
        self.config = config
        self.runner = OrtRunner(path, spec=spec).__enter__()

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **_: Any):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        out = self.runner.infer({"sample": sample.float().numpy(), "timestep": t.numpy().copy(),
                                 "encoder_hidden_states": encoder_hidden_states.float().numpy()})
        return (torch.from_numpy(out["out_sample"]),)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """Toy teacher and student: PyTorch fp32 vs gated int8 ONNX through the same pipeline and seeds."""
    from laptop_deploy.exporters.onnx_int8 import Int8Options
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.toy.dataset import train_prompts
    from laptop_deploy.toy.evaluate import eval_pairs, judge_model

    teacher = resolve_model("toy")
    pairs = eval_pairs(per_prompt=args.per_prompt)
    prompts = Path(args.work) / "toy_calib_prompts.txt"
    captions = [a.caption for a in train_prompts()]
    prompts.write_text("\n".join(captions[:: max(1, len(captions) // args.calib_count)][: args.calib_count]) + "\n")
    rows, images = [], {}
    for label, model in (("teacher", "toy"), ("student 50%", args.student)):
        if model is None:
            continue
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            pair = export_pair(model, Path(tmp), dynamic=True,
                               int8=Int8Options(calib_prompts=str(prompts), calib_steps=args.calib_steps,
                                                min_psnr=args.min_psnr, max_float_share=args.max_float_share))
            fp32 = judge_model(teacher, pair["source"].unet, pairs)
            int8_unet = OrtUNet(pair["int8"], pair["spec"].with_precision("fp32"), pair["source"].unet.config)
            int8 = judge_model(teacher, int8_unet, pairs)
            int8_unet.runner.__exit__(None, None, None)
        info = pair["info"]
        row = {"model": label, "spec": model, "gate": pair["gate"], "fp32": fp32.row(), "int8": int8.row(fp32),
               "int8_psnr_db_held_out_unet": info.get("int8_psnr_db"),
               "float_mac_share": info.get("int8_float_mac_share"),
               "kept_float_groups": info.get("int8_kept_float_groups"), "gate_log": info.get("int8_gate_log"),
               "calibration": info.get("int8_calibration"), "int8_s": pair["int8_s"]}
        rows.append(row)
        images[f"{label} fp32"], images[f"{label} int8"] = fp32.images, int8.images
        print(json.dumps({k: row[k] for k in ("model", "gate", "int8", "float_mac_share")}), flush=True)
    grid(images, RESULTS / f"{args.name}_samples.png", count=8)
    return {"rows": rows, "pairs": len(pairs), "calib_prompts": prompts.read_text().splitlines()}


def grid(images: dict[str, np.ndarray], path: Path, *, count: int) -> None:
    """One row per variant, the first ``count`` images of each (same pairs, same seeds), 2× upscaled."""
    from PIL import Image

    rows = [np.concatenate(list(v[:count]), axis=1) for v in images.values()]
    canvas = np.concatenate(rows, axis=0)
    Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("speed", "quality"))
    parser.add_argument("--teacher", default="random:sd15", help="teacher spec (speed)")
    parser.add_argument("--student", help="student folder (speed: of --teacher, or 'auto' to prune one with "
                                           "STUDENT_ARGS; quality: of toy)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (speed)")
    parser.add_argument("--latent", type=int, default=64, help="latent height = width (speed; default 64)")
    parser.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    parser.add_argument("--calib-prompts", type=int, default=1, help="calibration prompts (speed)")
    parser.add_argument("--calib-count", type=int, default=8, help="toy training captions used (quality)")
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--min-psnr", type=float, default=30.0)
    parser.add_argument("--max-float-share", type=float, default=0.5)
    parser.add_argument("--per-prompt", type=int, default=2, help="seeds per held-out prompt (quality)")
    parser.add_argument("--work", default=tempfile.gettempdir(), help="scratch folder (multi-GB for speed)")
    parser.add_argument("--name", help="result file stem (default bench_int8_<part>)")
    args = parser.parse_args(argv)
    args.name = args.name or f"bench_int8_{args.part}"
    started = time.perf_counter()
    command = "python benchmarks/bench_int8.py " + " ".join(argv or sys.argv[1:])
    result = {"command": command, **(speed if args.part == "speed" else quality)(args)}  # command first
    from laptop_deploy.deploy.bench import environment

    result.update(seconds=round(time.perf_counter() - started, 1), environment=environment(),
                  load_avg_end=os.getloadavg(), busy_warning=os.getloadavg()[0] > 1.5)
    if result["busy_warning"]:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: the machine was busy; "
              f"compare the ratios, not the absolute times", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {RESULTS / (args.name + '.json')} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
