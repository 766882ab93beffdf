"""Does the parity gate fail wrong exports and pass correct ones? Catch rates of the calibrated gate against the old
fixed thresholds, over the tiny model zoo, targets and precisions (issue 20).

For each model (tiny-sd15, tiny-sdxl, toy, and a student of each) and precision, one correct ONNX export is made
(TorchScript exporter; fp16 by the exporter's own converter on that graph), then every mutation of
:mod:`laptop_deploy.deploy.mutants` is applied to it and each artifact verified through :func:`verify_artifact`
(ONNX Runtime, and the same graphs converted to ORT Mobile's format); Core ML is checked as it can be on Linux, by
its exporter's traced-module check on mutated U-Nets. ExecuTorch (fp32 only) mutates the PyTorch U-Net
(:func:`~laptop_deploy.deploy.mutants.mutate_module`), exports each mutant to a ``.pte`` with the library's exporter
(its manifest naming the unmutated model, as a buggy exporter would) and verifies it against the unmutated source;
it needs the ``[executorch]`` extra. ``bundle`` (teachers only) exports an app bundle (``export --pipeline``) and
runs ``verify BUNDLE``'s per-part check (:func:`~laptop_deploy.deploy.bundle_verify.verify_parts`) with each ONNX
mutation applied to its ``unet/model.onnx``; its correct-export factor is the worst over every part (text
encoder, U-Net, VAE decoder and encoder). The table counts a mutation *caught* when the gate fails it
and a correct export *falsely failed* when the gate fails it; the "old" columns judge the same runs by the fixed
thresholds verify used before (fp32: rel L2 ≤ 1e-4 and PSNR ≥ 60 dB; fp16: PSNR ≥ 35 dB; end to end PSNR too).

    .venv/bin/python benchmarks/parity_mutations.py                  # everything (~30-40 min on 2 busy cores)
    .venv/bin/python benchmarks/parity_mutations.py --models random:tiny-sd15 --targets onnx --out /tmp/x
    python benchmarks/parity_mutations.py --models random:tiny-sd15 toy --precisions fp32 --targets executorch
    .venv/bin/python benchmarks/parity_mutations.py --models random:tiny-sd15 toy --targets bundle --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # deploy_fixtures: the tests' export helper and student removal sets

MODELS = ("random:tiny-sd15", "random:tiny-sdxl", "toy", "random:tiny-sd15 student", "random:tiny-sdxl student",
          "toy student")
TARGETS = ("onnx", "ort-mobile", "coreml-traced", "executorch", "bundle")
TORCH_SIDE = ("coreml-traced", "executorch")  # targets mutated on the PyTorch U-Net, fp32 only
FIXED = {"fp32": (1e-4, 60.0), "fp16": (None, 35.0)}  # the thresholds verify used before the calibrated gate


def load(model: str) -> Any:
    from deploy_fixtures import STUDENT_REMOVALS
    from laptop_deploy.models.layers import apply_removal
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.prune.handcrafted import handcrafted_removal

    spec, _, student = model.partition(" ")
    source = resolve_model(spec)
    if student:
        removed = STUDENT_REMOVALS.get(spec) or handcrafted_removal("bk-sdm-small", source.unet.config)
        apply_removal(source.unet, removed)
        source.removed = list(removed)
    return source


def fixed_verdict(data: dict[str, Any], precision: str) -> bool:
    """Would the old fixed thresholds have passed this verify run?"""
    max_rel, min_psnr = FIXED.get(precision, FIXED["fp32"])
    rows = data["cases"] + [data["end_to_end"]]
    if any(r["nan_count"] or r["inf_count"] for r in rows):
        return False
    if max_rel is not None and any(r["rel_l2"] is None or r["rel_l2"] > max_rel for r in data["cases"]):
        return False
    return all(r["psnr_db"] is not None and r["psnr_db"] >= min_psnr for r in rows)


def build(source: Any, precision: str, work: Path) -> Path:
    """The correct ONNX artifact at ``precision`` (fp16 from the fp32 graph, as the exporter converts it)."""
    from deploy_fixtures import export_artifact
    from laptop_deploy.exporters.onnx import MODEL_FILE, OnnxOptions, finish_artifact
    from laptop_deploy.deploy.manifest import read_manifest

    fp32 = work / "fp32"
    if not fp32.exists():
        export_artifact(source, fp32, exporter="torchscript")
    if precision == "fp32":
        return fp32
    out = work / precision
    if not out.exists():
        manifest = read_manifest(fp32)
        out.mkdir()
        finish_artifact(fp32 / MODEL_FILE, source.unet, manifest.spec.with_precision(precision), out,
                        source=manifest.source, options=OnnxOptions())
    return out


def variant(base: Path, out: Path, *, model_proto: Any, target: str) -> Path:
    """An artifact folder holding ``model_proto`` as ``target`` (onnx or ort-mobile), its manifest rewritten to
    match (what a buggy exporter would have written: digests agree, only parity can tell)."""
    import onnx

    from laptop_deploy.deploy.manifest import describe_files, read_manifest, write_manifest
    from laptop_deploy.exporters.ort_mobile import convert_to_ort

    manifest = read_manifest(base)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    onnx.save_model(model_proto, str(out / "model.onnx"))
    if target == "ort-mobile":
        stage = out / ".stage"
        stage.mkdir()
        shutil.move(str(out / "model.onnx"), stage / "model.onnx")
        convert_to_ort(stage / "model.onnx", out)
        shutil.rmtree(stage)
        manifest.target, manifest.model_file = "ort-mobile", "model.ort"
    manifest.files, manifest.results = describe_files(out), {}
    write_manifest(out, manifest)
    return out


def verify_row(folder: Path, source: Any, *, steps: int, precision: str) -> dict[str, Any]:
    from laptop_deploy.deploy.verify import verify_artifact

    result = verify_artifact(folder, source, steps=steps, record=False, intra_op_threads=1)
    data = result.as_dict()
    gate = data["gate"]
    return {"gate_passed": result.passed, "old_passed": fixed_verdict(data, precision),
            "factor_rel_l2": gate.get("factor_rel_l2"), "factor_max_abs": gate.get("max_factor_max_abs"),
            "floor_rel_l2": gate.get("floor_rel_l2"), "artifact_rel_l2": gate.get("artifact_rel_l2"),
            "rel_l2_vs_fp32": data["rel_l2"], "psnr_db": data["psnr_db"], "e2e_psnr_db": data["e2e_psnr_db"],
            "nonfinite": data["nan_count"] + data["inf_count"], "seconds": data["seconds"]}


def coreml_row(source: Any, mutation: Any) -> dict[str, Any]:
    """Core ML on Linux: the exporter's traced-module check, on a trace of the (mutated) U-Net."""
    from laptop_deploy.deploy.mutants import mutate_module
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.exporters import coreml

    spec = build_spec(source.unet.config)
    unet = source.unet if mutation is None else mutate_module(source.unet, mutation)
    traced = coreml.trace_unet(unet, spec)
    try:
        info = coreml.traced_parity(traced, source.unet, spec)
        passed, factor = True, info["factor_rel_l2"]
    except coreml.CoreMLExportError as exc:
        found = re.search(r"= ([0-9.e+]+)x the torch fp32 floor", str(exc))
        passed, factor = False, float(found.group(1)) if found else None  # None: non-finite output
        info = {"error": str(exc)[:200]}
    return {"gate_passed": passed, "old_passed": _old_traced(traced, source.unet, spec), "factor_rel_l2": factor,
            **{k: v for k, v in info.items() if k in ("rel_l2", "psnr_db", "error")}}


