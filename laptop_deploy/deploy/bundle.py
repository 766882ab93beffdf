"""``export --pipeline``: a whole text-to-image pipeline as an app bundle (layout: :mod:`.bundle_format`).

The U-Net comes from the model spec (a student or distillation run folder: the student; its other parts from the
teacher its metadata records); text encoder(s), VAE, tokenizer(s) and scheduler from the pipeline around it
(``toy``, ``random:*`` presets, pipeline folders). Each part is traced and finished by the ONNX exporter
(:func:`laptop_deploy.exporters.onnx.export_fp32` / ``finish_artifact``: optional slim, fp16 with its block list,
checks against the part's ExportSpec, the part's own ``manifest.json``); ``ort-mobile`` converts each part to
``model.ort``; ``coreml`` goes to :mod:`.bundle_coreml` (Apple's Resources naming). The toy's space-to-depth VAE is exported as an ONNX graph like any other VAE (a DepthToSpace).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LaptopDeployError
from ..models.sources import ModelSource, resolve_model
from ..models.student import read_student_meta
from ..models.unet_io import downsample_factor
from .attention_slice import AttentionSlice, plan_chunks, self_attentions, sliced_attention, token_counts
from .bundle_format import MODEL_INDEX, BundleManifest, describe_tree, write_bundle_manifest
from .bundle_parts import (FP32_PARTS, VAE_PARTS, save_tokenizer, text_encoder_spec, text_encoder_wrapper,
                           vae_example, vae_scale_factor, vae_spec)
from .manifest import Manifest, model_hash, tool_versions, write_manifest
from .spec import ExportSpec, build_spec, torch_inputs, wrap_unet

BUNDLE_TARGETS = ("onnx", "ort-mobile", "coreml", "executorch")
FIXED_SIZE_TARGETS = ("coreml", "executorch")  # one image size per bundle


@dataclass(frozen=True)
class BundleOptions:
    """``precision`` of the text encoders and U-Net (the VAE stays fp32); ``height``/``width``: the default
    latent size (every axis is dynamic; Core ML: the one fixed size). The VAE encoder is always exported:
    diffusers' ONNX pipelines require it (img2img). Core ML (:mod:`.bundle_coreml`): ``coreml`` is the exporter's
    ``CoreMLOptions`` (compute units, deployment target, U-Net weight compression), ``chunk_unet`` splits the
    U-Net in two packages. ``attention_slice`` (ONNX / ORT Mobile; None: ``auto``, and off for Core ML):
    self-attention of the U-Net and VAE over query chunks (:mod:`.attention_slice`), which bounds ``generate``'s
    transient memory at large images (SD-1.5 at 512×512: 8 chunks in its 4096-token layers)."""

    target: str = "onnx"
    precision: str = "fp32"
    height: int | None = None
    width: int | None = None
    exporter: str = "dynamo"
    opset: int = 18
    slim: bool = False
    seed: int = 0
    chunk_unet: bool = False
    coreml: Any = None  # exporters.coreml.CoreMLOptions (typed loosely: importing it imports coremltools)
    attention_slice: AttentionSlice | None = None

    @property
    def slicing(self) -> AttentionSlice:
        """The attention slicing in effect: as given, else ``auto`` (ONNX, ORT Mobile) or off (Core ML,
        ExecuTorch)."""
        if self.attention_slice is not None:
            return self.attention_slice
        return AttentionSlice() if self.target in FIXED_SIZE_TARGETS else AttentionSlice(auto=True)

    def check(self) -> None:
        if self.target not in BUNDLE_TARGETS:
            raise LaptopDeployError(f"--pipeline --target {self.target}: bundles are written for "
                                    f"{', '.join(BUNDLE_TARGETS)}")
        if self.chunk_unet and self.target != "coreml":
            raise LaptopDeployError(f"--chunk-unet splits the U-Net for Core ML's Neural Engine; it needs "
                                    f"--target coreml, not {self.target}")
        if self.target in FIXED_SIZE_TARGETS and self.attention_slice is not None and self.attention_slice.enabled:
            raise LaptopDeployError(f"--attention-slice {self.attention_slice.label}: slices the ONNX graph of onnx "
                                    f"and ort-mobile bundles, not --target {self.target}")
        if self.target == "executorch" and self.precision != "fp32":
            raise LaptopDeployError(f"--pipeline --target executorch --precision {self.precision}: ExecuTorch "
                                    f"bundles are fp32 (an int8 .pte U-Net: --target executorch --precision int8 "
                                    f"without --pipeline)")
        if self.target == "coreml":
            if self.coreml is None:
                raise LaptopDeployError("--target coreml bundle: Core ML options are missing")
            self.coreml.check()
            if self.coreml.sizes:
                raise LaptopDeployError("--coreml-sizes: a Core ML bundle has one fixed size (every part shares "
                                        "it); choose it with --height/--width")


@dataclass
class BundleSources:
    """The U-Net's source and the source of every other part (the teacher of a student, else the same)."""

    unet: ModelSource
    parts: ModelSource
    provenance: dict[str, Any]


