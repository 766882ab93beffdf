"""Reading weight files so that the same weights always compute the same numbers.

safetensors hands out tensors at whatever offset they sit in the file (8-byte aligned at best); CPU kernels pick
other SIMD paths for weights that are not 64-byte aligned and round differently (~1e-6 on a full SD-1.5 forward),
which breaks bit-exact parity between a model and its reloaded copy. Every reader here copies such tensors into
fresh (64-byte aligned) memory, one tensor at a time, so peak memory stays one model plus one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def aligned(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (converted to ``dtype`` if given) in 64-byte aligned memory; copies only when needed."""
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def read_safetensors(path: Path, names: Mapping[str, str] | None = None, *,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, aligned; ``names`` (file key -> returned key) selects and renames.

    Raises safetensors' ``SafetensorError`` / ``OSError`` for unreadable files: callers word the error.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = names if names is not None else {key: key for key in handle.keys()}
        return {new: aligned(handle.get_tensor(old), dtype) for old, new in names.items()}
