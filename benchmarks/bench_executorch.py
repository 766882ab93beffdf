"""ExecuTorch target results: fp32 parity of XNNPACK ``.pte`` exports of tiny SD-1.5, tiny SDXL, ``toy`` and a student
of each against PyTorch on captured denoising inputs, the share of convolutions/matmuls XNNPACK took, and the
latency of students' ``.pte`` beside ONNX Runtime and eager PyTorch (one run, interleaved).

    python benchmarks/bench_executorch.py [--models random:tiny-sd15,...] [--steps 4] [--repeats 7] [--calls 5]

Parity: ``laptop_deploy.deploy.verify.verify_artifact`` with the fixed fp32 tolerances (rel L2 ≤ 1e-4, PSNR ≥ 60 dB)
on the inputs captured from a ``--steps`` denoising loop (first, middle, last step) plus seeded random inputs and
the loop end to end. Latency (``--bench`` students): torch eager, onnxruntime CPU (``--target onnx``) and the
ExecuTorch ``.pte`` are loaded once, then timed round after round (A B C A B C ...; per round ``--calls`` calls,
their median), one thread each (``--threads``); median and min–max over rounds, ratios to torch. Writes
benchmarks/results/bench_executorch.json and .md with the command and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# students: whole units removed from each (prunable per `laptop-deploy inventory`); the tiny presets' sets are the
# test suite's (tests/deploy_fixtures.py)
REMOVALS = {
    "random:tiny-sd15": ["down_blocks.0.attentions.1", "down_blocks.1.resnets.1", "mid_block.attentions.0",
                         "up_blocks.1.resnets.1", "up_blocks.3.attentions.2"],
    "random:tiny-sdxl": ["down_blocks.0.resnets.1", "down_blocks.2.attentions.0.transformer_blocks.3",
                         "mid_block.resnets.1", "up_blocks.0.attentions.1", "up_blocks.2.resnets.1"],
    "toy": ["down_blocks.0.attentions.1", "down_blocks.1.resnets.1", "mid_block.attentions.0",
            "up_blocks.1.resnets.1", "up_blocks.2.attentions.2"],
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def source_of(model: str, student: bool):
    """The resolved model, or its student (units removed in place, as `prune` does)."""
    from laptop_deploy.models.layers import apply_removal
    from laptop_deploy.models.sources import resolve_model

    source = resolve_model(model)
    if student:
        apply_removal(source.unet, REMOVALS[model])
        source.removed = list(REMOVALS[model])
    return source


def export_to(source, target: str, out: Path):
    """What `laptop-deploy export --target TARGET` does (fp32, the spec's size), into ``out``."""
    from laptop_deploy.deploy.manifest import model_hash
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.exporters import get_exporter
    from laptop_deploy.outputs import write_atomically

    module = get_exporter(target)
    spec = build_spec(source.unet.config)
    described = {**source.describe(), "sha256": model_hash(source.unet)}
    holder = {}
    write_atomically(out, lambda tmp: holder.update(m=module.export(source.unet, spec, tmp, source=described,
                                                                    options=module.Options())))
    return holder["m"]


def parity_row(model: str, student: bool, work: Path, steps: int) -> dict:
    from laptop_deploy.deploy.verify import Tolerances, verify_artifact

    label = f"{model} student" if student else model
    say(f"export {label}")
    source = source_of(model, student)
    folder = work / label.replace(":", "_").replace(" ", "_")
    start = time.perf_counter()
    manifest = export_to(source, "executorch", folder)
    export_s = time.perf_counter() - start
    say(f"verify {label}")
    result = verify_artifact(folder, source, steps=steps, tolerances=Tolerances.for_precision("fp32"))
    data = result.as_dict()
    delegation = manifest.export["delegation"]
    return {"model": label, "removed": REMOVALS[model] if student else [], "passed": data["passed"],
            "worst_rel_l2": data["rel_l2"], "worst_psnr_db": data["psnr_db"], "e2e_psnr_db": data["e2e_psnr_db"],
            "cases": [{k: c[k] for k in ("case", "rel_l2", "psnr_db", "max_abs")} for c in data["cases"]],
            # the calibrated gate (error vs float64 within a factor of torch fp32's own), as `verify` reports it
            "gate": {k: v for k, v in (data.get("gate") or {}).items() if k != "rows"},
            "pte_bytes": manifest.files["model.pte"]["bytes"], "export_s": round(export_s, 1),
            "lower_s": manifest.export["lower_s"], "delegation": {k: delegation[k] for k in (
                "subgraphs", "delegated_nodes", "portable_nodes", "compute_nodes", "compute_delegated_share",
                "portable")}, "folder": folder}


def interleaved(runners: dict, feeds: dict, *, repeats: int, calls: int) -> dict:
    """Entered runners timed A B C A B C ...: per round ``calls`` calls per runner, the round's time their median."""
    rounds = {name: [] for name in runners}
    for name, runner in runners.items():  # warm-up: first-call allocations, XNNPACK's weight packing
        runner.infer(runner.spec.cast_feeds(feeds))
    for _ in range(repeats):
        for name, runner in runners.items():
            cast = runner.spec.cast_feeds(feeds)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                runner.infer(cast)
                times.append((time.perf_counter() - start) * 1e3)
            rounds[name].append(statistics.median(times))
    return {name: {"median_ms": round(statistics.median(v), 4), "min_ms": round(min(v), 4),
                   "max_ms": round(max(v), 4), "rounds_ms": [round(x, 4) for x in v]} for name, v in rounds.items()}


def latency_row(model: str, work: Path, *, repeats: int, calls: int, threads: int) -> dict:
    from laptop_deploy.deploy.manifest import read_manifest
    from laptop_deploy.runtimes.executorch import ExecuTorchRunner
    from laptop_deploy.runtimes.ort import OrtRunner
    from laptop_deploy.runtimes.pytorch import TorchRunner

    source = source_of(model, True)
    say(f"onnx and executorch exports of the {model} student")
    onnx = export_to(source, "onnx", work / f"onnx_{model.replace(':', '_')}")
    pte_folder = work / f"pte_{model.replace(':', '_')}"
    export_to(source, "executorch", pte_folder)
    spec = read_manifest(pte_folder).spec
    feeds = spec.example_feeds(seed=0)
    with contextlib.ExitStack() as stack:
        runners = {"torch eager": stack.enter_context(TorchRunner(source.unet, spec=spec)),
                   "onnxruntime cpu": stack.enter_context(OrtRunner(
                       work / f"onnx_{model.replace(':', '_')}" / onnx.model_file, spec=spec,
                       intra_op_threads=threads)),
                   "executorch xnnpack": stack.enter_context(ExecuTorchRunner(
                       pte_folder / "model.pte", spec=spec, intra_op_threads=threads))}
        say(f"timing the {model} student: {repeats} interleaved rounds")
        times = interleaved(runners, feeds, repeats=repeats, calls=calls)
    base = times["torch eager"]["median_ms"]
    return {"model": f"{model} student", "latent": [spec.height, spec.width], "batch": spec.batch,
            "runners": times, "ratio_vs_torch": {k: round(v["median_ms"] / base, 3) for k, v in times.items()}}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="random:tiny-sd15,random:tiny-sdxl,toy",
                        help="parity: each model and its student ('' = none)")
    parser.add_argument("--bench", default="toy", help="latency: the students of these models ('' = none)")
    parser.add_argument("--name", help="results file stem under benchmarks/results/ (default by what runs)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    # timings take the heavy-job lock (one at a time on this machine); parity of tiny models does not need it
    command = ("flock /tmp/ld-heavy.lock " if args.bench else "") + \
        f"python benchmarks/bench_executorch.py {args_text}".strip()
    name = args.name or "bench_executorch" + ("_latency" if args.bench and not args.models else
                                              "_parity" if not args.bench else "")
    import torch

    from laptop_deploy.deploy.bench import environment

    torch.set_num_threads(args.threads)
    before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench_executorch."))
    rows, latency = [], []
    try:
        for model in filter(None, args.models.split(",")):
            for student in (False, True):
                rows.append(parity_row(model, student, work, args.steps))
                _write(name, command, before, rows, latency, args)  # partial results survive an interruption
        for model in filter(None, args.bench.split(",")):
            latency.append(latency_row(model, work, repeats=args.repeats, calls=args.calls, threads=args.threads))
            _write(name, command, before, rows, latency, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = _write(name, command, before, rows, latency, args, env=environment())
    print((RESULTS / f"{name}.md").read_text())
    return 0 if all(r["passed"] for r in data["parity"]) else 1


def _write(name: str, command: str, before: list[float], rows: list[dict], latency: list[dict], args, env=None) -> dict:
    after = load_average()
    cores = os.cpu_count() or 1
    busy = max(before[0], after[0]) > cores
    data = {"command": command, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
            "calls": args.calls, "load_average": {"before": before, "after": after, "logical_cores": cores},
            "warning": (f"machine busy: 1-min load average {max(before[0], after[0])} on {cores} logical cores; "
                        f"timings inflated (latency ratios come from one interleaved run); parity is unaffected") if busy else None,
            "parity": [{k: v for k, v in r.items() if k != "folder"} for r in rows], "latency": latency,
            "environment": env}
    if busy:
        say(f"WARNING: {data['warning']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(data))
    return data


def _markdown(data: dict) -> str:
    lines = ["# ExecuTorch (.pte, XNNPACK, fp32): parity, delegation, latency", "", f"Command: `{data['command']}`",
             "", f"Load average before/after: {data['load_average']['before']} / {data['load_average']['after']} "
             f"on {data['load_average']['logical_cores']} logical cores."]
    if data["warning"]:
        lines.append(f"**Warning:** {data['warning']}.")
    if data["parity"]:
        lines += ["", f"Parity against PyTorch fp32 on captured denoising inputs ({data['steps']}-step loop: first, "
                  "middle and last step) and seeded random inputs; fixed fp32 tolerances rel L2 ≤ 1e-4, PSNR ≥ 60 "
                  "dB.", "", "| model | passed | worst rel L2 | worst PSNR dB | end-to-end PSNR dB | conv/matmul "
                  "delegated | XNNPACK subgraphs | ops left on portable kernels (nodes) | .pte MB |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in data["parity"]:
        d = r["delegation"]
        share = "n/a" if d["compute_delegated_share"] is None else f"{d['compute_delegated_share']:.0%} of {d['compute_nodes']}"
        portable = ", ".join(f"{k.removeprefix('aten_')} {v}" for k, v in d["portable"].items())
        lines.append(f"| {r['model']} | {'yes' if r['passed'] else 'NO'} | {r['worst_rel_l2']:.2e} | "
                     f"{_db(r['worst_psnr_db'])} | {_db(r['e2e_psnr_db'])} | {share} | {d['subgraphs']} | {portable} | "
                     f"{r['pte_bytes'] / 1e6:.2f} |")
    if data["latency"]:
        lines += ["", f"Latency, one run, runners loaded once and interleaved ({data['repeats']} rounds x "
                  f"{data['calls']} calls, {data['threads']} thread each); median (min–max) ms per U-Net call and the "
                  "median's ratio to torch:", "", "| student | latent | torch eager | onnxruntime cpu | "
                  "executorch xnnpack | ORT / torch | .pte / torch |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in data["latency"]:
            cells = [f"{t['median_ms']:.2f} ({t['min_ms']:.2f}–{t['max_ms']:.2f})" for t in r["runners"].values()]
            ratio = r["ratio_vs_torch"]
            lines.append(f"| {r['model']} | {r['latent'][0]}x{r['latent'][1]} | {' | '.join(cells)} | "
                         f"{ratio['onnxruntime cpu']:.3f} | {ratio['executorch xnnpack']:.3f} |")
    return "\n".join(lines) + "\n"


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
