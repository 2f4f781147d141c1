"""The contract every LoRA strategy implements, in two halves.

Server half (``LoraStrategy``): a Flower Message-API strategy (it subclasses
Flower's ``FedAvg`` for node sampling) that decides what each client
downloads and how uploads become the next global adapter. Client half
(``ClientHalf``): what a client starts from, which tensor kinds it trains and
what it uploads. Both halves of one strategy live in one module under
``fedlora/strategies/``; the client loop (client/app.py) and the round loop
(server/app.py) never change when a strategy is added.

Sampling: each round takes ``clients-per-round`` of the connected nodes, or
all of them when fewer are connected. The first round waits until
``clients-per-round`` nodes are connected (the federation forms, as with
Flower's sampler); later rounds wait only until ``min-clients`` are, so a node
that died does not stall the rest of the run (Flower's sampler would wait for
it forever). Which ones is a function of (seed, round) over positions in the
sorted node ids (``fedlora.seeding``), never of Flower's random node ids: the
message to the node at position p names partition p, and a simulated client
trains that partition, so the same seed asks the same data in every run.

Every payload goes through ``fedlora.codec``. Replies that fail to decode or
validate are rejected and logged per node ("reply from node N rejected: …")
and never aggregated; when fewer than ``min-clients`` remain the global adapter
stays as it was and the round says so in its metrics.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from threadpoolctl import threadpool_limits

from fedlora import codec
from fedlora.adapters import State
from fedlora.config import RunConfig
from fedlora.privacy import CentralPrivacy
from fedlora.seeding import sample_positions
from fedlora.strategies.sums import ClientUpdate, ClippedRoundSums, RoundSums

PAYLOAD = "payload"  # ArrayRecord key of the encoded adapter payload, both ways
CONFIG = "config"  # ConfigRecord key of the run config sent to clients
METRICS = "metrics"  # MetricRecord key of a client's training metrics
TASK = "task"  # ConfigRecord key of what one message asks of its node ("partition-id")
MAX_EXAMPLES = 2**31  # a client's claimed num-examples must be below this
LOGGER = logging.getLogger(__name__)
WAIT_FOR_NODES_S = 1.0  # how often the connected nodes are counted while too few are


def to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=np.float32))
                        for name, value in state.items()})


def from_arrayrecord(record: ArrayRecord) -> State:
    return {name: array.numpy() for name, array in record.items()}


class ClientHalf(ABC):
    """What a client does with the global adapter; one instance per message."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @abstractmethod
    def download_names(self, names: Iterable[str]) -> list[str]:
        """Which adapter tensors the server sends (a subset of ``names``)."""

    @abstractmethod
    def upload_names(self, names: Iterable[str]) -> list[str]:
        """Which adapter tensors the client sends back."""

    @abstractmethod
    def trains(self, kind: str) -> bool:
        """Whether tensors of ``kind`` (lora_A, lora_B, head) are trained."""

    def start_state(self, received: State, template: State) -> State:
        """The full adapter to train from; ``template`` is the adapter as built
        under the run seed (it fills in whatever is not sent)."""
        return {**template, **received}

    def upload(self, start: State, trained: State,
               memory: RecordDict) -> Mapping[str, np.ndarray | codec.SparseTensor]:
        """The tensors to send after local training. ``memory`` is the client's
        persistent state (Flower's ``context.state``): the same client gets it
        back in its next round, e.g. for error-feedback residuals."""
        return {name: trained[name] for name in self.upload_names(trained)}


