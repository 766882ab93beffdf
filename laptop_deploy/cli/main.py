"""``laptop-deploy <verb>``: parses arguments, calls the library, prints a table or ``--json``.

Exit codes: 0 success, 1 a check that ran failed, 2 bad input or usage (one line on stderr, no traceback unless
``--debug``), 3 an internal error (a bug: rerun with ``--debug`` and report the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError
from .noise import library_noise

PROG = "laptop-deploy"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (it prints the whole usage block by default)."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        raise LaptopDeployError(f"{message} (see {self.prog} --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable result on stdout only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--quiet", action="store_true", help="mute every library warning (laptop-deploy's own "
                                                             "lines and errors stay)")


def _runtime_args(parser: argparse.ArgumentParser) -> None:
    """How verify and bench run an artifact: the runner, its execution provider and threads."""
    parser.add_argument("--runtime", metavar="NAME", help="runner for the artifact (default: by target, e.g. ort)")
    parser.add_argument("--provider", metavar="NAME", help="execution provider: cpu (default), cuda, tensorrt, auto")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="ONNX Runtime: run even when a --provider asked for is not active (default: exit 2)")
    parser.add_argument("--threads", type=int, metavar="N", help="intra-op threads of the runtime")


def _digest_arg(parser: argparse.ArgumentParser) -> None:
    """``--skip-digest`` for every verb that runs an artifact (deploy.manifest.check_integrity)."""
    parser.add_argument("--skip-digest", action="store_true",
                        help="do not re-hash the artifact's files against manifest.json (sizes are still checked)")


def _model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, metavar="M",
                        help="toy (the trained toy teacher), random:<preset>, a U-Net/pipeline/student folder, "
                             "a checkpoint file, or a hub id")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:<preset> weights (default 0)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt files that need arbitrary-code unpickling (only for files you trust)")


def _coreml_args(group: Any) -> None:  # an argparse argument group
    group.add_argument("--compute-units", default="ALL", choices=("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"),
                       help="the package's default Core ML compute units (default ALL)")
    group.add_argument("--deployment-target", default="iOS17", metavar="OS",
                       help="minimum OS: iOS16, iOS17 (default), iOS18, macOS13, macOS14, macOS15")
    group.add_argument("--palettize", type=int, metavar="BITS", help="k-means weight palettization: 4, 6 or 8 bits")
    group.add_argument("--quantize", type=int, metavar="BITS", help="linear weight quantization: 8, or 4 (iOS18+)")
    group.add_argument("--coreml-sizes", metavar="HxW,...",
                       help="further latent sizes the package accepts (EnumeratedShapes), e.g. 64x64,96x64")


def _executorch_args(group: Any) -> None:  # an argparse argument group; defaults live in exporters/executorch.py
    group.add_argument("--et-max-batch", type=int, metavar="N",
                       help="--dynamic: largest batch the .pte accepts (default max(2, 2 x --batch))")
    group.add_argument("--et-max-latent", type=int, nargs=2, metavar=("H", "W"),
                       help="--dynamic: largest latent size the .pte accepts (default twice the spec's)")


def _int8_args(group: Any) -> None:  # an argparse argument group; defaults live in exporters/onnx_int8.py
    group.add_argument("--calib-prompts", metavar="N|FILE",
                       help="calibration prompts: a count of built-in prompts or a file, one a line (default 4)")
    group.add_argument("--calib-steps", type=int, metavar="N", help="denoising steps per calibration loop (default 8)")
    group.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"),
                       help="activation range calibration (default minmax)")
    group.add_argument("--min-psnr", type=float, metavar="DB",
                       help="quality gate: held-out output PSNR vs fp32, else keep sensitive nodes float (default 30)")
    group.add_argument("--max-float-share", type=float, metavar="X",
                       help="most of the Conv/MatMul MACs the gate may keep float before failing (default 0.5)")
    group.add_argument("--int8-float-outputs", metavar="OPS",
                       help="quantized op types whose outputs stay float, comma-separated, or 'none' "
                            "(default MatMul,Gemm: Softmax runs float; docs/INT8.md)")


def _bundle_verify_args(group: Any) -> None:  # verify BUNDLE (deploy.bundle_verify)
    group.add_argument("--prompt", action="append", metavar="P",
                       help="end-to-end prompt (repeatable; default: two built-in prompts)")
    group.add_argument("--scheduler", choices=("ddim", "euler", "dpm++"),
                       help="sampler (default: the bundle's scheduler config)")
    group.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default 4)")


def _generate_parser(verbs: Any) -> None:
    gen = verbs.add_parser("generate", help="draw an image from an app bundle without torch (the reference app loop)")
    gen.set_defaults(handler="laptop_deploy.cli.bundle_commands:generate")
    gen.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder (export --pipeline)")
    gen.add_argument("--prompt", required=True, metavar="P")
    gen.add_argument("--negative-prompt", metavar="N", help="the unconditional prompt of guidance (default empty)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 disables (7.5)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial latents (numpy PCG64; default 0)")
    gen.add_argument("--scheduler", metavar="NAME", help="ddim, euler or dpm++ (default: the bundle's config)")
    gen.add_argument("--height", type=int, metavar="H", help="image height in pixels (default: the bundle's)")
    gen.add_argument("--width", type=int, metavar="W", help="image width in pixels (default: the bundle's)")
    gen.add_argument("--out", required=True, type=Path, metavar="IMAGE.png", help="PNG file to write")
    gen.add_argument("--force", action="store_true", help="replace an existing --out file")
    gen.add_argument("--sequential", action="store_true",
                     help="load one part at a time and free it (text encoder, U-Net, VAE decoder) and run the "
                          "guidance pair one image per U-Net call: low memory")
    gen.add_argument("--threads", type=int, metavar="N", help="intra-op threads of ONNX Runtime")
    _digest_arg(gen)
    _common(gen)


def _tensorrt_args(group: Any) -> None:  # an argparse argument group
    group.add_argument("--dry-run", action="store_true",
                       help="no TensorRT or GPU needed: write the ONNX graph and the build plan, print the "
                            "polygraphy/trtexec commands that build the engine on a GPU machine")
    group.add_argument("--trt-typing", default="auto", choices=("auto", "strong", "weak"),
                       help="strong: precision from the graph (fp16 ONNX); weak: fp32 graph + the FP16 builder "
                            "flag; auto (default): strong for fp16, weak for fp32")
    group.add_argument("--trt-no-cfg", action="store_true",
                       help="dynamic profile without classifier-free guidance (default: batch = 2 x images)")
    group.add_argument("--trt-max-images", type=int, metavar="N",
                       help="images per call at the dynamic profile's max (default --batch)")
    group.add_argument("--trt-min-latent", type=int, nargs=2, metavar=("H", "W"),
                       help="dynamic profile's smallest latent size (default half the opt size)")
    group.add_argument("--trt-max-latent", type=int, nargs=2, metavar=("H", "W"),
                       help="dynamic profile's largest latent size (default twice the opt size)")
    group.add_argument("--trt-opt-level", type=int, default=3, metavar="0-5",
                       help="builder optimisation level (default 3)")
    group.add_argument("--trt-workspace", type=int, metavar="MIB", help="workspace memory pool limit in MiB")
    group.add_argument("--trt-timing-cache", type=Path, metavar="FILE",
                       help="timing cache to start from when it exists; the build's cache is written back")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prune, distill, export and verify Stable Diffusion U-Nets.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")

    inv = verbs.add_parser("inventory", help="list prunable layers with parameters and MACs")
    inv.set_defaults(handler="laptop_deploy.cli.commands:inventory")
    _model_args(inv)
    inv.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                     help="latent height and width for MACs (default: the U-Net's sample_size)")
    inv.add_argument("--granularity", default="auto", choices=("auto", "attention", "block"),
                     help="attention: whole Transformer2DModels; block: each BasicTransformerBlock; auto "
                          "(default): per block where a transformer has several")
    _common(inv)

    prune = verbs.add_parser("prune", help="choose layers to remove (LAPTOP-Diff) and save the student")
    prune.set_defaults(handler="laptop_deploy.cli.commands:prune")
    _model_args(prune)
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, metavar="R",
                     help="fraction of the U-Net's parameters (or MACs, --cost macs) to remove, 0 < R < 1")
    how.add_argument("--preset", metavar="NAME", help="a handcrafted removal set: bk-sdm-base, bk-sdm-small, koala")
    how.add_argument("--remove", metavar="NAMES", help="comma-separated layer names, or @FILE (one per line, or "
                                                       "a JSON list / object with a 'removed' list)")
    prune.add_argument("--criterion", default="output-loss",
                       help="output-loss (default), feature-loss, magnitude or random")
    prune.add_argument("--cost", default="params", choices=("params", "macs", "latency"),
                       help="what --ratio and the knapsack count (default params); latency: measured ms per "
                            "unit from --latency-table or --runtime")
    prune.add_argument("--latency-table", type=Path, metavar="T.json",
                       help="latency table from `laptop-deploy profile` (must match latent size, batch, precision)")
    prune.add_argument("--runtime", choices=("torch", "ort"),
                       help="profile the teacher on this runtime now (or: the runtime a --latency-table must have)")
    prune.add_argument("--batch", type=int, default=1, metavar="B",
                       help="images per U-Net call the latency is for (classifier-free guidance: 2; default 1)")
    prune.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                       help="precision the latency is for (default fp32)")
    prune.add_argument("--no-measure", action="store_true",
                       help="with a latency table: skip timing the built student against the teacher")
    prune.add_argument("--granularity", default="auto", choices=("auto", "attention", "block"),
                       help="candidate units, as in `inventory` (default auto)")
    prune.add_argument("--calib", type=int, default=8, metavar="K", help="calibration samples (default 8)")
    prune.add_argument("--batch-size", type=int, default=8, metavar="B", help="calibration batch (default 8)")
    prune.add_argument("--additivity-sets", type=int, metavar="M",
                       help="random removal sets for the additivity check (default 10 with --ratio, else 0)")
    prune.add_argument("--prompts", type=Path, metavar="FILE", help="calibration prompts, one per line")
    prune.add_argument("--images", type=Path, metavar="DIR", help="calibration images, VAE-encoded to latents "
                       "(conditioned on their own captions when the folder is captioned as for distill --data)")
    prune.add_argument("--steps", type=int, metavar="N", help="calibration timesteps from an N-step run of the "
                       "model's sampler, weighted as inference visits them (default: uniform over training's)")
    prune.add_argument("--refine", type=int, default=0, metavar="ROUNDS", help="rounds of interaction-aware "
                       "refinement of the knapsack's set by measured joint losses (default 0: one-shot)")
    prune.add_argument("--calib-seeds", type=int, default=1, metavar="K", help="score under K calibration draws "
                       "and report how stable the choice is (default 1: no report)")
    prune.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                       help="calibration and MAC latent size (default: the U-Net's sample_size)")
    prune.add_argument("--device", default="cpu", help="cpu or cuda[:i] for scoring (default cpu)")
    prune.add_argument("--autocast", choices=("bf16", "fp16"), help="CUDA autocast dtype for scoring forwards")
    prune.add_argument("--out", required=True, type=Path, metavar="DIR", help="student folder to write")
    prune.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    _common(prune)

    distill = verbs.add_parser("distill", help="retrain a pruned student from its teacher (normalized feature KD)")
    distill.set_defaults(handler="laptop_deploy.cli.commands:distill")
    distill.add_argument("--teacher", required=True, metavar="M", help="the teacher, as --model elsewhere")
    distill.add_argument("--student", required=True, metavar="DIR", help="student folder written by `prune`")
    data = distill.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, metavar="DIR",
                      help="images with captions (a .txt beside each, or metadata.jsonl), VAE-encoded and cached")
    data.add_argument("--prompts", type=Path, metavar="FILE", help="data-free: prompts, one per line")
    distill.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps")
    distill.add_argument("--out", required=True, type=Path, metavar="DIR",
                         help="run folder: checkpoints, log, then the distilled student")
    distill.add_argument("--batch-size", type=int, default=4, metavar="B", help="per process and micro-batch "
                                                                                  "(default 4)")
    distill.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    distill.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5, BK-SDM's)")
    distill.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                         help="after warm-up (default constant)")
    distill.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up (default 0)")
    distill.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    distill.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    distill.add_argument("--lambda-task", type=float, metavar="X",
                         help="weight of the denoising loss (default 1 with --data, 0 with --prompts)")
    distill.add_argument("--lambda-out", type=float, default=1.0, metavar="X", help="output KD weight (default 1)")
    distill.add_argument("--lambda-feat", type=float, default=1.0, metavar="X",
                         help="feature KD weight, 0 = no feature taps (default 1)")
    distill.add_argument("--feature-norm", default="l2", choices=("l2", "none"),
                         help="l2: LAPTOP-Diff's normalized feature KD (default); none: BK-SDM's plain KD")
    distill.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"),
                         help="CUDA autocast (fp16 with loss scaling); the CPU trains in fp32 (default no)")
    distill.add_argument("--ema-decay", type=float, default=0.9999,
                         help="EMA of the student's weights, written as the result; 0 = off (default 0.9999)")
    distill.add_argument("--uncond-prob", type=float, default=0.1, metavar="P",
                         help="fraction of samples trained on the empty prompt, for guidance (default 0.1)")
    distill.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                         help="steps between checkpoints (default 500; the last step always saves)")
    distill.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    distill.add_argument("--force", action="store_true", help="empty a non-empty --out and start over")
    distill.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                         help="training latent size (default: the U-Net's sample_size)")
    distill.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available; under torchrun / "
                                          "accelerate launch, one GPU per process)")
    distill.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    distill.add_argument("--cache-dir", type=Path, metavar="DIR",
                         help="encoded-data cache (default ~/.cache/laptop-deploy/distill)")
    distill.add_argument("--eval-samples", type=int, default=8, metavar="N",
                         help="fixed batch whose loss is reported at start and end (default 8)")
    distill.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    distill.add_argument("--teacher-seed", type=int, metavar="S",
                         help="seed of a random:<preset> teacher (default: the one the student was pruned from)")
    distill.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt teachers")
    _common(distill)

    quality = verbs.add_parser("quality", help="judge a student of the toy teacher: held-out alignment, PSNR")
    quality.set_defaults(handler="laptop_deploy.cli.commands:quality")
    quality.add_argument("--model", required=True, metavar="M",
                         help="a student folder pruned (or distilled) from the toy teacher, or toy itself")
    quality.add_argument("--per-prompt", type=int, default=10, metavar="N",
                         help="seeds per held-out prompt (24 prompts; default 10: 240 images)")
    quality.add_argument("--steps", type=int, default=None, metavar="N", help="sampler steps (default 20)")
    quality.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 4)")
    _common(quality)

    export = verbs.add_parser("export", help="export a U-Net or student (ONNX, ORT Mobile) with manifest.json")
    export.set_defaults(handler="laptop_deploy.cli.deploy_commands:export")
    _model_args(export)
    export.add_argument("--target", required=True, metavar="NAME",
                        help="onnx, ort-mobile, trt (TensorRT engine; NVIDIA GPU, or --dry-run anywhere), "
                             "coreml or executorch (.pte, XNNPACK)")
    export.add_argument("--precision", choices=("fp32", "fp16", "int8", "int8-weights"),
                        help="fp16 keeps norms, softmax and the timestep embedding in fp32 (default fp32; "
                             "fp16 for coreml); int8: calibrated static QDQ with a quality gate, int8-weights: "
                             "weight-only (onnx, ort-mobile)")
    export.add_argument("--batch", type=int, default=1, help="batch size of a static export (default 1)")
    export.add_argument("--height", type=int, metavar="H", help="latent height (default: the U-Net's sample_size)")
    export.add_argument("--width", type=int, metavar="W", help="latent width (default: the U-Net's sample_size)")
    export.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width axes")
    export.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"),
                        help="torch.onnx exporter (default dynamo)")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default 18)")
    export.add_argument("--slim", action="store_true", help="run onnxslim on the graph")
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="artifact folder to write")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    export.add_argument("--pipeline", action="store_true",
                        help="the whole text-to-image pipeline as an app bundle (onnx, ort-mobile, coreml, "
                             "executorch): text encoder(s), U-Net, VAE, tokenizer(s), scheduler in the diffusers ONNX layout")
    export.add_argument("--chunk-unet", action="store_true",
                        help="--pipeline --target coreml: split the U-Net into UnetChunk1/UnetChunk2.mlpackage "
                             "(Apple's layout for the Neural Engine's size limit)")
    export.add_argument("--attention-slice", metavar="auto|off|N",
                        help="--pipeline onnx/ort-mobile: compute each self-attention of the U-Net and VAE over N "
                             "query chunks (auto: enough that one image's scores stay <= 64 MiB at the export size), "
                             "bounding generate's peak memory at large images (default auto; coreml, executorch: off)")
    _tensorrt_args(export.add_argument_group("TensorRT (--target trt)"))
    _coreml_args(export.add_argument_group("Core ML (--target coreml)"))
    _executorch_args(export.add_argument_group("ExecuTorch (--target executorch)"))
    _int8_args(export.add_argument_group("int8 (--precision int8 / int8-weights)"))
    _common(export)

    verify = verbs.add_parser("verify", help="prove an artifact computes what the PyTorch model computes")
    verify.set_defaults(handler="laptop_deploy.cli.deploy_commands:verify")
    verify.add_argument("dir", type=Path, metavar="DIR", help="artifact folder (with manifest.json) or app bundle")
    _model_args(verify, required=False)  # required for a single artifact; a bundle records its model
    _runtime_args(verify)
    verify.add_argument("--steps", type=int, default=10, help="denoising steps of the captured loop (default 10)")
    verify.add_argument("--max-rel-l2", type=float, metavar="X",
                        help="fixed bound on relative L2 vs PyTorch fp32 (replaces the calibrated gate, which is "
                             "still reported)")
    verify.add_argument("--min-psnr", type=float, metavar="DB", help="fixed PSNR floor (replaces the gate, too)")
    verify.add_argument("--atol", type=float, metavar="X", help="fixed per-element |out - ref| <= atol + rtol|ref| "
                        "(Polygraphy's rule; replaces the gate, too)")
    verify.add_argument("--rtol", type=float, metavar="X", help="see --atol")
    verify.add_argument("--factor", type=float, metavar="F", help="calibrated gate: allowed artifact error vs "
                        "float64 as a multiple of the reference's own (default 4; see README)")
    _digest_arg(verify)
    _common(verify)

    _bundle_verify_args(verify.add_argument_group("app bundles (export --pipeline)"))
    _generate_parser(verbs)

    bench = verbs.add_parser("bench", help="measure an artifact's latency (optionally against eager PyTorch)")
    bench.set_defaults(handler="laptop_deploy.cli.deploy_commands:bench")
    bench.add_argument("dir", type=Path, metavar="DIR", help="artifact folder (with manifest.json)")
    _runtime_args(bench)
    bench.add_argument("--iterations", type=int, default=20, help="timed calls per runner (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    bench.add_argument("--vs-torch", action="store_true", help="also time the source model in eager PyTorch")
    bench.add_argument("--model", metavar="M", help="model for --vs-torch (default: the manifest's source)")
    bench.add_argument("--seed", type=int, help="seed of a random:<preset> model (default: the manifest's)")
    bench.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt files for --vs-torch")
    bench.add_argument("--batch", type=int, metavar="B",
                       help="images per call (a dynamic artifact; default the spec's batch)")
    _digest_arg(bench)
    _common(bench)

    profile = verbs.add_parser("profile", help="where one U-Net step spends its time, per unit and op type")
    profile.set_defaults(handler="laptop_deploy.cli.profile_commands:profile")
    profile.add_argument("artifact", nargs="?", type=Path, metavar="ARTIFACT",
                         help="an exported artifact folder (with manifest.json), profiled with its own runtime")
    profile.add_argument("--model", metavar="M", help="a model to profile (as elsewhere), or the artifact's "
                                                      "source when its manifest's spec does not resolve here")
    profile.add_argument("--seed", type=int, default=0, help="seed of random:<preset> weights (default 0)")
    profile.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt files")
    profile.add_argument("--runtime", default="ort", help="with --model: torch or ort (default ort)")
    profile.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="default fp32")
    profile.add_argument("--latent-size", type=int, nargs=2, metavar=("H", "W"),
                         help="latent height and width (default: the U-Net's sample_size)")
    profile.add_argument("--batch", type=int, default=1, metavar="B",
                         help="images per call (classifier-free guidance doubles it; default 1)")
    profile.add_argument("--repeats", type=int, default=5, metavar="N", help="timed calls, ≥ 3 (default 5)")
    profile.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed calls first (default 1)")
    profile.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads")
    profile.add_argument("--provider", default="cpu", metavar="NAME", help="ONNX Runtime provider (default cpu)")
    profile.add_argument("--dry-run", action="store_true",
                         help="TensorRT / Core ML artifacts: print the profiling command for the machine that "
                              "runs them")
    profile.add_argument("--out", required=True, type=Path, metavar="DIR",
                         help="folder for latency_table.json, latency_table.md and latency_shares.png")
    profile.add_argument("--force", action="store_true", help="replace a folder profile wrote before")
    _digest_arg(profile)
    _common(profile)

    compress = verbs.add_parser("compress", help="teacher -> pruned, distilled, exported, verified, benchmarked "
                                                 "student + report, in one resumable run folder")
    compress.set_defaults(handler="laptop_deploy.cli.compress_command:compress")
    importlib.import_module("laptop_deploy.cli.compress_command").add_arguments(compress)
    _common(compress)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        # only the known-noisy library messages are muted (cli/noise.py); --quiet mutes all, --debug none
        with library_noise(quiet=getattr(args, "quiet", False), debug=debug):
            result, text = _handler(args.handler)(args)
    except LaptopDeployError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so in one line, keep the traceback behind --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{PROG}: internal error: {type(exc).__name__}: {first} (rerun with --debug)", file=sys.stderr)
        return 3
    if result is None:  # a verb with nothing to report (a non-zero rank of a distributed run)
        return 0
    _emit(result, text, as_json=args.json)
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


def _handler(spec: str):
    """``module:function`` of a verb, imported only when that verb runs (optional dependencies stay optional)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _emit(result: dict[str, Any], text: str, *, as_json: bool) -> None:
    try:
        if as_json:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader is gone; exit quietly like other Unix tools
        sys.stdout = None


if __name__ == "__main__":
    sys.exit(main())
