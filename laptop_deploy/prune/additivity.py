"""Measured additivity of the output loss: is L(S) ≈ Σ_{i∈S} sᵢ for removal sets S near the target ratio?

LAPTOP-Diff's one-shot selection is only as good as this approximation, so every criterion-based run measures it:
the joint output loss of the chosen set and of M random sets of similar cost, against the sums of their single-layer
output losses. Reported: Pearson and Spearman correlation over all measured sets (chosen included), and joint/sum.
A correlation across sets can be high while the chosen set itself interacts strongly, so each set also gets its own
verdict: "not additive for this set" when L(S) is more than 2x or less than 1/2 of Σ sᵢ (:data:`ADDITIVE_BAND`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..models.layers import Layer

ADDITIVE_BAND = (0.5, 2.0)  # L(S) / Σ sᵢ inside this band: the set's loss is (roughly) the sum of its parts


def set_verdict(joint: float, summed: float) -> tuple[bool, str]:
    """(additive?, the sentence the plan and report print) for one removal set."""
    if summed <= 0:
        additive = joint <= 0
        ratio_text = "Σ sᵢ = 0"
    else:
        additive = ADDITIVE_BAND[0] <= joint / summed <= ADDITIVE_BAND[1]
        ratio_text = f"L(S) = {joint / summed:.2f} × Σ sᵢ"
    if additive:
        return True, f"additive for this set ({ratio_text})"
    return False, (f"not additive for this set ({ratio_text}, outside {ADDITIVE_BAND[0]:g}-{ADDITIVE_BAND[1]:g}×): "
                   f"the single-layer scores mis-state what removing these layers together costs")


@dataclass(frozen=True)
class SetMeasurement:
    """One removal set: its layers, the fraction of the cost it removes, L(S) and Σ sᵢ."""

    label: str
    names: tuple[str, ...]
    cost_ratio: float
    joint: float
    summed: float

    @property
    def ratio(self) -> float:
        return self.joint / self.summed if self.summed > 0 else math.inf


@dataclass
class AdditivityReport:
    sets: list[SetMeasurement] = field(default_factory=list)

    @property
    def pearson(self) -> float | None:
        return pearson([s.summed for s in self.sets], [s.joint for s in self.sets])

    @property
    def spearman(self) -> float | None:
        return pearson(_ranks([s.summed for s in self.sets]), _ranks([s.joint for s in self.sets]))

    def as_dict(self) -> dict[str, Any]:
        chosen = self.sets[0] if self.sets else None
        finite = [s.ratio for s in self.sets if math.isfinite(s.ratio)]
        return {
            "pearson": self.pearson, "spearman": self.spearman,
            "chosen_joint_loss": chosen.joint if chosen else None,
            "chosen_sum_of_singles": chosen.summed if chosen else None,
            "chosen_joint_over_sum": chosen.ratio if chosen and math.isfinite(chosen.ratio) else None,
            "mean_joint_over_sum": sum(finite) / len(finite) if finite else None,
            "chosen_additive": set_verdict(chosen.joint, chosen.summed)[0] if chosen else None,
            "chosen_verdict": set_verdict(chosen.joint, chosen.summed)[1] if chosen else None,
            "sets": [{**asdict(s), "names": list(s.names), "joint_over_sum": s.ratio if math.isfinite(s.ratio)
                      else None, "additive": set_verdict(s.joint, s.summed)[0]} for s in self.sets],
        }


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r, or None with fewer than 3 points or no variance."""
    if len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def random_sets(layers: Sequence[Layer], costs: dict[str, int], *, target: int, total: int, count: int,
                seed: int, tolerance: float = 0.02, exclude: Sequence[tuple[str, ...]] = ()) -> list[tuple[str, ...]]:
    """``count`` distinct random removal sets (sorted name tuples, none in ``exclude``) whose cost lies within
    ``tolerance``·total of ``target``.

    Each set walks a seeded random permutation, taking every layer that keeps the cost under target + tolerance,
    until it reaches target − tolerance. Sets that cannot get close enough are skipped (at most 20·count tries).
    """
    rng = random.Random(seed)
    low, high = target - tolerance * total, target + tolerance * total
    found: list[tuple[str, ...]] = []
    for _ in range(20 * count):
        if len(found) == count:
            break
        order = list(layers)
        rng.shuffle(order)
        chosen, cost = [], 0
        for layer in order:
            if cost + costs[layer.name] <= high:
                chosen.append(layer.name)
                cost += costs[layer.name]
            if cost >= low:
                break
        names = tuple(sorted(chosen))
        if cost >= low and names not in found and names not in exclude:
            found.append(names)
    return found


def measure_additivity(sets: Sequence[tuple[str, Sequence[str]]], singles: dict[str, float],
                       costs: dict[str, int], total: int,
                       joint_loss: Callable[[Sequence[str]], float]) -> AdditivityReport:
    """Measure L(S) and Σ sᵢ for each (label, names) in ``sets``; the first set is the chosen one."""
    report = AdditivityReport()
    for label, names in sets:
        report.sets.append(SetMeasurement(
            label=label, names=tuple(names), cost_ratio=sum(costs[n] for n in names) / total,
            joint=joint_loss(names), summed=sum(singles[n] for n in names)))
    return report
