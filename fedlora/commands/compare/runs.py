"""One run at one seed brought to its end: a finished one reused (if it ran
with this comparison's settings), an unfinished one resumed, any other run
afresh, each as a ``fedlora simulate`` child."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.commands.compare.child import run_child
from fedlora.commands.compare.plan import Run, run_dir
from fedlora.core.config import TRACKER_KEYS, ConfigError

REFUSED = 2  # the exit code of a refused ``fedlora simulate --resume``


class RunFailed(RuntimeError):
    """A child simulation exited non-zero; the message is one line."""


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


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _difference(directory: Path, settings: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting the run in ``directory`` was started with otherwise
    than this comparison says: (key, its value, the comparison's), or None.
    The tracker keys change no result: they are not compared."""
    from fedlora.strategies import resolve

    saved = json.loads((directory / "config.json").read_text())
    wanted = resolve(settings)
    for key in settings:
        if key not in TRACKER_KEYS and saved.get(key) != wanted[key]:
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
    settings = run.tracked(seed, out)
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