class LoraStrategy(FedAvg, ABC):
    """Server half: Flower's FedAvg interface; sampling, payloads and
    aggregation here."""

    name: ClassVar[str]
    client_half: ClassVar[type[ClientHalf]]

    def __init__(self, config: RunConfig, initial_state: State) -> None:
        per_round = config["clients-per-round"]
        super().__init__(
            fraction_train=per_round / config["num-clients"], fraction_evaluate=0.0,
            min_train_nodes=config["min-clients"], min_evaluate_nodes=0,
            min_available_nodes=config["min-clients"],
        )
        self.config = config
        self.per_round = per_round
        self.min_replies = config["min-clients"]
        self._outbox: list[Message] = []  # this round's messages (ids given at push)
        self._formed = False  # clients-per-round nodes have been connected once
        self.roles = self.client_half(config)
        self.state: State = {k: v.copy() for k, v in initial_state.items()}
        self.sent: State = {}  # the full adapter clients started from this round
        self.download_shapes = {n: initial_state[n].shape
                                for n in self.roles.download_names(initial_state)}
        self.upload_shapes = {n: initial_state[n].shape
                              for n in self.roles.upload_names(initial_state)}
        self._downlink_bytes = 0
        self.epsilons: dict[int, float] = {}  # ε spent so far, by partition id (local DP)
        self.central = CentralPrivacy(config) if config["dp"] == "central" else None

    # -- what subclasses define ------------------------------------------------
    @abstractmethod
    def merge(self, sums: RoundSums) -> State:
        """The next global adapter from the round's sums over accepted updates
        (``self.state`` is the current one, ``self.sent`` what clients started
        from)."""

    needs_products: ClassVar[bool] = False  # merge reads RoundSums.ideal

    def download(self, state: State) -> tuple[State, bytes]:
        """(what clients start from, its encoding) for this round."""
        return state, codec.encode({n: state[n] for n in self.download_shapes})

    def client_factors(self, update: ClientUpdate) -> State:
        """The client's full adapter after training, as far as the server can
        tell: what it started from overwritten by what it sent."""
        return {**self.sent, **update.tensors}

    def upload_of(self, factors: State) -> State:
        """What a client whose adapter ended at ``factors`` would have uploaded
        (the inverse of ``client_factors``, for central DP)."""
        return {n: factors[n] for n in self.upload_shapes}

    def new_sums(self) -> RoundSums:
        """Empty round sums of the kind this run folds updates into."""
        if self.central is not None:
            return ClippedRoundSums(self.central, self.sent, self.upload_shapes, self.upload_of)
        return RoundSums(products=self.needs_products or self.config["agg-residual"])

    def sums(self, updates: Iterable[ClientUpdate]) -> RoundSums:
        """Fold ``updates`` into fresh round sums (one at a time)."""
        sums = self.new_sums()
        for update in updates:
            sums.add(update, self.client_factors(update))
        return sums

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state a checkpoint must keep (optimiser moments, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned."""

    def sample_nodes(self, server_round: int, grid: Grid) -> list[tuple[int, int]]:
        """(position, node id) of ``clients-per-round`` of the connected nodes
        (all when fewer are connected), once ``clients-per-round`` (first
        round) or ``min-clients`` (later rounds) are; positions index the
        sorted node ids and are drawn from (seed, round)."""
        key, needed = (("min-clients", self.min_replies) if self._formed
                       else ("clients-per-round", self.per_round))
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            LOGGER.warning("round %d: %d nodes connected, waiting for %s=%d",
                           server_round, len(nodes), key, needed)
            time.sleep(WAIT_FOR_NODES_S)
        self._formed = True
        if len(nodes) < self.per_round:
            LOGGER.warning("round %d: %d nodes connected, fewer than clients-per-round=%d; "
                           "sampling all of them", server_round, len(nodes), self.per_round)
        positions = sample_positions(self.config["seed"], server_round, len(nodes),
                                     min(self.per_round, len(nodes)))
        return [(position, nodes[position]) for position in positions]

    def node_of(self, reply: Message) -> int:
        """The node a reply is about. The SuperLink answers for a node that
        stopped responding, as node ``SUPERLINK_NODE_ID``; that node is found
        by the message the answer replies to."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox}
        return asked.get(reply.metadata.reply_to_message_id, SUPERLINK_NODE_ID)

    # -- Flower's Strategy interface --------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.state = from_arrayrecord(arrays)
        self.sent, blob = self.download(self.state)
        config["server-round"] = server_round
        payload = codec.to_record(blob)
        chosen = self.sample_nodes(server_round, grid)
        self._downlink_bytes = len(blob) * len(chosen)
        self._outbox = [
            Message(content=RecordDict({PAYLOAD: payload, CONFIG: config,
                                        TASK: ConfigRecord({"partition-id": position})}),
                    message_type=MessageType.TRAIN, dst_node_id=node)
            for position, node in chosen]
        return self._outbox

    def _note_privacy(self, server_round: int, message: Message) -> bool:
        """Record the ε a DP client reports; True when it declined to train."""
        if message.has_error():
            return False
        metrics = message.content.metric_records.get(METRICS)
        if metrics is None or "epsilon" not in metrics or "partition-id" not in metrics:
            return False
        self.epsilons[int(metrics["partition-id"])] = float(metrics["epsilon"])
        if not metrics.get("declined"):
            return False
        LOGGER.info("round %d: node %d declined: one more round would spend ε=%.3f, over "
                    "the budget", server_round, message.metadata.src_node_id,
                    float(metrics.get("epsilon-after-round", float("nan"))))
        return True

    @staticmethod
    def _payload(message: Message) -> bytes:
        """The reply's payload bytes; raises ``PayloadError`` when there are none."""
        if message.has_error():
            reason = message.error.reason.strip().splitlines()
            raise codec.PayloadError(f"client failed: {reason[-1] if reason else '?'}")
        records = message.content.array_records
        if PAYLOAD not in records:
            raise codec.PayloadError("reply has no payload record")
        return codec.from_record(records[PAYLOAD])

    def _decode(self, message: Message, blob: bytes) -> ClientUpdate:
        """Validate one reply; raises ``PayloadError`` with the reason."""
        metrics = message.content.metric_records.get(METRICS)
        weight = metrics.get("num-examples") if metrics is not None else None
        if (not isinstance(weight, (int, float)) or not math.isfinite(weight)
                or not 0 < weight < MAX_EXAMPLES):
            raise codec.PayloadError(f"bad or missing num-examples {weight!r}")
        tensors = codec.decode(blob, self.upload_shapes)
        return ClientUpdate(message.metadata.src_node_id, float(weight), tensors, metrics)

    def _accepted(self, server_round: int, replies: Iterable[Message],
                  counts: dict[str, float]) -> Iterator[ClientUpdate]:
        """The valid updates among ``replies``, one at a time; declined,
        failed and invalid replies are counted (and the latter two logged)."""
        for message in replies:
            started = time.perf_counter()
            if self._note_privacy(server_round, message):
                counts["declined"] += 1
                continue
            try:
                blob = self._payload(message)
                counts["uplink_bytes"] += len(blob)
                update = self._decode(message, blob)
            except codec.PayloadError as err:
                LOGGER.warning("round %d: reply from node %d rejected: %s", server_round,
                    self.node_of(message), err)
                counts["rejected"] += 1
                continue
            finally:
                counts["decode_s"] += time.perf_counter() - started
            yield update

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        """Fold the replies in as they come (``replies`` may be a generator
        that yields each as it arrives: see server/app.py), then merge.

        NumPy's BLAS runs single-threaded here: the matrices are small (rank-r
        factors, one module at a time), and OpenBLAS's spinning worker threads
        on cores the clients are using made a 384×8×384 product 200× slower
        (16 ms instead of 0.08 ms) in the 2-core simulations."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._aggregate(server_round, replies)

    def _fold(self, server_round: int, replies: Iterable[Message],
              counts: dict[str, float]) -> RoundSums:
        """The round's sums over the valid replies; an update too large to add
        exactly (``fedlora.exactsum``) is rejected like an invalid one."""
        sums = self.new_sums()
        for update in self._accepted(server_round, replies, counts):
            started = time.perf_counter()
            try:
                sums.add(update, self.client_factors(update))
            except OverflowError as err:
                LOGGER.warning("round %d: reply from node %d rejected: %s", server_round,
                               update.node_id, err)
                counts["rejected"] += 1
            sums.fold_s += time.perf_counter() - started
        return sums

    def _aggregate(self, server_round: int,
                   replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        counts = {"rejected": 0, "declined": 0, "uplink_bytes": 0, "decode_s": 0.0}
        sums = self._fold(server_round, replies, counts)
        started = time.perf_counter()
        decode_s = counts.pop("decode_s")
        metrics = MetricRecord({
            "clients": sums.count, **counts, "downlink_bytes": self._downlink_bytes,
            "train_loss": sums.loss / sums.weight if sums.count else float("nan"),
            "compute_s": sums.compute_s,
        })
        if self.epsilons:
            metrics["epsilon"] = max(self.epsilons.values())
        if sums.count < self.min_replies:
            LOGGER.warning("round %d: %d valid replies (< %d): global adapter unchanged",
                server_round, sums.count, self.min_replies)
            if self.central is not None:
                metrics["epsilon"] = self.central.epsilon()
            return None, metrics
        merged = self._checked_merge(server_round, sums)
        if self.central is not None:
            metrics["epsilon"] = self.central.epsilon()
        if merged is None:
            return None, metrics
        self.state = merged
        # decoding and folding happen while replies arrive; merging after the last
        metrics["aggregate_s"] = decode_s + sums.fold_s + time.perf_counter() - started
        if sums.products:
            metrics["agg_residual"] = sums.residual(self.state)
            # the same clients' factors averaged separately (FedIT): the baseline
            metrics["agg_residual_fedavg"] = sums.residual(sums.factor_mean())
        return to_arrayrecord(self.state), metrics

    def _checked_merge(self, server_round: int, sums: RoundSums) -> State | None:
        """``merge``, or None (logged, strategy state as before) when it fails
        numerically or gives a global that is not finite: a bad round leaves
        the global adapter unchanged instead of crashing or poisoning it."""
        before = self.state_dict()
        try:
            merged = self.merge(sums)
            problem = next((f"merged {name} is not finite" for name, value in merged.items()
                            if not np.all(np.isfinite(value))), None)
        except (ArithmeticError, np.linalg.LinAlgError) as err:
            problem = f"merge failed ({type(err).__name__}: {err})"
        if problem is None:
            return merged
        LOGGER.warning("round %d: %s: global adapter unchanged", server_round, problem)
        self.load_state_dict(before)
        return None

    def summary(self) -> None:
        LOGGER.info("fedlora strategy: %s", self.name)
        super().summary()
