"""Interaction-aware refinement of the knapsack's removal set, by measured joint output losses.

The one-shot knapsack maximises the kept units' summed single-unit losses, i.e. it assumes L(S) ≈ Σ_{i∈S} sᵢ.
Where units interact (many that each matter little can matter together) the chosen set S can be far off that
sum. Each refinement round linearises around the current set instead of around the full model:

1. **marginals around S** (one pass per candidate): for a kept unit j, mⱼ = L(S ∪ {j}) − L(S), what removing it as
   well costs; for a removed unit i, mᵢ = L(S) − L(S ∖ {i}), what restoring it saves;
2. **re-solve**: the same knapsack (same cost vector, same budget) on the marginals, clipped at 0 — a proposal S';
3. **swaps**: the ``swaps`` (removed i, kept j) exchanges that keep the removed cost within the target's window
   (≥ what the ratio needs, and no further above it than the one-shot set or ``RATIO_SLACK``·total) and whose
   predicted change mⱼ − mᵢ is lowest (negative only), each a proposal;
4. every proposal's joint loss is measured (one pass each); the lowest is accepted only if it is strictly lower
   than L(S). A round without an accepted proposal ends the refinement ("converged").

A set's loss is measured once (:func:`_remembered`): after a swap, two of the next round's marginals are sets the
last round measured, so a round after a swap costs two passes fewer than one per candidate.

So the returned set's measured joint loss is never above the one-shot set's (same calibration, same scorer,
deterministic forwards). Costs are whatever vector the caller passes (params, MACs, measured latency): the
refinement only adds, compares and hands them to ``select``. Every forward pass goes through the caller's
:class:`~laptop_deploy.prune.scoring.Scorer` and is counted there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..models.layers import Layer

DEFAULT_SWAPS = 2  # swap proposals measured per round: each is one pass; the re-solve proposal usually wins


@dataclass
class RefineRound:
    """One round: the marginals, each measured proposal ({kind, removed, joint}), what was accepted, the set and its
    joint loss after the round, the forward passes the round cost, and the losses it took from earlier rounds
    (``passes + reused`` = candidates + proposals)."""

    index: int
    marginals: dict[str, float]
    proposals: list[dict[str, Any]]
    accepted: str | None
    removed: list[str]
    joint: float
    passes: int
    reused: int = 0


@dataclass
class Refinement:
    """The one-shot set and its joint loss, every round, the final set. ``one_shot_passes`` is what the plan had
    spent when refinement began; ``passes`` what refinement added."""

    one_shot: list[str]
    one_shot_joint: float
    one_shot_passes: int
    rounds: list[RefineRound] = field(default_factory=list)
    final: list[str] = field(default_factory=list)
    final_joint: float = 0.0
    passes: int = 0
    stopped: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"one_shot": self.one_shot, "one_shot_joint": self.one_shot_joint,
                "one_shot_passes": self.one_shot_passes, "rounds": [asdict(r) for r in self.rounds],
                "final": self.final, "final_joint": self.final_joint, "passes": self.passes,
                "total_passes": self.one_shot_passes + self.passes, "stopped": self.stopped,
                "improvement": 1 - self.final_joint / self.one_shot_joint if self.one_shot_joint > 0 else 0.0}


def refine_selection(joint_loss: Callable[[Sequence[Layer]], float], candidates: Sequence[Layer],
                     chosen: Sequence[Layer], chosen_joint: float, cost_of: dict[str, float],
                     select: Callable[[dict[str, float]], list[Layer]], *, need: float, slack: float,
                     rounds: int, swaps: int = DEFAULT_SWAPS,
                     passes: Callable[[], int] = lambda: 0) -> tuple[list[Layer], Refinement]:
    """Refine ``chosen`` (whose measured joint loss is ``chosen_joint``) for up to ``rounds`` rounds.

    ``joint_loss(layers)``: L with those units removed (one counted pass); ``select(scores)``: the knapsack over the
    candidates under the run's cost vector and budget, returning the removed units; ``need``: the least removed
    cost that meets the target; ``slack``: how far above ``need`` a swap may push the removed cost (the one-shot
    set's own overshoot is always allowed); ``passes()``: the scorer's pass counter, so rounds record their cost.
    Returns the final removed units (candidate order) and the record.
    """
    order = {layer.name: k for k, layer in enumerate(candidates)}
    joint_loss = _Remembered(joint_loss, chosen, chosen_joint)
    current = sorted(chosen, key=lambda layer: order[layer.name])
    record = Refinement(one_shot=[x.name for x in current], one_shot_joint=chosen_joint, one_shot_passes=passes())
    start, joint = passes(), chosen_joint
    ceiling = max(sum(cost_of[x.name] for x in current), need + slack)
    record.stopped = "no rounds requested"
    for index in range(rounds):
        before, reused = passes(), joint_loss.reused
        marginals = _marginals(joint_loss, candidates, current, joint)
        proposals = _proposals(candidates, current, marginals, cost_of, select, need=need, ceiling=ceiling,
                               swaps=swaps)
        measured = [{"kind": kind, "removed": [x.name for x in s], "joint": joint_loss(s)} for kind, s in proposals]
        best = min(range(len(measured)), key=lambda k: (measured[k]["joint"], k), default=None)
        accepted = None
        if best is not None and measured[best]["joint"] < joint:
            accepted, joint = measured[best]["kind"], measured[best]["joint"]
            current = sorted(proposals[best][1], key=lambda layer: order[layer.name])
        record.rounds.append(RefineRound(index=index + 1, marginals=marginals, proposals=measured,
                                         accepted=accepted, removed=[x.name for x in current], joint=joint,
                                         passes=passes() - before, reused=joint_loss.reused - reused))
        if accepted is None:
            record.stopped = "converged: no proposal lowered the measured joint loss"
            break
        record.stopped = f"{rounds} round(s) done"
    record.final, record.final_joint, record.passes = [x.name for x in current], joint, passes() - start
    return current, record


class _Remembered:
    """``joint_loss`` measured once per distinct set (forwards are deterministic): after an accepted swap
    i → j, the next round's marginals of i and j are sets the last round already measured (S ∖ {j} is the old
    S ∖ {i}; S ∪ {i} is the old S ∪ {j}), and a proposal may repeat an earlier one. ``reused`` counts the calls
    answered from memory."""

    def __init__(self, joint_loss: Callable[[Sequence[Layer]], float], chosen: Sequence[Layer],
                 chosen_joint: float) -> None:
        self.joint_loss, self.reused = joint_loss, 0
        self.known = {frozenset(x.name for x in chosen): chosen_joint}

    def __call__(self, layers: Sequence[Layer]) -> float:
        key = frozenset(x.name for x in layers)
        if key in self.known:
            self.reused += 1
        else:
            self.known[key] = self.joint_loss(layers)
        return self.known[key]


def _marginals(joint_loss: Callable[[Sequence[Layer]], float], candidates: Sequence[Layer],
               current: list[Layer], joint: float) -> dict[str, float]:
    """mⱼ = L(S ∪ {j}) − L(S) for kept j, mᵢ = L(S) − L(S ∖ {i}) for removed i: one pass per candidate."""
    removed = {x.name for x in current}
    out: dict[str, float] = {}
    for layer in candidates:
        if layer.name in removed:
            out[layer.name] = joint - joint_loss([x for x in current if x.name != layer.name])
        else:
            out[layer.name] = joint_loss([*current, layer]) - joint
    return out


def _proposals(candidates: Sequence[Layer], current: list[Layer], marginals: dict[str, float],
               cost_of: dict[str, float], select: Callable[[dict[str, float]], list[Layer]], *, need: float,
               ceiling: float, swaps: int) -> list[tuple[str, list[Layer]]]:
    """The re-solved set (if new), then up to ``swaps`` exchanges predicted to lower the loss, best first."""
    names = {x.name for x in current}
    out: list[tuple[str, list[Layer]]] = []
    resolved = select({name: max(0.0, m) for name, m in marginals.items()})
    if {x.name for x in resolved} != names:
        out.append(("re-solve", list(resolved)))
    removed_cost = sum(cost_of[x.name] for x in current)
    kept = [x for x in candidates if x.name not in names and cost_of[x.name] > 0]
    moves = []
    for i in current:
        for j in kept:
            after = removed_cost - cost_of[i.name] + cost_of[j.name]
            gain = marginals[j.name] - marginals[i.name]
            if need <= after <= ceiling and gain < 0:
                moves.append((gain, abs(cost_of[j.name] - cost_of[i.name]), i.name, j.name, i, j))
    seen = [set(names)] + [{x.name for x in s} for _, s in out]
    for _, _, _, _, i, j in sorted(moves, key=lambda m: m[:4]):
        if len(out) - (1 if out and out[0][0] == "re-solve" else 0) >= swaps:
            break
        swapped = [x for x in current if x is not i] + [j]
        if {x.name for x in swapped} not in seen:
            seen.append({x.name for x in swapped})
            out.append((f"swap {i.name} -> {j.name}", swapped))
    return out


def min_removed_cost(cost_of: dict[str, float], total: float, ratio: float) -> float:
    """The least removed cost whose complement fits the knapsack's budget — mirrors
    :func:`~laptop_deploy.prune.plan.select_layers`: budget = ⌊total·(1 − ratio)⌋ − the cost outside the candidates."""
    fixed = total - sum(cost_of.values())
    budget = max(0, int(total * (1 - ratio)) - fixed)
    return sum(cost_of.values()) - budget


def interaction_markdown(plan: dict[str, Any]) -> list[str]:
    """``pruning_report.md`` sections for the refinement and the stability report (empty when neither ran)."""
    lines: list[str] = []
    ref, stab = plan.get("refinement"), plan.get("stability")
    if ref:
        lines += ["", "## Refinement", "",
                  f"One-shot set: {len(ref['one_shot'])} units, joint loss {ref['one_shot_joint']:.4g} after "
                  f"{ref['one_shot_passes']} passes. Final set: {len(ref['final'])} units, joint loss "
                  f"{ref['final_joint']:.4g} after {ref['total_passes']} passes ({ref['stopped']}).", "",
                  "| round | proposals measured | accepted | joint loss | passes |", "|---:|---:|---|---:|---:|"]
        lines += [f"| {r['index']} | {len(r['proposals'])} | {r['accepted'] or '–'} | {r['joint']:.4g} | "
                  f"{r['passes']} |" for r in ref["rounds"]]
    if stab:
        own, final = stab["joint_own"], stab["joint_final"]
        lines += ["", "## Calibration stability", "",
                  f"{len(stab['draws'])} calibration draws (seeds {', '.join(map(str, stab['seeds']))}) picked "
                  f"{stab['distinct_sets']} distinct one-shot set(s) — "
                  f"{'**unstable**' if stab['unstable'] else 'stable'}. Joint loss of each draw's own set "
                  f"{own['min']:.4g}–{own['max']:.4g} (mean {own['mean']:.4g}); of the final set under every draw "
                  f"{final['min']:.4g}–{final['max']:.4g} (mean {final['mean']:.4g}).", ""]
        if stab["in_doubt"]:
            lines += ["| unit removed by some draws only | fraction of draws |", "|---|---:|"]
            lines += [f"| `{n}` | {stab['frequency'][n]:.2f} |" for n in stab["in_doubt"]]
    return lines
