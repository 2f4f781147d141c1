"""``fedlora compare``: run a set of simulations over several seeds, side by side.

A comparison file (TOML) holds the shared run config under ``[base]`` and one
``[[run]]`` table per simulation: a ``label`` (its directory name), a ``group``
(one plot panel and one table per group) and the run-config keys that differ.
Every run is simulated once per seed, each as a real ``fedlora simulate`` in a
child process, into ``OUT/<label>/seed-<s>`` with its output in
``OUT/<label>/seed-<s>.log``. Then ``OUT/summary.csv``, ``OUT/summary.md``,
``OUT/accuracy_vs_round.png`` and ``OUT/accuracy_vs_uplink.png`` are written.

Running the same command again continues a comparison, so hours of finished
work are never redone: a finished run (one with ``summary.json``) is reused;
an unfinished one that was started with this comparison's settings goes on
after its last checkpointed round (``fedlora simulate --resume``, its log
appended to); any other unfinished one (other settings, no ``config.json``, a
resume refused for a corrupt checkpoint) is removed and run from round 1.

SIGINT or SIGTERM stops the comparison the way it stops ``fedlora
simulate``: the signal is passed on to the running child, which saves where
it is, stops Ray and exits (killed with its processes if it takes more than
``CHILD_STOP_S``); then no further run starts, no summary is written, one line
says how to continue and the exit code is 128 + the signal's number (130,
143). The signal is always passed on, also when a terminal's Ctrl-C has
already reached the child through the process group: a second signal only
makes the child skip the grace its round loop gets, and a ``kill`` aimed at
``fedlora compare`` alone must reach the child too.

Seeds: ``--seeds 3`` means seeds 1, 2, 3 and ``--seeds 1,5,9`` exactly those.
Without ``--seeds`` the comparison runs one seed: ``[base]``'s ``seed`` key if
it has one, else seed 1. A ``seed`` key together with ``--seeds`` (or in a
``[[run]]`` table at all) is an error: every run gets the same seeds.

``summary.csv`` has one row per run; ``seeds`` is the number of seeds (the
seeds themselves are in ``seed_list``, e.g. ``1;2;3``). ``*_mean`` is the mean
over seeds and ``*_ci95`` the half-width of the Student-t 95% interval of that
mean; an empty cell means "not applicable" (a ci95 of one seed, ε without DP).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomllib

from fedlora.commands.report import (
    PLOTS,
    Curve,
    accuracy_points,
    read_run,
    render_plots,
    shared_metric,
    short_name,
    write_atomically,
)
from fedlora.core.config import ConfigError
from fedlora.core.metric import ACCURACY, Metric
from fedlora.runtime.stopping import end_processes

COLUMNS = ("group", "run", "seeds", "final_accuracy_mean", "final_accuracy_ci95",
           "best_accuracy_mean", "uplink_mb", "downlink_mb", "seconds_per_round_mean",
           "best_accuracy_ci95", "final_accuracy_min", "final_accuracy_max",
           "agg_residual_mean", "epsilon_mean", "client_accuracy_mean",
           "client_accuracy_ci95", "seed_list")
OUTPUTS = ("summary.csv", "summary.md", *PLOTS)
SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_STOP_S = 15.0  # how long a signalled child gets (it needs a few seconds) before SIGKILL
REFUSED = 2  # the exit code of a refused ``fedlora simulate --resume``


class RunFailed(RuntimeError):
    """A child simulation exited non-zero; the message is one line."""


class CompareInterrupted(Exception):
    """SIGINT or SIGTERM arrived while a child ran; it has exited."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Run:
    """One ``[[run]]`` table: its label, group and full overrides (base + run,
    local paths absolute, no seed)."""

    label: str
    group: str
    overrides: dict[str, Any]

    def settings(self, seed: int) -> dict[str, Any]:
        return {**self.overrides, "seed": seed}


# --- statistics ---------------------------------------------------------------

def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the Student-t 95% interval of the mean): with a
    handful of seeds a normal 1.96 would claim too much. NaN where undefined
    (no values; one value has no spread)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan
    from scipy.stats import t

    return mean, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


