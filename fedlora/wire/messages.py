"""The message schema between ServerApp and ClientApp, in one place.

A request (training or evaluation) carries four records:

* ``config``: the resolved run config plus the classes (``label-names``),
  onto which a deployed node maps its own data;
* ``task``: what this message asks of this node: round, partition, adapter
  rank, and the base-weight version the node reaches with ``base``;
* ``payload``: the adapter download (``fedlora.wire.codec``);
* ``base`` (only for strategies that change the base weights): the changes
  the node has not seen yet (``fedlora.wire.basedelta``).

A training reply carries ``payload`` (the upload) and ``metrics``; an
evaluation reply ``metrics`` only.

A cohort (``cohort-size`` > 1, simulation only) is several clients' training
requests in one message: the shared ``config``, a ``cohort`` record with the
number of clients C, and each client's ``task``, ``payload`` and ``base``
records under the name ``<record>.<i>`` (i = 0 … C−1, the cohort's order).
Its reply holds client i's ``metrics.<i>`` and ``payload.<i>`` as a single
reply holds them, or ``error.<i>`` with the reason that client failed.

The typed classes and functions below are the only code that reads or writes
these records: ``from_message`` turns a missing or mistyped field into a
``codec.PayloadError`` naming it, so the server logs and rejects a malformed
reply instead of crashing on it, and nothing a client claims is used before
it is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedlora.wire import codec

R = TypeVar("R", ConfigRecord, MetricRecord, ArrayRecord)
CONFIG = "config"
TASK = "task"
PAYLOAD = "payload"
BASE = "base"
METRICS = "metrics"
COHORT = "cohort"
ERROR = "error"
LABEL_NAMES = "label-names"  # in the config record: the run's classes
# also in the config record, for the client's state store (fedlora.node.client_state):
RUN_ID = "fedlora-run-id"  # the run's id, kept across a resume
LINEAGE = "fedlora-lineage"  # which server attempt ran which rounds (client_state.Lineage)
CLIENT_STORE = "fedlora-client-store"  # the run directory's client store (server's path)
STORE_REQUIRED = "fedlora-client-store-required"  # fedlora simulate: clients must use it
TRANSPORT = frozenset({LABEL_NAMES, RUN_ID, LINEAGE, CLIENT_STORE, STORE_REQUIRED})
MAX_EXAMPLES = 2**31  # a client's claimed example count must be below this
MAX_IDENTITY = 2**64  # a partition id, or a deployed node's Flower node id (8 random bytes)


def _number(metrics: MetricRecord, key: str, *, low: float = -math.inf,
            high: float = math.inf, default: float | None = None) -> float:
    """``metrics[key]`` as a finite float in [low, high), or PayloadError."""
    value = metrics.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not low <= value < high):
        raise codec.PayloadError(f"bad or missing {key} {value!r}")
    return float(value)


def _identity(metrics: MetricRecord) -> int:
    """The client's ``partition-id``: an exact integer (a node id would lose
    digits as a float)."""
    value = metrics.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_IDENTITY:
        raise codec.PayloadError(f"bad or missing partition-id {value!r}")
    return value


def member(name: str, index: int | None) -> str:
    """The name of a record of a message's client ``index`` (a cohort's), or
    ``name`` itself (``index`` None: a one-client message)."""
    return name if index is None else f"{name}.{index}"


def failure(reason: str) -> codec.PayloadError:
    """A failed client's reply, as the error the server rejects it with."""
    lines = reason.strip().splitlines()
    return codec.PayloadError(f"client failed: {lines[-1] if lines else '?'}")


def _record(content: RecordDict, name: str, kind: type[R]) -> R | None:
    """The record ``name`` of ``content`` if it is a ``kind``, else None. One
    lookup: flwr's ``config_records``-style views copy every record of the
    message on each access, which a cohort of C clients would pay C times."""
    record = content.get(name)
    return record if isinstance(record, kind) else None


def _reply_metrics(message: Message, index: int | None = None) -> MetricRecord:
    """A reply's metrics record (client ``index``'s in a cohort reply);
    ``PayloadError`` for a failed node or client (its error's last line) or
    a reply without one."""
    if message.has_error():
        raise failure(message.error.reason)
    error = _record(message.content, member(ERROR, index), ConfigRecord)
    if error is not None:
        raise failure(str(error.get("reason", "")))
    metrics = _record(message.content, member(METRICS, index), MetricRecord)
    if metrics is None:
        raise codec.PayloadError("reply has no metrics record")
    return metrics


