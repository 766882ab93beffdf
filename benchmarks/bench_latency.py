"""Pruning to a latency budget on full-size SD-1.5 (random weights), ONNX Runtime CPU fp32, batch 1, 64×64 latent:
students of ``--cost params``, ``--cost macs`` and ``--cost latency`` at ratios 0.3 and 0.5 plus BK-SDM-Base and
-Small, each with the latency the profile predicts and the latency measured (all variants interleaved, ≥ 3 rounds,
median and min–max, load average recorded). The same run times the teacher, the params/MACs@0.5 students and
BK-SDM-Small in eager PyTorch too and writes ``bench_runtimes.*`` (see ``bench_runtimes.py``).

    flock /tmp/ld-heavy.lock python benchmarks/bench_latency.py [--calib 2] [--score-latent 32 32] [--threads 1]

1. export the teacher once (timed) and profile that graph in ONNX Runtime (timed: the profile must cost less than
   the export) → ``results/sd15_latency_table.{json,md,png}``;
2. output-loss scores once (``sd15_students.load_or_score``, at ``--score-latent`` to keep 34 passes affordable);
3. the exact knapsack per cost unit and ratio on the 64×64 costs; export every student;
4. time everything interleaved; write ``results/bench_latency.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sd15_students import (RESULTS, busy_warning, export_variants, load_average, load_or_score, ort_factories,
                           removal_sets, say, torch_runner)

RUNTIME_VARIANTS = ["teacher", "params@0.5", "macs@0.5", "bk-sdm-small"]


def _variants(ratios: list[float]) -> list[str]:
    return ["teacher"] + [f"{cost}@{r:g}" for cost in ("params", "macs", "latency") for r in ratios] + \
        ["bk-sdm-base", "bk-sdm-small"]


def _sizes(unet, sets: dict[str, list[str]], latent: tuple[int, int]) -> dict[str, dict[str, int]]:
    from laptop_deploy.models.inventory import count_macs, meta_twin
    from laptop_deploy.models.layers import apply_removal

    sizes = {}
    for name, removed in sets.items():
        twin = meta_twin(unet)
        apply_removal(twin, removed)
        sizes[name] = {"params": sum(p.numel() for p in twin.parameters()),
                       "macs": count_macs(twin, height=latent[0], width=latent[1])[""]}
    return sizes


def _profile_teacher(unet, source, spec, work: Path, args) -> tuple[object, dict]:
    from laptop_deploy.deploy.latency_table import plot_shares, save_table, table_markdown
    from laptop_deploy.deploy.profile import ProfileOptions, profile_artifact_file

    if args.teacher_artifact is not None:  # an export of this same teacher kept from an earlier (killed) run
        from laptop_deploy.deploy.manifest import check_integrity

        manifest = check_integrity(args.teacher_artifact)
        info = {"path": str(args.teacher_artifact / manifest.model_file), "export_s": manifest.export["seconds"]}
    else:
        info = export_variants(unet, spec, {"teacher": []}, work, exporter=args.exporter)["teacher"]
    say(f"teacher exported in {info['export_s']} s; profiling it in onnxruntime")
    if args.table is not None:  # the profile an earlier run of this script wrote for this same teacher export
        from laptop_deploy.deploy.latency_table import load_table

        table = load_table(args.table)
        return table, {"export_s": info["export_s"], "profile_s": table.extra["profile_s"], "path": info["path"]}
    options = ProfileOptions(runtime="ort", repeats=args.repeats, threads=args.threads)
    setting = {"runtime": "ort", "precision": "fp32", "latent_size": list(args.latent), "batch": args.batch,
               "repeats": args.repeats, "warmup": options.warmup}
    start = time.perf_counter()
    table = profile_artifact_file(Path(info["path"]), spec, unet=unet, model=source.describe(), options=options,
                                  setting=setting, load_before=tuple(load_average()))
    profile_s = round(time.perf_counter() - start, 1)
    table.extra["command"] = args.command
    save_table(table, args.results / "sd15_latency_table.json")
    (args.results / "sd15_latency_table.md").write_text(table_markdown(table, command=args.command))
    plot_shares(table, args.results / "sd15_latency_table.png")
    return table, {"export_s": info["export_s"], "profile_s": profile_s, "path": info["path"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--calib", type=int, default=2)
    parser.add_argument("--score-latent", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--latent", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1: "
                        "2-thread OpenMP busy-waits badly when other processes share the 2 cores)")
    parser.add_argument("--runtime", default="ort", choices=("ort", "torch"),
                        help="ort (default): exports every variant; torch: profile and time eager PyTorch (no "
                             "exports), results as bench_latency_torch.*")
    parser.add_argument("--torch-warmup", type=int, default=1, help="untimed calls per round in torch")
    parser.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch rows (bench_runtimes)")
    parser.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"),
                        help="ONNX exporter for every variant (default torchscript: minutes faster here)")
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (default: all of --ratios)")
    parser.add_argument("--teacher-artifact", type=Path,
                        help="reuse this exported teacher (its manifest's export seconds are reported)")
    parser.add_argument("--table", type=Path, help="with --teacher-artifact: its latency table from an earlier run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go (default results/)")
    parser.add_argument("--work", type=Path, help="folder for the exported variants (default: a temporary one)")
    args = parser.parse_args(argv)
    args.latent, args.score_latent = tuple(args.latent), tuple(args.score_latent)
    args.results.mkdir(parents=True, exist_ok=True)
    args.command = "python benchmarks/bench_latency.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    import torch

    from laptop_deploy.deploy.bench import environment
    from laptop_deploy.deploy.profile import measure_interleaved, predicted_ms
    from laptop_deploy.deploy.spec import build_spec
    from laptop_deploy.models.sources import resolve_model

    torch.set_num_threads(args.threads)
    before = load_average()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_latency."))
    source = resolve_model(args.model)
    unet = source.unet
    spec = build_spec(unet.config, batch=args.batch, height=args.latent[0], width=args.latent[1])
    stem = "bench_latency" if args.runtime == "ort" else "bench_latency_torch"
    try:
        if args.runtime == "torch":
            return _torch_only(args, source, spec, before, stem)
        table, timing = _profile_teacher(unet, source, spec, work, args)
        say(f"profile {timing['profile_s']} s vs export {timing['export_s']} s; step {table.step:.0f} ms")
        scored = load_or_score(source, model=args.model, seed=0, calib=args.calib, latent=args.score_latent,
                               cache=args.results / "sd15_scores.json")
        sets = removal_sets(unet, scored["scores"], table=table, latent=args.latent,
                            variants=args.variants or _variants(args.ratios))
        variants = list(sets)
        exports = {"teacher": {"path": timing["path"], "export_s": timing["export_s"]}}
        exports |= export_variants(unet, spec, {k: v for k, v in sets.items() if k != "teacher"}, work,
                                   exporter=args.exporter)
        feeds = spec.example_feeds(seed=0)
        say(f"timing {len(variants)} variants in onnxruntime, {args.repeats} interleaved rounds")
        ort_times = measure_interleaved(ort_factories({k: v["path"] for k, v in exports.items()}, spec,
                                                      args.threads), feeds, repeats=args.repeats, progress=say)
        torch_times = {}
        if not args.no_torch:
            names = [k for k in RUNTIME_VARIANTS if k in sets]
            say(f"timing {names} in torch eager, {args.repeats} interleaved rounds")
            torch_times = measure_interleaved({k: (lambda r=sets[k]: torch_runner(unet, spec, r)) for k in names},
                                              feeds, repeats=args.repeats, progress=say)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    after = load_average()
    raw = {"sets": sets, "ort": ort_times, "torch": torch_times, "exports": exports, "timing": timing,
           "before": before, "after": after}
    (args.results / "bench_latency_raw.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    sizes = _sizes(unet, sets, args.latent)
    teacher = ort_times["teacher"]["median_ms"]
    rows = []
    for name in variants:
        pred = predicted_ms(table, sets[name]) / table.step
        meas = ort_times[name]["median_ms"] / teacher
        rows.append({"variant": name, "removed": sets[name], **sizes[name],
                     "params_ratio": round(sizes[name]["params"] / sizes["teacher"]["params"], 4),
                     "macs_ratio": round(sizes[name]["macs"] / sizes["teacher"]["macs"], 4),
                     "predicted_ratio": round(pred, 4), "measured_ratio": round(meas, 4),
                     "measured_ratio_min_max": [round(ort_times[name]["min_ms"] / teacher, 4),
                                                round(ort_times[name]["max_ms"] / teacher, 4)],
                     "prediction_error": round(pred / meas - 1, 4), "ort": ort_times[name],
                     "export_s": exports[name]["export_s"]})
    data = {"command": args.command, "model": args.model, "latent": list(args.latent), "batch": args.batch,
            "threads": args.threads, "score": {k: scored[k] for k in ("key", "seconds", "forward_passes")},
            "profile_s": timing["profile_s"], "teacher_export_s": timing["export_s"], "exporter": args.exporter,
            "table": "benchmarks/results/sd15_latency_table.json", "rows": rows,
            "reused": {"teacher_artifact": str(args.teacher_artifact) if args.teacher_artifact else None,
                       "table": str(args.table) if args.table else None},
            "load_average": {"before": before, "after": after}, "environment": environment()}
    data["warning"] = busy_warning(before, after, data["environment"]["logical_cores"])
    (args.results / "bench_latency.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.results / "bench_latency.md").write_text(_markdown(data))
    _plot(data, args.results / "bench_latency.png")
    if torch_times:
        from bench_runtimes import write_results

        write_results(data, sets, sizes, torch_times, ort_times, args.results)
    print(_markdown(data))
    return 0


def _torch_only(args, source, spec, before: list[float], stem: str) -> int:
    """--runtime torch: the same students, profiled (hooks) and timed in eager PyTorch; nothing exported."""
    from laptop_deploy.deploy.bench import environment
    from laptop_deploy.deploy.latency_table import plot_shares, save_table, table_markdown
    from laptop_deploy.deploy.profile import ProfileOptions, measure_interleaved, predicted_ms, profile_unet

    unet = source.unet
    options = ProfileOptions(runtime="torch", latent_size=args.latent, batch=args.batch, repeats=args.repeats)
    table = profile_unet(unet, model=source.describe(), options=options, progress=say)
    table.extra["command"] = args.command
    save_table(table, args.results / "sd15_latency_table_torch.json")
    (args.results / "sd15_latency_table_torch.md").write_text(table_markdown(table, command=args.command))
    plot_shares(table, args.results / "sd15_latency_table_torch.png")
    say(f"profiled in {table.extra['profile_s']} s; step {table.step:.0f} ms")
    scored = load_or_score(source, model=args.model, seed=0, calib=args.calib, latent=args.score_latent,
                           cache=args.results / f"sd15_scores_{args.score_latent[0]}.json")
    sets = removal_sets(unet, scored["scores"], table=table, latent=args.latent,
                        variants=args.variants or _variants(args.ratios))
    say(f"timing {list(sets)} in torch eager, {args.repeats} interleaved rounds")
    times = measure_interleaved({k: (lambda r=v: torch_runner(unet, spec, r)) for k, v in sets.items()},
                                spec.example_feeds(seed=0), repeats=args.repeats, warmup=args.torch_warmup,
                                progress=say)
    after = load_average()
    sizes = _sizes(unet, sets, args.latent)
    teacher = times["teacher"]["median_ms"]
    rows = []
    for name, removed in sets.items():
        pred, meas = predicted_ms(table, removed) / table.step, times[name]["median_ms"] / teacher
        rows.append({"variant": name, "removed": removed, **sizes[name],
                     "params_ratio": round(sizes[name]["params"] / sizes["teacher"]["params"], 4),
                     "macs_ratio": round(sizes[name]["macs"] / sizes["teacher"]["macs"], 4),
                     "predicted_ratio": round(pred, 4), "measured_ratio": round(meas, 4),
                     "measured_ratio_min_max": [round(times[name]["min_ms"] / teacher, 4),
                                                round(times[name]["max_ms"] / teacher, 4)],
                     "prediction_error": round(pred / meas - 1, 4), "times": times[name]})
    data = {"command": args.command, "runtime": "torch", "model": args.model, "latent": list(args.latent),
            "batch": args.batch, "threads": args.threads,
            "score": {k: scored[k] for k in ("key", "seconds", "forward_passes")},
            "profile_s": table.extra["profile_s"], "teacher_export_s": None, "exporter": None,
            "table": "benchmarks/results/sd15_latency_table_torch.json", "rows": rows,
            "reused": {"teacher_artifact": None, "table": None},
            "load_average": {"before": before, "after": after}, "environment": environment()}
    data["warning"] = busy_warning(before, after, data["environment"]["logical_cores"])
    (args.results / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(_markdown(data))
    _plot(data, args.results / f"{stem}.png")
    print(_markdown(data))
    return 0


def _markdown(data: dict) -> str:
    runtime = "PyTorch eager CPU" if data.get("runtime") == "torch" else "ONNX Runtime CPU"
    lines = [f"# Pruning to a latency budget: SD-1.5 U-Net, {runtime} fp32", "",
             f"Command: `{data['command']}`", ""]
    if data.get("warning"):
        lines += [f"**{data['warning']}**", ""]
    score = data["score"]["key"]
    lines += [f"Model `{data['model']}` (random weights), batch {data['batch']}, latent "
              f"{data['latent'][0]}x{data['latent'][1]}, {data['threads']} intra-op thread(s). Output-loss scores "
              f"computed once at a {score['latent'][0]}x{score['latent'][1]} latent with {score['calib']} calibration "
              f"samples ({data['score']['forward_passes']} passes, {data['score']['seconds']} s; no additivity "
              f"sets) and reused for every cost unit and ratio; costs (params, MACs, measured ms) are those of the "
              f"{data['latent'][0]}x{data['latent'][1]} shape. Latency table: `{data['table']}`.", "",
              (f"Profiling the teacher in ONNX Runtime took **{data['profile_s']} s**; exporting it took "
               f"**{data['teacher_export_s']} s** ({data['exporter']} exporter, every variant). "
               if data["teacher_export_s"] else f"Profiling the teacher (hooks) took {data['profile_s']} s. ") +
              f"Load average before / after: {data['load_average']['before']} / {data['load_average']['after']}.",
              ""]
    if data["reused"]["teacher_artifact"]:
        table = data["reused"]["table"]
        lines += [f"The teacher's export was made by an earlier run of this script (same model, seed and settings; "
                  f"its export seconds come from the artifact's manifest) and reused here; "
                  + (f"so was its profile (`{table}`)." if table else "the profile was taken in this run."), ""]
    lines += ["| variant | params × | MACs × | predicted latency × | measured latency × (min–max) | error |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lo, hi = r["measured_ratio_min_max"]
        lines.append(f"| {r['variant']} | {r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | "
                     f"{r['predicted_ratio']:.3f} | {r['measured_ratio']:.3f} ({lo:.3f}–{hi:.3f}) | "
                     f"{r['prediction_error']:+.1%} |")
    lines += ["", "Ratios are against the teacher's median in the same interleaved run (× < 1: smaller / faster); "
              "min–max are each variant's slowest and fastest round over the teacher's median. Error = predicted / "
              "measured − 1.", ""]
    return "\n".join(lines)


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for cost, marker in (("params", "o"), ("macs", "s"), ("latency", "^")):
        rows = [r for r in data["rows"] if r["variant"].startswith(cost + "@")]
        x = [float(r["variant"].split("@")[1]) for r in rows]
        ax.plot(x, [r["measured_ratio"] for r in rows], marker=marker, label=f"--cost {cost} (measured)")
        ax.plot(x, [r["predicted_ratio"] for r in rows], marker=marker, linestyle=":", color="grey", alpha=0.6)
    for r in data["rows"]:
        if r["variant"].startswith("bk-sdm"):
            ax.scatter([1 - r["params_ratio"]], [r["measured_ratio"]], marker="*", s=120, label=r["variant"])
    ax.set_xlabel("--ratio (bk-sdm: fraction of params removed)")
    ax.set_ylabel(f"student latency / teacher latency ({data.get('runtime', 'ort')} CPU)")
    ax.set_title("measured (solid) and predicted (dotted) latency", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
