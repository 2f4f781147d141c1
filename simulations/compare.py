"""Run a set of simulations side by side and compare them.

A comparison file (TOML) holds the shared run config under ``[base]`` and one
``[[run]]`` table per simulation: a ``label``, a ``group`` (one plot panel per
group) and the run-config keys that differ. Each run is a ``fedlora
simulate`` into ``OUT/<label>`` (a finished run is reused and an unfinished
one restarted, so an interrupted comparison resumes); then ``OUT/table.md``,
``OUT/accuracy_vs_round.png`` and ``OUT/accuracy_vs_uplink.png`` are written.

    python simulations/compare.py simulations/strategies.toml --out runs/strategies
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib


def run(base: dict, spec: dict, out: Path) -> list[dict]:
    run_dir = out / spec["label"]
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
        overrides = {**base, **{k: v for k, v in spec.items() if k not in ("label", "group")}}
        command = [sys.executable, "-m", "fedlora.cli", "simulate", "--set",
                   *[f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                     for k, v in overrides.items()], "--out", str(run_dir)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def table(results: dict[str, tuple[dict, list[dict]]]) -> str:
    lines = ["| group | run | final acc | best acc | uplink MB | downlink MB | "
             "mean agg_residual | final ε | s/round |", "|---|---|---|---|---|---|---|---|---|"]
    for label, (spec, rows) in results.items():
        accuracy = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        residual = [r["agg_residual"] for r in rows if r.get("agg_residual") is not None]
        epsilon = rows[-1].get("epsilon")
        lines.append(
            f"| {spec['group']} | {label} | {accuracy[-1]:.4f} | {max(accuracy):.4f} | "
            f"{sum(r['uplink_bytes'] for r in rows) / 1e6:.2f} | "
            f"{sum(r['downlink_bytes'] for r in rows) / 1e6:.2f} | "
            f"{(sum(residual) / len(residual)) if residual else float('nan'):.4f} | "
            f"{'-' if epsilon is None else format(epsilon, '.2f')} | "
            f"{sum(r['seconds'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, tuple[dict, list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(spec["group"] for spec, _ in results.values()))
    for axis in ("round", "uplink"):
        fig, panels = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4),
                                   squeeze=False)
        for panel, group in zip(panels[0], groups):
            for label, (spec, rows) in results.items():
                if spec["group"] != group:
                    continue
                sent, xs, ys = 0.0, [], []
                for row in rows:
                    sent += row["uplink_bytes"] / 1e6
                    if row["accuracy"] is not None:
                        xs.append(row["round"] if axis == "round" else sent)
                        ys.append(row["accuracy"])
                panel.plot(xs, ys, marker="o", label=label)
            panel.set_title(group)
            panel.set_xlabel("round" if axis == "round" else "cumulative uplink MB (log)")
            if axis == "uplink":
                panel.set_xscale("log")
            panel.set_ylabel("test accuracy")
            panel.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"accuracy_vs_{axis}.png", dpi=100)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="TOML with [base] and [[run]] tables")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = tomllib.loads(args.comparison.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    results = {r["label"]: (r, run(spec["base"], r, args.out)) for r in spec["run"]}
    report = table(results)
    (args.out / "table.md").write_text(report + "\n")
    plot(results, args.out)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