def resolve_sources(spec: str, *, seed: int = 0) -> BundleSources:
    """Resolve ``spec`` for a bundle; a bare U-Net or a checkpoint file has no pipeline parts (exit 2)."""
    unet = resolve_model(spec, seed=seed)
    provenance: dict[str, Any] = {}
    parts = unet
    if unet.kind == "student":
        meta = read_student_meta(unet.path)
        teacher = meta.get("teacher") or {}
        if not teacher.get("spec"):
            raise LaptopDeployError(f"{unet.path}: the student's metadata records no teacher spec; its text "
                                    f"encoder and VAE cannot be found")
        parts = resolve_model(teacher["spec"], materialize=False, seed=int(teacher.get("seed", seed)))
        provenance = {"teacher": teacher, "removed": meta["removed"], "params": meta["params"],
                      "plan_sha256": _plan_hash(unet.path, meta["removed"]),
                      **({"distilled": meta["distilled"]} if "distilled" in meta else {})}
    if "text_encoder" not in parts.available_parts():
        raise LaptopDeployError(f"model '{spec}' is a bare U-Net: a bundle needs its text encoder, VAE, tokenizer "
                                f"and scheduler (pass a pipeline folder, toy, random:<preset> or a student of one)")
    return BundleSources(unet=unet, parts=parts, provenance=provenance)


