"""Load a Stable Diffusion U-Net from one checkpoint file, offline.

Two key layouts are understood:

* ``ldm``: the original CompVis / SGM names (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``, or the
  same without the ``model.diffusion_model.`` prefix). A full checkpoint also holds the VAE (``first_stage_model.*``)
  and text encoders (``cond_stage_model.*`` / ``conditioner.*``); only the U-Net tensors are read. The diffusers
  config is inferred from tensor shapes and the weights are renamed with diffusers' own converter.
* ``diffusers``: a copied ``diffusion_pytorch_model.safetensors`` (``conv_in.weight``, ``down_blocks.0...``). The
  file holds no config, so it must match one of :data:`laptop_deploy.models.presets.PRESETS` key for key and shape for shape.

The number of attention heads is not stored in the weights; the family convention is used (SD-1.x: 8 heads per
block; SD-2.x and SDXL: 64 channels per head).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelSourceError
from .presets import PRESETS
from .weights import aligned, read_safetensors

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

Shapes = Mapping[str, tuple[int, ...]]

LDM_PREFIX = "model.diffusion_model."
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Latent sample size (pixels / 8) of each family's native resolution: 512, 768 and 1024 px.
_DEFAULT_SAMPLE_SIZE = {"sd1": 64, "sd2": 96, "sdxl": 128}
_SDXL_TIME_EMBED_DIM = 256  # per micro-conditioning scalar; SDXL base has 6 of them (sizes, crop, target).
_HEAD_CHANNELS = 64  # SD-2.x / SDXL convention: channels per attention head.
_SD1_HEADS = 8


@dataclass(frozen=True)
class SingleFileUNet:
    """A U-Net read from one file: eval mode, fp32, on CPU, real weights.

    ``family`` is ``sd1``, ``sd2`` or ``sdxl``; ``layout`` is the key layout of the file (``ldm`` or ``diffusers``);
    ``config`` is the ``UNet2DConditionModel`` keyword config the model was built from.
    """

    unet: UNet2DConditionModel
    family: str
    layout: str
    config: dict


@dataclass(frozen=True)
class _Level:
    """One resolution level of an LDM U-Net encoder: output channels, ResBlocks and transformer depth (0: none)."""

    channels: int
    res_blocks: int
    depth: int


def load_single_file(path: Path, *, allow_pickle: bool = False) -> SingleFileUNet:
    """Read the U-Net from ``path`` (``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/``.bin`` via torch.load).

    Pickle files are loaded with ``weights_only=True``; ``allow_pickle=True`` permits arbitrary-code unpickling.
    Every failure is a one-line :class:`ModelSourceError` that starts with the path.
    """
    path = Path(path)
    try:
        return _load(path, allow_pickle)
    except ModelSourceError as err:
        raise ModelSourceError(f"{path}: {err}") from err.__cause__


def _load(path: Path, allow_pickle: bool) -> SingleFileUNet:
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _PICKLE_SUFFIXES:
        supported = ", ".join((".safetensors", *_PICKLE_SUFFIXES))
        raise ModelSourceError(f"unsupported file type '{suffix or path.name}'; expected one of {supported}")
    if not path.is_file():
        raise ModelSourceError("no such file" if not path.exists() else "not a regular file")
    # Shapes first, so an unsupported model is rejected before gigabytes of weights are read.
    state = None
    if suffix == ".safetensors":
        shapes = _safetensors_shapes(path)
    else:
        state = _torch_load(path, allow_pickle)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    layout, names = _unet_keys(shapes)
    unet_shapes = {new: shapes[old] for old, new in names.items()}
    if layout == "ldm":
        family, config = infer_ldm_config(unet_shapes)
    else:
        family, config = _match_preset(unet_shapes)
    tensors = _read_safetensors(path, names) if state is None else _take_fp32(state, names)
    del state  # drop VAE / text-encoder tensors of a torch.load'ed checkpoint before building the model
    if layout == "ldm":
        tensors = _convert_ldm(tensors, config)
    return SingleFileUNet(unet=_build(config, tensors), family=family, layout=layout, config=config)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


# ---------------------------------------------------------------------------------------------------- reading


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the header, without reading data (safetensors checks the header covers the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelSourceError(f"not a valid safetensors file, truncated or corrupt ({_one_line(err)})") from err


def _read_safetensors(path: Path, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Only the tensors named in ``names`` (file key -> new key), converted to fp32 one at a time."""
    import torch
    from safetensors import SafetensorError

    try:
        return read_safetensors(path, names, dtype=torch.float32)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelSourceError(f"cannot read tensor data, truncated or corrupt ({_one_line(err)})") from err


