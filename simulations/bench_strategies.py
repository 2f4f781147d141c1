"""Compare the strategies side by side: accuracy, bytes and aggregation residual.

Runs ``fedlora simulate`` once per (strategy, Dirichlet α) from a shared TOML
config, then writes a Markdown table and two plots (accuracy vs round,
accuracy vs cumulative uplink MB) into the output directory.

    python simulations/bench_strategies.py --config simulations/strategies.toml \\
        --out runs/bench-strategies [--alphas 0.1 1.0] [--strategies fedavg ffa ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STRATEGY_KEYS = {"fedavg": [], "ffa": [], "lora-fair": [],
                 "cellm": ["cellm-up-density=0.05", "cellm-error-feedback=true"]}


def run_one(config: Path, out: Path, strategy: str, alpha: float) -> Path:
    run_dir = out / f"{strategy}-alpha{alpha}"
    if (run_dir / "summary.json").is_file():
        return run_dir  # finished earlier: reuse
    command = [sys.executable, "-m", "fedlora.cli", "simulate", "--config", str(config),
               "--set", f"strategy={strategy}", f"dirichlet-alpha={alpha}",
               *STRATEGY_KEYS[strategy], "--out", str(run_dir)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


def load_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def table(runs: dict[tuple[str, float], list[dict]]) -> str:
    lines = ["| α | strategy | final acc | best acc | uplink MB | downlink MB | "
             "mean agg_residual | s/round |", "|---|---|---|---|---|---|---|---|"]
    for (strategy, alpha), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        evaluated = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        residuals = [r["agg_residual"] for r in rows if r.get("agg_residual") is not None]
        lines.append(
            f"| {alpha} | {strategy} | {evaluated[-1]:.4f} | {max(evaluated):.4f} | "
            f"{sum(r['uplink_bytes'] for r in rows) / 1e6:.2f} | "
            f"{sum(r['downlink_bytes'] for r in rows) / 1e6:.2f} | "
            f"{sum(residuals) / len(residuals):.4f} | "
            f"{sum(r['seconds'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def plot(runs: dict[tuple[str, float], list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({alpha for _, alpha in runs})
    for kind in ("round", "uplink"):
        fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
        for ax, alpha in zip(axes[0], alphas):
            for (strategy, a), rows in sorted(runs.items()):
                if a != alpha:
                    continue
                cumulative, xs, ys = 0.0, [], []
                for row in rows:
                    cumulative += row["uplink_bytes"] / 1e6
                    if row["accuracy"] is not None:
                        xs.append(row["round"] if kind == "round" else cumulative)
                        ys.append(row["accuracy"])
                ax.plot(xs, ys, marker="o", label=strategy)
            ax.set_title(f"Dirichlet α = {alpha}")
            ax.set_xlabel("round" if kind == "round" else "cumulative uplink MB")
            if kind == "uplink":
                ax.set_xscale("log")
            ax.set_ylabel("test accuracy")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"accuracy_vs_{kind}.png", dpi=100)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("simulations/strategies.toml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_KEYS),
                        choices=list(STRATEGY_KEYS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for alpha in args.alphas:
        for strategy in args.strategies:
            runs[(strategy, alpha)] = load_rows(run_one(args.config, args.out, strategy, alpha))
    report = table(runs)
    (args.out / "table.md").write_text(report + "\n")
    plot(runs, args.out)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
