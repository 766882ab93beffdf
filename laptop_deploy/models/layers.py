"""Prunable residual units of a ``UNet2DConditionModel`` and the one mechanism that removes them.

A unit is removable when replacing it by the identity leaves every tensor shape intact:

* a ``ResnetBlock2D`` in a down or mid block whose input and output channels match;
* a ``ResnetBlock2D`` in an up block, together with the skip connection it concatenates, when the hidden state it
  receives already has the channel count it would produce (LAPTOP-Diff / BK-SDM bookkeeping);
* a ``Transformer2DModel`` (kind ``attention``), or one ``BasicTransformerBlock`` inside it (``transformer-block``):
  both are residual, so removing them is the identity.

Removal always goes through :class:`Removed`, whether permanent (:func:`apply_removal`, the student) or temporary
(:func:`bypassed`, scoring without model copies), so a scored layer and a removed layer compute the same function.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerError

KINDS = ("resnet", "attention", "transformer-block")


class Removed(nn.Module):
    """Stands in for a removed residual unit and returns its input, with the calling convention of the original.

    ``keep_channels`` is set for up-block ResNets: their input is ``cat([hidden, skip], dim=1)`` and removing them
    keeps the first ``keep_channels`` channels (the hidden state) and drops the skip. Attention units answer
    diffusers' ``return_dict=False`` convention with a one-tuple. Holds no parameters.
    """

    def __init__(self, *, kind: str, keep_channels: int | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.keep_channels = keep_channels

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        if self.keep_channels is not None:
            hidden_states = hidden_states[:, : self.keep_channels]
        if self.kind != "attention":
            return hidden_states
        if not return_dict:
            return (hidden_states,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=hidden_states)

    def extra_repr(self) -> str:
        suffix = f", keep_channels={self.keep_channels}" if self.keep_channels is not None else ""
        return f"kind={self.kind}{suffix}"


@dataclass(frozen=True)
class Layer:
    """One residual unit. ``params`` counts parameters; ``reason`` says why a unit is not prunable.

    ``keep_channels`` (up-block ResNets only) is the hidden-state width kept when the unit and its skip are dropped.
    ``parent`` names the Transformer2DModel that holds a transformer block.
    """

    name: str
    kind: str
    stage: str
    params: int
    prunable: bool
    reason: str = ""
    keep_channels: int | None = None
    parent: str | None = None


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resnet_rule(resnet: nn.Module, *, stage: str, hidden_in: int) -> tuple[bool, str, int | None]:
    """(prunable, reason, keep_channels) for one ResnetBlock2D receiving ``hidden_in`` channels of hidden state."""
    c_in, c_out = resnet.in_channels, resnet.out_channels
    if not stage.startswith("up"):
        if c_in != c_out:
            return False, f"changes channels {c_in}->{c_out}", None
        return True, "", None
    skip = c_in - hidden_in
    if hidden_in != c_out:
        return False, (f"consumes a {skip}-channel skip and maps {hidden_in}->{c_out} hidden channels; "
                       f"without it the next layer would see {hidden_in} channels"), None
    return True, "", hidden_in


def discover_layers(unet: nn.Module) -> tuple[list[Layer], list[str]]:
    """Every ResNet, Transformer2DModel and BasicTransformerBlock of ``unet``, in forward order.

    Returns (layers, removed): units already replaced by :class:`Removed` are listed in ``removed`` only.
    Transformer blocks are listed after the Transformer2DModel that holds them (``parent`` set).
    """
    layers: list[Layer] = []
    removed: list[str] = []
    blocks = [(f"down_blocks.{i}", f"down.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks.append(("mid_block", "mid", unet.mid_block))
    blocks += [(f"up_blocks.{i}", f"up.{i}", b) for i, b in enumerate(unet.up_blocks)]
    hidden = unet.config.block_out_channels[-1]  # width entering the up path
    for prefix, stage, block in blocks:
        if block is None:
            continue
        for j, resnet in enumerate(block.resnets):
            name = f"{prefix}.resnets.{j}"
            if isinstance(resnet, Removed):
                removed.append(name)
                continue
            prunable, reason, keep = _resnet_rule(resnet, stage=stage, hidden_in=hidden)
            layers.append(Layer(name, "resnet", stage, _params(resnet), prunable, reason, keep))
            if stage.startswith("up"):
                hidden = resnet.out_channels
        for j, attention in enumerate(getattr(block, "attentions", None) or ()):
            name = f"{prefix}.attentions.{j}"
            if isinstance(attention, Removed):
                removed.append(name)
                continue
            layers.append(Layer(name, "attention", stage, _params(attention), True))
            for k, tblock in enumerate(getattr(attention, "transformer_blocks", ())):
                if isinstance(tblock, Removed):
                    removed.append(f"{name}.transformer_blocks.{k}")
                    continue
                layers.append(Layer(f"{name}.transformer_blocks.{k}", "transformer-block", stage,
                                    _params(tblock), True, parent=name))
    return layers, removed


def check_removal(layers: Iterable[Layer], names: Iterable[str], *, removed: Iterable[str] = ()) -> list[Layer]:
    """The layers named by ``names``, or a :class:`LayerError` for an unknown, non-prunable or overlapping name."""
    by_name = {layer.name: layer for layer in layers}
    already = set(removed)
    chosen: list[Layer] = []
    for name in dict.fromkeys(names):
        if name in already:
            raise LayerError(f"layer '{name}' is already removed in this model")
        if name not in by_name:
            close = difflib.get_close_matches(name, by_name, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `laptop-deploy inventory` lists them"
            raise LayerError(f"unknown layer '{name}'{hint}")
        layer = by_name[name]
        if not layer.prunable:
            raise LayerError(f"layer '{name}' is not prunable: {layer.reason}")
        chosen.append(layer)
    names_chosen = {layer.name for layer in chosen}
    for layer in chosen:
        if layer.parent in names_chosen:
            raise LayerError(f"layer '{layer.name}' lies inside '{layer.parent}', which is removed as a whole; "
                             f"name one or the other")
    return chosen


def _slot(unet: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return unet.get_submodule(parent_name), attr


@contextmanager
def bypassed(unet: nn.Module, layers: Iterable[Layer]) -> Iterator[nn.Module]:
    """Temporarily replace ``layers`` by :class:`Removed` in place (no copy); the originals return on exit."""
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for layer in layers:
            parent, attr = _slot(unet, layer.name)
            saved.append((parent, attr, parent.get_submodule(attr)))
            parent.register_module(attr, Removed(kind=layer.kind, keep_channels=layer.keep_channels))
        yield unet
    finally:
        for parent, attr, original in reversed(saved):
            parent.register_module(attr, original)


def apply_removal(unet: nn.Module, names: Iterable[str]) -> list[Layer]:
    """Remove the named units from ``unet`` for good (their parameters are freed); returns the removed layers."""
    layers, removed = discover_layers(unet)
    chosen = check_removal(layers, names, removed=removed)
    for layer in chosen:
        parent, attr = _slot(unet, layer.name)
        parent.register_module(attr, Removed(kind=layer.kind, keep_channels=layer.keep_channels))
    return chosen


def removed_layers(unet: nn.Module) -> list[str]:
    """Names of the units of ``unet`` that are :class:`Removed`, in forward order (the student's removal set)."""
    return discover_layers(unet)[1]


def stages(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The U-Net's stages by module name: every down block, the mid block, every up block (feature-KD taps)."""
    named = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        named.append(("mid_block", unet.mid_block))
    return named + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]


def tap_stages(unet: nn.Module, sink: list[torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks appending each stage's output to ``sink`` in :func:`stages` order, as fp32 and still in the
    autograd graph (down blocks return ``(hidden, skips)``: the hidden state is kept). Remove the handles after."""

    def hook(module, args, output):
        sink.append((output[0] if isinstance(output, tuple) else output).float())

    return [module.register_forward_hook(hook) for _, module in stages(unet)]

