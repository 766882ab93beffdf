"""Is the one-shot choice a property of the model, or of the calibration draw? ``prune --calib-seeds K``.

The plan's own calibration is draw 0 (seed s). Draws 1..K−1 use seeds s+1..s+K−1, everything else equal (count,
images, prompts, ``--steps``, latent size). Under each draw the single-unit output losses are scored again (N + 1
passes), the same knapsack picks a set, and two joint losses are measured: that set's, and the plan's final set's
(so the spread says both how much the choice moves and how robust the delivered set is). Reported:

* ``frequency`` — for every candidate, the fraction of draws whose one-shot set removes it;
* ``joint_own`` / ``joint_final`` — min, max, mean, standard deviation of those two losses over draws;
* ``distinct_sets`` and ``unstable`` — the choice is called unstable when the draws do not all pick one set; the
  units "in doubt" are those removed by some draws but not all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..models.layers import Layer


@dataclass
class Draw:
    """One calibration draw: its seed, its one-shot removed set, that set's joint loss, the final set's joint loss
    under this draw, and the passes it cost."""

    seed: int
    removed: list[str]
    joint_own: float
    joint_final: float
    passes: int


@dataclass
class StabilityReport:
    draws: list[Draw] = field(default_factory=list)

    def frequency(self, names: Sequence[str]) -> dict[str, float]:
        return {n: sum(n in d.removed for d in self.draws) / len(self.draws) for n in names}

    def in_doubt(self, names: Sequence[str]) -> list[str]:
        return [n for n, f in self.frequency(names).items() if 0 < f < 1]

    @property
    def distinct_sets(self) -> int:
        return len({tuple(sorted(d.removed)) for d in self.draws})

    def as_dict(self, names: Sequence[str]) -> dict[str, Any]:
        doubt = self.in_doubt(names)
        return {"draws": [asdict(d) for d in self.draws], "seeds": [d.seed for d in self.draws],
                "frequency": self.frequency(names), "distinct_sets": self.distinct_sets,
                "unstable": self.distinct_sets > 1, "in_doubt": doubt,
                "joint_own": spread([d.joint_own for d in self.draws]),
                "joint_final": spread([d.joint_final for d in self.draws]),
                "passes": sum(d.passes for d in self.draws)}


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, max, mean and the population standard deviation of ``values`` (non-empty)."""
    mean = sum(values) / len(values)
    return {"min": min(values), "max": max(values), "mean": mean,
            "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}


def measure_stability(first: Draw, seeds: Sequence[int], score: Callable[[int], tuple[Any, dict[str, float]]],
                      select: Callable[[dict[str, float]], list[Layer]], final: Sequence[Layer]) -> StabilityReport:
    """Draw 0 is ``first`` (the plan's own); for every further seed, ``score(seed)`` returns a fresh scorer on that
    draw and its single-unit output losses, ``select`` the one-shot set, then both joint losses are measured."""
    report = StabilityReport([first])
    final_names = sorted(x.name for x in final)
    for seed in seeds:
        scorer, singles = score(seed)
        removed = select(singles)
        own = scorer.output_loss(removed)
        joint_final = own if sorted(x.name for x in removed) == final_names else scorer.output_loss(final)
        report.draws.append(Draw(seed=seed, removed=[x.name for x in removed], joint_own=own,
                                 joint_final=joint_final, passes=scorer.forward_passes))
    return report


def stability_note(report: dict[str, Any]) -> str | None:
    """The plan's note when the choice depends on the draw (None when every draw picked the same set)."""
    if not report["unstable"]:
        return None
    own = report["joint_own"]
    return (f"unstable selection: {len(report['draws'])} calibration draws picked {report['distinct_sets']} "
            f"different sets; {len(report['in_doubt'])} unit(s) removed by some draws only "
            f"({', '.join(report['in_doubt'][:6])}{', …' if len(report['in_doubt']) > 6 else ''}); their joint "
            f"losses span {own['min']:.4g}–{own['max']:.4g} (the final set under every draw: "
            f"{report['joint_final']['min']:.4g}–{report['joint_final']['max']:.4g}); consider more --calib "
            f"samples or --refine")
