"""A client's persistent state on disk, so that it survives the process.

What a client keeps between rounds (its local-DP accountant history, CELLM's
error-feedback residual, FedSA's personal B and head, whatever a strategy's
client half puts in its memory) lives in a Flower ``RecordDict``: the
``context.state`` each message hands the client loop. Flower keeps that in
memory only (in the simulation process, or the SuperNode), so a crashed run
would lose it, and a resumed run would start every client afresh: wrong
results, and for DP an accountant that forgot what was spent.

``ClientStore`` gives that memory a home on disk, for every strategy at once:
before each message the client loop restores the memory from the store, and
after a training message saves it back. Where the store is (``store_for``):

1. the node config's ``state-dir``, when set: a deployed node's own disk,
   in a directory per run (``messages.RUN_ID``, kept across a resume);
2. else, for a client of the run's shared dataset (no ``data-path``: a
   simulation, or ``flwr run`` on one machine), the run directory's
   ``clients/``, which the server names in every message
   (``messages.CLIENT_STORE``), when this node can see it. A ``fedlora
   simulate`` requires it: on a multi-machine Ray cluster the run directory
   must be on storage every machine shares, and a worker that cannot see it
   fails the message with that reason. A node with its own ``data-path``
   never writes where a server says: that path is the server's word, and a
   deployed node trusts nothing it is sent;
3. else ``~/.fedlora/client-state``, per run.

Inside it, a client's directory is named by its data (``data-<hash of the
data-path>``: stable across a SuperNode restart, which changes the node's
Flower id, and distinct for nodes sharing a machine) or, for a client of the
run's shared dataset, by its partition (``partition-<p>``).

Consistency with the server's checkpoint (``fedlora.federation.checkpoint``): every
start of the server (the first, and each resume) is an *attempt* with its
own token, and the server sends the run's lineage in every message
(``messages.LINEAGE``, ``Lineage``): which attempt ran each committed round,
and the current attempt from the round it started at. What a client saves
in round r goes to ``state-r-<token>.pb``, and a saved state is valid only
if the attempt that wrote it is the one the lineage names for its round: a
state saved in a round a crash cut short is never read, and is deleted,
whichever nodes the resumed run samples. Training in round r starts from
the latest valid state saved *before* round r (round r's messages go out
only after round r − 1 was checkpointed). Every file is written to a
temporary name and renamed.

Not stored: records a server can always send again (``CACHE_RECORDS``: a
node's copy of the base-weight changes, ``fedlora.wire.basedelta``), which would
otherwise cost a d×k matrix per module per client on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from google.protobuf.message import DecodeError

from fedlora.wire.basedelta import DELTA_KEY, VERSION_KEY
from fedlora.wire.codec import PayloadError

CACHE_RECORDS = frozenset({VERSION_KEY, DELTA_KEY})
DEFAULT_STATE_DIR = "~/.fedlora/client-state"
_FILE = re.compile(r"^state-(\d+)-([0-9a-f]+)\.pb$")


class Lineage:
    """Which attempt ran each round: (token, first round) pairs in order, the
    last one the attempt running now. Sent as ``token:round,token:round``."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:
        self.entries = sorted(entries, key=lambda entry: entry[1])

    @classmethod
    def parse(cls, text: str) -> Lineage:
        try:
            entries = [(token, int(first)) for token, first in
                       (item.split(":") for item in text.split(",") if item)]
        except ValueError:
            raise PayloadError(f"bad lineage {text!r}") from None
        if not entries or any(not re.fullmatch(r"[0-9a-f]+", t) for t, _ in entries):
            raise PayloadError(f"bad lineage {text!r}")
        return cls(entries)

    def __str__(self) -> str:
        return ",".join(f"{token}:{first}" for token, first in self.entries)

    @property
    def current(self) -> str:
        return self.entries[-1][0]

    def owner(self, server_round: int) -> str | None:
        """The token of the attempt that ran ``server_round``."""
        owners = [token for token, first in self.entries if first <= server_round]
        return owners[-1] if owners else None

    def resumed(self, after: int, token: str) -> Lineage:
        """The lineage of a new attempt that goes on after round ``after``."""
        return Lineage([*(e for e in self.entries if e[1] <= after), (token, after + 1)])


