"""The int8 gate's keep-float search, shared by the ONNX (``onnx_int8.py``) and ExecuTorch (``executorch_int8.py``)
int8 paths; pure Python, no ONNX or ExecuTorch import, so either path works without the other's extra.

* :func:`unit_of` — the U-Net unit a module path belongs to (``down_blocks.1.attentions.0``, ``conv_in``...): the
  node groups the gate keeps float or quantizes as a whole;
* :func:`keep_float` — the greedy loop: groups kept float from the most sensitive on until the held-out PSNR
  reaches the gate or the float share of MACs would pass ``--max-float-share``.
"""

from __future__ import annotations

import sys
from typing import Any

UNIT_ROOTS = ("down_blocks", "up_blocks", "mid_block")  # a unit is <root>.<i>.<kind>.<j> below these


def unit_of(scope: str) -> str:
    """The U-Net unit of a module path: ``down_blocks.0.attentions.1`` for anything inside it, the first component
    elsewhere (``conv_in``, ``time_embedding``), ``graph`` when the exporter recorded no scope."""
    parts = [p for p in scope.split(".") if p]
    if not parts:
        return "graph"
    if parts[0] == "mid_block" and len(parts) >= 3:
        return ".".join(parts[:3])
    if parts[0] in UNIT_ROOTS and len(parts) >= 4:
        return ".".join(parts[:4])
    return ".".join(parts[:2]) if parts[0] in UNIT_ROOTS else parts[0]


def keep_float(order: list[str], shares: dict[str, float], evaluate: Any, *, start_db: float, min_psnr: float,
               max_share: float) -> tuple[list[str], float, list[dict[str, Any]]]:
    """The gate's greedy loop: add groups from ``order`` (most sensitive first) to the float set, calling
    ``evaluate(kept) -> PSNR dB`` after each, until the PSNR reaches ``min_psnr`` or the next group would push the
    float share of MACs above ``max_share``. Returns (kept groups, last PSNR, one log entry per evaluation)."""
    kept: list[str] = []
    psnr, log = start_db, [{"kept_float": None, "psnr_db": round(start_db, 2), "float_mac_share": 0.0}]
    for group in order:
        if psnr >= min_psnr:
            break
        share = sum(shares[g] for g in (*kept, group))
        if share > max_share:
            break
        kept.append(group)
        psnr = evaluate(kept)
        log.append({"kept_float": group, "psnr_db": round(psnr, 2), "float_mac_share": round(share, 4)})
        print(f"int8: + {group} float ({100 * share:.1f}% of MACs float): {psnr:.2f} dB", file=sys.stderr,
              flush=True)
    return kept, psnr, log
