"""``fedlora report RUN_DIR... --out DIR``: a table and two plots for any set
of finished runs (directories written by ``fedlora simulate``).

``DIR/report.md`` has one row per run: final and best accuracy (with the
round of the best), uplink and downlink bytes in total, ε (empty without DP)
and seconds per round, all taken from the run's ``metrics.jsonl``.
``DIR/accuracy_vs_round.png`` and ``DIR/accuracy_vs_uplink.png`` draw each
run's accuracy at its evaluated rounds, against the round and against the
cumulative uplink MB by then. "Accuracy" is the runs' primary metric, as
their summary.json names it (``fedlora.core.metric``): accuracy for the
classification tasks, exact match (or perplexity, where lower is better) for
instruction tuning; runs judged by different metrics are not compared.

Every run is read and checked before anything is written, and each output
goes to a temporary file renamed into place, so a refused run (missing, not
finished: no ``summary.json``, a malformed ``metrics.jsonl``) leaves one
``fedlora: error: …`` line naming it and no report. ``fedlora compare``
reads its runs and draws its plots with this module too.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError
from fedlora.core.fields import Round, Summary
from fedlora.core.metric import ACCURACY, Metric

AXES = ("round", "uplink")
PLOTS = tuple(f"accuracy_vs_{axis}.png" for axis in AXES)
# the round fields the table and plots compute with: numbers, or null
NUMERIC_FIELDS = (Round.ACCURACY, Round.UPLINK_BYTES, Round.DOWNLINK_BYTES, Round.EPSILON,
                  Round.SECONDS)
REPORT = "report.md"


# --- reading a finished run ------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None


def _read_summary(directory: Path) -> dict[str, Any]:
    """summary.json, which marks a finished run: without it, the directory
    may be a run still going or one that was stopped."""
    if not directory.exists():
        raise ConfigError(f"{directory}: no such run directory")
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    path = directory / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: not a finished run (no summary.json)")
    try:
        summary = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_row(path: Path, number: int, line: str, primary: str) -> dict[str, Any]:
    """Line ``number`` of metrics.jsonl as a round's record, or a ConfigError
    saying what is wrong with it (the sums below would otherwise fail with a
    traceback, or silently count a corrupt line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: line {number} is not valid JSON ({err})") from None
    if not isinstance(row, dict) or not isinstance(row.get(Round.ROUND), int):
        raise ConfigError(f"{path}: line {number} is not a round's metrics (a JSON object "
                          "with an integer 'round')")
    for field in dict.fromkeys((primary, *NUMERIC_FIELDS)):
        if row.get(field) is not None and not _is_number(row[field]):
            raise ConfigError(f"{path}: line {number}: '{field}' is {row[field]!r}, "
                              "not a number")
    return row


def _read_rows(directory: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.jsonl's rounds, which must be 1..N once each with N the
    summary's round count: a truncated or spliced file is refused."""
    path = directory / "metrics.jsonl"
    primary = Metric.of_summary(summary).name
    rows = [_parse_row(path, number, line, primary)
            for number, line in enumerate(_read_text(path).splitlines(), start=1)
            if line.strip()]
    rounds = [row[Round.ROUND] for row in rows]
    if rounds != list(range(1, len(rows) + 1)):
        raise ConfigError(f"{path}: does not hold rounds 1..{len(rows)} in order, once each")
    if not rows or summary.get(Summary.ROUNDS) != len(rows):
        raise ConfigError(f"{path}: holds {len(rows)} rounds, but summary.json says "
                          f"{summary.get(Summary.ROUNDS)!r}")
    return rows


def read_run(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished run's summary.json and metrics.jsonl rows, checked; a
    ConfigError naming the directory or file otherwise."""
    directory = Path(directory)
    summary = _read_summary(directory)
    return summary, _read_rows(directory, summary)


# --- what the table and plots show ------------------------------------------------

def shared_metric(summaries: list[dict[str, Any]], names: list[str]) -> Metric:
    """The primary metric that all runs (``names``) are judged by; a
    ConfigError naming them when they differ."""
    metrics = [Metric.of_summary(summary) for summary in summaries]
    if len(set(metrics)) > 1:
        by_metric = {metric.name: [n for n, m in zip(names, metrics) if m == metric]
                     for metric in metrics}
        raise ConfigError("runs judged by different primary metrics cannot be compared: "
                          + "; ".join(f"{name}: {', '.join(runs)}"
                                      for name, runs in by_metric.items()))
    return metrics[0] if metrics else ACCURACY


def short_name(metric: Metric) -> str:
    """A metric's short column name: 'acc' for accuracy, as tables always said."""
    return "acc" if metric.name == Round.ACCURACY else metric.name


def accuracy_points(rows: list[dict[str, Any]], metric: Metric = ACCURACY
                    ) -> dict[int, tuple[float, float]]:
    """round → (cumulative uplink MB by its end, ``metric``), at the evaluated rounds."""
    sent, points = 0.0, {}
    for row in rows:
        sent += (row.get(Round.UPLINK_BYTES) or 0) / 1e6
        if row.get(metric.name) is not None:
            points[row[Round.ROUND]] = (sent, row[metric.name])
    return points


@dataclass(frozen=True)
class Stats:
    """One run's row of the table."""

    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    uplink_bytes: int
    downlink_bytes: int
    epsilon: float | None
    seconds_per_round: float


def stats(rows: list[dict[str, Any]], metric: Metric = ACCURACY) -> Stats:
    """The table's numbers (of the primary ``metric``). ε is the last one
    reported: it only grows, and a round no client trained in reports none."""
    name = metric.name
    evaluated = [row for row in rows if row.get(name) is not None]
    pick = max if metric.higher_is_better else min
    best = pick(evaluated, key=lambda row: row[name], default=None)  # the first best
    spent = [row[Round.EPSILON] for row in rows if row.get(Round.EPSILON) is not None]

    def total(field: str) -> float:  # over every round (missing or null counts as 0)
        return sum(row.get(field) or 0 for row in rows)

    return Stats(
        rounds=len(rows),
        final_accuracy=evaluated[-1][name] if evaluated else None,
        best_accuracy=best[name] if best else None,
        best_round=best[Round.ROUND] if best else None,
        uplink_bytes=total(Round.UPLINK_BYTES),
        downlink_bytes=total(Round.DOWNLINK_BYTES),
        epsilon=spent[-1] if spent else None,
        seconds_per_round=total(Round.SECONDS) / len(rows))


def labels(directories: list[Path]) -> list[str]:
    """Short unique names: the fewest trailing path parts that tell every run
    apart (``avg/seed-1``, ``ffa/seed-1``), as full paths are too wide for a
    table or a legend. A directory given twice is refused: its two rows
    could not be told apart."""
    parts = [Path(os.path.abspath(d)).parts for d in directories]
    for directory, path in zip(directories, parts):
        if parts.count(path) > 1:
            raise ConfigError(f"{directory}: the run directory is given twice")
    depth = 1
    while len({p[-depth:] for p in parts}) < len(parts):
        depth += 1
    return [str(Path(*p[-depth:])) for p in parts]


# --- plots, shared with ``fedlora compare`` --------------------------------------

@dataclass(frozen=True)
class Curve:
    """One line of both plots: accuracy at each evaluated round, with x as
    the round or as the cumulative uplink MB by then; ``band``: the
    half-width of a shaded interval around it (NaN where there is none)."""

    label: str
    rounds: list[float]
    uplink_mb: list[float]
    accuracy: list[float]
    band: list[float] | None = None


def run_curve(label: str, rows: list[dict[str, Any]], metric: Metric = ACCURACY) -> Curve:
    points = accuracy_points(rows, metric)
    return Curve(label, list(points), [mb for mb, _ in points.values()],
                 [accuracy for _, accuracy in points.values()])


def _draw(panel: Any, curve: Curve, axis: str) -> None:
    xs = curve.rounds if axis == "round" else curve.uplink_mb
    line, = panel.plot(xs, curve.accuracy, marker="o", label=curve.label)
    if curve.band is not None:
        panel.fill_between(xs, [m - c for m, c in zip(curve.accuracy, curve.band)],
                           [m + c for m, c in zip(curve.accuracy, curve.band)],
                           color=line.get_color(), alpha=0.2, linewidth=0)


def _log_axis(panel: Any, xs: list[float]) -> None:
    """A log x axis labelled with plain numbers (0.2, not 2×10⁻¹: matplotlib's
    own labels overlap over a short range): at 1, 2 and 5 per decade over up
    to two decades, at the decades over more."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panel.set_xscale("log")
    positive = [x for x in xs if x > 0]
    if positive and math.log10(max(positive) / min(positive)) <= 2:
        panel.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    panel.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    panel.xaxis.set_minor_formatter(NullFormatter())


def _figure(plt: Any, panels: dict[str, list[Curve]], axis: str, ylabel: str) -> bytes:
    """One plot as PNG bytes: a panel per key of ``panels`` (its title)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for panel, (title, curves) in zip(axes[0], panels.items()):
        for curve in curves:
            _draw(panel, curve, axis)
        panel.set_title(title)
        if axis == "round":
            panel.set_xlabel("round")
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            panel.set_xlabel("cumulative uplink MB (log)")
            _log_axis(panel, [x for curve in curves for x in curve.uplink_mb])
        panel.set_ylabel(ylabel)
        panel.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def render_plots(panels: dict[str, list[Curve]], ylabel: str) -> dict[str, bytes] | None:
    """{file name: PNG bytes} of accuracy_vs_round.png and
    accuracy_vs_uplink.png, rendered in memory so that nothing is written
    before both exist; None (and one line) if matplotlib, a dev dependency,
    is missing. matplotlib is imported here only: it is slow to import and
    no other command needs it."""
    try:
        import matplotlib
    except ImportError:
        print("fedlora: warning: matplotlib is not installed, so no plots "
              "(pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return {name: _figure(plt, panels, axis, ylabel) for name, axis in zip(PLOTS, AXES)}


def write_atomically(path: Path, data: bytes) -> None:
    """A reader never sees a half-written file: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the report ---------------------------------------------------------------------

def _number(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _best(row: Stats) -> str:
    return "" if row.best_accuracy is None else f"{row.best_accuracy:.4f} (round {row.best_round})"


def markdown(names: list[str], directories: list[Path], rows: list[Stats],
             metric: Metric = ACCURACY) -> str:
    """report.md: the table, what its columns mean, and each label's directory."""
    short, best = short_name(metric), "highest" if metric.higher_is_better else "lowest"
    what = "accuracy" if metric == ACCURACY else metric.name
    lines = [f"Final {short}: the last evaluated round's test {what}; best {short}: the "
             f"{best}, with its round. Bytes: totals over all rounds, as sent. ε: the DP "
             "budget spent (empty without DP). s/round: mean seconds per round.", "",
             f"| run | rounds | final {short} | best {short} | uplink bytes | downlink bytes "
             "| ε | s/round |", "|---|---|---|---|---|---|---|---|"]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | {row.rounds} | {_number(row.final_accuracy, 4)} | "
                     f"{_best(row)} | {row.uplink_bytes:,} | {row.downlink_bytes:,} | "
                     f"{_number(row.epsilon, 2)} | {_number(row.seconds_per_round, 2)} |")
    lines += ["", "Runs:", ""]
    lines += [f"- {name}: `{os.path.abspath(d)}`" for name, d in zip(names, directories)]
    return "\n".join(lines) + "\n"


def _out_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    return out


def _write(out: Path, files: dict[str, bytes]) -> None:
    """The report's files, each renamed into place; a plot left from an
    earlier report that this one could not draw is removed, as it would
    describe other runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomically(out / name, data)
        for name in set(PLOTS) - set(files):
            (out / name).unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write the report ({err})") from None


def report(run_dirs: list[str], out: str | Path) -> int:
    """The whole command: every run read and checked, then the report
    written; returns the exit code."""
    out = _out_dir(out)
    directories = [Path(d) for d in run_dirs]
    names = labels(directories)
    read = [read_run(d) for d in directories]
    metric = shared_metric([summary for summary, _ in read], names)
    runs = [rows for _, rows in read]
    table = markdown(names, directories, [stats(rows, metric) for rows in runs], metric)
    curves = [run_curve(name, rows, metric) for name, rows in zip(names, runs)]
    plots = render_plots({"": curves}, f"test {metric.name}") or {}
    _write(out, {REPORT: table.encode(), **plots})
    print(table, end="")
    print(f"wrote {', '.join([REPORT, *plots])} in {out}")
    return 0
