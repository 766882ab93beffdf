"""The README's main job, end to end, with its output committed: prune the toy teacher to 50%, grade it, write the
captioned toy dataset, distill 400 steps, grade again.

    .venv/bin/python benchmarks/main_job.py            # a few minutes on 2 idle cores

Each step runs the console command exactly as the README prints it (plus ``--json`` to read the numbers, and
``--cache-dir`` inside the work folder so that nothing outside it is touched), in a fresh process, and records its
wall time, its stderr lines (a fresh install's main job should print only laptop-deploy's own lines) and the load
average. Writes ``benchmarks/results/main_job.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "laptop_deploy"]
DISTILL = ["--steps", "400", "--batch-size", "32", "--lr", "3e-4", "--lr-schedule", "cosine", "--warmup-steps", "20",
           "--ema-decay", "0.99"]


def steps(work: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of each README command, paths inside ``work``."""
    student, data, run = work / "students" / "toy-50", work / "data" / "toy", work / "runs" / "toy-50"
    return [
        ("prune", CLI + ["prune", "--model", "toy", "--ratio", "0.5", "--out", str(student), "--json"]),
        ("quality (pruned)", CLI + ["quality", "--model", str(student), "--json"]),
        ("dataset", [sys.executable, "-m", "laptop_deploy.toy.dataset", "--out", str(data), "--count", "1920",
                     "--json"]),
        ("distill", CLI + ["distill", "--teacher", "toy", "--student", str(student), "--data", str(data), *DISTILL,
                           "--out", str(run), "--cache-dir", str(work / "cache"), "--json"]),
        ("quality (distilled)", CLI + ["quality", "--model", str(run), "--json"]),
    ]


def run_step(name: str, argv: list[str], threads: int | None) -> dict:
    load = os.getloadavg()[0]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    stderr = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"{name}: {seconds:.0f} s, {len(stderr)} stderr lines", file=sys.stderr)
    command = " ".join(argv[argv.index("-m") + 1:]).replace("laptop_deploy ", "laptop-deploy ", 1)
    return {"name": name, "command": command,
            "seconds": round(seconds, 1), "load_average_1min_at_start": round(load, 2), "stderr": stderr,
            "result": json.loads(proc.stdout)}


def summarize(rows: list[dict]) -> dict:
    prune, pruned, _, distill, distilled = (row["result"] for row in rows)
    teacher = pruned["models"][0]
    return {
        "params_before": prune["params_before"], "params_after": prune["params_after"],
        "params_ratio_achieved": prune["params_ratio_achieved"], "macs_ratio_achieved": prune["macs_ratio_achieved"],
        "joint_output_loss": prune["joint_output_loss"], "additivity": prune["additivity"],
        "teacher_alignment": teacher["alignment"], "teacher_alignment_95": teacher["alignment_95"],
        "pruned": {k: pruned["models"][1][k] for k in ("alignment", "alignment_95", "decline_pct", "psnr_db")},
        "pruned_paired_test": pruned["paired_test"],
        "distilled": {k: distilled["models"][1][k] for k in ("alignment", "alignment_95", "decline_pct", "psnr_db")},
        "distilled_paired_test": distilled["paired_test"],
        "distill_eval": {k: v.get("total") for k, v in distill["eval"].items()},
    }


def markdown(data: dict) -> str:
    s = data["summary"]
    lines = [
        "# The README's main job", "",
        f"`{data['command']}` — {data['when']}, {data['machine']}; load average at the start "
        f"{data['load_average_start']} (1/5/15 min){' — **the machine was busy: times are inflated**' if data['busy'] else ''}.",
        "",
        "| step | command | wall s | stderr lines |", "|---|---|---:|---:|",
    ]
    lines += [f"| {r['name']} | `{r['command']}` | {r['seconds']:.0f} | {len(r['stderr'])} |" for r in data["steps"]]
    add = s["additivity"] or {}
    lines += [
        "", f"- pruned: {s['params_before']:,} → {s['params_after']:,} params ({s['params_ratio_achieved']:.2%}), "
        f"{s['macs_ratio_achieved']:.2%} of MACs; output loss {s['joint_output_loss']:.6f}; additivity Pearson "
        f"{add.get('pearson', float('nan')):.3f}, Spearman {add.get('spearman', float('nan')):.3f}; chosen set: "
        f"{add.get('chosen_verdict')}",
        f"- teacher held-out alignment {s['teacher_alignment']:.3f} ({s['teacher_alignment_95'][0]:.3f}–"
        f"{s['teacher_alignment_95'][1]:.3f})",
    ]
    for key in ("pruned", "distilled"):
        row, test = s[key], s[f"{key}_paired_test"]
        lines.append(f"- {key}: alignment {row['alignment']:.3f} ({row['alignment_95'][0]:.3f}–"
                     f"{row['alignment_95'][1]:.3f}), decline {row['decline_pct']:+.1f}%, PSNR vs teacher "
                     f"{row['psnr_db']:.2f} dB; McNemar p = {test['p']:.2g} ({test['only_model_right']} right only "
                     f"with the student, {test['only_teacher_right']} only with the teacher)")
    noisy = [(r["name"], line) for r in data["steps"] for line in r["stderr"]]
    lines += ["", "stderr of the whole job" + (":" if noisy else ": empty (only laptop-deploy's own lines on stdout).")]
    lines += [f"    {name}: {line}" for name, line in noisy]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="main_job")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every step (default: torch's choice); "
                                                    "1 on a shared machine, where spinning threads slow ~100x")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="main-job-"))
    start_load = [round(x, 2) for x in os.getloadavg()]
    try:
        rows = [run_step(name, argv, args.threads) for name, argv in steps(work)]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    import platform

    command = "python benchmarks/main_job.py" + (f" --threads {args.threads}" if args.threads else "")
    data = {"command": command, "threads": args.threads or "torch default", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
            "load_average_start": start_load, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "busy": start_load[0] > (os.cpu_count() or 1), "steps": rows, "summary": summarize(rows)}
    if data["busy"]:
        print(f"warning: load average {start_load[0]} on {os.cpu_count()} cores: the times are inflated "
              f"(the quality numbers are not)", file=sys.stderr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
