"""Same seed, same bytes, across a change: fingerprint a fixed set of runs.

A refactor must not change what a run computes. This runs the README's main
job and one short run of every built-in strategy (plus the research
features that touch the round: robust screening with attacks, local and
central DP, CELLM's error feedback and server Adam, heterogeneous ranks), then
writes, per run, the SHA-256 of the final adapter, of the base delta (where a
strategy changes the base) and of ``metrics.jsonl`` with its timing fields
left out (seconds are the only thing allowed to differ):

    python simulations/fingerprint.py --out runs/fp-before      # on main
    python simulations/fingerprint.py --out runs/fp-after       # on the change
    python simulations/fingerprint.py --diff runs/fp-before/fingerprints.json \
                                             runs/fp-after/fingerprints.json

``--only NAME ...`` runs a subset; ``--dataset`` points at AG News.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

SMALL = ["num-clients=4", "clients-per-round=2", "rounds=2", "local-steps=2",
         "batch-size=4", "max-seq-len=32", "eval-examples=64", "partition=dirichlet"]
RUNS: dict[str, list[str]] = {
    "readme-main-job": ["num-clients=20", "clients-per-round=5", "rounds=3",
                        "partition=dirichlet", "dirichlet-alpha=0.5"],
    "fedavg": SMALL + ["strategy=fedavg"],
    "ffa": SMALL + ["strategy=ffa"],
    "lora-fair": SMALL + ["strategy=lora-fair"],
    "cellm": SMALL + ["strategy=cellm", "cellm-error-feedback=true",
                      "cellm-server-optimizer=adam", "cellm-server-lr=0.001"],
    "fedsa": SMALL + ["strategy=fedsa"],
    "hetlora": SMALL + ["strategy=hetlora", "client-ranks=2,4,8,8"],
    "flexlora": SMALL + ["strategy=flexlora", "client-ranks=2,4,8,8"],
    "flora": SMALL + ["strategy=flora", "client-ranks=2,4,8,8"],
    "fedex": SMALL + ["strategy=fedex"],
    "fedavg-median-attack": SMALL + ["num-clients=5", "clients-per-round=5",
                                     "robust=median", "attack=scale",
                                     "attack-fraction=0.2"],
    "fedavg-normbound-noise": SMALL + ["clients-per-round=4", "robust=norm-bound",
                                       "attack=noise", "attack-fraction=0.25"],
    "fedavg-label-flip": SMALL + ["clients-per-round=4", "attack=label-flip",
                                  "attack-fraction=0.25"],
    "fedavg-dp-local": SMALL + ["dp=local", "dp-noise-multiplier=1.0",
                                "dp-seeded-noise=true"],
    "fedavg-dp-central": SMALL + ["dp=central", "dp-noise-multiplier=0.5",
                                  "dp-seeded-noise=true"],
}
TIMING = ("seconds", "wall_seconds")  # plus every field ending in _s


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING and not k.endswith("_s")}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def fingerprint(run_dir: Path) -> dict:
    """The bytes a run computed: adapter, base delta, untimed metrics."""
    rows = [_untimed(json.loads(line)) for line in
            (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"adapter": _sha(run_dir / "adapter" / "adapter_model.safetensors"),
            "base_delta": _sha(run_dir / "base_delta.safetensors"),
            "metrics": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
            "final": rows[-1] if rows else None}


def run_all(out: Path, dataset: str, only: list[str]) -> dict:
    results = {}
    for name, keys in RUNS.items():
        if only and name not in only:
            continue
        run_dir = out / name
        command = ["fedlora", "simulate", "--quiet", "--set", f"dataset={dataset}", *keys,
                   "--out", str(run_dir)]
        print(f"{name}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
        results[name] = fingerprint(run_dir)
    (out / "fingerprints.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def diff(before: Path, after: Path) -> int:
    """0 when every run both files hold has the same bytes; 1 otherwise."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differing = 0
    for name in sorted(set(a) & set(b)):
        same = all(a[name][k] == b[name][k] for k in ("adapter", "base_delta", "metrics"))
        differing += not same
        print(f"{name:24s} {'same bytes' if same else 'DIFFERENT'}")
    for name in sorted(set(a) ^ set(b)):
        print(f"{name:24s} only in {'the first' if name in a else 'the second'}")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dataset", default="../shared/data/ag_news")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.diff:
        return diff(*args.diff)
    if args.out is None:
        parser.error("--out DIR (or --diff BEFORE AFTER) is required")
    unknown = sorted(set(args.only) - set(RUNS))
    if unknown:
        print(f"fingerprint: unknown run {unknown[0]!r} (known: {', '.join(RUNS)})",
              file=sys.stderr)
        return 2
    if not Path(args.dataset).exists():
        print(f"fingerprint: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(args.out, str(Path(args.dataset).resolve()), args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
