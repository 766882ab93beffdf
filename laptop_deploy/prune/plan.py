"""LAPTOP-Diff pruning end to end: inventory → calibration → scores → exact knapsack → additivity → plan.

:func:`plan_pruning` decides what to remove and measures it; it never changes the model's function (scoring only
toggles layers in place). The caller turns ``plan.removed`` into a student with :func:`laptop_deploy.models.student
.make_student` and writes the plan beside it (:func:`laptop_deploy.prune.report.write_plan_files`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .additivity import measure_additivity, random_sets
from .calibration import NO_SCHEDULER, build_calibration
from ..errors import LaptopDeployError
from .handcrafted import handcrafted_removal
from ..models.inventory import Inventory, build_inventory, count_macs, meta_twin
from .knapsack import solve_knapsack
from .latency_cost import latency_summary, resolve_table, unit_costs
from .refine import min_removed_cost, refine_selection
from .stability import Draw, measure_stability, stability_note
from ..models.layers import Layer, apply_removal, check_removal, discover_layers
from .scoring import NEEDS_FORWARD, Scorer, ScoringContext, get_criterion, output_loss, resolve_device

COSTS = ("params", "macs", "latency")
RATIO_SLACK = 0.02  # how far above the target the achieved ratio may land before the plan says why
DEFAULT_ADDITIVITY_SETS = 10


@dataclass
class PruneOptions:
    """Exactly one of ``ratio`` (fraction of total params or MACs to remove), ``preset`` or ``remove``."""

    ratio: float | None = None
    preset: str | None = None
    remove: list[str] | None = None
    criterion: str = "output-loss"
    cost: str = "params"
    calib: int = 8
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    autocast: str | None = None
    granularity: str = "auto"
    additivity_sets: int | None = None  # None: DEFAULT_ADDITIVITY_SETS
    prompts: list[str] | None = None
    images: Path | None = None
    latent_size: tuple[int, int] | None = None
    latency_table: Any = None  # --cost latency: a deploy.latency_table.LatencyTable (prune/latency_cost.py)
    runtime: str | None = None  # --cost latency without a table: profile on this runtime now
    batch: int = 1  # deployment batch and precision the latency table must have been measured at
    precision: str = "fp32"
    steps: int | None = None  # calibration timesteps from a --steps-step run of the source's sampler
    refine: int = 0  # rounds of interaction-aware refinement (prune/refine.py); 0: the one-shot set
    calib_seeds: int = 1  # calibration draws for the stability report (prune/stability.py); 1: none

    def validate(self) -> None:
        if sum(x is not None for x in (self.ratio, self.preset, self.remove)) != 1:
            raise LaptopDeployError("give exactly one of --ratio, --preset or --remove")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise LaptopDeployError(f"--ratio must lie strictly between 0 and 1, got {self.ratio:g}")
        if self.cost not in COSTS:
            raise LaptopDeployError(f"unknown cost '{self.cost}'; valid: {', '.join(COSTS)}")
        if self.cost == "latency" and self.latency_table is None and self.runtime is None:
            raise LaptopDeployError("--cost latency needs --latency-table T.json or --runtime R (profile now)")
        get_criterion(self.criterion)
        if resolve_device(self.device).type != "cuda" and self.autocast:
            raise LaptopDeployError(f"--autocast {self.autocast} needs --device cuda (CPU scoring runs in fp32)")
        if self.batch_size < 1 or (self.additivity_sets or 0) < 0:
            raise LaptopDeployError("--batch-size must be ≥ 1 and --additivity-sets ≥ 0")
        if self.autocast not in (None, "bf16", "fp16"):
            raise LaptopDeployError(f"--autocast must be bf16 or fp16, got {self.autocast}")
        if self.refine < 0 or self.calib_seeds < 1 or (self.steps is not None and self.steps < 1):
            raise LaptopDeployError("--refine must be ≥ 0, --calib-seeds ≥ 1 and --steps ≥ 1")
        if (self.refine or self.calib_seeds > 1) and self.ratio is None:
            raise LaptopDeployError("--refine and --calib-seeds choose among sets: they need --ratio")


@dataclass
class PruningPlan:
    """Everything a run decided and measured; ``as_dict`` is ``pruning_plan.json``.

    ``after`` is (params, MACs) of the student, counted on a meta twin with the removal applied.
    """

    model: dict[str, Any]
    method: str
    options: dict[str, Any]
    inventory: Inventory
    scores: dict[str, float]
    removed: list[str]
    after: tuple[int, int]
    joint_output_loss: float | None
    additivity: dict[str, Any] | None
    calibration: dict[str, Any]
    forward_passes: int = 0
    scoring_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # latency_cost.latency_summary (+ "measured") when a table priced it
    refinement: dict[str, Any] | None = None  # refine.Refinement.as_dict(): one-shot set, rounds, final set
    stability: dict[str, Any] | None = None  # stability.StabilityReport.as_dict() under --calib-seeds K > 1

    def totals(self) -> dict[str, Any]:
        """Sizes before and after. ``ratio_achieved`` is in the unit of ``--cost`` (the unit of the target)."""
        inv, (params, macs) = self.inventory, self.after
        params_ratio, macs_ratio = round(1 - params / inv.total_params, 6), round(1 - macs / inv.total_macs, 6)
        return {"params_before": inv.total_params, "params_after": params, "params_ratio_achieved": params_ratio,
                "macs_before": inv.total_macs, "macs_after": macs, "macs_ratio_achieved": macs_ratio,
                "ratio_achieved": macs_ratio if self.options["cost"] == "macs" else
                (round(1 - self.latency["predicted_ratio"], 6) if self.options["cost"] == "latency" else params_ratio)}

    def as_dict(self) -> dict[str, Any]:
        removed = set(self.removed)
        layers = [{**e.as_dict(), "score": self.scores.get(e.layer.name), "removed": e.layer.name in removed}
                  for e in self.inventory.entries]
        return {"model": self.model, "method": self.method, **self.options, **self.totals(),
                "removed": self.removed, "joint_output_loss": self.joint_output_loss,
                "additivity": self.additivity, "calibration": self.calibration,
                "forward_passes": self.forward_passes, "scoring_seconds": round(self.scoring_seconds, 3),
                "notes": self.notes, "latency": self.latency, "refinement": self.refinement,
                "stability": self.stability,
                "latent_size": list(self.inventory.latent_size),
                "granularity": self.inventory.granularity, "layers": layers}


def plan_pruning(source: Any, options: PruneOptions, *,
                 progress: Callable[[int], Callable[[int], None] | None] | None = None) -> PruningPlan:
    """Choose the removal set for ``source`` and measure it; the model's function is left unchanged.

    ``progress(total)`` may return an update callback for a bar over ``total`` batch forwards.
    """
    options.validate()
    device = resolve_device(options.device)
    unet = source.unet
    inv = build_inventory(unet, granularity=options.granularity, latent_size=options.latent_size)
    candidates = [e.layer for e in inv.prunable]
    cost_of = {e.layer.name: (e.layer.params if options.cost == "params" else e.macs) for e in inv.prunable}
    total = inv.total_params if options.cost == "params" else inv.total_macs
    table = resolve_table(unet, model=source.describe(), table=options.latency_table, runtime=options.runtime,
                          latent_size=inv.latent_size, batch=options.batch, precision=options.precision)
    if options.cost == "latency":
        cost_of, total = unit_costs(inv.prunable, table)
    method = "criterion" if options.ratio is not None else ("preset" if options.preset else "explicit")
    sets = options.additivity_sets if options.additivity_sets is not None else DEFAULT_ADDITIVITY_SETS
    chosen: list[Layer] | None = None
    if method == "criterion":
        reachable = sum(cost_of.values()) / total
        if options.ratio > reachable:
            raise LaptopDeployError(f"--ratio {options.ratio:g} exceeds what can be pruned: {reachable:.4f} of "
                                    f"the {options.cost} lie in prunable units at granularity {inv.granularity}")
    else:
        names = options.remove if method == "explicit" else handcrafted_removal(options.preset, unet.config)
        all_layers, already = discover_layers(unet)
        chosen = check_removal(all_layers, names, removed=already)
    calib = build_calibration(source, count=options.calib, seed=options.seed, prompts=options.prompts,
                              images=options.images, latent_size=options.latent_size, steps=options.steps)
    criterion = options.criterion if method == "criterion" else None
    extra_singles = sets > 0 and criterion != "output-loss"
    passes = 1 + len(candidates) * (NEEDS_FORWARD.get(criterion, 0) + extra_singles) + 1 + sets
    passes += (options.refine + options.calib_seeds - 1) * (len(candidates) + 3)  # an estimate: rounds may stop early
    scorer = Scorer(unet, calib, device=device, batch_size=options.batch_size,
                    autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.autocast or ""),
                    progress=progress(passes * -(-len(calib) // options.batch_size)) if progress else None)
    notes: list[str] = [NO_SCHEDULER] if calib.description.get("noise_schedule") == NO_SCHEDULER else []
    start = time.perf_counter()
    try:
        ctx = ScoringContext(scorer=scorer, seed=options.seed)
        scores = get_criterion(criterion)(ctx, candidates) if criterion else {}
        singles = scores if criterion == "output-loss" else (output_loss(ctx, candidates) if sets else {})
        if chosen is None:
            chosen = select_layers(candidates, scores, cost_of, total, options.ratio, notes)
        joint = scorer.output_loss(chosen)
        refinement = stability = None
        if method == "criterion":
            chosen, joint, refinement, stability = _interactions(source, options, scorer, candidates, criterion,
                                                                chosen, joint, cost_of, total, notes)
        additivity = _additivity(scorer, candidates, chosen, singles, cost_of, total, sets, options.seed)
    finally:
        unet.to("cpu")
    if additivity is None:
        notes.append("additivity not measured (--additivity-sets 0)")
    elif additivity.get("chosen_additive") is False:  # whatever the correlation across sets says
        notes.append(f"chosen set: {additivity['chosen_verdict']}")
    twin = meta_twin(unet)
    apply_removal(twin, [layer.name for layer in chosen])
    after = (sum(p.numel() for p in twin.parameters()),
             count_macs(twin, height=inv.latent_size[0], width=inv.latent_size[1])[""])
    option_view = {"criterion": criterion, "cost": options.cost, "target_ratio": options.ratio,
                   "preset": options.preset, "seed": options.seed, "device": str(device),
                   "autocast": options.autocast}
    return PruningPlan(model=source.describe(), method=method, options=option_view, inventory=inv, scores=scores,
                       removed=[layer.name for layer in chosen], after=after, joint_output_loss=joint,
                       additivity=additivity, calibration=calib.description, forward_passes=scorer.forward_passes,
                       scoring_seconds=time.perf_counter() - start, notes=notes,
                       refinement=refinement, stability=stability,
                       latency=latency_summary(table, [layer.name for layer in chosen]) if table else None)


def _interactions(source: Any, options: PruneOptions, scorer: Scorer, candidates: list[Layer], criterion: str,
                  chosen: list[Layer], joint: float, cost_of: dict[str, int], total: int,
                  notes: list[str]) -> tuple[list[Layer], float, dict[str, Any] | None, dict[str, Any] | None]:
    """--refine rounds on the knapsack's set, then the --calib-seeds stability report; returns the final set, its
    joint loss and both records (None when not asked). Extra passes are counted by ``scorer`` (refinement) and by
    the report (other draws), and the latter are added to ``scorer.forward_passes`` so the plan's count is total."""
    def select(scores: dict[str, float]) -> list[Layer]:
        return select_layers(candidates, scores, cost_of, total, options.ratio, [])

    one_shot, one_shot_joint, one_shot_passes = list(chosen), joint, scorer.forward_passes
    refinement = stability = None
    if options.refine:
        chosen, record = refine_selection(scorer.output_loss, candidates, chosen, joint, cost_of, select,
                                          need=min_removed_cost(cost_of, total, options.ratio),
                                          slack=RATIO_SLACK * total, rounds=options.refine,
                                          passes=lambda: scorer.forward_passes)
        joint, refinement = record.final_joint, record.as_dict()
    if options.calib_seeds > 1:
        def score(seed: int) -> tuple[Scorer, dict[str, float]]:
            calib = build_calibration(source, count=options.calib, seed=seed, prompts=options.prompts,
                                      images=options.images, latent_size=options.latent_size, steps=options.steps)
            other = Scorer(scorer.unet, calib, device=scorer.device, batch_size=options.batch_size,
                           autocast=scorer.autocast, progress=scorer.progress)
            return other, get_criterion(criterion)(ScoringContext(scorer=other, seed=seed), candidates)

        first = Draw(seed=options.seed, removed=[x.name for x in one_shot], joint_own=one_shot_joint,
                     joint_final=joint, passes=one_shot_passes)
        seeds = range(options.seed + 1, options.seed + options.calib_seeds)
        stability = measure_stability(first, seeds, score, select, chosen).as_dict([x.name for x in candidates])
        scorer.forward_passes += stability["passes"] - one_shot_passes
        note = stability_note(stability)
        if note:
            notes.append(note)
    return chosen, joint, refinement, stability