def executorch_row(source: Any, mutation: Any, *, work: Path, steps: int) -> dict[str, Any]:
    """ExecuTorch: the (mutated) U-Net exported to a ``.pte`` by the library's exporter, verified against the
    unmutated source. The export's own ``.pte`` check compares with the module it was given (the mutant), so it
    passes every mutant but a non-finite one; a refused export is recorded, then built from the exporter's own
    steps without that check, so that ``verify`` judges it too."""
    from laptop_deploy.deploy.manifest import Manifest, describe_files, model_hash, tool_versions, write_manifest
    from laptop_deploy.deploy.mutants import mutate_module
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.errors import CheckFailed
    from laptop_deploy.exporters import executorch as et

    spec = build_spec(source.unet.config)
    unet = source.unet if mutation is None else mutate_module(source.unet, mutation)
    described = {**source.describe(), "sha256": model_hash(source.unet)}  # what a buggy exporter would record
    out = work / "executorch"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    export_check = "passed"
    try:
        et.export(unet, spec, out, source=described)
    except CheckFailed as exc:
        export_check = f"refused: {str(exc)[:160]}"
        et.write_program(et.lower(et.export_program(unet, spec, et.ExecuTorchOptions())), out / et.PTE_FILE)
        write_manifest(out, Manifest(target="executorch", precision="fp32", model_file=et.PTE_FILE, spec=spec,
                                     source=described, files=describe_files(out), tools=tool_versions(),
                                     export={}))
    return {**verify_row(out, source, steps=steps, precision="fp32"), "export_check": export_check}


