"""Interaction-aware refinement, the calibration-stability report and deployment-matched calibration."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from laptop_deploy.cli.main import main
from laptop_deploy.errors import LaptopDeployError
from laptop_deploy.models.layers import Layer
from laptop_deploy.models.sources import resolve_model
from laptop_deploy.prune.calib_sources import sampler_timesteps
from laptop_deploy.prune.calibration import build_calibration
from laptop_deploy.prune.plan import PruneOptions, plan_pruning, select_layers
from laptop_deploy.prune.refine import min_removed_cost, refine_selection
from laptop_deploy.prune.report import plan_markdown
from laptop_deploy.prune.scoring import Scorer


def _units(costs: dict[str, int]) -> list[Layer]:
    return [Layer(name=n, kind="resnet", stage="mid", params=c, prunable=True) for n, c in costs.items()]


def test_refinement_escapes_an_interacting_pair_the_knapsack_walks_into():
    """a and b each matter little, together a lot (L += 5): the knapsack on singles removes both; the measured
    marginals and swaps find the true optimum, and every call of the joint loss is counted."""
    costs = {"a": 1, "b": 1, "c": 1, "d": 2}
    singles = {"a": 0.1, "b": 0.1, "c": 0.3, "d": 0.35}
    units, calls = _units(costs), []

    def joint(layers) -> float:
        names = {x.name for x in layers}
        calls.append(names)
        return sum(singles[n] for n in names) + (5.0 if {"a", "b"} <= names else 0.0)

    def select(scores):
        return select_layers(units, scores, costs, 5, 0.4, [])

    one_shot = select(singles)
    assert {x.name for x in one_shot} == {"a", "b"}
    need = min_removed_cost(costs, 5, 0.4)
    final, record = refine_selection(joint, units, one_shot, joint(one_shot), costs, select, need=need, slack=0,
                                     rounds=3, passes=lambda: len(calls))
    feasible = [set(s) for k in range(1, 5) for s in itertools.combinations(costs, k)
                if sum(costs[n] for n in s) >= need]
    best = min(sum(singles[n] for n in s) + (5.0 if {"a", "b"} <= s else 0.0) for s in feasible)
    assert need == 2 and record.one_shot_joint == pytest.approx(5.2)
    assert record.final_joint == pytest.approx(best) == pytest.approx(0.35)  # remove d alone
    assert joint(final) == pytest.approx(record.final_joint)
    assert record.one_shot_passes == 1 and record.passes == len(calls) - 2  # the two joint() calls outside
    assert record.passes == sum(r.passes for r in record.rounds)
    assert record.rounds[0].passes == len(units) + len(record.rounds[0].proposals)
    assert all(r.passes + r.reused == len(units) + len(r.proposals) for r in record.rounds)
    measured = calls[:-1]  # the last call is this test's own joint(final) above
    assert len({frozenset(c) for c in measured}) == len(measured), "no set is measured twice"
    assert record.rounds[-1].accepted is None and record.stopped.startswith("converged")
    assert all(r.joint <= record.one_shot_joint for r in record.rounds)


@pytest.fixture(scope="module")
def refined_plan():
    options = PruneOptions(ratio=0.5, calib=1, batch_size=1, additivity_sets=0, refine=2, calib_seeds=2, seed=1)
    return plan_pruning(resolve_model("random:tiny-sd15"), options)


def test_refined_plan_never_worse_and_every_pass_is_counted(refined_plan):
    plan, ref = refined_plan, refined_plan.refinement
    n = len(plan.inventory.prunable)
    assert ref["one_shot_passes"] == n + 2  # teacher + one per unit + the one-shot set's joint loss
    assert ref["final_joint"] <= ref["one_shot_joint"] and plan.joint_output_loss == ref["final_joint"]
    assert plan.removed == ref["final"] and ref["rounds"]
    previous = ref["one_shot_joint"]
    for r in ref["rounds"]:  # a round keeps the lowest of its current set and its measured proposals
        assert r["passes"] + r["reused"] == n + len(r["proposals"])
        assert set(r["marginals"]) == {e.layer.name for e in plan.inventory.prunable}
        after_swap = r["index"] > 1 and (ref["rounds"][r["index"] - 2]["accepted"] or "").startswith("swap")
        assert r["reused"] >= (2 if after_swap else 0)  # S ∖ {j} and S ∪ {i} were the last round's marginals
        assert r["joint"] == min([previous] + [p["joint"] for p in r["proposals"]])
        assert (r["accepted"] is None) == (r["joint"] == previous)
        previous = r["joint"]
    assert ref["total_passes"] == ref["one_shot_passes"] + sum(r["passes"] for r in ref["rounds"])
    assert plan.forward_passes == ref["total_passes"] + plan.stability["passes"] - ref["one_shot_passes"]
    assert plan.totals()["ratio_achieved"] >= 0.5
    # the recorded loss is the set's measured loss: re-measured on a fresh scorer over the same draw
    source = resolve_model("random:tiny-sd15")
    calib = build_calibration(source, count=1, seed=1)
    layers = [e.layer for e in plan.inventory.prunable if e.layer.name in plan.removed]
    assert Scorer(source.unet, calib, batch_size=1).output_loss(layers) == pytest.approx(ref["final_joint"], rel=1e-6)


def test_stability_report_schema(refined_plan):
    stab, names = refined_plan.stability, [e.layer.name for e in refined_plan.inventory.prunable]
    assert set(stab) == {"draws", "seeds", "frequency", "distinct_sets", "unstable", "in_doubt", "joint_own",
                         "joint_final", "passes"}
    assert stab["seeds"] == [1, 2] and len(stab["draws"]) == 2
    assert stab["draws"][0]["removed"] == refined_plan.refinement["one_shot"]
    assert stab["draws"][0]["joint_final"] == refined_plan.joint_output_loss
    for name in names:
        assert stab["frequency"][name] == sum(name in d["removed"] for d in stab["draws"]) / 2
    assert stab["distinct_sets"] == len({tuple(sorted(d["removed"])) for d in stab["draws"]})
    assert stab["unstable"] == (stab["distinct_sets"] > 1)
    assert stab["in_doubt"] == [n for n in names if 0 < stab["frequency"][n] < 1]
    own = [d["joint_own"] for d in stab["draws"]]
    assert stab["joint_own"]["min"] == min(own) and stab["joint_own"]["max"] == max(own)
    assert stab["joint_own"]["mean"] == pytest.approx(sum(own) / 2)
    n = len(names)
    assert all(d["passes"] in (n + 2, n + 3) for d in stab["draws"][1:])  # + the final set when it differs
    assert any(note.startswith("unstable selection") for note in refined_plan.notes) == stab["unstable"]
    report = plan_markdown(json.loads(json.dumps(refined_plan.as_dict())))  # the plan file carries both records
    assert "## Refinement" in report and "## Calibration stability" in report
    assert f"| {len(refined_plan.refinement['rounds'])} | " in report  # one row per round


def test_same_seed_same_refinement(refined_plan):
    # the refinement runs before the stability draws, so a run without them must reproduce it exactly
    again = plan_pruning(resolve_model("random:tiny-sd15"),
                         PruneOptions(ratio=0.5, calib=1, batch_size=1, additivity_sets=0, refine=2, seed=1))
    assert again.refinement == refined_plan.refinement and again.removed == refined_plan.removed
    assert again.stability is None


def test_refine_needs_a_ratio_and_sane_counts():
    for options in (PruneOptions(preset="bk-sdm-base", refine=1), PruneOptions(ratio=0.5, refine=-1),
                    PruneOptions(ratio=0.5, calib_seeds=0), PruneOptions(ratio=0.5, steps=0)):
        with pytest.raises(LaptopDeployError):
            options.validate()


def test_calibration_timesteps_follow_the_sampler_schedule(make_source):
    from diffusers import PNDMScheduler

    source = make_source()
    schedule = sampler_timesteps(source, 10)
    if "scheduler" in source.available_parts():
        expected = type(source.part("scheduler")).from_config(source.part("scheduler").config)
    else:
        expected = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 skip_prk_steps=True, steps_offset=1, timestep_spacing="leading")
    expected.set_timesteps(10)
    assert schedule.tolist() == expected.timesteps.tolist()
    calib = build_calibration(source, count=2 * len(schedule), seed=4, steps=10)
    assert sorted(calib.timestep.tolist()) == sorted(schedule.tolist() * 2)  # each visit weighted equally
    assert "10-step schedule" in calib.description["timestep_schedule"]
    assert "training timesteps" in build_calibration(source, count=2).description["timestep_schedule"]


@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_captioned_images_condition_on_their_own_captions(make_source, tmp_path, layout):
    source = make_source("random:tiny-sdxl")
    rng = np.random.default_rng(0)
    captions = ["a red cube", "a blue ball"]
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        if layout == "txt":
            (tmp_path / f"{i}.txt").write_text(caption + "\n")
    if layout == "metadata":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                         for i, c in enumerate(captions)))
    calib = build_calibration(source, count=3, images=tmp_path)
    prompted = build_calibration(source, count=3, images=tmp_path, prompts=["a red cube", "a blue ball"])
    assert calib.description["text"] == "each image's own caption through the text encoder(s)"
    assert torch.equal(calib.cond["encoder_hidden_states"], prompted.cond["encoder_hidden_states"])
    (tmp_path / "2.png").write_bytes((tmp_path / "0.png").read_bytes())  # one image without a caption
    assert "built-in" in build_calibration(source, count=3, images=tmp_path).description["text"]


def test_cli_prune_refine_writes_both_records(capsys, tmp_path):
    """Through the CLI, and in MACs: the refinement takes whatever cost vector the plan uses."""
    code = main(["prune", "--model", "random:tiny-sd15", "--ratio", "0.5", "--cost", "macs", "--calib", "2",
                 "--additivity-sets", "0", "--refine", "1", "--steps", "5",
                 "--out", str(tmp_path / "s"), "--json"])
    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert code == 0 and result["macs_ratio_achieved"] >= 0.5
    assert result["refinement"]["final_joint"] <= result["refinement"]["one_shot_joint"]
    plan = json.loads((tmp_path / "s" / "pruning_plan.json").read_text())
    assert plan["removed"] == plan["refinement"]["final"]
    assert plan["refinement"]["rounds"] and plan["stability"] is None
    assert plan["calibration"]["timestep_schedule"].startswith("stratified over the 5-step schedule")
    report = (tmp_path / "s" / "pruning_report.md").read_text()
    assert "## Refinement" in report and "## Calibration stability" not in report
