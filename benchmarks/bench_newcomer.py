"""How long a newcomer waits for the README's main job: the toy data, one ``compress`` run (prune, distill, app
bundle, verify, bench, report) and one ``generate`` from the bundle, each timed as a fresh process in an empty
folder — the commands exactly as README.md prints them (after the install, which is not timed here).

    flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_newcomer.py

writes benchmarks/results/newcomer.json and .md (wall seconds per command, the load average before and after, a
warning when the machine was busy). Target (issue 19): report and picture in under 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
COMMAND = "flock /tmp/ld-heavy.lock .venv/bin/python benchmarks/bench_newcomer.py"
# The README's main job, verbatim (.venv/bin/... is this checkout's virtual environment).
STEPS = [
    ".venv/bin/python -m laptop_deploy.toy.dataset --out data/toy --count 1920",
    ".venv/bin/laptop-deploy compress --model toy --budget params=0.5 --pipeline --data data/toy "
    "--distill-steps 400 --batch-size 32 --lr 3e-4 --lr-schedule cosine --warmup-steps 20 --ema-decay 0.99 "
    "--out runs/toy-50",
    '.venv/bin/laptop-deploy generate runs/toy-50/export --prompt "a red circle at the top left" --guidance 4 '
    "--out red-circle.png",
]
TARGET_S = 300


def run(workdir: Path) -> dict:
    venv = REPO / ".venv" / "bin"
    rows = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    for command in STEPS:
        argv = shlex.split(command)
        argv[0] = str(venv / Path(argv[0]).name)
        tick = time.perf_counter()
        done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - tick
        rows.append({"command": command, "seconds": round(seconds, 1), "exit_code": done.returncode,
                     "stderr_tail": done.stderr.strip().splitlines()[-12:]})
        print(f"{seconds:7.1f} s  exit {done.returncode}  {command}", file=sys.stderr, flush=True)
        if done.returncode != 0:
            break
    total = time.perf_counter() - started
    load_after = os.getloadavg()
    cores = os.cpu_count() or 1
    report = workdir / "runs" / "toy-50" / "report" / "report.md"
    return {"command": COMMAND, "steps": rows, "total_s": round(total, 1), "target_s": TARGET_S,
            "met": total <= TARGET_S and all(r["exit_code"] == 0 for r in rows),
            "report_written": report.is_file(), "picture_written": (workdir / "red-circle.png").is_file(),
            "report_head": report.read_text().splitlines()[:16] if report.is_file() else [],
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
            "busy": max(load_before[0], load_after[0]) > 0.5 * cores, "cores": cores,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def markdown(data: dict) -> str:
    lines = [f"# Newcomer time: the README's main job", "", f"Command: `{data['command']}`", "",
             f"Total **{data['total_s']:.0f} s** (target {data['target_s']} s: "
             f"{'met' if data['met'] else 'NOT met'}); report written: {data['report_written']}, picture written: "
             f"{data['picture_written']}; {data['cores']} cores, load average {data['load_before'][0]:.2f} before, "
             f"{data['load_after'][0]:.2f} after.", ""]
    if data["busy"]:
        lines += ["**Warning: the machine was busy (load average above half the cores): these times are upper "
                  "bounds; rerun in a quiet window.**", ""]
    lines += ["| seconds | exit | command |", "|---:|---:|---|"]
    lines += [f"| {r['seconds']:.1f} | {r['exit_code']} | `{r['command']}` |" for r in data["steps"]]
    lines += ["", "Report head:", "", "```", *data["report_head"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        data = run(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-newcomer-") as tmp:
            data = run(Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "newcomer.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "newcomer.md").write_text(markdown(data))
    print(markdown(data))
    return 0 if all(r["exit_code"] == 0 for r in data["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