def bundle_row(model: str, precision: str, mutation: Any, *, work: Path, cache: dict[str, Any]) -> dict[str, Any]:
    """An app bundle of ``model`` at ``precision`` (exported once, TorchScript exporter as the bundle tests use),
    its U-Net part mutated in place, judged by ``verify BUNDLE``'s per-part check; the file is restored after."""
    import onnx

    from laptop_deploy.deploy.bundle import BundleOptions, export_bundle, resolve_sources
    from laptop_deploy.deploy.bundle_format import check_bundle
    from laptop_deploy.deploy.bundle_verify import verify_parts
    from laptop_deploy.deploy.mutants import mutate_onnx

    if " " in model:
        raise MutationNotApplicableHere("bundles are measured on teachers (a student's bundle takes the same parts)")
    if precision not in cache:
        folder = work / f"bundle-{precision}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        sources = resolve_sources(model)
        export_bundle(sources, folder, BundleOptions(exporter="torchscript", precision=precision))
        cache[precision] = (folder, check_bundle(folder), sources)
    folder, manifest, sources = cache[precision]
    part_file = folder / manifest.parts["unet"]["model_file"]
    original = part_file.read_bytes()
    try:
        if mutation is not None:
            onnx.save_model(mutate_onnx(onnx.load(str(part_file)), sources.unet.unet, mutation), str(part_file))
        parts = verify_parts(folder, manifest, sources)
    finally:
        part_file.write_bytes(original)
    unet = parts["unet"]
    max_rel, min_psnr = FIXED.get(precision, FIXED["fp32"])  # the fixed thresholds parts were judged by before
    old = not (unet["nan_count"] or unet["inf_count"]) and unet["psnr_db"] is not None and \
        unet["psnr_db"] >= min_psnr and (max_rel is None or (unet["rel_l2"] is not None and unet["rel_l2"] <= max_rel))
    factors = {name: (part["gate"] or {}).get("factor_rel_l2") for name, part in parts.items()}
    judged = parts if mutation is None else {"unet": unet}  # a correct bundle: every part; a mutant: its U-Net
    worst = max(judged, key=lambda name: -1.0 if factors[name] is None else factors[name])
    gate = judged[worst]["gate"] or {}
    return {"gate_passed": all(part["passed"] for part in judged.values()), "old_passed": old,
            "factor_rel_l2": None if factors[worst] is None else factors[worst],
            "factor_max_abs": gate.get("max_factor_max_abs"), "floor_rel_l2": gate.get("floor_rel_l2"),
            "artifact_rel_l2": gate.get("artifact_rel_l2"), "rel_l2_vs_fp32": unet["rel_l2"],
            "psnr_db": unet["psnr_db"], "worst_part": worst, "part_factors": factors,
            "failures": [f for part in judged.values() for f in part["failures"]][:4]}


class MutationNotApplicableHere(ValueError):
    """This target does not take this model (recorded as n/a, like a mutation without a place)."""


def _old_traced(traced: Any, unet: Any, spec: Any) -> bool:
    """The traced check as it was: fp32 fixed tolerances against eager fp32 on the same seeded inputs."""
    from laptop_deploy.deploy.spec import torch_inputs
    from laptop_deploy.deploy.verify import Tolerances, compare

    feeds = spec.example_feeds(seed=1)
    feeds["timestep"] = np.random.default_rng(1).uniform(1, 999, spec.batch).round().astype(np.float32)
    with torch.no_grad():
        out = traced(*torch_inputs(spec, feeds)).numpy()
        ref = unet(*[t for t in torch_inputs(spec, feeds)][:3],
                   added_cond_kwargs={k: v for k, v in zip(spec.input_names, torch_inputs(spec, feeds))
                                      if k in ("text_embeds", "time_ids")} or None, return_dict=False)[0].numpy()
    return compare({"o": ref}, {"o": out}, tolerances=Tolerances.for_precision("fp32")).passed


