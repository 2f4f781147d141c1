"""The whole command: check the plan, run what is missing, summarise; or,
stopped by a signal, say how to continue."""

from __future__ import annotations

import json
import math
import signal
import sys
import tempfile
from pathlib import Path

from fedlora.commands.compare.child import CompareInterrupted
from fedlora.commands.compare.output import OUTPUTS, plus_minus, write_outputs
from fedlora.commands.compare.plan import Run, load_plan, run_dir
from fedlora.commands.compare.runs import check_reusable, simulate
from fedlora.commands.report import short_name
from fedlora.core.config import ConfigError
from fedlora.core.fields import Summary
from fedlora.core.metric import Metric


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
            final = summary[Summary.final(metric.name)]
            print(f"[{done}/{total}] {run.label} seed {seed}: final {short_name(metric)} "
                  f"{plus_minus(math.nan if final is None else final)} ({note})", flush=True)


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
    try:  # a real try: os.access says yes to root everywhere
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out).cleanup()
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err})") from None
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
