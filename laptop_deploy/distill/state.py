"""The distillation run folder: atomic checkpoints, the settings fingerprint that guards ``--resume``, the JSONL log
kept consistent with the checkpoint, and the checks on ``--out`` made before anything loads.

Layout of ``--out``: ``checkpoints/last.pt``, ``distill_log.jsonl``, then (at the end) the student files and
``distill_summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DistillError, OutputError
from ..models.student import META_FILE, STAGING, WEIGHTS_FILE
from ..outputs import foreign_entries, fresh_folder, prepare_output

if TYPE_CHECKING:
    from .options import DistEnv, DistillOptions
    from .data import DistillData

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
LOG_FILE = "distill_log.jsonl"
SUMMARY_FILE = "distill_summary.json"
CHECKPOINT_VERSION = 1
# Every top-level name a run writes into --out (its marker declares them): checkpoints, log, summary, and the
# student's files (published through STAGING at the end).
RUN_ENTRIES = (CHECKPOINT_DIR, LOG_FILE, SUMMARY_FILE, "config.json", WEIGHTS_FILE, META_FILE, STAGING)


def plain_json(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, paths strings): comparable with a loaded one."""
    return json.loads(json.dumps(value, default=str))


def _fsync_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` into a temporary sibling, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _fsync_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DistillError(f"--resume: no checkpoint at {path} (nothing to resume; drop --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise DistillError(f"--resume: checkpoint {path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise DistillError(f"--resume: {path} is not a laptop-deploy distillation checkpoint "
                           f"v{CHECKPOINT_VERSION}")
    return state


def fingerprint(options: DistillOptions, lambda_task: float, teacher: dict[str, Any], student: dict[str, Any],
                 data: DistillData, env: DistEnv) -> dict[str, Any]:
    """What must not change between a checkpoint and its resumption (``--steps`` may grow unless cosine)."""
    settings = {k: v for k, v in asdict(options).items() if k not in ("steps", "checkpoint_every", "device",
                                                                       "gradient_checkpointing", "lambda_task")}
    if options.lr_schedule == "cosine":
        settings["steps"] = options.steps
    settings["lambda_task"] = lambda_task
    described = {k: v for k, v in data.description.items() if k in ("kind", "samples", "folder", "cache")}
    return plain_json({"settings": settings, "teacher": teacher, "student": student, "data": described,
                   "world_size": env.world_size})


def differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} (checkpoint) vs {b!r} (now)")
    return out


def prepare_run_folder(out: Path, *, resume: bool, force: bool) -> Path:
    """A fresh run needs a new, empty or laptop-deploy-written ``--out`` (replaced only with ``--force``);
    ``--resume`` needs its checkpoint. Checked (writability too, see :func:`~laptop_deploy.outputs.prepare_output`)
    before anything is loaded, and without creating anything."""
    if resume and force:
        raise DistillError("--resume and --force contradict each other (--force starts over)")
    if not resume and not force and Path(out).is_dir() and os.listdir(out) and not foreign_entries(Path(out)):
        raise OutputError(f"--out {out} is a non-empty folder; pass --resume to continue its run or --force to "
                          f"start over")
    out = prepare_output(out, force=force, keep=resume)
    if resume and not (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        raise DistillError(f"--resume: no checkpoint at {out / CHECKPOINT_DIR / CHECKPOINT_FILE} "
                           f"(nothing to resume; drop --resume to start)")
    return out


def start_run_folder(out: Path, *, force: bool) -> Path:
    """A fresh run: ``out`` becomes an empty run folder with its marker (an old run is replaced atomically, and
    only once the models and data have loaded, so a bad flag destroys nothing)."""
    return fresh_folder(out, force=force, kind="distill-run", entries=RUN_ENTRIES)


def logged_start(path: Path) -> dict[str, Any]:
    """The step-0 evaluation a resumed run's log already holds (so the summary still compares start and end)."""
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("event") == "eval" and record.get("step") == 0:
            return {"start": {k: v for k, v in record.items() if k not in ("event", "step", "which")}}
    return {}


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (a killed run logged steps it will now redo)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if record.get("step", 0) <= step and not record.get("event") == "end":
            kept.append(line)
    _fsync_write(path, lambda handle: handle.write("".join(f"{line}\n" for line in kept).encode()))
