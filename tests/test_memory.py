"""Memory reports are the process's own: a command started from a big Python process must not report the
parent's high-water mark (what ``ru_maxrss`` does on Linux across fork + exec)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from laptop_deploy.memory import current_rss_mb, peak_rss_mb


def test_peak_follows_an_allocation_and_never_drops():
    before = peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_mb() >= before and peak_rss_mb() >= current_rss_mb() - 1
    assert current_rss_mb() > 32
    del block
    assert peak_rss_mb() >= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc (ru_maxrss is all macOS has)")
def test_a_child_reports_its_own_peak_not_the_parents():
    held = np.ones(256 * 2**20 // 8)  # make sure this process's peak is well above a bare interpreter's
    code = "import json; from laptop_deploy.memory import peak_rss_mb; print(json.dumps(peak_rss_mb()))"
    child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert peak_rss_mb() > 256 and child < 0.5 * peak_rss_mb()
    del held