@dataclass(frozen=True)
class Task:
    """What one message asks of its node."""

    server_round: int
    partition_id: int  # the partition a simulated node trains; position in the sorted nodes
    rank: int  # the adapter rank this node trains and uploads at
    base_version: int = 0  # base-weight changes the node holds after applying ``base``
    base_from: int = 0  # the version ``base`` starts from (0 with a dense catch-up)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"server-round": self.server_round,
                             "partition-id": self.partition_id, "rank": self.rank,
                             "base-version": self.base_version, "base-from": self.base_from})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Task:
        try:
            return cls(*(int(record[k]) for k in ("server-round", "partition-id", "rank",
                                                  "base-version", "base-from")))
        except (KeyError, TypeError, ValueError) as err:
            raise codec.PayloadError(f"bad task record ({err})") from None


@dataclass(frozen=True)
class Request:
    """A training or evaluation request to one node."""

    config: dict[str, Any]  # resolved run config, plus the TRANSPORT entries
    task: Task
    payload: bytes
    base: bytes | None = None

    def to_content(self, config_record: ConfigRecord | None = None) -> RecordDict:
        """The request's records; ``config_record`` lets a round share one
        record among its messages."""
        content = RecordDict({CONFIG: config_record or ConfigRecord(self.config),
                              TASK: self.task.to_record(),
                              PAYLOAD: codec.to_record(self.payload)})
        if self.base is not None:
            content[BASE] = codec.to_record(self.base)
        return content

    def to_message(self, node_id: int, message_type: str = MessageType.TRAIN,
                   config_record: ConfigRecord | None = None) -> Message:
        return Message(content=self.to_content(config_record), message_type=message_type,
                       dst_node_id=node_id)

    @classmethod
    def from_message(cls, message: Message) -> Request:
        return cls.from_content(message.content)

    @classmethod
    def from_content(cls, content: RecordDict, index: int | None = None) -> Request:
        """The request in ``content`` (client ``index``'s of a cohort)."""
        config = _record(content, CONFIG, ConfigRecord)
        task = _record(content, member(TASK, index), ConfigRecord)
        if config is None or task is None:
            raise codec.PayloadError("request lacks its config or task record")
        base = _record(content, member(BASE, index), ArrayRecord)
        return cls(dict(config), Task.from_record(task),
                   codec.from_record(_record(content, member(PAYLOAD, index), ArrayRecord)),
                   codec.from_record(base) if base is not None else None)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.config[LABEL_NAMES])

    def run_config(self) -> dict[str, Any]:
        """The run-config keys alone."""
        return {k: v for k, v in self.config.items() if k not in TRANSPORT}

    @property
    def run_id(self) -> str:
        return str(self.config.get(RUN_ID, ""))

    @property
    def lineage(self) -> str:
        return str(self.config.get(LINEAGE, ""))

    @property
    def client_store(self) -> str | None:
        """The run directory's client store, as the server sees it."""
        return self.config.get(CLIENT_STORE) or None

    @property
    def store_required(self) -> bool:
        """Whether clients must keep their state in ``client_store`` (simulation)."""
        return bool(self.config.get(STORE_REQUIRED, False))


@dataclass(frozen=True)
class TrainReply:
    """A node's answer to a training request: an update, or a DP decline."""

    partition_id: int
    num_examples: int = 0
    train_loss: float = 0.0
    steps: int = 0
    compute_seconds: float = 0.0
    payload: bytes | None = None  # None: declined (no update)
    base_version: int = 0  # the base-weight version the node trained on
    epsilon: float | None = None  # ε spent so far (local DP)
    epsilon_after_round: float | None = None  # set when declining

    @property
    def declined(self) -> bool:
        return self.payload is None

    def to_message(self, reply_to: Message) -> Message:
        return Message(content=self.to_content(), reply_to=reply_to)

    def to_content(self, content: RecordDict | None = None,
                   index: int | None = None) -> RecordDict:
        """This reply's records, added to ``content`` (as client ``index``'s
        of a cohort reply)."""
        content = RecordDict() if content is None else content
        metrics = MetricRecord({"partition-id": self.partition_id,
                                "base-version": self.base_version})
        if self.epsilon is not None:
            metrics["epsilon"] = self.epsilon
        content[member(METRICS, index)] = metrics
        if self.payload is None:
            metrics["declined"] = 1
            metrics["epsilon-after-round"] = self.epsilon_after_round or math.nan
        else:
            metrics.update({"num-examples": self.num_examples, "train-loss": self.train_loss,
                            "steps": self.steps, "compute-seconds": self.compute_seconds})
            content[member(PAYLOAD, index)] = codec.to_record(self.payload)
        return content

    @classmethod
    def from_message(cls, message: Message, index: int | None = None) -> TrainReply:
        """The typed reply (client ``index``'s of a cohort reply);
        ``PayloadError`` when the node or client failed or sent a malformed
        or implausible one."""
        metrics = _reply_metrics(message, index)
        partition = _identity(metrics)
        version = int(_number(metrics, "base-version", low=0, high=MAX_EXAMPLES, default=0))
        epsilon = (_number(metrics, "epsilon", low=0) if "epsilon" in metrics else None)
        if metrics.get("declined"):
            return cls(partition, base_version=version, epsilon=epsilon,
                       epsilon_after_round=float(metrics.get("epsilon-after-round",
                                                             math.nan)))
        payload = _record(message.content, member(PAYLOAD, index), ArrayRecord)
        if payload is None:
            raise codec.PayloadError("reply has no payload record")
        weight = _number(metrics, "num-examples", low=1, high=MAX_EXAMPLES)
        return cls(partition, int(weight) if weight.is_integer() else weight,
                   _number(metrics, "train-loss", low=0, default=0.0),
                   int(_number(metrics, "steps", low=0, high=MAX_EXAMPLES, default=0)),
                   _number(metrics, "compute-seconds", low=0, default=0.0),
                   codec.from_record(payload), version, epsilon)