# --- the plan: everything checked before any run starts -----------------------

def parse_seeds(text: str | None) -> list[int] | None:
    """``"3"`` → [1, 2, 3]; ``"1,5,9"`` → [1, 5, 9]; None stays None (the
    TOML decides)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count N or a comma list of "
                          "positive integers") from None
    if any(n <= 0 for n in numbers):
        raise ConfigError(f"--seeds {text!r}: seeds must be positive integers")
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice")
    return list(range(1, numbers[0] + 1)) if len(parts) == 1 else numbers


def _read_comparison(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"comparison file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"comparison file {path}: cannot be read ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"comparison file {path}: not valid TOML ({err})") from None


def _check_run_table(number: int, table: Any, seen: set[str]) -> tuple[str, str]:
    """The (label, group) of the ``number``-th [[run]] table, or a ConfigError."""
    if not isinstance(table, dict):
        raise ConfigError(f"[[run]] number {number}: not a table")
    label, group = table.get("label"), table.get("group")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"[[run]] number {number}: needs a label (a string)")
    if not SAFE_LABEL.fullmatch(label):
        raise ConfigError(f"run '{label}': the label must be a plain directory name "
                          "(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
    if label in seen:
        raise ConfigError(f"run '{label}': the label is used twice")
    if not isinstance(group, str) or not group:
        raise ConfigError(f"run '{label}': needs a group (a string)")
    if "seed" in table:
        raise ConfigError(f"run '{label}': has a 'seed' key; give the seeds with --seeds "
                          "(every run gets the same ones)")
    if "out-dir" in table:
        raise ConfigError(f"run '{label}': has an 'out-dir' key; the comparison places "
                          "each run under --out itself")
    return label, group


def load_plan(path: str | Path, seeds_text: str | None) -> tuple[list[Run], list[int]]:
    """Read and check the whole comparison, every run at every seed resolved
    as ``fedlora simulate`` will resolve it, so that a typo in the last run
    fails before the first one starts."""
    from fedlora.commands.prepare import absolute_paths
    from fedlora.strategies import resolve

    seeds = parse_seeds(seeds_text)
    data = _read_comparison(Path(path))
    unknown = sorted(set(data) - {"base", "run"})
    if unknown:
        raise ConfigError(f"comparison file {path}: unknown table '{unknown[0]}' "
                          "(expected [base] and [[run]])")
    base = data.get("base", {})
    tables = data.get("run")
    if not isinstance(base, dict):
        raise ConfigError(f"comparison file {path}: 'base' must be a table")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"comparison file {path}: no [[run]] tables")
    if "out-dir" in base:
        raise ConfigError("[base] has an 'out-dir' key; the comparison places each run "
                          "under --out itself")
    if "seed" in base and seeds is not None:
        raise ConfigError(f"[base] has 'seed = {base['seed']!r}' and --seeds is given; "
                          "remove one of them")
    if "seed" in base and (not isinstance(base["seed"], int) or isinstance(base["seed"], bool)):
        raise ConfigError(f"[base] seed: expected an integer, got {base['seed']!r}")
    if seeds is None:
        seeds = [base["seed"]] if "seed" in base else [1]
    base = {k: v for k, v in base.items() if k != "seed"}

    runs: list[Run] = []
    for number, table in enumerate(tables, start=1):
        label, group = _check_run_table(number, table, {r.label for r in runs})
        own = {k: v for k, v in table.items() if k not in ("label", "group")}
        run = Run(label, group, absolute_paths({**base, **own}))
        for seed in seeds:
            try:
                resolve(run.settings(seed))
            except ConfigError as err:
                raise ConfigError(f"run '{label}': {err}") from None
        runs.append(run)
    return runs, seeds


# --- running ------------------------------------------------------------------

def run_dir(out: Path, run: Run, seed: int) -> Path:
    return out / run.label / f"seed-{seed}"


def _toml_literal(value: Any) -> str:
    """A value as ``--set`` reads it back (a TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def simulate_command(settings: dict[str, Any], out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fedlora", "simulate", "--set",
            *[f"{k}={_toml_literal(v)}" for k, v in settings.items()], "--out", str(out_dir)]


def resume_command(directory: Path) -> list[str]:
    return [sys.executable, "-m", "fedlora", "simulate", "--resume", str(directory)]


class _Forward:
    """The SIGINT/SIGTERM handler while a child runs: remembers the first
    signal and passes each one on to the child. The child's processes are
    listed at the first one, so that those it leaves behind can be killed."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self.tree: list[psutil.Process] = []

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self.child is not None:
            self.send(signum)

    def send(self, signum: int) -> None:
        if not self.tree:
            self.tree = _tree(self.child.pid)
        self.child.send_signal(signum)  # a no-op once it has exited

    def kill(self) -> None:
        """The child took too long: kill it and every process of its tree."""
        end_processes(list({*self.tree, *_tree(self.child.pid)}))


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (empty once it is gone)."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def run_child(command: list[str], log: Path, append: bool = False) -> int:
    """Run one simulation with its output in ``log`` (a line per round would
    flood the terminal); returns its exit code, or raises
    ``CompareInterrupted`` once the child has exited if SIGINT or SIGTERM
    arrived meanwhile (see the module docstring)."""
    forward = _Forward()
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        with open(log, "a" if append else "w") as handle:
            forward.child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            if forward.signum is not None:  # it came while the child was starting
                forward.send(forward.signum)
            code = _wait(forward)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forward.signum is not None:
        raise CompareInterrupted(forward.signum)
    return code


def _wait(forward: _Forward) -> int:
    """The child's exit code; after a signal it gets ``CHILD_STOP_S`` to exit.
    (A plain ``wait()`` would go on waiting after the handler ran.)"""
    deadline = None
    while True:
        try:
            return forward.child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if forward.signum is None:
                continue
            deadline = deadline or time.monotonic() + CHILD_STOP_S
            if time.monotonic() > deadline:
                forward.kill()
                return forward.child.wait()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _difference(directory: Path, settings: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting the run in ``directory`` was started with otherwise
    than this comparison says: (key, its value, the comparison's), or None."""
    from fedlora.strategies import resolve

    saved = json.loads((directory / "config.json").read_text())
    wanted = resolve(settings)
    for key in settings:
        if saved.get(key) != wanted[key]:
            return key, saved.get(key), wanted[key]
    return None


def check_reusable(directory: Path, settings: dict[str, Any]) -> None:
    """A finished run is reused only if it ran with this comparison's
    settings: an edited TOML must not silently mix old and new results."""
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}: has summary.json but no config.json; remove it "
                          "or use another --out")
    difference = _difference(directory, settings)
    if difference is not None:
        key, saved, wanted = difference
        raise ConfigError(f"{directory}: finished with {key} = {saved!r}, but the "
                          f"comparison now says {wanted!r}; remove that directory or use "
                          "another --out")


