"""A distillation run's settings (:class:`DistillOptions`) and the process it runs in (``torchrun`` / ``accelerate``).

Kept apart from :mod:`.train` so that :mod:`.loss` and :mod:`.state` can name these types without importing the
training loop that imports them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import DistillError

FEATURE_NORMS = ("l2", "none")
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = ("constant", "cosine")


@dataclass
class DistillOptions:
    """Every setting of a distillation run; see ``laptop-deploy distill --help`` for each one's meaning."""

    steps: int
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    lambda_task: float | None = None
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    feature_norm: str = "l2"
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    uncond_prob: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    eval_samples: int = 8
    gradient_checkpointing: bool = False
    device: str | None = None

    def validate(self) -> None:
        """Cheap checks, before any model is loaded."""
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--checkpoint-every": self.checkpoint_every, "--eval-samples": self.eval_samples}
        for flag, value in positive.items():
            if value < 1:
                raise DistillError(f"{flag} must be at least 1, got {value}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise DistillError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise DistillError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in SCHEDULES:
            raise DistillError(f"--lr-schedule {self.lr_schedule}: expected one of {', '.join(SCHEDULES)}")
        if self.feature_norm not in FEATURE_NORMS:
            raise DistillError(f"--feature-norm {self.feature_norm}: expected one of {', '.join(FEATURE_NORMS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DistillError(f"--mixed-precision {self.mixed_precision}: expected no, fp16 or bf16")
        lambdas = {"--lambda-out": self.lambda_out, "--lambda-feat": self.lambda_feat,
                   "--lambda-task": self.lambda_task or 0.0, "--weight-decay": self.weight_decay,
                   "--max-grad-norm": self.max_grad_norm}
        for flag, value in lambdas.items():
            if value < 0 or not math.isfinite(value):
                raise DistillError(f"{flag} must be a non-negative number, got {value}")
        if self.lambda_out == 0 and self.lambda_feat == 0 and not self.lambda_task:
            raise DistillError("every loss weight is 0 (--lambda-task, --lambda-out, --lambda-feat): nothing to train")
        if not 0 <= self.ema_decay < 1:
            raise DistillError(f"--ema-decay must be in [0, 1), got {self.ema_decay} (0 disables the EMA)")
        if not 0 <= self.uncond_prob <= 1:
            raise DistillError(f"--uncond-prob must be in [0, 1], got {self.uncond_prob}")


@dataclass
class DistEnv:
    """One process of a ``torchrun`` / ``accelerate launch`` job (world size 1 without either)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str | None, env: DistEnv) -> torch.device:
    """``--device``, else CUDA when available (one GPU per process under torchrun), else the CPU."""
    from ..prune.scoring import resolve_device

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    return device
