"""Every error laptop-deploy raises on purpose, with the CLI exit code it maps to.

Messages are one line and quote the actual value next to the expected one; the CLI prints them as they are.
"""

from __future__ import annotations


class LaptopDeployError(Exception):
    """Base class: bad input or usage. The CLI exits with ``exit_code`` and prints the message on one line."""

    exit_code = 2


class ModelSourceError(LaptopDeployError):
    """A model spec that cannot be resolved or read (missing path, corrupt file, unknown preset, offline hub id)."""


class LayerError(LaptopDeployError):
    """A removal set that names an unknown layer, a non-prunable one, or overlapping units."""


class StudentFormatError(LaptopDeployError):
    """A student folder whose files disagree with each other (missing or unexpected weights, bad metadata)."""


class OutputError(LaptopDeployError):
    """An output path that cannot be written (an existing file, a non-empty folder without ``--force``)."""


class DistillError(LaptopDeployError):
    """Distillation settings, models or checkpoints that cannot be used together."""


class CheckFailed(LaptopDeployError):
    """A check the command ran did not pass (parity, additivity threshold): exit code 1, not a usage error."""

    exit_code = 1