@dataclass(frozen=True)
class EvaluateReply:
    """A node's metrics on its own held-out slice: accuracy and loss (for an
    instruction-tuning task, token accuracy and eval loss), and the task's
    primary metric where it is neither (``primary``: absent from the record
    otherwise, so a classification reply is what it always was)."""

    partition_id: int
    num_examples: int
    accuracy: float
    loss: float
    primary: float | None = None

    def to_message(self, reply_to: Message) -> Message:
        metrics = {"partition-id": self.partition_id, "num-examples": self.num_examples,
                   "accuracy": self.accuracy, "loss": self.loss}
        if self.primary is not None:
            metrics["primary"] = self.primary
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=reply_to)

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        metrics = _reply_metrics(message)
        return cls(_identity(metrics),
                   int(_number(metrics, "num-examples", low=1, high=MAX_EXAMPLES)),
                   _number(metrics, "accuracy", low=0, high=1 + 1e-9),
                   _number(metrics, "loss", low=0),
                   _number(metrics, "primary") if "primary" in metrics else None)

    def value(self, metric: str) -> float:
        """The reply's ``metric``: its primary one, or accuracy (a
        classification reply carries no separate primary metric)."""
        if self.primary is not None:
            return self.primary
        if metric != "accuracy":
            raise codec.PayloadError(f"no {metric} in the evaluation reply")
        return self.accuracy


def is_cohort(message: Message) -> bool:
    """Whether ``message`` is a cohort request (or a cohort's reply)."""
    return (not message.has_error()
            and _record(message.content, COHORT, ConfigRecord) is not None)


def cohort_message(requests: list[Request], node_id: int,
                   config_record: ConfigRecord) -> Message:
    """One training message carrying ``requests`` (a cohort's clients, in
    order, sharing ``config_record``), addressed to ``node_id``."""
    content = RecordDict({CONFIG: config_record,
                          COHORT: ConfigRecord({"size": len(requests)})})
    for index, request in enumerate(requests):
        for name, record in request.to_content(config_record).items():
            if name != CONFIG:
                content[member(name, index)] = record
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)


def cohort_size(message: Message) -> int:
    """How many clients a cohort request or reply carries."""
    record = _record(message.content, COHORT, ConfigRecord)
    value = record.get("size") if record is not None else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_EXAMPLES:
        raise codec.PayloadError(f"bad cohort size {value!r}")
    return value


def clients_in(message: Message) -> int:
    """How many clients ``message`` is for: a cohort's size, else 1 (what the
    progress line counts). A malformed size counts as 1 here; the server's
    intake rejects that reply's clients."""
    if not is_cohort(message):
        return 1
    try:
        return cohort_size(message)
    except codec.PayloadError:
        return 1


def cohort_requests(message: Message) -> list[Request]:
    """Each client's request in a cohort message, in the cohort's order."""
    return [Request.from_content(message.content, index)
            for index in range(cohort_size(message))]


def cohort_reply(reply_to: Message, replies: list[TrainReply | str]) -> Message:
    """A cohort's reply: client i's ``TrainReply``, or the reason it failed."""
    content = RecordDict({COHORT: ConfigRecord({"size": len(replies)})})
    for index, reply in enumerate(replies):
        if isinstance(reply, str):
            content[member(ERROR, index)] = ConfigRecord({"reason": reply})
        else:
            reply.to_content(content, index)
    return Message(content=content, reply_to=reply_to)
