"""The student format: a pruned U-Net saved as a folder that reloads exactly, or not at all.

Layout of a student folder::

    config.json                  the teacher's diffusers UNet2DConditionModel config, unchanged
    student.safetensors          the student's state dict (removed units have no tensors)
    laptop_deploy_student.json   format tag, removal set, parameter counts, where the teacher came from

The weights deliberately do not use diffusers' file name: ``UNet2DConditionModel.from_pretrained`` on a student
folder fails with "no file named diffusion_pytorch_model..." instead of silently random-initialising the removed
layers (diffusers only warns about missing keys). :func:`load_student` rebuilds the teacher architecture on the meta
device, removes the same units, and loads with every key accounted for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StudentFormatError
from ..outputs import MARKER, as_path, write_atomically
from .layers import apply_removal, removed_layers
from .weights import read_safetensors

FORMAT = "laptop-deploy-student"
FORMAT_VERSION = 1
META_FILE = "laptop_deploy_student.json"
WEIGHTS_FILE = "student.safetensors"
STAGING = ".student-staging"  # publish_student's folder inside a run folder


def is_student_folder(path: str | os.PathLike[str]) -> bool:
    return (as_path(path) / META_FILE).is_file()


def make_student(teacher: nn.Module, names: list[str]) -> nn.Module:
    """Remove ``names`` from ``teacher`` in place and return it (the same object: no copy of the weights)."""
    apply_removal(teacher, names)
    return teacher


def save_student(student: nn.Module, out: str | os.PathLike[str], *, teacher: dict[str, Any], force: bool = False,
                 extra: dict[str, Any] | None = None, files: dict[str, str] | None = None) -> Path:
    """Write ``student`` to the folder ``out`` (atomically). ``teacher`` describes the source (spec, params);
    ``extra`` goes into the metadata; ``files`` are further text files (name -> content) written beside it."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "removed": removed_layers(student),
        "params": sum(p.numel() for p in student.parameters()),
        "teacher": teacher,
        "weights": WEIGHTS_FILE,
        **(extra or {}),
    }

    def write(tmp: Path) -> None:
        student.save_config(tmp)
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, content in (files or {}).items():
            (tmp / name).write_text(content)

    return write_atomically(out, write, force=force, kind="student")


def publish_student(student: nn.Module, folder: str | os.PathLike[str], **kwargs: Any) -> Path:
    """:func:`save_student` into an existing folder that holds other files (a distillation run): staged in a
    subfolder, then each file renamed into place, the metadata last — the folder is a student only once whole."""
    folder = as_path(folder)
    staging = folder / STAGING
    save_student(student, staging, force=True, **kwargs)
    (staging / MARKER).unlink()  # the run folder keeps its own marker, which already declares these names
    for path in sorted(staging.iterdir(), key=lambda p: p.name == META_FILE):
        os.replace(path, folder / path.name)
    staging.rmdir()
    return folder


def read_student_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = as_path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudentFormatError(f"{path / META_FILE}: unreadable student metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise StudentFormatError(f"{path / META_FILE}: format {found[0]!r} v{found[1]!r}, "
                                 f"expected {FORMAT!r} v{FORMAT_VERSION}")
    missing = [key for key in ("removed", "params", "weights") if key not in meta]
    if missing or not isinstance(meta["removed"], list):
        raise StudentFormatError(f"{path / META_FILE}: metadata lacks {', '.join(missing) or 'a removed list'}")
    return meta


def load_student(path: str | os.PathLike[str], *, materialize: bool = True) -> nn.Module:
    """Rebuild the student saved in ``path``; any missing or unexpected tensor is an error, never a random init.

    ``materialize=False`` returns the architecture on the meta device without reading the weights.
    """
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError

    path = as_path(path)
    meta = read_student_meta(path)
    config = UNet2DConditionModel.load_config(path)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(config)
    make_student(student, meta["removed"])
    if not materialize:
        return student.eval()
    try:
        state = read_safetensors(path / meta["weights"])
    except (OSError, SafetensorError) as exc:
        raise StudentFormatError(f"{path / meta['weights']}: unreadable weights ({exc})") from None
    expected = set(student.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise StudentFormatError(
            f"{path}: weights do not match the removal set: {len(missing)} missing "
            f"({', '.join(missing[:3])}) and {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    try:
        student.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches: keep the last (most specific) line of torch's report
        raise StudentFormatError(f"{path}: weights do not fit the architecture: {str(exc).splitlines()[-1].strip()}") from None
    params = sum(p.numel() for p in student.parameters())
    if params != meta["params"]:
        raise StudentFormatError(f"{path}: {params} parameters loaded, metadata says {meta['params']}")
    return student.eval()
