"""Model sources: every way a user can name a U-Net, resolved in one place.

A spec string is one of:

* ``random:<preset>`` — a built-in architecture with seeded random weights (see :mod:`laptop_deploy.models.presets`);
* a student folder (``laptop_deploy_student.json`` inside), a diffusers U-Net folder (``config.json`` +
  weights), or a pipeline folder (``model_index.json`` + ``unet/``; its other parts load on demand);
* a single checkpoint file: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/``.bin`` (pickle only with opt-in);
* a hub id ``owner/name`` — only when online; offline it is a clear error, never a hang;
* ``toy`` — the trained toy teacher shipped inside the package (:mod:`laptop_deploy.toy`), a pipeline folder.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelSourceError
from ..outputs import as_path
from .pipeline import PART_NAMES, build_pipeline, build_preset_part
from .presets import Preset, get_preset
from .student import is_student_folder, load_student, read_student_meta

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PART_LIBRARIES = ("diffusers", "transformers")  # model_index.json may only name classes from these, or:
_OWN_PARTS = {("laptop_deploy.toy.latent", "SpaceToDepthVAE")}  # laptop_deploy's own part classes


@dataclass
class ModelSource:
    """A resolved U-Net plus what came with it. ``kind`` says which route resolved it; ``family`` is ``sd1``,
    ``sd2`` or ``sdxl``. Pipeline parts (:data:`PART_NAMES`) load lazily through :meth:`part`."""

    spec: str
    kind: str
    unet: nn.Module
    family: str
    path: Path | None = None
    preset: Preset | None = None
    seed: int = 0
    removed: list[str] = field(default_factory=list)
    _parts: dict[str, Any] = field(default_factory=dict, repr=False)

    def available_parts(self) -> list[str]:
        if self.preset is not None:
            return [n for n in PART_NAMES if n[-2:] != "_2" or len(self.preset.text_encoders) > 1]
        if self.kind in ("pipeline-folder", "toy"):
            index = json.loads((self.path / "model_index.json").read_text())
            return [n for n in PART_NAMES if (index.get(n) or [None])[0] and (self.path / n).is_dir()]
        return []

    def part(self, name: str) -> Any:
        """One pipeline part (``text_encoder``, ``tokenizer_2``, ``vae``, ``scheduler``…), loaded once."""
        if name not in self.available_parts():
            raise ModelSourceError(f"model '{self.spec}' has no {name}; it has: "
                                   f"{', '.join(self.available_parts()) or 'no pipeline parts (a bare U-Net)'}")
        if name not in self._parts:
            if self.preset is not None:
                self._parts[name] = build_preset_part(self.preset, name, seed=self.seed)
            else:
                self._parts[name] = _load_folder_part(self.path, name)
        return self._parts[name]

    def pipeline(self, unet: nn.Module | None = None):
        """A diffusers pipeline around ``unet`` (default: this source's) with this source's other parts."""
        parts = {name: self.part(name) for name in self.available_parts()}
        return build_pipeline(unet if unet is not None else self.unet, parts, family=self.family)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "family": self.family,
                "params": sum(p.numel() for p in self.unet.parameters()),
                **({"seed": self.seed} if self.preset is not None else {}),
                **({"removed": self.removed} if self.removed else {})}


def family_of(config: Any) -> str:
    """``sdxl`` for text_time added conditioning, ``sd2`` for linear projections / 1024-wide text, else ``sd1``."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def resolve_model(spec: str | os.PathLike[str], *, materialize: bool = True, seed: int = 0,
                  allow_pickle: bool = False) -> ModelSource:
    """Resolve ``spec`` (a spec string or a path) to a U-Net in eval mode. ``materialize=False`` gives the
    architecture on the meta device (no weights read or drawn) wherever the route allows it: enough for counting
    parameters and MACs."""
    if not isinstance(spec, str):
        spec = str(as_path(spec, what="model spec"))
    if spec.startswith("random:"):
        return _from_preset(spec, get_preset(spec.removeprefix("random:")), materialize=materialize, seed=seed)
    if spec == "toy":
        return _from_toy(materialize=materialize)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(spec, path, allow_pickle=allow_pickle)
    if path.is_dir():
        return _from_folder(spec, path, materialize=materialize)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _from_hub(spec)
    raise ModelSourceError(f"model '{spec}' not found: no such file or folder, and not a random:<preset> "
                           f"or hub id")


def _from_preset(spec: str, preset: Preset, *, materialize: bool, seed: int) -> ModelSource:
    from diffusers import UNet2DConditionModel

    if materialize:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**preset.unet)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**preset.unet)
    return ModelSource(spec, "preset", unet.eval(), preset.family, preset=preset, seed=seed)


