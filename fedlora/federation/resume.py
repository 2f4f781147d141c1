"""Where a run starts: a fresh run directory, or an interrupted run's, after
its last checkpointed round.

``fedlora simulate --resume DIR`` and the run-config key ``resume-from``
(``flwr run`` on the server host) both end here (``start_run``). A resumed
run keeps its own config (``DIR/config.json``): ``fedlora simulate`` refuses a
``--set`` that would change it (``check_unchanged``); under ``flwr run``,
whose run config always carries every key, keys that differ from the saved
run are named in a warning and ignored. Only ``RESUME_FREE_KEYS`` may
differ: where the run (and its converted GGUF model) sits, how long a round
may wait, how often it is snapshotted and where it is logged (the tracker
keys) change no result.

A finished run (``summary.json``) has nothing to resume and is refused. A
run stopped before its first checkpoint starts again at round 1, as a new
attempt (``fedlora.node.client_state.Lineage``), so nothing its clients saved
is read.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedlora.core.config import TRACKER_KEYS, ConfigError, RunConfig
from fedlora.federation import checkpoint
from fedlora.federation.checkpoint import Checkpoint
from fedlora.federation.results import RunWriter, prepare_out_dir
from fedlora.node.client_state import Lineage
from fedlora.strategies import resolve

LOGGER = logging.getLogger(__name__)
RESUME_FREE_KEYS = ("out-dir", "resume-from", "round-timeout", "ray-address", "model-cache",
                    "save-every", *TRACKER_KEYS)
SUMMARY = "summary.json"


def new_token() -> str:
    """An id for a run or an attempt (not drawn from the seed: two runs with
    one seed must not share a node's state directory)."""
    return secrets.token_hex(8)


def saved_config(run_dir: Path) -> RunConfig:
    """The config an interrupted run was started with; refuses a directory
    that is not a run, or one that finished."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"resume {run_dir}: not a run directory (no config.json)")
    if (run_dir / SUMMARY).is_file():
        raise ConfigError(f"resume {run_dir}: the run finished ({SUMMARY} is there); "
                          "nothing to resume")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"resume {run_dir}: config.json is not JSON ({err})") from None
    return resolve({**saved, "out-dir": str(run_dir), "resume-from": str(run_dir)})


def changed_keys(saved: RunConfig, given: dict) -> list[str]:
    """The keys of ``given`` whose value would change the saved run."""
    return [key for key, value in given.items()
            if key not in RESUME_FREE_KEYS and saved.to_dict().get(key) != value]


def check_unchanged(saved: RunConfig, overrides: dict) -> None:
    """``fedlora simulate --resume`` with ``--set``: one line per refusal."""
    resolved = resolve({**saved.to_dict(), **overrides}).to_dict()
    for key in changed_keys(saved, {k: resolved[k] for k in overrides}):
        raise ConfigError(f"config key '{key}': a resumed run keeps its own value "
                          f"({saved[key]!r}, not {resolved[key]!r}); start a new run to "
                          "change it")


@dataclass
class Start:
    """What the round loop starts from."""

    config: RunConfig
    out_dir: Path
    writer: RunWriter
    run_id: str
    lineage: Lineage
    checkpoint: Checkpoint | None  # None: from round 1

    @property
    def completed(self) -> int:
        return self.checkpoint.round if self.checkpoint is not None else 0


def start_run(config: RunConfig, default_out: Path) -> Start:
    """A new run in ``out-dir`` (or ``default_out``), or, with
    ``resume-from``, the interrupted run there."""
    if not config.resume_from:
        out_dir = prepare_out_dir(config.out_dir or default_out)
        return Start(config, out_dir, RunWriter(out_dir, config), new_token(),
                     Lineage([(new_token(), 1)]), None)
    run_dir = Path(config.resume_from).expanduser().resolve()
    saved = saved_config(run_dir)
    ignored = changed_keys(saved, config.to_dict())
    if ignored:
        LOGGER.warning("resuming %s with its own config; ignored: %s", run_dir,
                       ", ".join(f"{k}={config[k]!r}" for k in ignored))
    saved = RunConfig({**saved.to_dict(), **{k: config[k] for k in RESUME_FREE_KEYS
                                            if k not in ("out-dir", "resume-from")}})
    last = checkpoint.load(run_dir)
    if last is None:
        LOGGER.warning("%s has no checkpoint (stopped in round 1): starting again", run_dir)
        return Start(saved, run_dir, RunWriter(run_dir, None), new_token(),
                     Lineage([(new_token(), 1)]), None)
    writer = RunWriter.resume(run_dir, last.round)
    lineage = Lineage.parse(last.lineage).resumed(last.round, new_token())
    LOGGER.info("resuming %s after round %d", run_dir, last.round)
    return Start(saved, run_dir, writer, last.run_id, lineage, last)
