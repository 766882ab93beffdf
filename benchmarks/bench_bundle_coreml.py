"""Core ML app bundles on toy and tiny models: what `export --pipeline --target coreml` writes (package bytes and
weight bytes per part), how `--chunk-unet` splits the U-Net (parameters per chunk, tensors crossing the cut) and
the traced-module checks (each part against its stock PyTorch call; the chunk pair against the whole U-Net).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bundle_coreml.py

Writes ``benchmarks/results/bench_bundle_coreml.json`` and ``.md``. No Core ML prediction runs (Linux): these are
sizes and PyTorch-side parity, not the packages' outputs. Export seconds are recorded with the load average as
upper bounds on a shared machine, not compared.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bundle_coreml.py"
CASES = [("toy", "fp16", False), ("toy", "fp16", True), ("random:tiny-sd15", "fp16", True),
         ("random:tiny-sdxl", "fp32", True)]


def export(model: str, precision: str, chunk: bool, out: Path) -> dict:
    from laptop_deploy.cli.main import main

    argv = ["export", "--pipeline", "--model", model, "--target", "coreml", "--precision", precision,
            "--out", str(out), "--quiet"] + (["--chunk-unet"] if chunk else [])
    with contextlib.redirect_stdout(io.StringIO()):
        if main(argv) != 0:
            raise SystemExit(f"export failed: {' '.join(argv)}")
    return json.loads((out / "manifest.json").read_text())


def row(model: str, precision: str, chunk: bool, manifest: dict, load: tuple[float, ...]) -> dict:
    parts = {name: {"file": p["model_file"], "precision": p["precision"], "bytes": p["bytes"],
                    "weight_bytes": p["weight_bytes"], "params": p["params"], "ops": p["ops"],
                    "traced_rel_l2": p["traced_parity"]["rel_l2"],
                    "traced_factor_rel_l2": p["traced_parity"]["factor_rel_l2"]}
             for name, p in manifest["parts"].items()}
    chunks = (manifest["unet"] or {}).get("chunks")
    return {"model": model, "precision": precision, "chunk_unet": chunk, "parts": parts,
            "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
            "files": len(manifest["files"]),
            "chunks": None if chunks is None else {k: chunks["plan"][k] for k in
                                                   ("chunk1_stages", "chunk2_stages", "params", "skips")},
            "seconds": manifest["export"]["seconds"], "peak_rss_mb": manifest["export"]["peak_rss_mb"],
            "load_average_before": load}


def full_size_plans() -> list[dict]:
    """Where ``--chunk-unet`` cuts the full-size U-Nets, planned on the meta device (architecture only: no weights
    are drawn or loaded, nothing is converted)."""
    from laptop_deploy.deploy.unet_chunks import plan_chunks
    from laptop_deploy.models.sources import resolve_model

    plans = []
    for spec in ("random:sd15", "random:sdxl"):
        plan = plan_chunks(resolve_model(spec, materialize=False).unet).as_dict()
        plans.append({"model": spec, **{k: plan[k] for k in ("chunk1_stages", "chunk2_stages", "params", "skips")},
                      "fp16_weight_bytes": [2 * p for p in plan["params"]]})
    return plans


def markdown(rows: list[dict], plans: list[dict]) -> str:
    lines = [f"# Core ML bundles (`{COMMAND}`)", "",
             "No Core ML prediction ran (Linux). Traced: each part's `torch.jit.trace` vs the stock PyTorch call "
             "(chunks: chunk 2 ∘ chunk 1 vs the whole U-Net), rel L2 and its factor of the fp32 floor (gate 2x).",
             "", "| model | precision | chunked | part | file | bytes | weight bytes | traced rel L2 | factor |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for name, p in r["parts"].items():
            lines.append(f"| {r['model']} | {p['precision']} | {'yes' if r['chunk_unet'] else 'no'} | {name} | "
                         f"{p['file']} | {p['bytes']:,} | {p['weight_bytes']:,} | {p['traced_rel_l2']:.2g} | "
                         f"{p['traced_factor_rel_l2']:.2f} |")
    lines += ["", "| model | chunk 1 stages | chunk 2 stages | params (chunk 1, chunk 2) | skips crossing |",
              "|---|---|---|---|---:|"]
    for r in rows:
        if r["chunks"]:
            c = r["chunks"]
            lines.append(f"| {r['model']} | {', '.join(c['chunk1_stages'])} | {', '.join(c['chunk2_stages'])} | "
                         f"{c['params'][0]:,} / {c['params'][1]:,} | {c['skips']} |")
    lines += ["", "Full-size U-Nets, planned on the meta device (no weights, no conversion):", "",
              "| model | chunk 1 stages | chunk 2 stages | params (chunk 1, chunk 2) | fp16 weight bytes | skips |",
              "|---|---|---|---|---|---:|"]
    lines += [f"| {p['model']} | {', '.join(p['chunk1_stages'])} | {', '.join(p['chunk2_stages'])} | "
              f"{p['params'][0]:,} / {p['params'][1]:,} | {p['fp16_weight_bytes'][0]:,} / "
              f"{p['fp16_weight_bytes'][1]:,} | {p['skips']} |" for p in plans]
    lines += ["", "Export seconds (upper bounds; load average before each run):", ""]
    lines += [f"- {r['model']} {r['precision']}{' chunked' if r['chunk_unet'] else ''}: {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:,.0f} MiB, load {r['load_average_before'][0]:.2f}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-coreml-") as tmp:
        for index, (model, precision, chunk) in enumerate(CASES):
            load = os.getloadavg()
            if load[0] > (os.cpu_count() or 1):
                print(f"warning: load average {load[0]:.2f} on {os.cpu_count()} cores: times are upper bounds",
                      file=sys.stderr)
            manifest = export(model, precision, chunk, Path(tmp) / f"b{index}")
            rows.append(row(model, precision, chunk, manifest, tuple(round(x, 2) for x in load)))
            print(f"{model} {precision} chunk={chunk}: {rows[-1]['bundle_bytes']:,} bytes", file=sys.stderr)
    plans = full_size_plans()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_bundle_coreml.json").write_text(json.dumps({"command": COMMAND, "rows": rows,
                                                                  "full_size_plans": plans}, indent=2) + "\n")
    (RESULTS / "bench_bundle_coreml.md").write_text(markdown(rows, plans))
    print(markdown(rows, plans))


if __name__ == "__main__":
    main()
