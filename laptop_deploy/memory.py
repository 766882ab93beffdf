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


_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Set this process's high-water mark (VmHWM) back to its resident memory now, so the next
    :func:`peak_rss_mb` is the peak since this call. Linux only (writing ``5`` to ``/proc/self/clear_refs``);
    False where that is unavailable. The mark is process-wide and the old value cannot come back: callers that
    reset it keep the maximum themselves (:class:`PhasePeaks`)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PhasePeaks:
    """Peak resident memory (MiB) of consecutive phases of one process: ``mark(name)`` closes a phase and starts the
    next. ``phases`` stays empty where the mark cannot be reset (then each phase's peak would be the process's);
    :meth:`peak` is the process's peak over all phases either way."""

    def __init__(self, enabled: bool = True) -> None:
        self.overall = peak_rss_mb()
        self.enabled = enabled and reset_peak_rss()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        peak = peak_rss_mb()
        self.overall = max(self.overall, peak)
        if self.enabled:
            self.phases[name] = round(peak, 1)
            reset_peak_rss()

    def peak(self) -> float:
        return max(self.overall, peak_rss_mb())
