"""The outputs contract of a run directory.

``config.json`` (resolved config), ``metrics.jsonl`` (one object per round),
``adapter/`` (PEFT ``save_pretrained``, head included) and ``summary.json``.
Files are written to a temporary name and renamed, and ``summary.json`` is
written last: a directory without it is not a finished run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.fields import Round, Summary, client_fields
from fedlora.core.metric import ACCURACY, Metric


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """NaN/Inf become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_out_dir(path: str | Path) -> Path:
    """The run directory as an absolute path; refuse one that already holds files."""
    out = Path(path).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        hint = ("; it is an unfinished run: continue it with `fedlora simulate --resume "
                f"{out}`" if (out / "config.json").is_file()
                and not (out / "summary.json").is_file() else "")
        raise ConfigError(f"output directory {path}: exists and is not empty{hint}")
    return out


def prepare_out_dir(path: str | Path) -> Path:
    """Create the (empty) run directory."""
    out = check_out_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


class RunWriter:
    """Writes one run's outputs as the rounds go."""

    def __init__(self, out_dir: Path, config: RunConfig | None,
                 rounds: list[dict[str, Any]] | None = None) -> None:
        """A new run's writer (writes ``config``), or with ``config`` None a
        resumed one's, whose metrics.jsonl is rewritten to ``rounds``."""
        self.out_dir = out_dir
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        out_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            _atomic_write(out_dir / "config.json", config.to_json() + "\n")
        self._metrics = out_dir / "metrics.jsonl"
        _atomic_write(self._metrics, "".join(json.dumps(row) + "\n" for row in self.rounds))

    @classmethod
    def resume(cls, out_dir: Path, completed: int) -> RunWriter:
        """The writer of a run going on after round ``completed``: the rounds
        metrics.jsonl holds beyond it (written before a crash cut the round's
        checkpoint short, or a half-written last line) are dropped."""
        path = out_dir / "metrics.jsonl"
        rows = []
        for line in (path.read_text().splitlines() if path.is_file() else []):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line a crash cut short
                continue
            if isinstance(row, dict) and isinstance(row.get(Round.ROUND), int) \
                    and row[Round.ROUND] <= completed:
                rows.append(row)
        if [row[Round.ROUND] for row in rows] != list(range(1, completed + 1)):
            raise ConfigError(f"{path}: does not hold rounds 1..{completed} once each, "
                              "as its checkpoint says; the run cannot be resumed")
        return cls(out_dir, None, rows)

    def add_round(self, record: dict[str, Any],
                  metrics: tuple[str, ...] = Round.CLASSIFICATION) -> None:
        """Append a round's record; ``metrics``: the task's evaluation fields."""
        row = {key: _jsonable(record.get(key)) for key in Round.fixed(metrics)}
        row.update({k: _jsonable(v) for k, v in record.items() if k not in row})
        self.rounds.append(row)
        with self._metrics.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the round's checkpoint

    def save_adapter(self, peft_model) -> Path:
        """``save_pretrained`` into a temporary folder, then rename into place."""
        final = self.out_dir / "adapter"
        tmp = self.out_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def finish(self, extra: dict[str, Any], metrics: tuple[str, ...] = Round.CLASSIFICATION,
               primary: Metric = ACCURACY) -> dict[str, Any]:
        """Write summary.json (last, marking the run finished) and return it:
        the final value of each of the task's ``metrics``, and the best of
        its ``primary`` one."""
        name = primary.name
        evaluated = [r for r in self.rounds if r.get(name) is not None]
        final = evaluated[-1] if evaluated else {}
        client = next((final[k] for k in client_fields(name) if final.get(k) is not None), None)
        rounds = self.rounds

        def total(field: str) -> float:  # over every round (null counts as 0)
            return sum(r[field] or 0 for r in rounds)

        summary = {
            Summary.ROUNDS: len(rounds),
            Summary.FINAL_ROUND: final.get(Round.ROUND),
            **{Summary.final(metric): final.get(metric) for metric in metrics},
            Summary.best(name): primary.best(r[name] for r in evaluated),
            Summary.PRIMARY_METRIC: name,
            Summary.PRIMARY_DIRECTION: primary.direction,
            Summary.UPLINK_BYTES: total(Round.UPLINK_BYTES),
            Summary.DOWNLINK_BYTES: total(Round.DOWNLINK_BYTES),
            Summary.CLIENT_UPDATES: total(Round.CLIENTS),
            Summary.REJECTED_UPDATES: total(Round.REJECTED),
            Summary.SECONDS: total(Round.SECONDS),
            Summary.EPSILON: rounds[-1][Round.EPSILON] if rounds else None,
            Summary.final_client(name): client,
            **{k: _jsonable(v) for k, v in extra.items()},
        }
        _atomic_write(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
