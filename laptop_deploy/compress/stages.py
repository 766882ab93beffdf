"""The stage machinery of a compress run: each stage in its own subfolder of the run folder, keyed by a fingerprint of
its settings and of the fingerprints of the stages it reads, skipped when its done-marker carries that fingerprint.

Layout of a run folder ``RUN``::

    recipe.toml              the resolved recipe of the latest invocation
    .compress/NAME.started   the fingerprint a stage was started with (a killed stage of the same fingerprint
                             resumes from its own checkpoint, e.g. distillation; otherwise its folder starts over)
    NAME/                    the stage's output, written through the safe output function
    NAME/stage.json          the done-marker, written last: fingerprint, settings, inputs, result, seconds

Fingerprints chain: a stage's fingerprint hashes its settings and its inputs' fingerprints, so a changed setting
re-runs its stage and every stage after it that reads it, directly or not, and nothing before it.
No torch here: the machinery is tested without models.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError

DONE_FILE = "stage.json"
STATE_DIR = ".compress"
RECIPE_FILE = "recipe.toml"
RUN_KIND = "compress-run"
FINGERPRINT_VERSION = 1
# Test hook: SIGKILL this very process at a named point ("STAGE:end" after a stage's work, before its marker;
# stages name their own mid-stage points, e.g. "distill:step=2"). Real process death, as a user's kill -9.
KILL_ENV = "LAPTOP_DEPLOY_KILL_AT"


def maybe_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StageContext:
    """What a running stage sees: its folder (not yet existing for a fresh stage), the results of the stages
    before it (from their markers), and whether a killed attempt with the same fingerprint left state behind."""

    run_dir: Path
    folder: Path
    results: dict[str, dict[str, Any]]
    resume: bool


@dataclass
class Stage:
    """``run(ctx) -> result`` writes ``ctx.folder`` (through the safe output function) and returns a JSON-able
    summary stored in the marker. ``inputs`` name the earlier stages it reads."""

    name: str
    settings: dict[str, Any]
    run: Callable[[StageContext], dict[str, Any]]
    inputs: tuple[str, ...] = ()
    resumable: bool = False  # keeps a killed attempt's state (its own checkpoint); others always start over


@dataclass
class Outcome:
    name: str
    status: str  # "ran", "resumed" or "skipped"
    seconds: float
    fingerprint: str
    result: dict[str, Any] = field(default_factory=dict)


def fingerprint(stage: Stage, upstream: dict[str, str]) -> str:
    """sha256 of the stage's name, settings and its inputs' fingerprints (canonical JSON)."""
    payload = {"version": FINGERPRINT_VERSION, "stage": stage.name, "settings": stage.settings,
               "inputs": {name: upstream[name] for name in stage.inputs}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_done(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "fingerprint" in data else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write-then-rename with fsync: a marker is either absent or whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_run_folder(out: Path) -> None:
    """``--out`` must be new, empty, or a compress run folder (resumed without ``--force``); checked before
    anything loads, creating nothing."""
    from ..outputs import prepare_output, read_marker

    prepare_output(out, keep=True)
    if out.is_dir() and os.listdir(out):
        marker = read_marker(out) or {}
        if marker.get("kind") != RUN_KIND:
            raise OutputError(f"--out {out} is a laptop-deploy {marker.get('kind', 'folder')}, not a compress run "
                              f"folder; choose a new folder")


def open_run_folder(out: Path, stage_names: list[str], recipe_toml: str) -> None:
    """Create the run folder (or keep the existing run) and store the resolved recipe."""
    from ..outputs import fresh_folder, read_marker, write_marker

    entries = [RECIPE_FILE, STATE_DIR, *stage_names]
    if not (out.is_dir() and os.listdir(out)):
        fresh_folder(out, kind=RUN_KIND, entries=entries)
    else:  # a run of another recipe may have had other stages: the marker keeps every name ever declared
        known = (read_marker(out) or {}).get("entries", [])
        write_marker(out, kind=RUN_KIND, entries=sorted(set(known) | set(entries)))
    (out / STATE_DIR).mkdir(exist_ok=True)
    _write_text(out / RECIPE_FILE, recipe_toml, staging=out / STATE_DIR)


def _write_text(path: Path, text: str, *, staging: Path) -> None:
    """Write-then-rename; the temporary file lives in ``staging`` (ours), so a kill leaves no stray name."""
    tmp = staging / f"{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _clear_stage(run_dir: Path, name: str) -> None:
    """Remove a stage's folder and the temporary siblings a killed atomic write left (all written by us)."""
    from ..outputs import delete_tree

    for path in [run_dir / name, *run_dir.glob(f".{name}.*")]:
        if path.exists() or path.is_symlink():
            delete_tree(path)


def run_stages(run_dir: Path, stages: list[Stage], *, log: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run ``stages`` in order: skip each whose done-marker matches its fingerprint, else (re)run it."""
    outcomes: list[Outcome] = []
    prints: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    width = max(len(s.name) for s in stages)
    for index, stage in enumerate(stages, 1):
        missing = [n for n in stage.inputs if n not in prints]
        if missing:
            raise ValueError(f"stage {stage.name} reads {missing[0]}, which does not run before it")
        fp = fingerprint(stage, prints)
        folder = run_dir / stage.name
        done = read_done(folder)
        tag = f"[{index}/{len(stages)}] {stage.name:<{width}}"
        if done is not None and done["fingerprint"] == fp:
            outcome = Outcome(stage.name, "skipped", 0.0, fp, done.get("result", {}))
            _say(log, f"{tag}  up to date (finished earlier in {done.get('seconds', 0):.1f} s)")
        else:
            outcome = _run_one(run_dir, stage, fp, results, tag, log)
        prints[stage.name], results[stage.name] = fp, outcome.result
        outcomes.append(outcome)
    return outcomes


def _run_one(run_dir: Path, stage: Stage, fp: str, results: dict[str, dict[str, Any]], tag: str,
             log: Callable[[str], None] | None) -> Outcome:
    started_file = run_dir / STATE_DIR / f"{stage.name}.started"
    folder = run_dir / stage.name
    resume = stage.resumable and started_file.is_file() and started_file.read_text().strip() == fp \
        and folder.is_dir() and read_done(folder) is None
    if not resume:
        _clear_stage(run_dir, stage.name)
        _write_text(started_file, fp + "\n", staging=started_file.parent)
    if log is not None and sys.stderr.isatty():
        _say(log, f"{tag}  {'resuming' if resume else 'running'}...")
    start = time.perf_counter()
    result = stage.run(StageContext(run_dir, folder, dict(results), resume))
    seconds = time.perf_counter() - start
    maybe_kill(f"{stage.name}:end")
    folder.mkdir(exist_ok=True)
    _write_json(folder / DONE_FILE, {"stage": stage.name, "fingerprint": fp, "settings": stage.settings,
                                     "inputs": list(stage.inputs), "seconds": round(seconds, 2),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "result": result})
    started_file.unlink(missing_ok=True)
    status = "resumed" if resume else "ran"
    _say(log, f"{tag}  {'resumed and ' if resume else ''}done in {seconds:.1f} s")
    return Outcome(stage.name, status, seconds, fp, result)


def _say(log: Callable[[str], None] | None, line: str) -> None:
    if log is not None:
        log(line)