def resumable(directory: Path, settings: dict[str, Any]) -> bool:
    """An unfinished run started with this comparison's settings; one with
    others (the TOML was edited since) is no part of this comparison."""
    try:
        return (directory / "config.json").is_file() and _difference(directory, settings) is None
    except (json.JSONDecodeError, UnicodeDecodeError):  # cut short while written
        return False


def simulate(run: Run, seed: int, out: Path) -> tuple[float, bool]:
    """One run to its end, resumed if it can be, else from round 1; returns
    (wall-clock seconds, resumed). A failed child leaves nothing that looks
    finished (a run that accepted no update writes summary.json and then
    exits 1)."""
    directory = run_dir(out, run, seed)
    settings = run.settings(seed)
    log = directory.parent / f"seed-{seed}.log"
    started = time.perf_counter()
    resumed = refused = False
    if resumable(directory, settings):
        code = run_child(resume_command(directory), log, append=True)
        refused = code == REFUSED  # a corrupt checkpoint, say: its line is in the log
        if refused:
            with open(log, "a") as handle:
                handle.write("fedlora compare: the resume was refused, so this run "
                             "starts again from round 1\n")
        resumed = not refused
    if not resumed:
        shutil.rmtree(directory, ignore_errors=True)  # unfinished, and not resumable
        directory.parent.mkdir(parents=True, exist_ok=True)
        code = run_child(simulate_command(settings, directory), log, append=refused)
    if code != 0 or not (directory / "summary.json").is_file():
        (directory / "summary.json").unlink(missing_ok=True)
        raise RunFailed(f"run '{run.label}' seed {seed} failed with exit code {code}: "
                        f"{_last_line(log)} (log: {log})")
    return time.perf_counter() - started, resumed


