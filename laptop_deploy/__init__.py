"""laptop-deploy: prune a Stable Diffusion U-Net (LAPTOP-Diff), retrain it, export it, and prove it still works."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# The repository keeps exporters/ and runtimes/ at its root (the user's layout) while they are imported as
# laptop_deploy.exporters / laptop_deploy.runtimes. Installed, pyproject's package-dir maps them; run from a source
# checkout (e.g. `python -m pytest` puts the repo root first on sys.path), this finds them beside the package.
_root = Path(__file__).resolve().parent.parent
if (_root / "exporters" / "__init__.py").is_file() and not (Path(__file__).parent / "exporters").exists():
    __path__.append(str(_root))  # noqa: F821 - __path__ is defined for packages
