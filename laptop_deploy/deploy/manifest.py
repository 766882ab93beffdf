"""``manifest.json``: what an exported artifact is, where it came from, and what was measured on it.

Written beside every artifact by its exporter; ``verify`` and ``bench`` add their results under ``results``::

    format, version        "laptop-deploy-artifact", 1
    target, precision      e.g. "onnx", "fp16"
    model_file             the file a runner loads (e.g. "model.onnx", "model.ort")
    files                  {name: {"bytes": int, "sha256": hex}} for every file of the artifact
    spec                   the ExportSpec (laptop_deploy.deploy.spec) as a dict
    source                 the model spec string, kind, family, params, removed layers, "sha256" of its weights
    tools                  versions of python, torch, diffusers, onnx, onnxruntime, ... at export time
    export                 how it was exported (exporter, opset, seconds, peak RSS, fp16 block list, ...)
    results                {"parity": {...}, "latency": {...}} once measured

Reading checks the format and every listed file's size, so a truncated or partly copied artifact is an error
before any runtime sees it; :func:`check_integrity` also re-hashes every file against its recorded sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LaptopDeployError
from .integrity import MANIFEST, check_files, file_entry, write_json_atomically
from .spec import ExportSpec

FORMAT = "laptop-deploy-artifact"
FORMAT_VERSION = 1
TOOLS = ("torch", "diffusers", "transformers", "numpy", "onnx", "onnxruntime", "onnxscript", "onnxslim",
         "coremltools", "tensorrt", "executorch")


class ArtifactError(LaptopDeployError):
    """An artifact folder that cannot be used: no manifest, a malformed one, or files that do not match it."""


@dataclass
class Manifest:
    """The parsed ``manifest.json`` (see the module docstring for the fields)."""

    target: str
    precision: str
    model_file: str
    spec: ExportSpec
    source: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.as_dict()
        return {"format": FORMAT, "version": FORMAT_VERSION, **data}


def tool_versions() -> dict[str, str]:
    """Installed versions of the libraries an artifact's numbers depend on (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def model_hash(unet: nn.Module) -> str:
    """``sha256:<hex>`` over the U-Net's config and every tensor of its state dict (name, dtype, shape, bytes).

    Equal hashes mean the same architecture, removal set and weights, whatever file or preset they came from.
    """
    # Private keys (diffusers' `_use_default_values`, `_diffusers_version`...) are bookkeeping; the first is built
    # from a set, so its order changes between processes.
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest_tensors(digest, unet)
    return f"sha256:{digest.hexdigest()}"


def digest_tensors(digest: Any, module: nn.Module) -> Any:
    """Feed every tensor of ``module``'s state dict (name, dtype, shape, bytes; meta tensors without bytes) into
    the hashlib object ``digest``, in name order; returns it."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().data)
    return digest



def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """:func:`file_entry` for every regular file directly in ``folder`` except the manifest."""
    return {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file, then rename)."""
    return write_json_atomically(folder / MANIFEST, manifest.as_dict())


def read_manifest(folder: Path, *, check_files: bool = True) -> Manifest:
    """The manifest of the artifact in ``folder``; every listed file must exist with its recorded size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not an artifact folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not an artifact written by `laptop-deploy export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        got = (data.get("format"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{path}: format {got}, expected ('{FORMAT}', {FORMAT_VERSION})")
    try:
        manifest = Manifest(target=data["target"], precision=data["precision"], model_file=data["model_file"],
                            spec=ExportSpec.from_dict(data["spec"]), source=data["source"],
                            files=data.get("files", {}), tools=data.get("tools", {}),
                            export=data.get("export", {}), results=data.get("results", {}))
    except KeyError as exc:
        raise ArtifactError(f"{path}: missing field {exc}") from None
    if check_files:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists with the recorded byte size (a cheap truncation check; the digests
    are re-read by :func:`check_integrity`, which every verb that runs an artifact calls)."""
    package = manifest.model_file + "/"  # a directory artifact (Core ML .mlpackage) lists the files inside it
    if manifest.model_file not in manifest.files and not any(name.startswith(package) for name in manifest.files):
        raise ArtifactError(f"{folder / MANIFEST}: model file '{manifest.model_file}' is not among its files")
    check_files(folder, manifest.files, skip_digest=True, error=ArtifactError)


def check_integrity(folder: Path, manifest: Manifest | None = None, *, skip_digest: bool = False) -> Manifest:
    """The manifest of the artifact in ``folder`` after checking every file it lists against it: present, the
    recorded byte size, and (unless ``skip_digest``) the recorded sha256, re-read from disk. Raises
    :class:`ArtifactError` (exit 2) naming the first file that differs, or that the manifest lists without a
    digest. Call it before any runtime loads the artifact (``verify``, ``bench``, ``profile``, ``generate``).

    Cost: one sequential read of the artifact (sha256 runs at roughly 0.5-1 GB/s per core, so ~3-7 s for a
    full-size fp32 SD-1.5 U-Net, milliseconds for the tiny presets). ``manifest`` skips re-reading the JSON.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder, check_files=False)
    verify_files(folder, manifest)
    check_files(folder, manifest.files, skip_digest=skip_digest, error=ArtifactError)
    return manifest


def record_result(folder: Path, key: str, value: Mapping[str, Any]) -> None:
    """Store ``value`` under ``results[key]`` in the manifest of ``folder`` (atomically)."""
    manifest = read_manifest(folder, check_files=False)
    manifest.results[key] = dict(value)
    write_manifest(folder, manifest)
