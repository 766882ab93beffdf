"""``latency_table.json``: where one U-Net step spends its time, per prunable unit and per op type, and exactly
what it was measured on (runtime, providers, threads, precision, latent size, batch, machine, versions).

Layout (format ``laptop-deploy-latency-table``, version 1)::

    model      the profiled model: spec, family, params, removed units
    setting    runtime, providers, precision, latent_size [H, W], batch, threads, graph_optimization
    method     how units were timed (torch forward hooks / ORT profiler events mapped to module paths)
    step_ms    {"median", "min", "max", "runs": [...]}: one U-Net call, per repeat, in ms
    units      one row per unit of ``layers.discover_layers`` (Transformer2DModels *and* their blocks), with the
               unit's inclusive ``ms`` (median over repeats), ``ms_min``/``ms_max``, ``share`` of the step,
               ``params`` and ``macs`` (batch 1 at the table's latent size)
    op_types   ms per category (conv, matmul/attention, norm, elementwise, other), median over repeats
    machine    bench.environment(); load_average at start and end

A table is applied only to the setting it was measured on: :func:`check_table` refuses another latent size,
batch, precision or runtime (naming the difference) and a model whose units differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LaptopDeployError

FORMAT = "laptop-deploy-latency-table"
VERSION = 1
TABLE_FILE = "latency_table.json"
OP_CATEGORIES = ("conv", "matmul/attention", "norm", "elementwise", "other")


class LatencyTableError(LaptopDeployError):
    """A latency table that is missing, malformed, or measured on another setting or model (exit 2)."""


@dataclass
class UnitTime:
    """One unit: inclusive time of its module per call (ms, median and range over repeats)."""

    name: str
    kind: str
    stage: str
    prunable: bool
    params: int
    macs: int
    ms: float
    ms_min: float
    ms_max: float
    parent: str | None = None


@dataclass
class LatencyTable:
    """See the module docstring; ``setting`` keys are those :func:`check_table` compares."""

    model: dict[str, Any]
    setting: dict[str, Any]
    method: str
    step_ms: dict[str, Any]
    units: list[UnitTime]
    op_types: dict[str, float]
    machine: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> float:
        """Median ms of one U-Net call."""
        return float(self.step_ms["median"])

    def unit(self, name: str) -> UnitTime | None:
        return next((u for u in self.units if u.name == name), None)

    def exclusive_ms(self, name: str) -> float:
        """ms of ``name`` without the units nested in it (a Transformer2DModel's shell around its blocks)."""
        unit = self.unit(name)
        if unit is None:
            raise LatencyTableError(f"latency table has no unit '{name}'")
        return unit.ms - sum(u.ms for u in self.units if u.parent == name)

    def as_dict(self) -> dict[str, Any]:
        total_params = max(int(self.model.get("params") or 1), 1)
        total_macs = max(int(self.model.get("macs") or 1), 1)
        units = [{**asdict(u), "share": round(u.ms / self.step, 6), "params_share": round(u.params / total_params, 6),
                  "macs_share": round(u.macs / total_macs, 6)} for u in self.units]
        top = [u for u in self.units if u.parent is None]
        return {"format": FORMAT, "version": VERSION, "model": self.model, "setting": self.setting,
                "method": self.method, "step_ms": self.step_ms, "units_ms": round(sum(u.ms for u in top), 4),
                "remainder_ms": round(self.step - sum(u.ms for u in top), 4), "units": units,
                "op_types": self.op_types, "machine": self.machine, **self.extra}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyTableError(f"{where} is not a laptop-deploy latency table (no format '{FORMAT}'; "
                                    f"write one with `laptop-deploy profile`)")
        if data.get("version") != VERSION:
            raise LatencyTableError(f"{where}: version {data.get('version')}, this laptop-deploy reads {VERSION}")
        try:
            fields = {f for f in UnitTime.__dataclass_fields__}
            units = [UnitTime(**{k: v for k, v in row.items() if k in fields}) for row in data["units"]]
            known = {"format", "version", "model", "setting", "method", "step_ms", "units", "op_types", "machine",
                     "units_ms", "remainder_ms"}
            table = cls(model=data["model"], setting=data["setting"], method=data["method"],
                        step_ms=data["step_ms"], units=units, op_types=data["op_types"],
                        machine=data.get("machine", {}), extra={k: v for k, v in data.items() if k not in known})
            float(table.step_ms["median"])
            for key in ("runtime", "precision", "latent_size", "batch"):
                table.setting[key]
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyTableError(f"{where}: malformed latency table ({type(exc).__name__}: {exc})") from None
        return table


def save_table(table: LatencyTable, path: Path) -> Path:
    """Write ``table`` as JSON to ``path`` (the caller's output folder; see :func:`laptop_deploy.outputs`)."""
    path.write_text(json.dumps(table.as_dict(), indent=2) + "\n")
    return path


def load_table(path: str | os.PathLike[str]) -> LatencyTable:
    """Read a table file (or ``DIR/latency_table.json``); a missing or malformed file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / TABLE_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise LatencyTableError(f"--latency-table {path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LatencyTableError(f"--latency-table {path}: not JSON ({exc})") from None
    return LatencyTable.from_dict(data, where=f"--latency-table {path}")


def describe_setting(setting: dict[str, Any]) -> str:
    h, w = setting["latent_size"]
    return f"runtime {setting['runtime']}, {setting['precision']}, latent {h}x{w}, batch {setting['batch']}"


def check_table(table: LatencyTable, *, latent_size: tuple[int, int], batch: int, precision: str,
                runtime: str | None = None, layers: list[Any] | None = None, total_params: int | None = None,
                where: str = "latency table") -> None:
    """Refuse ``table`` unless it was measured at this latent size, batch, precision (and ``runtime`` when given)
    on a model with the same units (``layers`` from ``discover_layers``, compared by name and params)."""
    asked = {"latent size": "x".join(map(str, latent_size)), "batch": batch, "precision": precision}
    have = {"latent size": "x".join(map(str, table.setting["latent_size"])), "batch": table.setting["batch"],
            "precision": table.setting["precision"]}
    if runtime is not None:
        asked["runtime"], have["runtime"] = runtime, table.setting["runtime"]
    differ = [f"{key} {have[key]} (asked {asked[key]})" for key in asked if str(have[key]) != str(asked[key])]
    if differ:
        raise LatencyTableError(f"{where} was measured with another setting: {'; '.join(differ)}; profile this "
                                f"setting with `laptop-deploy profile`")
    if total_params is not None and int(table.model.get("params", -1)) != total_params:
        raise LatencyTableError(f"{where} was measured on another model: {table.model.get('params')} params "
                                f"({table.model.get('spec')}), this model has {total_params:,}")
    for layer in layers or ():
        unit = table.unit(layer.name)
        if unit is None or unit.params != layer.params:
            found = "missing" if unit is None else f"{unit.params:,} params"
            raise LatencyTableError(f"{where} was measured on another model: unit '{layer.name}' is {found} in "
                                    f"the table, {layer.params:,} params here")


def summary_rows(table: LatencyTable) -> list[dict[str, Any]]:
    """Top-level units (a Transformer2DModel as a whole) with their shares of time, params and MACs."""
    total_params = max(int(table.model.get("params") or 1), 1)
    total_macs = max(int(table.model.get("macs") or 1), 1)
    return [{"name": u.name, "kind": u.kind, "prunable": u.prunable, "ms": u.ms, "share": u.ms / table.step,
             "params_share": u.params / total_params, "macs_share": u.macs / total_macs}
            for u in table.units if u.parent is None]


def table_markdown(table: LatencyTable, *, command: str | None = None) -> str:
    """The table as Markdown: setting, step time, per-unit rows (top-level units), op types."""
    step = table.step_ms
    lines = ["# Latency profile", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Model `{table.model.get('spec')}` ({table.model.get('params', 0):,} params); "
              f"{describe_setting(table.setting)}; providers {table.setting.get('providers')}, threads "
              f"{table.setting.get('threads')}; method: {table.method}.", "",
              f"One step: median **{step['median']:.2f} ms** (min {step['min']:.2f}, max {step['max']:.2f}, "
              f"{len(step.get('runs', []))} repeats); load average {table.machine.get('load_average')}.", "",
              "| unit | kind | prunable | ms | latency share | params share | MACs share |",
              "|---|---|---|---:|---:|---:|---:|"]
    rows = summary_rows(table)
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {'yes' if r['prunable'] else 'no'} | {r['ms']:.2f} | "
                     f"{r['share']:.1%} | {r['params_share']:.1%} | {r['macs_share']:.1%} |")
    rest = table.step - sum(r["ms"] for r in rows)
    lines += [f"| (outside units) | | no | {rest:.2f} | {rest / table.step:.1%} | | |", "",
              "| op type | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v / table.step:.1%} |" for k, v in table.op_types.items()]
    return "\n".join(lines) + "\n"


def plot_shares(table: LatencyTable, path: Path) -> Path:
    """PNG: per top-level unit, its share of step latency beside its share of params and of MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary_rows(table)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.38 * len(rows)), 4.5))
    for offset, key, label in ((-0.27, "share", "latency"), (0.0, "params_share", "params"),
                               (0.27, "macs_share", "MACs")):
        ax.bar(x + offset, [100 * r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, [r["name"].replace("_blocks", "").replace("attentions", "attn") for r in rows],
                  rotation=75, fontsize=7)
    ax.set_ylabel("% of the U-Net")
    ax.set_title(f"{table.model.get('spec')}: {describe_setting(table.setting)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
