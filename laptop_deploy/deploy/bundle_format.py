"""An app bundle's layout and its ``manifest.json`` — read, written and checked without torch.

``export --pipeline`` writes the diffusers/Optimum ONNX pipeline layout, which
``diffusers.OnnxStableDiffusionPipeline.from_pretrained`` loads as it is (SD-1.x/2.x)::

    model_index.json                 diffusers' pipeline index (OnnxStableDiffusionPipeline / ORT SDXL names)
    manifest.json                    this module's format: parts, tokenizers, scheduler, image geometry, files
    text_encoder/model.onnx          input_ids int32 [batch, 77] -> last_hidden_state, pooler_output (...)
    text_encoder_2/model.onnx        SDXL only: -> text_embeds, last_hidden_state, hidden_states.0..L
    unet/model.onnx                  the (pruned) U-Net, ExportSpec names (sample, timestep, ...)
    vae_decoder/model.onnx           latent_sample [batch, C, h, w] (already / scaling_factor) -> sample in [-1, 1]
    vae_encoder/model.onnx           sample [batch, 3, H, W] -> latent_sample (the posterior mean, unscaled)
    tokenizer/, tokenizer_2/         tokenizer.json (the `tokenizers` library reads it) + transformers' files
    scheduler/scheduler_config.json  the source's scheduler config, unchanged

ORT Mobile bundles have ``model.ort`` in place of ``model.onnx``, ExecuTorch bundles ``model.pte`` (and no
``model_index.json``: :mod:`.bundle_executorch`). Every part folder also holds the part's own
``manifest.json`` (the single-artifact format of :mod:`laptop_deploy.deploy.manifest`). Core ML bundles
(:mod:`.bundle_coreml`) use Apple's Resources names instead (``TextEncoder.mlpackage``, ``Unet.mlpackage`` or
``UnetChunk1/2.mlpackage``, ``VAEDecoder.mlpackage``, ``vocab.json``, ``merges.txt``…): a part's ``model_file`` is
then a package folder, and ``files`` lists every file inside it.

This module is imported by the torch-free app loop (:mod:`.generate`): it may import only the standard library and
numpy. :func:`check_bundle` is the digest check every verb that loads a bundle runs first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError
from .integrity import MANIFEST, check_files, file_entry, write_json_atomically

BUNDLE_FORMAT = "laptop-deploy-bundle"
BUNDLE_VERSION = 1
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# the order an app runs them in, which is also the order --sequential loads them
PART_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class BundleError(LaptopDeployError):
    """A bundle folder that cannot be used: no manifest, a part missing, a file whose size or digest differs."""


@dataclass
class BundleManifest:
    """The parsed bundle ``manifest.json``.

    ``parts``: {part: {"model_file", "precision", "inputs", "outputs", "bytes", "weight_bytes", "note"?}} where
    inputs/outputs are ``[{"name", "shape", "dtype"}]`` (axis names for dynamic axes), ``bytes`` the part's files
    and ``weight_bytes`` the fp32 state dict of the module it was traced from (for VAE parts: the whole VAE). ``tokenizers``:
    {folder: {"file", "max_length", "pad_id"}}. ``image``: {"vae_scale_factor", "latent_channels",
    "scaling_factor", "shift_factor", "height", "width", "multiple_of"} in image pixels. ``unet``: {"sdxl",
    "projection_dim", "force_zeros_for_empty_prompt"}. ``files``: {relative path: {"bytes", "sha256"}}.
    """

    target: str
    family: str
    precision: str
    parts: dict[str, dict[str, Any]]
    tokenizers: dict[str, dict[str, Any]]
    scheduler: dict[str, Any]
    image: dict[str, Any]
    unet: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **self.__dict__}


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a bundle manifest (cheap: reads only the format tag)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def describe_tree(folder: Path) -> dict[str, dict[str, Any]]:
    """:func:`~.integrity.file_entry` of every file under ``folder`` (relative POSIX paths), except the root manifest."""
    return {p.relative_to(folder).as_posix(): file_entry(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def write_bundle_manifest(folder: Path, manifest: BundleManifest) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file, then rename)."""
    return write_json_atomically(folder / MANIFEST, manifest.as_dict())


def read_bundle_manifest(folder: Path) -> BundleManifest:
    """The manifest of the bundle in ``folder`` (format and fields only; :func:`check_bundle` checks files)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a bundle folder (no such directory)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST}; not a bundle written by `laptop-deploy export "
                          f"--pipeline`") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (BUNDLE_FORMAT, BUNDLE_VERSION):
        got = (data.get("format"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path}: format {got}, expected ('{BUNDLE_FORMAT}', {BUNDLE_VERSION})")
    fields = BundleManifest.__dataclass_fields__
    try:
        return BundleManifest(**{k: data[k] for k in fields if k in data})
    except TypeError as exc:
        raise BundleError(f"{path}: missing field ({exc})") from None


def check_bundle(folder: Path, *, skip_digest: bool = False) -> BundleManifest:
    """The manifest of ``folder`` once every part's model file is listed and every listed file exists with its
    recorded size and (unless ``skip_digest``) sha256; a part missing or a file modified is a :class:`BundleError`
    (exit 2) naming the file, before any runtime loads it."""
    folder = Path(folder)
    manifest = read_bundle_manifest(folder)
    for name, part in manifest.parts.items():
        model_file = part.get("model_file")
        # a Core ML part is a package folder: the manifest lists the files inside it
        if model_file not in manifest.files and not any(f.startswith(f"{model_file}/") for f in manifest.files):
            raise BundleError(f"{folder / MANIFEST}: part '{name}' model file {part.get('model_file')!r} is not "
                              f"among its files")
    check_files(folder, manifest.files, skip_digest=skip_digest, error=BundleError)
    return manifest


def record_bundle_result(folder: Path, key: str, value: dict[str, Any]) -> None:
    """Store ``value`` under ``results[key]`` in the bundle manifest (atomically)."""
    manifest = read_bundle_manifest(folder)
    manifest.results[key] = value
    write_bundle_manifest(Path(folder), manifest)
