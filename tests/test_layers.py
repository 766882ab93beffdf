"""Removal mechanics: a removed unit computes exactly 'the residual branch is gone', by an independent route."""

from __future__ import annotations

import pytest
import torch

from laptop_deploy.errors import LayerError
from laptop_deploy.models.layers import Removed, apply_removal, bypassed, check_removal, discover_layers

REMOVALS = {
    "random:tiny-sd15": ["down_blocks.0.resnets.1", "down_blocks.1.attentions.0", "mid_block.resnets.1",
                         "up_blocks.0.resnets.2", "up_blocks.1.resnets.2", "up_blocks.3.attentions.2"],
    "random:tiny-sdxl": ["down_blocks.0.resnets.1", "down_blocks.2.attentions.1.transformer_blocks.3",
                         "mid_block.attentions.0.transformer_blocks.0", "up_blocks.0.resnets.1",
                         "up_blocks.1.attentions.0", "up_blocks.2.resnets.2"],
}


def _hook_out_residual_branches(unet, names):
    """Reference: keep each unit but overwrite its output with its input. An up-block ResNet receives
    cat([hidden, skip]); its removal keeps the hidden part, whose width is the ResNet's own output width."""
    handles = []
    for name in names:
        module = unet.get_submodule(name)
        is_attention = ".attentions." in name and ".transformer_blocks." not in name
        keep = module.out_channels if name.startswith("up_blocks") and ".resnets." in name else None

        def hook(module, args, output, keep=keep, is_attention=is_attention):
            x = args[0] if keep is None else args[0][:, :keep]
            return (x,) if is_attention else x

        handles.append(unet.get_submodule(name).register_forward_hook(hook))
    return handles


def test_removed_units_compute_the_teacher_without_their_branches(tiny_spec, make_source, inputs_for):
    teacher = make_source(tiny_spec).unet
    student = make_source(tiny_spec).unet
    names = REMOVALS[tiny_spec]
    inputs = inputs_for(teacher)
    handles = _hook_out_residual_branches(teacher, names)
    with torch.no_grad():
        expected = teacher(**inputs).sample
        for h in handles:
            h.remove()
        full = teacher(**inputs).sample
        removed = {layer.name: layer.params for layer in apply_removal(student, names)}
        got = student(**inputs).sample
    assert torch.equal(got, expected)
    assert not torch.allclose(got, full)  # the removal did change the function
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(student) == params(teacher) - sum(removed.values())


def test_bypass_restores_the_original_modules(make_source, inputs_for):
    unet = make_source().unet
    layers = {layer.name: layer for layer in discover_layers(unet)[0]}
    inputs = inputs_for(unet)
    with torch.no_grad():
        before = unet(**inputs).sample
        originals = [unet.get_submodule(n) for n in REMOVALS["random:tiny-sd15"]]
        with bypassed(unet, [layers[n] for n in REMOVALS["random:tiny-sd15"]]):
            assert all(isinstance(unet.get_submodule(n), Removed) for n in REMOVALS["random:tiny-sd15"])
            during = unet(**inputs).sample
        after = unet(**inputs).sample
    assert [unet.get_submodule(n) for n in REMOVALS["random:tiny-sd15"]] == originals
    assert torch.equal(before, after) and not torch.allclose(before, during)


@pytest.mark.parametrize("names,message", [
    (["down_blocks.9.resnets.0"], "unknown layer 'down_blocks.9.resnets.0'"),
    (["down_blocks.0.resnet.0"], "did you mean down_blocks.0.resnets.0"),
    (["down_blocks.1.resnets.0"], "not prunable: changes channels 32->64"),
    (["up_blocks.2.resnets.0"], "not prunable: consumes a 64-channel skip"),
])
def test_bad_removal_sets_are_rejected_with_the_reason(make_source, names, message):
    unet = make_source().unet
    with pytest.raises(LayerError, match=message):
        check_removal(discover_layers(unet)[0], names)


def test_overlapping_and_repeated_removals_are_rejected(make_source):
    unet = make_source("random:tiny-sdxl").unet
    layers = discover_layers(unet)[0]
    with pytest.raises(LayerError, match="lies inside 'down_blocks.2.attentions.0'"):
        check_removal(layers, ["down_blocks.2.attentions.0", "down_blocks.2.attentions.0.transformer_blocks.1"])
    apply_removal(unet, ["mid_block.resnets.0"])
    with pytest.raises(LayerError, match="already removed"):
        apply_removal(unet, ["mid_block.resnets.0"])
