"""Exact 0/1 knapsack: keep the layers with the largest summed score whose summed cost fits the budget.

Costs are integers (parameters or MACs, up to ~10¹⁰) and N is 28–100, so a table over costs is out of the
question. This is the Nemhauser–Ullmann dynamic programme over Pareto-optimal (cost, score) states: after each
item, only states that no cheaper state beats on score survive, and states whose optimistic completion (the
fractional-knapsack bound over the remaining items) cannot beat the best complete solution found greedily are
dropped. Both prunings are exact, so the result is optimal. Identical items (SDXL's many equal transformer blocks)
collapse to the same states, which keeps the frontier small.

Ties are broken deterministically: among equal scores the cheaper kept set wins (more is pruned), then the set
whose kept items come first in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KnapsackResult:
    """Indices of the kept items (ascending), their summed score and cost, and the number of states explored."""

    kept: tuple[int, ...]
    score: float
    cost: int
    states: int


def _fractional_bound(order: Sequence[int], scores: Sequence[float], costs: Sequence[int],
                      start: int, room: int) -> float:
    """Largest score the items ``order[start:]`` can add within ``room`` when items may be split."""
    bound = 0.0
    for i in order[start:]:
        if costs[i] <= room:
            room -= costs[i]
            bound += scores[i]
        else:
            return bound + scores[i] * room / costs[i]
    return bound


def solve_knapsack(scores: Sequence[float], costs: Sequence[int], budget: int) -> KnapsackResult:
    """Maximise Σ scores[i] over kept i subject to Σ costs[i] ≤ ``budget``; exact.

    Scores must be ≥ 0 (a negative-score item would simply never be kept) and costs > 0.
    """
    n = len(scores)
    if len(costs) != n:
        raise ValueError(f"{n} scores but {len(costs)} costs")
    if any(c <= 0 for c in costs) or any(s < 0 or s != s for s in scores):
        raise ValueError("costs must be positive and scores non-negative numbers")
    # Process items by decreasing score density so the bound tightens early; the order is total (ties by index).
    order = sorted(range(n), key=lambda i: (-scores[i] / costs[i], i))
    greedy_score, room = 0.0, budget
    for i in order:
        if costs[i] <= room:
            room -= costs[i]
            greedy_score += scores[i]
    best_known = greedy_score
    # state: cost -> (score, mask of kept items); mask bits are input indices.
    frontier: list[tuple[int, float, int]] = [(0, 0.0, 0)]
    explored = 1
    for position, item in enumerate(order):
        candidates = frontier + [(c + costs[item], s + scores[item], m | (1 << item))
                                 for c, s, m in frontier if c + costs[item] <= budget]
        explored += len(candidates)
        candidates.sort(key=lambda st: (st[0], -st[1], -_earliness(st[2], n)))
        frontier = []
        best_score = -1.0
        for cost, score, mask in candidates:
            if score <= best_score:
                continue  # a cheaper (or equal-cost, earlier) state scores at least as much
            optimistic = score + _fractional_bound(order, scores, costs, position + 1, budget - cost)
            if optimistic < best_known - 1e-12 * max(1.0, abs(best_known)):
                continue
            frontier.append((cost, score, mask))
            best_score = score
            best_known = max(best_known, score)
    best_cost, best_score_final, best_mask = max(frontier, key=lambda st: (st[1], -st[0], _earliness(st[2], n)))
    kept = tuple(i for i in range(n) if best_mask >> i & 1)
    return KnapsackResult(kept=kept, score=best_score_final, cost=best_cost, states=explored)


def _earliness(mask: int, width: int) -> int:
    """Larger when the kept items sit earlier in input order: the mask's bits reversed over ``width`` bits, so
    the lowest index where two sets differ decides, in favour of the set that keeps it."""
    return int(format(mask, f"0{width}b")[::-1], 2) if width else 0
