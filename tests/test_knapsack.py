"""The knapsack is exact: it matches brute force on random instances, including ties and SDXL-like duplicates."""

from __future__ import annotations

import itertools
import random

import pytest

from laptop_deploy.prune.knapsack import solve_knapsack


def brute_force(scores, costs, budget):
    best = None
    for r in range(len(scores) + 1):
        for kept in itertools.combinations(range(len(scores)), r):
            cost = sum(costs[i] for i in kept)
            if cost > budget:
                continue
            score = sum(scores[i] for i in kept)
            if best is None or score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and cost < best[1]):
                best = (score, cost, kept)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 16)
    costs = [rng.randint(1, 10**9) for _ in range(n)] if seed % 2 else [rng.randint(1, 12) for _ in range(n)]
    scores = [rng.random() * 10 ** rng.randint(-6, 2) for _ in range(n)]
    if seed % 4 == 3:  # duplicated items and exact ties
        costs[n // 2:] = costs[: n - n // 2]
        scores[n // 2:] = scores[: n - n // 2]
    budget = rng.randint(0, sum(costs))
    result = solve_knapsack(scores, costs, budget)
    score, cost, _ = brute_force(scores, costs, budget)
    assert result.cost <= budget
    assert result.score == pytest.approx(score, rel=1e-12, abs=1e-15)
    assert sum(scores[i] for i in result.kept) == pytest.approx(result.score)
    assert sum(costs[i] for i in result.kept) == result.cost
    assert result.cost == cost  # among equal scores, the cheaper kept set (more pruning) wins


def brute_force_with_ties(scores, costs, budget):
    """The documented order: max score, then min cost, then the kept set whose first differing item is earlier."""
    best = None
    for mask in range(1 << len(scores)):
        kept = tuple(i for i in range(len(scores)) if mask >> i & 1)
        cost = sum(costs[i] for i in kept)
        if cost > budget:
            continue
        key = (sum(scores[i] for i in kept), -cost, tuple(-i for i in kept))
        if best is None or (key[0], key[1]) > (best[0][0], best[0][1]) or (
                (key[0], key[1]) == (best[0][0], best[0][1]) and _earlier(kept, best[1])):
            best = (key, kept)
    return best[1]


def _earlier(a, b):
    """a keeps the lowest index where a and b differ."""
    diff = sorted(set(a) ^ set(b))
    return bool(diff) and diff[0] in a


@pytest.mark.parametrize("seed", range(30))
def test_integer_ties_break_exactly_as_documented(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(2, 12)
    scores = [float(rng.randint(0, 4)) for _ in range(n)]  # integers: ties are exact, many of them
    costs = [rng.randint(1, 5) for _ in range(n)]
    budget = rng.randint(0, sum(costs))
    assert solve_knapsack(scores, costs, budget).kept == brute_force_with_ties(scores, costs, budget)


def test_ties_resolve_deterministically_to_earlier_items():
    result = solve_knapsack([1.0, 1.0, 1.0, 1.0], [5, 5, 5, 5], 10)
    assert result.kept == (0, 1)
    assert solve_knapsack([1.0, 1.0, 1.0, 1.0], [5, 5, 5, 5], 10) == result


def test_many_identical_items_stay_fast():
    # SDXL at block granularity: ~70 transformer blocks of three sizes plus ResNets.
    rng = random.Random(0)
    costs = [30_000_000] * 40 + [7_000_000] * 30 + [rng.randint(10**6, 5 * 10**7) for _ in range(20)]
    scores = [rng.random() for _ in costs]
    result = solve_knapsack(scores, costs, sum(costs) // 2)
    assert result.cost <= sum(costs) // 2 and result.states < 2_000_000


def test_rejects_bad_items():
    with pytest.raises(ValueError):
        solve_knapsack([1.0], [0], 5)
    with pytest.raises(ValueError):
        solve_knapsack([float("nan")], [1], 5)