def _additivity(scorer: Scorer, candidates: list[Layer], chosen: list[Layer], singles: dict[str, float],
                cost_of: dict[str, int], total: int, count: int, seed: int) -> dict[str, Any] | None:
    """L(S) vs Σ sᵢ for the chosen set and ``count`` random sets of similar cost (singles must cover them)."""
    if count <= 0 or not singles or any(layer.name not in singles for layer in chosen):
        return None
    by_name = {layer.name: layer for layer in candidates}
    target = sum(cost_of[layer.name] for layer in chosen)
    others = random_sets(candidates, cost_of, target=target, total=total, count=count, seed=seed + 1,
                         exclude=[tuple(sorted(layer.name for layer in chosen))])
    labelled = [("chosen", [layer.name for layer in chosen])] + [(f"random-{i}", s) for i, s in enumerate(others)]
    report = measure_additivity(labelled, singles, cost_of, total,
                                lambda names: scorer.output_loss([by_name[n] for n in names]))
    return {**report.as_dict(), "singles": singles}


def select_layers(layers: list[Layer], scores: dict[str, float], cost_of: dict[str, int], total: int,
                  ratio: float, notes: list[str]) -> list[Layer]:
    """Exact knapsack over the candidates: keep the best-scoring set whose cost fits (1 − ratio)·total."""
    fixed = total - sum(cost_of.values())  # the remainder and non-prunable units are always kept
    budget = max(0, int(total * (1 - ratio)) - fixed)
    items = [layer for layer in layers if cost_of[layer.name] > 0]  # a costless unit is always kept
    result = solve_knapsack([max(0.0, scores[layer.name]) for layer in items],
                            [cost_of[layer.name] for layer in items], budget)
    kept = {items[i].name for i in result.kept}
    removed = [layer for layer in items if layer.name not in kept]
    achieved = sum(cost_of[layer.name] for layer in removed) / total
    if achieved - ratio > RATIO_SLACK:
        notes.append(f"ratio achieved {achieved:.4f} overshoots the target {ratio:g} by more than {RATIO_SLACK}: "
                     f"no set of whole units at this granularity lands closer")
    return removed
