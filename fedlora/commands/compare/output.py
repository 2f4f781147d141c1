"""The comparison's outputs, from its finished runs: summary.csv, summary.md
and ``fedlora report``'s two plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from fedlora.commands.compare.plan import Run, run_dir
from fedlora.commands.compare.stats import curve, summarize
from fedlora.commands.report import (
    PLOTS,
    Curve,
    read_run,
    render_plots,
    shared_metric,
    short_name,
    write_atomically,
)
from fedlora.core.fields import Compared
from fedlora.core.metric import ACCURACY, Metric

OUTPUTS = ("summary.csv", "summary.md", *PLOTS)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".6g")
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path, metric: Metric = ACCURACY) -> None:
    """summary.csv; its header names the runs' primary ``metric``."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(Compared.header(metric.name))
        writer.writerows([[_cell(row[c]) for c in Compared.COLUMNS] for row in rows])


def plus_minus(mean: float, ci: float = math.nan, digits: int = 4) -> str:
    """``mean ± ci`` (``mean`` alone without a ci; "–" without a mean)."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")


def _table_row(row: dict[str, Any]) -> str:
    def cell(mean: str, ci: str | None = None, digits: int = 4) -> str:
        return plus_minus(row[mean], math.nan if ci is None else row[ci], digits)

    cells = [row[Compared.RUN], row[Compared.SEEDS],
             cell(Compared.FINAL_ACCURACY_MEAN, Compared.FINAL_ACCURACY_CI95),
             cell(Compared.BEST_ACCURACY_MEAN, Compared.BEST_ACCURACY_CI95),
             cell(Compared.UPLINK_MB, digits=2), cell(Compared.DOWNLINK_MB, digits=2),
             cell(Compared.SECONDS_PER_ROUND_MEAN, digits=1),
             cell(Compared.AGG_RESIDUAL_MEAN), cell(Compared.EPSILON_MEAN, digits=2),
             cell(Compared.CLIENT_ACCURACY_MEAN, Compared.CLIENT_ACCURACY_CI95)]
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown(rows: list[dict[str, Any]], seeds: list[int], metric: Metric = ACCURACY) -> str:
    """One table per group; the primary metric as mean ± ci95 over the seeds."""
    short = short_name(metric)
    lines = [f"Mean ± 95% CI half-width (Student t) over seeds "
             f"{', '.join(map(str, seeds))}. \"client {short}\": federated evaluation, each "
             "client on its own held-out slice (personal models for fedsa)."]
    for group in dict.fromkeys(row[Compared.GROUP] for row in rows):
        lines += ["", f"## {group}", "",
                  f"| run | seeds | final {short} | best {short} | uplink MB | downlink MB | "
                  f"s/round | mean agg_residual | ε | client {short} |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_table_row(row) for row in rows if row[Compared.GROUP] == group]
    return "\n".join(lines) + "\n"


def write_plots(runs: list[Run], results: dict[str, dict], out: Path,
                metric: Metric = ACCURACY) -> None:
    """accuracy_vs_round.png and accuracy_vs_uplink.png (``fedlora report``'s
    plots), a panel per group, each run's mean curve with its 95% band."""
    panels: dict[str, list[Curve]] = {}
    for run in runs:
        rounds, means, cis = curve(results[run.label], "round", metric)
        uplink_mb, _, _ = curve(results[run.label], "uplink", metric)
        panels.setdefault(run.group, []).append(Curve(run.label, rounds, uplink_mb, means, cis))
    plots = render_plots(panels, f"test {metric.name} (mean, 95% CI over seeds)")
    for name, png in (plots or {}).items():
        write_atomically(out / name, png)


def write_outputs(runs: list[Run], seeds: list[int], out: Path) -> str:
    """Read every finished run and write the CSV, the markdown and the plots;
    returns the markdown."""
    results = {run.label: {seed: read_run(run_dir(out, run, seed)) for seed in seeds}
               for run in runs}
    metric = shared_metric([summary for run in runs for summary, _ in results[run.label].values()],
                           [f"{run.label} seed {seed}" for run in runs for seed in seeds])
    rows = [summarize(run, results[run.label], metric) for run in runs]
    write_csv(rows, out / "summary.csv", metric)
    table = markdown(rows, seeds, metric)
    (out / "summary.md").write_text(table)
    write_plots(runs, results, out, metric)
    return table
