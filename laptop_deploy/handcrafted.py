"""Handcrafted removal sets from the literature, the baselines LAPTOP-Diff is compared against.

* ``bk-sdm-base`` (Kim et al. 2023, BK-SDM): from each down stage one ResNet+attention pair (the second), the
  last down stage's second ResNet, and the middle ResNet+attention pair of every up stage. SD-1.5: 579,384,964
  parameters remain.
* ``bk-sdm-small``: Base plus the whole mid block (482,346,884 on SD-1.5).

Both are defined on the SD-1.x/2.x topology (four stages, two ResNets per down stage, three per up stage).
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


HANDCRAFTED: dict[str, Callable[[Any], list[str]]] = {
    "bk-sdm-base": bk_sdm_base,
    "bk-sdm-small": bk_sdm_small,
}


def handcrafted_removal(name: str, config: Any) -> list[str]:
    """Layer names the handcrafted preset ``name`` removes from a U-Net with ``config``."""
    try:
        preset = HANDCRAFTED[name]
    except KeyError:
        raise LaptopDeployError(f"unknown preset '{name}'; valid: {', '.join(HANDCRAFTED)}") from None
    return preset(config)
