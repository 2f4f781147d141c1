"""The robustness benchmark's table, from a finished ``fedlora compare`` of
simulations/robustness.toml:

    python simulations/robustness_report.py runs/bench-robustness

For no attack and every attack, each robust mode's final accuracy (mean ± Student-t 95%
half-width over seeds), its gap to the clean run (no attack, no robust mode;
the same seeds), the attackers, clipped and rejected replies per round, and
whether the best robust mode meets the floor (within 5 points of clean).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

ATTACKS = ("scale", "sign-flip", "noise", "inflate-weight", "label-flip")
MODES = ("none", "norm-bound", "trimmed-mean", "median", "krum")
FLOOR = 0.05  # the best robust mode ends within 5 points of clean


def seeds_of(run: Path) -> dict[int, tuple[float, list[dict]]]:
    """Seed → (final accuracy, metrics rows) for every finished seed of a run."""
    out = {}
    for directory in sorted(run.glob("seed-*")):
        if not (directory / "summary.json").is_file():
            continue
        summary = json.loads((directory / "summary.json").read_text())
        rows = [json.loads(line) for line in
                (directory / "metrics.jsonl").read_text().splitlines()]
        out[int(directory.name.removeprefix("seed-"))] = (summary["final_accuracy"], rows)
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, half


def per_round(rows_by_seed: list[list[dict]], key: str) -> float:
    return statistics.fmean(row.get(key) or 0 for rows in rows_by_seed for row in rows)


def main(out: Path) -> int:
    clean = seeds_of(out / "clean")
    if not clean:
        print(f"{out}/clean: no finished seeds", file=sys.stderr)
        return 1
    clean_mean, clean_ci = mean_ci([acc for acc, _ in clean.values()])
    print(f"clean (no attack, robust=none): {clean_mean:.3f} ± {clean_ci:.3f} "
          f"over seeds {sorted(clean)}\n")
    print("| attack | robust | final acc (mean ± 95% CI) | Δ vs clean (paired, ± CI) "
          "| attackers/round | clipped/round | rejected/round |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for attack in ("no attack", *ATTACKS):
        best = None
        for mode in MODES:
            label = "clean" if attack == "no attack" else attack
            seeds = seeds_of(out / f"{label}-{mode}" if mode != "none" or label != "clean"
                             else out / "clean")
            if not seeds:
                print(f"| {attack} | {mode} | (not run) | | | | |")
                continue
            accuracy, ci = mean_ci([acc for acc, _ in seeds.values()])
            paired = [seeds[s][0] - clean[s][0] for s in seeds if s in clean]
            gap, gap_ci = mean_ci(paired)
            rows = [r for _, r in seeds.values()]
            print(f"| {attack} | {mode} | {accuracy:.3f} ± {ci:.3f} | {gap:+.3f} ± {gap_ci:.3f} "
                  f"| {per_round(rows, 'attackers'):.1f} | {per_round(rows, 'clipped'):.1f} "
                  f"| {per_round(rows, 'rejected'):.1f} |")
            if mode != "none" and (best is None or gap > best[1]):
                best = (mode, gap, len(seeds))
        if best is not None and attack != "no attack":
            verdicts.append(f"- {attack}: best robust mode {best[0]}, {best[1]:+.3f} vs clean "
                            f"({best[2]} seeds): "
                            f"{'meets' if best[1] >= -FLOOR else 'MISSES'} the floor")
    print("\n" + "\n".join(verdicts))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