def _plan_hash(folder: Path, removed: list[str]) -> str:
    """sha256 of the student's ``pruning_plan.json`` when it has one, else of its sorted removal set."""
    plan = folder / "pruning_plan.json"
    data = plan.read_bytes() if plan.is_file() else json.dumps(sorted(removed)).encode()
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def export_bundle(sources: BundleSources, out: Path, options: BundleOptions) -> BundleManifest:
    """Write the bundle into the (empty, temporary) folder ``out``; returns its manifest."""
    from ..memory import peak_rss_mb

    options.check()
    if options.target == "coreml":
        from .bundle_coreml import export_coreml_bundle

        return export_coreml_bundle(sources, out, options)
    start = time.perf_counter()
    export_part = _export_part
    if options.target == "executorch":
        from .bundle_executorch import export_pte_part as export_part
    unet, parts = sources.unet.unet, sources.parts
    family = sources.unet.family
    sdxl = family == "sdxl"
    vae = parts.part("vae")
    factor = vae_scale_factor(vae)
    config = unet.config
    height, width = options.height or config["sample_size"], options.width or config["sample_size"]
    unet_spec = build_spec(config, batch=2, height=height, width=width, dynamic=True, precision=options.precision)
    entries: dict[str, dict[str, Any]] = {}
    tokenizers: dict[str, dict[str, Any]] = {}
    described = {**sources.unet.describe(), "sha256": model_hash(unet)}
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    for index, name in enumerate(encoders):
        tok_name = "tokenizer" if index == 0 else "tokenizer_2"
        tokenizers[tok_name], ids = save_tokenizer(parts.part(tok_name), out / tok_name)
        encoder = parts.part(name).eval()
        spec = text_encoder_spec(encoder, tokens=ids.shape[1], hidden_states=sdxl, precision=options.precision)
        wrapper = text_encoder_wrapper(encoder, hidden_states=sdxl)
        entries[name] = export_part(name, encoder, spec, out, options, wrapper=wrapper, args=(ids,),
                                    source={"part": name, "of": parts.spec})
    entries["unet"] = export_part("unet", unet, unet_spec, out, options, source=described)
    channels = config["in_channels"]
    for name in VAE_PARTS:
        spec = vae_spec(name, latent_channels=channels, height=height, width=width, factor=factor)
        wrapper = _vae_wrapper(name, vae)
        args = vae_example(name, latent_channels=channels, height=height, width=width, factor=factor)
        entries[name] = {**export_part(name, vae, spec, out, options, wrapper=wrapper, args=args,
                                       source={"part": name, "of": parts.spec}), "note": FP32_PARTS[name]}
    scheduler = parts.part("scheduler")
    scheduler.save_pretrained(out / "scheduler")
    if options.target != "executorch":  # diffusers loads ONNX parts, not .pte
        _write_model_index(out, family=family, scheduler=type(scheduler).__name__, parts=list(entries),
                           toy=parts.kind == "toy")
    vae_config = dict(vae.config)
    manifest = BundleManifest(
        target=options.target, family=family, precision=options.precision, parts=entries, tokenizers=tokenizers,
        scheduler=json.loads((out / "scheduler" / "scheduler_config.json").read_text()),
        image={"vae_scale_factor": factor, "latent_channels": channels, "scaling_factor": vae_config["scaling_factor"],
               "shift_factor": vae_config.get("shift_factor"), "height": height * factor, "width": width * factor,
               "multiple_of": factor * downsample_factor(config),
               **({"fixed": True} if options.target in FIXED_SIZE_TARGETS else {})},
        unet={"sdxl": sdxl, "downsample": downsample_factor(config),
              "force_zeros_for_empty_prompt": True if sdxl else None},
        source=described, provenance=sources.provenance, files=describe_tree(out), tools=tool_versions(),
        export={**({"backend": "XnnpackPartitioner", "max_batch": 2} if options.target == "executorch" else
                   {"exporter": options.exporter, "opset": options.opset, "slim": options.slim}),
                "attention_slice": options.slicing.label,
                "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                "notes": [f"{name}: {entry['note']}" for name, entry in entries.items() if "note" in entry]})
    write_bundle_manifest(out, manifest)
    return manifest


def _vae_wrapper(name: str, vae: nn.Module) -> nn.Module:
    from .bundle_parts import VaeDecoderWrapper, VaeEncoderWrapper

    return (VaeDecoderWrapper if name == "vae_decoder" else VaeEncoderWrapper)(vae).eval()


def _export_part(name: str, module: nn.Module, spec: ExportSpec, out: Path, options: BundleOptions, *,
                 source: dict[str, Any], wrapper: nn.Module | None = None,
                 args: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Trace one part into ``out/name`` with the ONNX exporter's steps; ``ort-mobile`` converts it. Returns its
    manifest entry (model file, precision, I/O, bytes)."""
    from ..exporters.onnx import OnnxOptions, export_fp32, finish_artifact

    onnx_options = OnnxOptions(exporter=options.exporter, opset=options.opset, slim=options.slim)
    onnx_options.check()
    folder = out / name
    folder.mkdir()
    chunks = _attention_chunks(module, spec, options.slicing, wrapper=wrapper, args=args)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        with sliced_attention(module, chunks) as sliced:
            fp32 = export_fp32(module, spec, stage, options=onnx_options, wrapper=wrapper, args=args)
        target_dir = stage / "finished" if options.target == "ort-mobile" else folder
        target_dir.mkdir(exist_ok=True)
        manifest = finish_artifact(fp32, module, spec, target_dir, source=source, options=onnx_options,
                                   consume=True)
        if options.target == "ort-mobile":
            manifest = _to_ort(target_dir, folder, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    entry = {"model_file": f"{name}/{manifest.model_file}", "precision": spec.precision,
             "inputs": spec.as_dict()["inputs"], "outputs": spec.as_dict()["outputs"],
             "bytes": sum(f["bytes"] for f in manifest.files.values()), "weight_bytes": weight_bytes}
    if sliced:
        entry["attention_slice"] = {"option": options.slicing.label, "sliced_modules": sliced,
                                    "max_chunks": max(chunks.values())}
    return entry


def _attention_chunks(module: nn.Module, spec: ExportSpec, option: AttentionSlice, *, wrapper: nn.Module | None,
                      args: tuple[Any, ...] | None) -> dict[str, int]:
    """Query chunks per self-attention module of the part (none for parts without diffusers attention). ``auto``
    measures each module's token count in one batch-1 forward pass at the export size."""
    attentions = self_attentions(module) if option.enabled else []
    if not attentions:
        return {}
    if not option.auto:
        return {name: option.chunks for name, _ in attentions}
    if wrapper is None:  # the U-Net: the exporter's own wrapper, with batch-1 example feeds
        wrapper = wrap_unet(module, spec)
        args = torch_inputs(spec, spec.example_feeds(batch=1, seed=0))
    args = tuple(a[:1] for a in args) if args else ()  # batch 1: the budget is per image
    return plan_chunks(option, token_counts(module, lambda: wrapper(*args)))


def _to_ort(onnx_dir: Path, folder: Path, manifest: Manifest) -> Manifest:
    """ORT-format conversion of a finished part (the ORT format is one flatbuffer: ≤ 2 GiB)."""
    from ..exporters.ort_mobile import FLATBUFFER_LIMIT, convert_to_ort
    from .manifest import describe_files

    size = sum(f["bytes"] for f in manifest.files.values())
    if size > FLATBUFFER_LIMIT:
        raise LaptopDeployError(f"ort-mobile: part {folder.name} is {size / 1e9:.2f} GB; the ORT format is one "
                                f"flatbuffer limited to 2 GiB (use --precision fp16 or prune further)")
    converted = convert_to_ort(onnx_dir / manifest.model_file, folder)
    ort_manifest = Manifest(target="ort-mobile", precision=manifest.precision, model_file=converted.name,
                            spec=manifest.spec, source=manifest.source, files=describe_files(folder),
                            tools=manifest.tools, export={**manifest.export,
                                                          "onnx_sha256": manifest.files["model.onnx"]["sha256"]})
    write_manifest(folder, ort_manifest)
    return ort_manifest


def _write_model_index(out: Path, *, family: str, scheduler: str, parts: list[str], toy: bool) -> None:
    """diffusers' ``model_index.json`` for an ONNX pipeline (the class names ``OnnxStableDiffusionPipeline``
    expects: every model part an ``OnnxRuntimeModel``)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "ORTStableDiffusionXLPipeline" if family == "sdxl" else "OnnxStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **{part: ["diffusers", "OnnxRuntimeModel"] for part in parts},
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler],
    }
    if family == "sdxl":
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        # OnnxStableDiffusionPipeline requires vae_encoder (only safety_checker/feature_extractor are optional)
    if toy:  # diffusers' ONNX pipeline hard-codes SD's 0.18215 latent scale: the toy's bundle is for our loop
        index["_laptop_deploy_note"] = "toy latent scale 3.8: use laptop-deploy generate, not diffusers"
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