def run_all(runs: list[Run], seeds: list[int], out: Path) -> None:
    """Every run at every seed, reusing finished ones; one line per run."""
    total, done = len(runs) * len(seeds), 0
    for run in runs:
        for seed in seeds:
            done += 1
            directory = run_dir(out, run, seed)
            if (directory / "summary.json").is_file():
                check_reusable(directory, run.settings(seed))
                note = "reused"
            else:
                seconds, resumed = simulate(run, seed, out)
                note = ("resumed, " if resumed else "") + f"{seconds:.1f} s"
            summary = json.loads((directory / "summary.json").read_text())
            metric = Metric.of_summary(summary)
            final = summary[f"final_{metric.name}"]
            print(f"[{done}/{total}] {run.label} seed {seed}: final {short_name(metric)} "
                  f"{_pm(math.nan if final is None else final)} ({note})", flush=True)


# --- results ------------------------------------------------------------------

def _present(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _mean(values: list[Any]) -> float:
    return mean_ci95(_present(values))[0]


def _mean_residual(rows: list[dict[str, Any]]) -> float | None:
    """A seed's mean agg_residual over its rounds; None if it reports none
    (central DP, or the metric switched off)."""
    present = _present([row.get("agg_residual") for row in rows])
    return statistics.fmean(present) if present else None


def _final_client_accuracy(rows: list[dict[str, Any]], metric: Metric) -> float | None:
    """Federated evaluation's ``metric`` at the last round that has it."""
    for row in reversed(rows):
        for key in (f"personal_{metric.name}", f"fed_{metric.name}"):
            if row.get(key) is not None:
                return row[key]
    return None


def summarize(run: Run, results: dict[int, tuple[dict, list[dict]]],
              metric: Metric = ACCURACY) -> dict[str, Any]:
    """One CSV row: the run's per-seed numbers reduced to mean (and ci95);
    "accuracy" is the runs' primary ``metric``."""
    summaries = [summary for summary, _ in results.values()]
    final = _present([s[f"final_{metric.name}"] for s in summaries])
    final_mean, final_ci = mean_ci95(final)
    best_mean, best_ci = mean_ci95(_present([s[f"best_{metric.name}"] for s in summaries]))
    return {
        "group": run.group, "run": run.label, "seeds": len(results),
        "final_accuracy_mean": final_mean, "final_accuracy_ci95": final_ci,
        "best_accuracy_mean": best_mean,
        "uplink_mb": _mean([s["uplink_bytes"] / 1e6 for s in summaries]),
        "downlink_mb": _mean([s["downlink_bytes"] / 1e6 for s in summaries]),
        "seconds_per_round_mean": _mean([s["seconds"] / s["rounds"] for s in summaries]),
        "best_accuracy_ci95": best_ci,
        "final_accuracy_min": min(final, default=math.nan),
        "final_accuracy_max": max(final, default=math.nan),
        "agg_residual_mean": _mean([_mean_residual(rows) for _, rows in results.values()]),
        "epsilon_mean": _mean([s.get("epsilon") for s in summaries]),
        **dict(zip(("client_accuracy_mean", "client_accuracy_ci95"), mean_ci95(
            _present([_final_client_accuracy(rows, metric)
                      for _, rows in results.values()])))),
        "seed_list": ";".join(str(seed) for seed in results),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".6g")
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path, metric: Metric = ACCURACY) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([c.replace("accuracy", metric.name) for c in COLUMNS])
        writer.writerows([[_cell(row[c]) for c in COLUMNS] for row in rows])


