"""``pruning_report.md``: the pruning plan as a person reads it — why each layer went, and how additive it was."""

from __future__ import annotations

from typing import Any

from .refine import interaction_markdown


def format_value(value: float | None, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def plan_markdown(plan: dict[str, Any]) -> str:
    """Markdown for a ``pruning_plan.json`` dict (see :meth:`laptop_deploy.prune.plan.PruningPlan.as_dict`)."""
    how = {"criterion": f"criterion `{plan['criterion']}`, cost `{plan['cost']}`, target ratio {plan['target_ratio']}",
           "preset": f"handcrafted preset `{plan['preset']}`",
           "explicit": "explicit removal set"}[plan["method"]]
    lines = [
        f"# Pruning report: `{plan['model']['spec']}`",
        "",
        f"- method: {how}; seed {plan['seed']}; granularity {plan['granularity']}; device {plan['device']}",
        f"- parameters: {plan['params_before']:,} → {plan['params_after']:,} "
        f"(**{plan['params_ratio_achieved']:.2%} removed**)",
        f"- MACs (batch 1, latent {plan['latent_size'][0]}×{plan['latent_size'][1]}): "
        f"{plan['macs_before'] / 1e9:,.2f} G → {plan['macs_after'] / 1e9:,.2f} G "
        f"({plan['macs_ratio_achieved']:.2%} removed)",
        f"- output loss of the removal set, mean (ε_S − ε_teacher)²: {format_value(plan['joint_output_loss'])}",
        f"- calibration: {plan['calibration']['count']} samples, seed {plan['calibration']['seed']}; "
        f"{plan['calibration']['latents']}; {plan['calibration']['text']}; timesteps "
        f"{plan['calibration']['timesteps']}",
        f"- cost: {plan['forward_passes']} passes over the calibration set in {plan['scoring_seconds']:.1f} s",
    ]
    lines += [f"- note: {note}" for note in plan["notes"]]
    lines += _additivity_section(plan.get("additivity"))
    lines += interaction_markdown(plan)  # --refine rounds and the --calib-seeds report (prune/refine.py)
    lines += ["", "## Layers", "", "| layer | kind | params | GMACs | score | removed |", "|---|---|---:|---:|---:|:-:|"]
    for row in plan["layers"]:
        verdict = "**removed**" if row["removed"] else ("" if row["prunable"] else f"not prunable: {row['reason']}")
        lines.append(f"| `{row['name']}` | {row['kind']} | {row['params']:,} | {row['macs'] / 1e9:.3f} | "
                     f"{format_value(row['score'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def _additivity_section(additivity: dict[str, Any] | None) -> list[str]:
    if not additivity:
        return []
    lines = [
        "", "## Additivity of the output loss", "",
        f"Joint loss L(S) against the sum of single-layer losses Σ sᵢ over {len(additivity['sets'])} removal sets "
        f"(the chosen one and random sets of similar cost): Pearson {format_value(additivity['pearson'], '.3f')}, "
        f"Spearman {format_value(additivity['spearman'], '.3f')}; chosen set L(S)/Σsᵢ = "
        f"{format_value(additivity['chosen_joint_over_sum'], '.3f')}, mean over sets "
        f"{format_value(additivity['mean_joint_over_sum'], '.3f')}.",
    ]
    if additivity.get("chosen_verdict"):
        lines += ["", f"**Chosen set: {additivity['chosen_verdict']}.**"]
    lines += ["", "| set | layers | cost removed | L(S) | Σ sᵢ | L/Σ | additive |",
              "|---|---:|---:|---:|---:|---:|:-:|"]
    for s in additivity["sets"]:
        verdict = {True: "yes", False: "**no**"}.get(s.get("additive"), "–")
        lines.append(f"| {s['label']} | {len(s['names'])} | {s['cost_ratio']:.3f} | {s['joint']:.4g} | "
                     f"{s['summed']:.4g} | {format_value(s['joint_over_sum'], '.3f')} | {verdict} |")
    return lines