def client_key(node_config: dict, partition: int) -> str:
    """A client's directory name (see the module docstring)."""
    data_path = node_config.get("data-path")
    if data_path:
        resolved = str(Path(str(data_path)).expanduser().resolve())
        return "data-" + hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return f"partition-{partition}"


def _records(memory: RecordDict) -> RecordDict:
    """The records of ``memory`` worth keeping (caches left out)."""
    return RecordDict({name: record for name, record in memory.items()
                       if name not in CACHE_RECORDS})


class ClientStore:
    """One client's saved states in ``directory``, read and written under
    the run's ``lineage``."""

    def __init__(self, directory: Path, lineage: Lineage) -> None:
        self.directory = directory
        self.lineage = lineage

    def _saved(self) -> list[tuple[int, str, Path]]:
        """(round, attempt token, file) of every state file here, by round."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if (match := _FILE.match(path.name)) is not None:
                found.append((int(match.group(1)), match.group(2), path))
        return sorted(found)

    def _valid(self, saved_round: int, token: str) -> bool:
        return self.lineage.owner(saved_round) == token

    def restore(self, memory: RecordDict, server_round: int, *, inclusive: bool) -> None:
        """Replace ``memory``'s kept records by the latest valid state saved
        before ``server_round`` (or in it, when ``inclusive``: evaluation
        after training). Caches stay as they are."""
        limit = server_round if inclusive else server_round - 1
        usable = [(r, path) for r, s, path in self._saved() if r <= limit and self._valid(r, s)]
        for name in [n for n in memory if n not in CACHE_RECORDS]:
            del memory[name]
        if not usable:
            return
        path = usable[-1][1]
        proto = RecordDictProto()
        try:
            proto.ParseFromString(path.read_bytes())
            loaded = recorddict_from_proto(proto)
        except (OSError, DecodeError, ValueError) as err:
            raise PayloadError(f"client state {path} cannot be read ({err}); "
                               "remove it to start this client afresh") from None
        for name, record in loaded.items():
            memory[name] = record

    def save(self, memory: RecordDict, server_round: int) -> None:
        """Keep ``memory`` as this client's state after ``server_round``, and
        delete what can no longer be read: states of a cut-short round, and
        older states than the latest one before this round. A client that
        keeps nothing (FedAvg without DP, say) writes nothing."""
        kept = _records(memory)
        if not len(kept) and not self._saved():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"state-{server_round}-{self.lineage.current}.pb"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(recorddict_to_proto(kept).SerializeToString())
        os.replace(tmp, self.directory / name)
        saved = self._saved()
        earlier = [(r, path) for r, s, path in saved
                   if r < server_round and self._valid(r, s)]
        keep = {self.directory / name, *(path for _, path in earlier[-1:])}
        for _, _, path in saved:
            if path not in keep:
                path.unlink(missing_ok=True)


def store_for(node_config: dict, run_store: str | None, required: bool, run_id: str,
              partition: int, lineage: Lineage) -> ClientStore:
    """This client's store: the node's ``state-dir``, else (a client of the
    shared dataset) the run directory's store ``run_store`` if visible here
    (``required``: it must be), else the default directory."""
    if not re.fullmatch(r"[0-9a-f]+", run_id):
        raise PayloadError(f"bad run id {run_id!r}")
    state_dir = node_config.get("state-dir")
    if state_dir:
        root = Path(str(state_dir)).expanduser() / run_id
    elif run_store and not node_config.get("data-path") and Path(run_store).is_dir():
        root = Path(run_store)
    elif required:
        raise PayloadError(f"client state store {run_store} is not visible on this "
                           "worker; on a Ray cluster the run directory must be on "
                           "storage every machine shares")
    else:
        root = Path(DEFAULT_STATE_DIR).expanduser() / run_id
    return ClientStore(root / client_key(node_config, partition), lineage)