def _pm(mean: float, ci: float = math.nan, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")


def markdown(rows: list[dict[str, Any]], seeds: list[int], metric: Metric = ACCURACY) -> str:
    """One table per group; the primary metric as mean ± ci95 over the seeds."""
    short = short_name(metric)
    lines = [f"Mean ± 95% CI half-width (Student t) over seeds "
             f"{', '.join(map(str, seeds))}. \"client {short}\": federated evaluation, each "
             "client on its own held-out slice (personal models for fedsa)."]
    for group in dict.fromkeys(row["group"] for row in rows):
        lines += ["", f"## {group}", "",
                  f"| run | seeds | final {short} | best {short} | uplink MB | downlink MB | "
                  f"s/round | mean agg_residual | ε | client {short} |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (row for row in rows if row["group"] == group):
            lines.append(
                f"| {r['run']} | {r['seeds']} | "
                f"{_pm(r['final_accuracy_mean'], r['final_accuracy_ci95'])} | "
                f"{_pm(r['best_accuracy_mean'], r['best_accuracy_ci95'])} | "
                f"{_pm(r['uplink_mb'], digits=2)} | {_pm(r['downlink_mb'], digits=2)} | "
                f"{_pm(r['seconds_per_round_mean'], digits=1)} | "
                f"{_pm(r['agg_residual_mean'])} | {_pm(r['epsilon_mean'], digits=2)} | "
                f"{_pm(r['client_accuracy_mean'], r['client_accuracy_ci95'])} |")
    return "\n".join(lines) + "\n"


def curve(results: dict[int, tuple[dict, list[dict]]], axis: str, metric: Metric = ACCURACY
          ) -> tuple[list[float], list[float], list[float]]:
    """(x, mean ``metric``, ci95) at the rounds evaluated in every seed; x is the
    round or the mean cumulative uplink MB by then."""
    per_seed = [accuracy_points(rows, metric) for _, rows in results.values()]
    rounds = sorted(set.intersection(*(set(points) for points in per_seed)))
    xs, means, cis = [], [], []
    for round_ in rounds:
        mean, ci = mean_ci95([points[round_][1] for points in per_seed])
        xs.append(round_ if axis == "round" else
                  statistics.fmean(points[round_][0] for points in per_seed))
        means.append(mean)
        cis.append(ci)
    return xs, means, cis


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


def _stopped(signum: int, runs: list[Run], seeds: list[int], out: Path) -> int:
    """The one line an interrupted comparison ends with; its exit code."""
    finished = sum((run_dir(out, run, seed) / "summary.json").is_file()
                   for run in runs for seed in seeds)
    print(f"fedlora: compare stopped by {signal.Signals(signum).name}: {finished} of "
          f"{len(runs) * len(seeds)} runs finished in {out}; run the same command again "
          "to continue (an interrupted run resumes from its last round)",
          file=sys.stderr, flush=True)
    return 128 + signum


def compare(config_path: str | Path, seeds_text: str | None, out: str | Path) -> int:
    """The whole command: check the plan, run what is missing, summarise;
    returns the exit code. The comparison's own outputs are removed first and
    written only once every run has finished, so they never describe a partial
    comparison (nor does an interrupted one write them)."""
    runs, seeds = load_plan(config_path, seeds_text)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    print(f"comparing {len(runs)} runs × {len(seeds)} seeds "
          f"({', '.join(map(str, seeds))}) in {out}", flush=True)
    try:
        run_all(runs, seeds, out)
    except CompareInterrupted as stop:
        return _stopped(stop.signum, runs, seeds, out)
    except KeyboardInterrupt:  # Ctrl-C while no child ran
        return _stopped(signal.SIGINT, runs, seeds, out)
    print(write_outputs(runs, seeds, out), end="")
    written = [name for name in OUTPUTS if (out / name).is_file()]
    print(f"wrote {', '.join(written)} in {out}")
    return 0
