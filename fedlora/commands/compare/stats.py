"""Each run's seeds reduced to means and Student-t 95% intervals: the rows of
summary.csv and the curves of the plots."""

from __future__ import annotations

import math
import statistics
from typing import Any

from fedlora.commands.compare.plan import Run
from fedlora.commands.report import accuracy_points
from fedlora.core.fields import Compared, Round, Summary, client_fields
from fedlora.core.metric import ACCURACY, Metric


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


def _present(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _mean(values: list[Any]) -> float:
    return mean_ci95(_present(values))[0]


def _mean_residual(rows: list[dict[str, Any]]) -> float | None:
    """A seed's mean agg_residual over its rounds; None if it reports none
    (central DP, or the metric switched off)."""
    present = _present([row.get(Round.AGG_RESIDUAL) for row in rows])
    return statistics.fmean(present) if present else None


def _final_client_accuracy(rows: list[dict[str, Any]], metric: Metric) -> float | None:
    """Federated evaluation's ``metric`` at the last round that has it."""
    for row in reversed(rows):
        for key in client_fields(metric.name):
            if row.get(key) is not None:
                return row[key]
    return None


def summarize(run: Run, results: dict[int, tuple[dict, list[dict]]],
              metric: Metric = ACCURACY) -> dict[str, Any]:
    """One CSV row: the run's per-seed numbers reduced to mean (and ci95);
    the ``*_accuracy_*`` columns hold the runs' primary ``metric``."""
    summaries = [summary for summary, _ in results.values()]
    final = _present([s[Summary.final(metric.name)] for s in summaries])
    final_mean, final_ci = mean_ci95(final)
    best_mean, best_ci = mean_ci95(_present([s[Summary.best(metric.name)] for s in summaries]))
    client_mean, client_ci = mean_ci95(
        _present([_final_client_accuracy(rows, metric) for _, rows in results.values()]))
    return {
        Compared.GROUP: run.group, Compared.RUN: run.label, Compared.SEEDS: len(results),
        Compared.FINAL_ACCURACY_MEAN: final_mean, Compared.FINAL_ACCURACY_CI95: final_ci,
        Compared.BEST_ACCURACY_MEAN: best_mean,
        Compared.UPLINK_MB: _mean([s[Summary.UPLINK_BYTES] / 1e6 for s in summaries]),
        Compared.DOWNLINK_MB: _mean([s[Summary.DOWNLINK_BYTES] / 1e6 for s in summaries]),
        Compared.SECONDS_PER_ROUND_MEAN: _mean([s[Summary.SECONDS] / s[Summary.ROUNDS]
                                                for s in summaries]),
        Compared.BEST_ACCURACY_CI95: best_ci,
        Compared.FINAL_ACCURACY_MIN: min(final, default=math.nan),
        Compared.FINAL_ACCURACY_MAX: max(final, default=math.nan),
        Compared.AGG_RESIDUAL_MEAN: _mean([_mean_residual(rows)
                                           for _, rows in results.values()]),
        Compared.EPSILON_MEAN: _mean([s.get(Summary.EPSILON) for s in summaries]),
        Compared.CLIENT_ACCURACY_MEAN: client_mean, Compared.CLIENT_ACCURACY_CI95: client_ci,
        Compared.SEED_LIST: ";".join(str(seed) for seed in results),
    }


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
