"""The distillation loss: stage taps on the unwrapped U-Net, and the plain (BK-SDM) and normalized (LAPTOP-Diff)
feature terms beside the output and task terms. The formula is in :mod:`laptop_deploy.distill.train`'s docstring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import stages, tap_stages

if TYPE_CHECKING:
    from .options import DistillOptions


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate / torch.compile wrappers (hooks must go on this one: BK-SDM's bug)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class FeatureTaps:
    """Stage outputs of one U-Net, captured by forward hooks on the unwrapped model, popped after each forward."""

    def __init__(self, model: nn.Module) -> None:
        inner = unwrap(model)
        self.names = [name for name, _ in stages(inner)]
        self._sink: list[torch.Tensor] = []
        self._handles = tap_stages(inner, self._sink)

    def pop(self) -> list[torch.Tensor]:
        out, self._sink[:] = list(self._sink), []
        if len(out) != len(self.names):
            raise RuntimeError(f"captured {len(out)} stage outputs, expected {len(self.names)} (hooks lost?)")
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def feature_terms(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """Per stage: plain MSE (BK-SDM) and the normalized ‖F_S − F_T‖² / ‖F_T‖² (per sample, then batch mean)."""
    raw, normalized = [], []
    for s, t in zip(student, teacher):
        t = t.detach()
        diff = (s - t).pow(2)
        raw.append(diff.mean())
        per_sample = diff.flatten(1).sum(1) / t.pow(2).flatten(1).sum(1).clamp_min(torch.finfo(t.dtype).tiny)
        normalized.append(per_sample.mean())
    return raw, normalized


def distill_loss(options: DistillOptions, *, lambda_task: float, s_out: torch.Tensor, t_out: torch.Tensor,
                 target: torch.Tensor, s_feats: list[torch.Tensor] | None, t_feats: list[torch.Tensor] | None,
                 names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The total loss of one micro-batch and its terms (floats) for the log, before and after normalization."""
    s_out = s_out.float()
    out = F.mse_loss(s_out, t_out.float())
    task = F.mse_loss(s_out, target.float()) if lambda_task else torch.zeros((), device=s_out.device)
    total = options.lambda_out * out + lambda_task * task
    record: dict[str, Any] = {"task": task.item(), "out": out.item()}
    if s_feats is not None:
        raw, normalized = feature_terms(s_feats, t_feats)
        used = normalized if options.feature_norm == "l2" else raw
        feat = torch.stack(used).sum()
        total = total + options.lambda_feat * feat
        record.update({"feat": feat.item(),
                       "feat_raw": {n: v.item() for n, v in zip(names, raw)},
                       "feat_normalized": {n: v.item() for n, v in zip(names, normalized)},
                       "feat_contrib": {n: options.lambda_feat * v.item() for n, v in zip(names, used)}})
    record["total"] = total.item()
    record["contrib"] = {"task": lambda_task * record["task"], "out": options.lambda_out * record["out"],
                         "feat": options.lambda_feat * record.get("feat", 0.0)}
    return total, record


def mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in records[0].items():
        if isinstance(value, dict):
            out[key] = mean_records([r[key] for r in records])
        else:
            out[key] = sum(r[key] for r in records) / len(records)
    return out
