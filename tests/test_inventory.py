"""Parameter and MAC accounting on the real architectures (meta device: no weights drawn)."""

from __future__ import annotations

import pytest

from laptop_deploy.prune.handcrafted import handcrafted_removal
from laptop_deploy.models.inventory import build_inventory
from laptop_deploy.models.layers import apply_removal
from laptop_deploy.models.sources import resolve_model

# Published sizes: SD-1.5 and SDXL-base U-Nets; the remainder is everything outside ResNet/Transformer2D units.
TOTALS = {"random:sd15": (859_520_964, 54_611_204), "random:sdxl": (2_567_463_684, 30_362_884)}


@pytest.mark.parametrize("spec", TOTALS)
def test_totals_and_remainder_match_published_counts(spec):
    inv = build_inventory(resolve_model(spec, materialize=False).unet, granularity="attention")
    total, remainder = TOTALS[spec]
    assert inv.total_params == total
    assert inv.remainder_params == remainder
    assert sum(inv.remainder_breakdown.values()) == remainder
    assert sum(e.layer.params for e in inv.entries) + inv.remainder_params == total


@pytest.mark.parametrize("granularity", ["auto", "attention", "block"])
def test_every_granularity_accounts_for_every_parameter_and_mac(granularity):
    inv = build_inventory(resolve_model("random:tiny-sdxl", materialize=False).unet, granularity=granularity)
    assert sum(e.layer.params for e in inv.entries) + inv.remainder_params == inv.total_params
    assert sum(e.macs for e in inv.entries) + inv.remainder_macs == inv.total_macs
    assert inv.remainder_macs >= 0 and all(e.macs >= 0 for e in inv.entries)


def test_sd15_macs_and_prunability():
    inv = build_inventory(resolve_model("random:sd15", materialize=False).unet)
    # 339 GMACs is the usual figure without attention's QK^T and AV products; with them, 401.64.
    assert inv.total_macs == 401_636_720_640
    rows = {e.layer.name: e for e in inv.entries}
    assert rows["down_blocks.0.resnets.0"].macs == 2 * 320 * 320 * 9 * 64 * 64 + 1280 * 320
    fixed = {e.layer.name for e in inv.entries if not e.layer.prunable}
    assert fixed == {"down_blocks.1.resnets.0", "down_blocks.2.resnets.0", "up_blocks.2.resnets.0",
                     "up_blocks.3.resnets.0"}
    assert "changes channels 320->640" in rows["down_blocks.1.resnets.0"].layer.reason
    assert rows["up_blocks.1.resnets.2"].layer.keep_channels == 1280  # drops a 640-channel skip
    assert len(inv.prunable) == 34


def test_sdxl_auto_granularity_is_per_block_in_deep_transformers():
    inv = build_inventory(resolve_model("random:sdxl", materialize=False).unet)
    kinds = {}
    for e in inv.prunable:
        kinds[e.layer.kind] = kinds.get(e.layer.kind, 0) + 1
    # 2 down stages x 2 + 2 up stages x 3 transformers, depth 2 or 10; mid block depth 10.
    assert kinds["transformer-block"] == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2
    assert "attention" not in kinds
    shells = [e for e in inv.entries if e.layer.kind == "attention"]
    assert shells and not any(e.layer.prunable for e in shells)


@pytest.mark.parametrize("preset,params", [("bk-sdm-base", 579_384_964), ("bk-sdm-small", 482_346_884)])
def test_bk_sdm_removal_leaves_published_parameter_count(preset, params):
    unet = resolve_model("random:sd15", materialize=False).unet
    apply_removal(unet, handcrafted_removal(preset, unet.config))
    assert sum(p.numel() for p in unet.parameters()) == params


def test_inventory_of_a_student_lists_removed_units_and_its_own_macs():
    unet = resolve_model("random:tiny-sd15", materialize=False).unet
    before = build_inventory(unet)
    apply_removal(unet, ["mid_block.attentions.0", "up_blocks.2.resnets.1"])
    after = build_inventory(unet)
    assert after.removed == ["mid_block.attentions.0", "up_blocks.2.resnets.1"]
    removed_macs = sum(e.macs for e in before.entries if e.layer.name in after.removed)
    assert after.total_macs == before.total_macs - removed_macs


def test_latent_size_scales_macs_and_rejects_invalid_sizes():
    unet = resolve_model("random:tiny-sd15", materialize=False).unet
    small, big = build_inventory(unet, latent_size=(16, 16)), build_inventory(unet, latent_size=(32, 32))
    conv = next(e for e in small.entries if e.layer.name == "down_blocks.0.resnets.0")
    assert next(e for e in big.entries if e.layer.name == conv.layer.name).macs - conv.macs \
        == 2 * 32 * 32 * 9 * (32 * 32 - 16 * 16)
    with pytest.raises(Exception, match="nearest valid: 16 or 24"):
        build_inventory(unet, latent_size=(20, 16))
