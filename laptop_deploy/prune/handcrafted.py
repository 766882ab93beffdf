"""Handcrafted removal sets from the literature, the baselines LAPTOP-Diff is compared against.

* ``bk-sdm-base`` (Kim et al. 2023, BK-SDM): from each down stage one ResNet+attention pair (the second), the
  last down stage's second ResNet, and the middle ResNet+attention pair of every up stage. SD-1.5: 579,384,964
  parameters remain.
* ``bk-sdm-small``: Base plus the whole mid block (482,346,884 on SD-1.5).

Both are defined on the SD-1.x/2.x topology (two ResNets per down stage, three per up stage, attention in every
stage but the deepest) at any number of stages: SD's four, or the three of the ``toy`` teacher, where the same rule
removes 10 of its 28 units.

* ``koala`` (Lee et al. 2023, KOALA): SDXL's transformer depth per stage [0, 2, 10] → [0, 2, 6], i.e. in every
  Transformer2DModel of the deepest down stage and of the matching up stage the blocks past the first 60% go
  (blocks 6–9 of 10; the first blocks are kept, as KOALA initialises from them). The mid block is left as it is.
  On ``random:tiny-sdxl`` (depths [1, 2, 4]) the same rule keeps 2 of 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import LaptopDeployError


def _check_sd_topology(config: Any, preset: str) -> int:
    """The number of stages of an SD-1.x/2.x-style U-Net; anything else is refused."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    stages = len(down)
    attention = ["CrossAttnDownBlock2D"] * (stages - 1) + ["DownBlock2D"]
    if stages < 2 or config["layers_per_block"] != 2 or down != attention \
            or up != ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (stages - 1):
        raise LaptopDeployError(
            f"preset '{preset}' needs the SD-1.x/2.x topology (2 layers per block, cross-attention in every stage "
            f"but the deepest); this U-Net has down blocks {down}")
    return stages


def bk_sdm_base(config: Any) -> list[str]:
    stages = _check_sd_topology(config, "bk-sdm-base")
    names = [f"down_blocks.{i}.{kind}.1" for i in range(stages - 1) for kind in ("resnets", "attentions")]
    names.append(f"down_blocks.{stages - 1}.resnets.1")
    names.append("up_blocks.0.resnets.1")
    names += [f"up_blocks.{i}.{kind}.1" for i in range(1, stages) for kind in ("resnets", "attentions")]
    return names


def bk_sdm_small(config: Any) -> list[str]:
    _check_sd_topology(config, "bk-sdm-small")
    return bk_sdm_base(config) + ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]


KOALA_KEEP = 0.6  # 6 of SDXL's 10 blocks


def koala(config: Any) -> list[str]:
    depths = config.get("transformer_layers_per_block")
    if config.get("addition_embed_type") != "text_time" or not isinstance(depths, (list, tuple)):
        raise LaptopDeployError("preset 'koala' needs the SDXL topology (text_time conditioning, a transformer "
                                f"depth per stage); this U-Net has down blocks {list(config['down_block_types'])}")
    deepest = max(depths)
    keep = round(deepest * KOALA_KEEP)
    layers = config["layers_per_block"]
    stages = len(depths)
    names = []
    for stage, depth in enumerate(depths):
        if depth != deepest or config["down_block_types"][stage] == "DownBlock2D":
            continue
        units = [f"down_blocks.{stage}.attentions.{j}" for j in range(layers)]
        units += [f"up_blocks.{stages - 1 - stage}.attentions.{j}" for j in range(layers + 1)]
        names += [f"{unit}.transformer_blocks.{k}" for unit in units for k in range(keep, depth)]
    return names


HANDCRAFTED: dict[str, Callable[[Any], list[str]]] = {
    "bk-sdm-base": bk_sdm_base,
    "bk-sdm-small": bk_sdm_small,
    "koala": koala,
}


def handcrafted_removal(name: str, config: Any) -> list[str]:
    """Layer names the handcrafted preset ``name`` removes from a U-Net with ``config``."""
    try:
        preset = HANDCRAFTED[name]
    except KeyError:
        raise LaptopDeployError(f"unknown preset '{name}'; valid: {', '.join(HANDCRAFTED)}") from None
    return preset(config)
