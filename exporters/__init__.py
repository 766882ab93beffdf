"""Exporters, imported as ``laptop_deploy.exporters``: one module per target, registered by name and imported only
when that target is used (after ExecuTorch's model registry), so a missing optional package breaks only its own
target.

Every exporter module has ``export(unet, spec, out_dir, *, source, options) -> Manifest``: it writes the artifact
and ``manifest.json`` into ``out_dir`` (a temporary folder the caller moves into place) from one
:class:`~laptop_deploy.deploy.spec.ExportSpec`, and an ``Options`` dataclass with ``from_args(args)`` (the parsed
``laptop-deploy export`` arguments) and ``check()`` (cheap validation before any model is built).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import LaptopDeployError

# target -> (module, the pip extra that installs what it imports)
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("laptop_deploy.exporters.onnx", "onnx"),
    "ort-mobile": ("laptop_deploy.exporters.ort_mobile", "onnx"),
    # the ONNX exporter is what the module imports; tensorrt (the [trt] extra) is checked when an engine is built
    "trt": ("laptop_deploy.exporters.tensorrt", "onnx"),
    "coreml": ("laptop_deploy.exporters.coreml", "coreml"),
    "executorch": ("laptop_deploy.exporters.executorch", "executorch"),
}


class TargetError(LaptopDeployError):
    """An unknown export target, or one whose packages are not installed."""


def get_exporter(target: str) -> ModuleType:
    """The exporter module of ``target``. Unknown targets list the valid ones; a missing package names the extra."""
    if target not in TARGETS:
        raise TargetError(f"unknown target '{target}'; valid: {', '.join(TARGETS)}")
    module, extra = TARGETS[target]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or str(exc)).split(".")[0]
        raise TargetError(f"target '{target}' needs the package '{missing}', which is not installed: "
                          f"pip install 'laptop-deploy[{extra}]'") from None
