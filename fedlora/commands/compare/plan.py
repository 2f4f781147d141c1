"""The comparison file, read and checked whole before any run starts: a typo
in the last ``[[run]]`` table fails before the first run does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fedlora.core.config import ConfigError, check_file_types, key_values

SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Run:
    """One ``[[run]]`` table: its label, group and full overrides (base + run,
    local paths absolute, no seed)."""

    label: str
    group: str
    overrides: dict[str, Any]

    def settings(self, seed: int) -> dict[str, Any]:
        return {**self.overrides, "seed": seed}

    def tracked(self, seed: int, out: Path) -> dict[str, Any]:
        """``settings`` with what the child logs its run under (see the
        package docstring): its tags always, so a later upload has them too
        (a comma, which would split the tag list, becomes ';')."""
        tags = {**key_values(self.overrides.get("tracker-tags", "")), "label": self.label,
                "group": self.group.replace(",", ";"), "seed": str(seed)}
        tracked = {**self.settings(seed),
                   "tracker-tags": ",".join(f"{k}={v}" for k, v in tags.items())}
        if self.overrides.get("tracker", "none") != "none" and not tracked.get("tracker-dir"):
            tracked["tracker-dir"] = str(out / "tracker")
        return tracked


def run_dir(out: Path, run: Run, seed: int) -> Path:
    """Where ``run`` at ``seed`` lives under the comparison's ``out``."""
    return out / run.label / f"seed-{seed}"


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
    from fedlora.federation import trackers
    from fedlora.strategies import resolve, strategy_keys

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
        check_file_types({**base, **own}, strategy_keys(),
                         f"comparison file {path}, run '{label}'")
        run = Run(label, group, absolute_paths({**base, **own}))
        for seed in seeds:
            try:
                trackers.check(resolve(run.settings(seed)))
            except ConfigError as err:
                raise ConfigError(f"run '{label}': {err}") from None
        runs.append(run)
    return runs, seeds