def _from_toy(*, materialize: bool) -> ModelSource:
    """The trained toy teacher: the pipeline folder committed inside the package."""
    from ..toy.model import TEACHER_DIR

    if not (TEACHER_DIR / "model_index.json").is_file():
        raise ModelSourceError(f"model 'toy': its weights are missing from {TEACHER_DIR} (a broken install?); "
                               f"retrain with python -m laptop_deploy.toy.train --out {TEACHER_DIR}")
    source = _from_folder("toy", TEACHER_DIR, materialize=materialize)
    source.kind = "toy"
    return source


def _from_file(spec: str, path: Path, *, allow_pickle: bool) -> ModelSource:
    from .single_file import load_single_file

    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelSourceError(f"{path}: unsupported file type '{path.suffix}'; expected one of "
                               f"{', '.join(CHECKPOINT_SUFFIXES)} or a folder")
    loaded = load_single_file(path, allow_pickle=allow_pickle)
    return ModelSource(spec, "single-file", loaded.unet, loaded.family, path=path)


def _from_folder(spec: str, path: Path, *, materialize: bool) -> ModelSource:
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        if not unet_dir.is_dir():
            raise ModelSourceError(f"{path}: pipeline folder without a unet/ subfolder")
        source = _from_folder(spec, unet_dir, materialize=materialize)
        source.kind, source.path = "pipeline-folder", path
        return source
    if is_student_folder(path):
        unet = load_student(path, materialize=materialize)
        return ModelSource(spec, "student", unet, family_of(unet.config), path=path,
                           removed=list(read_student_meta(path)["removed"]))
    if (path / "config.json").is_file():
        return ModelSource(spec, "unet-folder", _load_unet_folder(path, materialize=materialize),
                           family_of(json.loads((path / "config.json").read_text())), path=path)
    raise ModelSourceError(f"{path}: not a model folder (expected model_index.json, config.json or "
                           f"laptop_deploy_student.json inside)")


def _load_unet_folder(path: Path, *, materialize: bool) -> nn.Module:
    """A diffusers U-Net folder; every missing or unexpected weight is an error (diffusers would only warn)."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(path)
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ModelSourceError(f"{path}: a {config['_class_name']}, expected a UNet2DConditionModel")
        if not materialize:
            with torch.device("meta"):
                return UNet2DConditionModel.from_config(config).eval()
        unet, info = UNet2DConditionModel.from_pretrained(path, output_loading_info=True,
                                                          low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path}: cannot load U-Net ({_first_line(exc)})") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{len(v)} {k.replace('_', ' ')} ({', '.join(map(str, v[:3]))})" for k, v in bad.items())
        raise ModelSourceError(f"{path}: weights do not match config.json: {detail}")
    return unet.eval()


def _load_folder_part(path: Path, name: str) -> Any:
    library, class_name = json.loads((path / "model_index.json").read_text())[name]
    if library not in _PART_LIBRARIES and (library, class_name) not in _OWN_PARTS:
        raise ModelSourceError(f"{path}/model_index.json: part '{name}' comes from '{library}'; only "
                               f"{', '.join(_PART_LIBRARIES)} classes and the toy's SpaceToDepthVAE are loaded")
    cls = getattr(importlib.import_module(library), class_name)
    _quiet_progress(library)
    try:
        return cls.from_pretrained(path / name)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path / name}: cannot load {class_name} ({_first_line(exc)})") from None


def _quiet_progress(library: str) -> None:
    """No "Loading weights" bars from transformers/diffusers: stderr carries our progress and one-line errors."""
    if library in _PART_LIBRARIES:
        importlib.import_module(f"{library}.utils.logging").disable_progress_bar()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect: checked first, because huggingface_hub retries an
    unreachable host for about a minute per file before failing."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _from_hub(spec: str) -> ModelSource:
    """A hub id: fetched when the hub is reachable, else served from the local hub cache, else a clear error."""
    from diffusers import UNet2DConditionModel

    online = _hub_reachable()
    last: Exception | None = None
    for subfolder in ("unet", None):
        try:
            unet = UNet2DConditionModel.from_pretrained(spec, subfolder=subfolder, local_files_only=not online)
            return ModelSource(spec, "hub", unet.eval(), family_of(unet.config))
        except (OSError, ValueError) as exc:
            last = exc
    if not online:
        raise ModelSourceError(f"'{spec}' is not a local path, the hub is unreachable (offline) and it is not in "
                               f"the local hub cache; pass a local folder or file")
    raise ModelSourceError(f"'{spec}' is not a local path and could not be fetched from the hub "
                           f"({_first_line(last)})")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
