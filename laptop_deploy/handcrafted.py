"""Handcrafted removal sets from the literature, the baselines LAPTOP-Diff is compared against.

* ``bk-sdm-base`` (Kim et al. 2023, BK-SDM): from each down stage one ResNet+attention pair (the second), the
  last down stage's second ResNet, and the middle ResNet+attention pair of every up stage. SD-1.5: 579,384,964
  parameters remain.
* ``bk-sdm-small``: Base plus the whole mid block (482,346,884 on SD-1.5).

Both are defined on the SD-1.x/2.x topology (four stages, two ResNets per down stage, three per up stage).

* ``koala`` (Lee et al. 2023, KOALA): SDXL's transformer depth per stage [0, 2, 10] → [0, 2, 6], i.e. in every
  Transformer2DModel of the deepest down stage and of the matching up stage the blocks past the first 60% go
  (blocks 6–9 of 10; the first blocks are kept, as KOALA initialises from them). The mid block is left as it is.
  On ``random:tiny-sdxl`` (depths [1, 2, 4]) the same rule keeps 2 of 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import LaptopDeployError


def _check_sd_topology(config: Any, preset: str) -> None:
    if len(config["down_block_types"]) != 4 or config["layers_per_block"] != 2 \
            or config["down_block_types"][-1] != "DownBlock2D" or config["up_block_types"][0] != "UpBlock2D":
        raise LaptopDeployError(
            f"preset '{preset}' needs the SD-1.x/2.x topology (4 stages, 2 layers per block, last down stage "
            f"without attention); this U-Net has down blocks {list(config['down_block_types'])}")


def bk_sdm_base(config: Any) -> list[str]:
    _check_sd_topology(config, "bk-sdm-base")
    names = [f"down_blocks.{i}.{kind}.1" for i in range(3) for kind in ("resnets", "attentions")]
    names.append("down_blocks.3.resnets.1")
    names.append("up_blocks.0.resnets.1")
    names += [f"up_blocks.{i}.{kind}.1" for i in range(1, 4) for kind in ("resnets", "attentions")]
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
