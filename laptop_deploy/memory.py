"""Resident memory of this process, in MiB (2**20 bytes), for every report that states memory (export, bench,
generate, distill). Standard library only: the torch-free ``generate`` loop imports it.

Linux: ``VmRSS`` / ``VmHWM`` of ``/proc/self/status``. Not ``getrusage().ru_maxrss``: Linux keeps that high-water
mark across fork + exec, so a command started from an 800 MiB Python process (a test, a benchmark driver) reports
an 800 MiB peak whatever it did itself. Elsewhere (macOS) ``ru_maxrss`` is all there is, and it serves for both.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB, or None where there is no /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident memory now (MiB); where /proc is missing, the peak so far."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else _ru_maxrss_mib()


def peak_rss_mb() -> float:
    """This process's own peak resident memory so far (MiB)."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else _ru_maxrss_mib()
