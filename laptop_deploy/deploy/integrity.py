"""Files against the manifest that lists them: sizes, sha256 digests and atomic JSON writes, with no torch.

One implementation for single artifacts (:func:`laptop_deploy.deploy.manifest.check_integrity`) and app bundles
(:func:`laptop_deploy.deploy.bundle_format.check_bundle`), torch-free so that ``generate`` — the reference app loop,
which must not import torch — checks a bundle with the same code ``verify`` uses. A manifest's ``files`` maps a
path relative to the artifact folder (POSIX, may contain ``/``) to ``{"bytes": int, "sha256": hex}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError
from ..outputs import replace_file

MANIFEST = "manifest.json"
CHUNK = 1 << 24  # 16 MiB reads: sha256 runs at ~0.5-1 GB/s per core, a full-size U-Net hashes in a few seconds


def file_entry(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of one file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def check_files(folder: Path, files: Mapping[str, Mapping[str, Any]], *, skip_digest: bool = False,
                error: type[LaptopDeployError] = LaptopDeployError) -> None:
    """Every file in ``files`` exists under ``folder`` with its recorded byte size and (unless ``skip_digest``) its
    recorded sha256, re-read from disk. Sizes are checked for all files first, so a truncated or missing file is
    named without hashing anything. Raises ``error`` (exit 2) naming the first file that differs, or that is
    listed without a digest."""
    folder = Path(folder)
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise error(f"{path}: missing (listed in {MANIFEST}); the artifact is incomplete")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise error(f"{path}: {size:,} bytes, {MANIFEST} says {entry.get('bytes'):,} (truncated or modified)")
    if skip_digest:
        return
    for name, entry in sorted(files.items()):
        path = folder / name
        recorded = entry.get("sha256")
        if not recorded:
            raise error(f"{path}: {MANIFEST} lists no sha256 for it, so its integrity cannot be checked; "
                        f"re-export, or pass --skip-digest to use it unchecked")
        actual = file_entry(path)["sha256"]
        if actual != recorded:
            raise error(f"{path}: sha256 {actual[:16]}…, {MANIFEST} says {recorded[:16]}… (modified after "
                        f"export); re-export, or pass --skip-digest to use it unchecked")


def write_json_atomically(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary sibling and a rename: a reader sees the old
    file or the new one, never half of one."""
    return replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