def run_model(model: str, *, precisions: list[str], targets: list[str], steps: int, work: Path,
              log: Any, rows_file: Path | None = None, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """Verify the correct export and every mutant of ``model``; one row per (precision, mutation, target), each
    also appended to ``rows_file`` (JSON lines) as it is measured, so an interrupted run keeps what it did."""
    import onnx

    from laptop_deploy.deploy.mutants import MutationNotApplicable, mutate_onnx, mutation_set

    source = load(model)
    rows: list[dict[str, Any]] = []
    bundles: dict[str, Any] = {}  # precision -> (folder, manifest, sources) of the bundle target
    for precision in precisions:
        mutations = [None, *mutation_set(source.unet, precision)]
        if kinds:  # a partial rerun: only these mutation kinds ("correct" for the correct export) or names
            mutations = [m for m in mutations if (m.kind if m else "correct") in kinds
                         or (m is not None and any(m.name.startswith(k) for k in kinds))]
        onnx_targets = [t for t in targets if t not in (*TORCH_SIDE, "bundle")]
        base = build(source, precision, work) if onnx_targets else None
        proto = onnx.load(str(base / "model.onnx")) if base else None
        for mutation in mutations:
            name = "correct export" if mutation is None else mutation.name
            for target in targets:
                if target in TORCH_SIDE and precision != "fp32":
                    continue  # Core ML converts to fp16 itself (on Linux only the fp32 trace can be checked);
                    # ExecuTorch is fp32 only
                start = time.perf_counter()
                try:
                    if target == "coreml-traced":
                        row = coreml_row(source, mutation)
                    elif target == "executorch":
                        row = executorch_row(source, mutation, work=work, steps=steps)
                    elif target == "bundle":
                        row = bundle_row(model, precision, mutation, work=work, cache=bundles)
                    else:
                        mutated = proto if mutation is None else mutate_onnx(proto, source.unet, mutation)
                        folder = variant(base, work / "variant", model_proto=mutated, target=target)
                        row = verify_row(folder, source, steps=steps, precision=precision)
                except (MutationNotApplicable, MutationNotApplicableHere) as exc:
                    row = {"not_applicable": str(exc)}
                row = {"model": model, "precision": precision, "target": target, "mutation": name,
                       "kind": "correct" if mutation is None else mutation.kind, **row}
                rows.append(row)
                if rows_file is not None:
                    with rows_file.open("a") as handle:
                        handle.write(json.dumps(row, default=float) + "\n")
                verdict = "n/a" if "gate_passed" not in row else ("pass" if row["gate_passed"] else "FAIL")
                old = "n/a" if "old_passed" not in row else ("pass" if row["old_passed"] else "FAIL")
                factor = row.get("factor_rel_l2")
                print(f"{model:<26} {precision:<5} {target:<14} {name:<30} gate {verdict:<4} old {old:<4} "
                      f"factor {'-' if factor is None else f'{factor:.3g}':>8}  {time.perf_counter() - start:5.1f} s",
                      file=log, flush=True)
    return rows


def tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: catch rates per target and precision, false failures, the factors of correct exports, the
    mutations the old thresholds missed, and every row."""
    def rate(sel: list[dict[str, Any]], key: str, want: bool) -> str:
        judged = [r for r in sel if key in r]
        return f"{sum(r[key] is want for r in judged)}/{len(judged)}" if judged else "-"

    lines = ["| target | precision | mutations caught (gate) | caught (old fixed) | correct exports passed (gate) "
             "| passed (old) | worst correct factor (rel L2) | smallest mutant factor |",
             "|---|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        for precision in ("fp32", "fp16"):
            sel = [r for r in rows if r["target"] == target and r["precision"] == precision]
            if not sel:
                continue
            bad = [r for r in sel if r["kind"] != "correct"]
            good = [r for r in sel if r["kind"] == "correct"]
            worst = max((r["factor_rel_l2"] for r in good if r.get("factor_rel_l2") is not None), default=None)
            least = min((r["factor_rel_l2"] for r in bad if r.get("factor_rel_l2") is not None), default=None)
            lines.append(f"| {target} | {precision} | {rate(bad, 'gate_passed', False)} | "
                         f"{rate(bad, 'old_passed', False)} | {rate(good, 'gate_passed', True)} | "
                         f"{rate(good, 'old_passed', True)} | {_num(worst)} | {_num(least)} |")
    missed = [r for r in rows if r["kind"] != "correct" and r.get("old_passed") is True]
    lines += ["", f"Mutations the old fixed thresholds passed ({len(missed)}):", ""]
    lines += [f"- {r['model']} {r['precision']} {r['target']}: {r['mutation']} (rel L2 vs fp32 "
              f"{_num(r.get('rel_l2_vs_fp32', r.get('rel_l2')))}, gate factor {_num(r.get('factor_rel_l2'))})"
              for r in missed] or ["- none"]
    lines += ["", "| model | precision | target | mutation | gate | old | factor rel L2 | factor max abs "
              "| floor rel L2 | rel L2 vs fp32 | PSNR dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_applicable" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['target']} | {r['mutation']} | n/a | n/a | "
                         f"{r['not_applicable']} | | | | |")
            continue
        refused = " (export refused it too)" if str(r.get("export_check", "")).startswith("refused") else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['target']} | {r['mutation']} | "
                     f"{'pass' if r['gate_passed'] else 'FAIL'}{refused} | {'pass' if r['old_passed'] else 'FAIL'} | "
                     f"{_num(r.get('factor_rel_l2'))} | {_num(r.get('factor_max_abs'))} | "
                     f"{_num(r.get('floor_rel_l2'))} | {_num(r.get('rel_l2_vs_fp32', r.get('rel_l2')))} | "
                     f"{_num(r.get('psnr_db'))} |")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    from laptop_deploy.deploy.noise_floor import FACTORS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of each verify (default 3)")
    parser.add_argument("--kinds", nargs="+", help="only these mutation kinds ('correct': the correct export) or "
                        "mutations whose name starts so (e.g. 'up-block conv'), to rerun some or split a slow run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parity_mutations")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="only write the table from earlier runs' JSON files (runs split across processes)")
    parser.add_argument("--merge-rows", nargs="+", type=Path, metavar="JSONL", default=[],
                        help="with --merge: also the rows of interrupted runs (their .rows.jsonl files)")
    args = parser.parse_args(argv)
    command = "python benchmarks/parity_mutations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge or args.merge_rows:
        runs = [json.loads(p.read_text()) for p in args.merge or []]
        rows = [r for run in runs for r in run["rows"]]
        rows += [json.loads(line) for p in args.merge_rows for line in p.read_text().splitlines() if line]
        # a row measured again (a rerun after a fix) replaces the earlier one, in its place
        latest = {(r["model"], r["precision"], r["target"], r["mutation"]): r for r in rows}
        rows = [latest[key] for key in dict.fromkeys((r["model"], r["precision"], r["target"], r["mutation"])
                                                     for r in rows)]
        info = {"commands": [c for r in runs for c in r["commands"]] + [f"{p} (interrupted run: its rows)"
                                                                         for p in args.merge_rows],
                "seconds": sum(r["seconds"] for r in runs), "loadavg": [r["loadavg"] for r in runs],
                "steps": args.steps}
    else:
        torch.set_num_threads(1)  # tiny widths: one thread is as fast, and immune to other jobs' contention
        load_before, start, rows = os.getloadavg(), time.perf_counter(), []
        rows_file = args.out.with_suffix(".rows.jsonl")
        rows_file.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="parity_mutations.") as tmp:
            for i, model in enumerate(args.models):
                rows += run_model(model, precisions=args.precisions, targets=args.targets, steps=args.steps,
                                  work=Path(tmp) / str(i), log=sys.stderr, rows_file=rows_file, kinds=args.kinds)
        info = {"commands": [command.strip()], "seconds": round(time.perf_counter() - start),
                "loadavg": [[load_before[0], os.getloadavg()[0]]], "steps": args.steps}
    header = (f"# Parity gate: mutation catch rates\n\nCommands: {', '.join(f'`{c}`' for c in info['commands'])}"
              f"; {info['steps']} denoising steps per verify, {info['seconds']} s of runs; load average before/after "
              f"{info['loadavg']} (2-core machine shared with other jobs: timings only, verdicts do not depend on "
              f"time).\n\nGate: artifact error vs float64 ≤ F× the reference's own (relative L2 and max abs), "
              f"F = {FACTORS} (precision: (rel L2, max abs)); factor = artifact error / floor.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(header + tables(rows) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({**info, "factors": FACTORS, "rows": rows}, indent=1,
                                                        default=float) + "\n")
    print(tables(rows).split("\n\n")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