def _torch_load(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensor entries of a torch.save'd checkpoint, unwrapping a nested ``state_dict``."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found or "allowlisted" in str(err):
            what = f" (it references {found.group(1)})" if found else ""
            raise ModelSourceError(
                f"file needs arbitrary-code unpickling to load{what}; pass --allow-pickle to opt in, "
                "only if you trust the file") from err
        raise ModelSourceError(f"not a valid torch checkpoint, truncated or corrupt ({_one_line(err)})") from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError... for bad files
        raise ModelSourceError(f"not a valid torch checkpoint, truncated or corrupt ({_one_line(err)})") from err
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelSourceError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    return {key: value for key, value in obj.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def _take_fp32(state: dict[str, torch.Tensor], names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Move the named tensors out of ``state`` as fp32, so at most one extra copy of a tensor exists at a time."""
    import torch

    return {new: aligned(state.pop(old), torch.float32) for old, new in names.items()}


def _unet_keys(shapes: Shapes) -> tuple[str, dict[str, str]]:
    """The layout and a map file key -> U-Net key (LDM keys lose the ``model.diffusion_model.`` prefix)."""
    prefixed = {key: key[len(LDM_PREFIX):] for key in shapes if key.startswith(LDM_PREFIX)}
    if any(key.startswith("input_blocks.") for key in prefixed.values()):
        return "ldm", prefixed
    if any(key.startswith("input_blocks.") for key in shapes):
        return "ldm", {key: key for key in shapes if key.startswith(_LDM_ROOTS)}
    if "conv_in.weight" in shapes and any(key.startswith("down_blocks.0.") for key in shapes):
        return "diffusers", {key: key for key in shapes}
    sample = ", ".join(sorted(shapes)[:3]) or "none"
    raise ModelSourceError(
        f"no U-Net weights found ({len(shapes)} tensors, e.g. {sample}); expected LDM keys "
        f"'{LDM_PREFIX}input_blocks.*' (or bare 'input_blocks.*') "
        "or diffusers keys 'conv_in.weight', 'down_blocks.0.*'")


# ---------------------------------------------------------------------------------------------- LDM inference


def infer_ldm_config(shapes: Shapes) -> tuple[str, dict[str, Any]]:
    """Family and diffusers ``UNet2DConditionModel`` config of an LDM U-Net, from {key: shape} alone.

    Keys are LDM names without the ``model.diffusion_model.`` prefix; shapes are PyTorch weight shapes.
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    family, params = _ldm_params(shapes)
    network = "network_config" if family == "sdxl" else "unet_config"  # SGM (SDXL) configs use network_config
    # The converter only reads ch_mult from the VAE section (for sample_size, which is overridden below).
    original = {"model": {"params": {network: {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    # An empty checkpoint: the converter only sniffs it for the model type, to pick a default image size.
    config = create_unet_diffusers_config_from_ldm(original, {})
    config["sample_size"] = _DEFAULT_SAMPLE_SIZE[family]
    if family != "sd1":
        # diffusers computes (model_channels // 64) * mult, which is 0 heads below 64 base channels.
        config["attention_head_dim"] = [max(1, ch // _HEAD_CHANNELS) for ch in config["block_out_channels"]]
    if family == "sd2":
        config["upcast_attention"] = True  # SD-2.1 overflows in fp16 without it; exact no-op in fp32
    if family == "sdxl":
        # diffusers only recognises SDXL by context_dim 2048/1280 and otherwise picks a class embedding.
        config.update(class_embed_type=None, addition_embed_type="text_time",
                      addition_time_embed_dim=_time_embed_dim(params["adm_in_channels"]))
    return family, config


def _ldm_params(shapes: Shapes) -> tuple[str, dict[str, Any]]:
    """The family and LDM ``UNetModel`` params that the shapes imply."""
    needed = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
    if any(key not in shapes for key in needed):
        raise ModelSourceError(f"LDM U-Net lacks one of {', '.join(needed)}")
    model_channels = shapes["time_embed.0.weight"][1]
    levels = _scan_levels(shapes)
    attention = [key for key in shapes if key.endswith(".attn2.to_k.weight")]
    contexts = {shapes[key][1] for key in attention}
    if len(contexts) != 1:
        raise ModelSourceError(f"expected one cross-attention context dim, found {sorted(contexts) or 'none'}")
    proj_in = next((shapes[key] for key in shapes if key.endswith(".proj_in.weight")), ())
    linear = len(proj_in) == 2  # SpatialTransformer proj_in: Linear (2-D weight) vs 1x1 Conv2d (4-D)
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    family = _family(shapes, levels, model_channels, linear, adm)
    depths = [level.depth or 1 for level in levels]  # diffusers ignores the depth of levels without attention
    mid_depth = _depth(shapes, "middle_block")
    if mid_depth != depths[-1]:
        raise ModelSourceError(f"middle block has {mid_depth} transformer layers; diffusers builds {depths[-1]}")
    if any(ch % model_channels for ch in (level.channels for level in levels)):
        raise ModelSourceError(f"level widths {[lv.channels for lv in levels]} are not multiples of {model_channels}")
    params: dict[str, Any] = {
        "in_channels": shapes["input_blocks.0.0.weight"][1], "out_channels": shapes["out.2.weight"][0],
        "model_channels": model_channels, "channel_mult": [lv.channels // model_channels for lv in levels],
        "num_res_blocks": levels[0].res_blocks, "context_dim": contexts.pop(), "use_linear_in_transformer": linear,
        "attention_resolutions": [2 ** i for i, level in enumerate(levels) if level.depth],
        "transformer_depth": 1 if set(depths) == {1} else depths,
    }
    if family == "sd1":
        params["num_heads"] = _SD1_HEADS
    else:
        params["num_head_channels"] = _HEAD_CHANNELS
    if adm is not None:
        params.update(num_classes="sequential", adm_in_channels=adm)
    return family, params


def _scan_levels(shapes: Shapes) -> list[_Level]:
    """Walk ``input_blocks.1..N``: ResBlocks (+ optional transformer) per level, a ``.0.op`` conv between levels."""
    levels: list[_Level] = []
    current: list[tuple[int, int]] = []  # (ResBlock output channels, transformer depth) of the open level
    index = 1
    while any(key.startswith(f"input_blocks.{index}.") for key in shapes):
        block = f"input_blocks.{index}"
        if f"{block}.0.op.weight" in shapes:
            levels.append(_close_level(current, len(levels)))
            current = []
        elif f"{block}.0.out_layers.3.weight" in shapes:
            current.append((shapes[f"{block}.0.out_layers.3.weight"][0], _depth(shapes, block)))
        else:
            raise ModelSourceError(f"{block} is neither a ResBlock nor a downsampler")
        index += 1
    levels.append(_close_level(current, len(levels)))
    if len({level.res_blocks for level in levels}) != 1:
        raise ModelSourceError(f"ResBlocks per level differ: {[level.res_blocks for level in levels]}")
    return levels


def _close_level(blocks: list[tuple[int, int]], number: int) -> _Level:
    if not blocks or len(set(blocks)) != 1:
        raise ModelSourceError(f"level {number} has mixed or no ResBlocks (channels, depth): {blocks}")
    channels, depth = blocks[0]
    return _Level(channels=channels, res_blocks=len(blocks), depth=depth)


def _depth(shapes: Shapes, block: str) -> int:
    """Number of ``transformer_blocks`` in the SpatialTransformer at ``{block}.1`` (0 when there is none)."""
    prefix = f"{block}.1.transformer_blocks."
    return len({key[len(prefix):].split(".", 1)[0] for key in shapes if key.startswith(prefix)})


def _family(shapes: Shapes, levels: list[_Level], model_channels: int, linear: bool, adm: int | None) -> str:
    """``sd1`` (conv proj_in), ``sd2`` (linear proj_in) or ``sdxl`` (label_emb added conditioning, 3 levels)."""
    shape = f"{len(levels)} levels, {model_channels} base channels"
    if "label_emb.weight" in shapes:
        raise ModelSourceError(f"class-label U-Net ({shape}, e.g. the x4 upscaler) is not supported")
    if adm is not None:
        if len(levels) == 3 and levels[0].depth == 0 and linear:
            return "sdxl"
        hint = " looks like the SDXL refiner, which" if len(levels) == 4 and model_channels == 384 else ""
        raise ModelSourceError(f"U-Net with added conditioning (adm_in_channels {adm}, {shape}){hint} is not "
                               "supported; expected SDXL base: 3 levels, no attention at the first")
    return "sd2" if linear else "sd1"


def _time_embed_dim(adm_in_channels: int) -> int:
    """Width of each SDXL micro-conditioning embedding: 6 of them plus the pooled text embedding make adm_in.

    256 when it fits (SDXL base: 1280 + 6 * 256 = 2816); for smaller test models the largest power of two that
    leaves a positive text-embedding width (80 = 32 + 6 * 8).
    """
    if adm_in_channels > 6 * _SDXL_TIME_EMBED_DIM:
        return _SDXL_TIME_EMBED_DIM
    dim = 1
    while adm_in_channels - 6 * dim * 2 > 0:
        dim *= 2
    return dim


# ----------------------------------------------------------------------------------------- convert and build


def _convert_ldm(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename LDM keys to diffusers with diffusers' converter, which silently drops keys it has no rule for."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefixed = {LDM_PREFIX + key: value for key, value in tensors.items()}  # the converter filters on the prefix
    converted = convert_ldm_unet_checkpoint(prefixed, config)
    # The converter moves tensor objects without copying, so identity tells which inputs it left behind.
    used = {id(value) for value in converted.values()}
    dropped = sorted(key for key, value in tensors.items() if id(value) not in used)
    if dropped:
        raise ModelSourceError(f"{len(dropped)} LDM U-Net tensors have no diffusers equivalent: {_few(dropped)}")
    return converted


def _build(config: dict[str, Any], state: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """Build on the meta device and adopt ``state`` in place (assign=True), so weights are never copied."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)}: {_few(keys)}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ModelSourceError("weights do not fit the inferred U-Net; " + "; ".join(parts))
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()


def _few(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")


def _match_preset(shapes: Shapes) -> tuple[str, dict[str, Any]]:
    """The preset whose U-Net has exactly these diffusers keys and shapes (a diffusers file holds no config)."""
    import torch
    from diffusers import UNet2DConditionModel

    for preset in PRESETS.values():
        channels = preset.unet["block_out_channels"]
        # Cheap pre-filter (first width, level count) so only plausible presets are built, even on meta.
        if (shapes.get("conv_in.weight", (0,))[0] != channels[0]
                or f"down_blocks.{len(channels) - 1}.resnets.0.conv1.weight" not in shapes
                or f"down_blocks.{len(channels)}.resnets.0.conv1.weight" in shapes):
            continue
        with torch.device("meta"):
            reference = UNet2DConditionModel(**preset.unet).state_dict()
        if {k: tuple(v.shape) for k, v in reference.items()} == dict(shapes):
            return preset.family, dict(preset.unet)
    raise ModelSourceError("diffusers-layout weights match no built-in preset and the file holds no config; "
                           "pass the folder that holds config.json and this file instead")
