"""The contract every LoRA strategy implements, in two halves.

Server half (``LoraStrategy``): a Flower Message-API strategy (it subclasses
Flower's ``FedAvg`` for its interface) that plans each sampled node's task
(partition, rank), decides what each node downloads, validates each reply
against what that node was asked, and turns the replies into the next global
adapter (and, for some strategies, a change to the frozen base weights).
Client half (``ClientHalf``): what a client starts from (seeing its
persistent memory), which tensor kinds it trains and what it uploads (and
keeps). Both halves of one strategy live in one module under
``fedlora/strategies/``; the client loop (``fedlora.node.client_loop``) and the
round loop (``fedlora.federation.loop``) never change when a strategy is added.
Messages are typed in ``fedlora.wire.messages``.

Sampling: each round takes ``clients-per-round`` of the connected nodes, or
all of them when fewer are connected. The first round waits until
``clients-per-round`` nodes are connected (the federation forms, as with
Flower's sampler); later rounds wait only until ``min-clients`` are, so a node
that died does not stall the rest of the run (Flower's sampler would wait for
it forever). Which ones is a function of (seed, round) over positions in the
sorted node ids (``fedlora.core.seeding``), never of Flower's random node ids: the
message to the node at position p names partition p, and a simulated client
trains that partition, so the same seed asks the same data in every run.

Every payload goes through ``fedlora.wire.codec``: downloads at
``payload-dtype-down``, uploads at ``payload-dtype-up``. What the server keeps
as sent (``sent``, each plan's start) is what the node decodes from the
bytes, not the unquantised adapter, so both judge a reply against the same
start. Replies that fail to decode or
validate are rejected and logged per node ("reply from node N rejected: …")
and never aggregated; when fewer than ``min-clients`` remain the global adapter
stays as it was and the round says so in its metrics.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from threadpoolctl import threadpool_limits

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.config import ConfigError, Key, RunConfig
from fedlora.core.seeding import sample_positions
from fedlora.federation.checkpoint import Checkpoint
from fedlora.learning.attacks import attackers
from fedlora.learning.privacy import CentralPrivacy
from fedlora.runtime.stopping import wait
from fedlora.strategies.ranks import check_client_ranks, pad, rank_of, shapes_at, truncate
from fedlora.strategies.robust import Candidate, RobustAggregation
from fedlora.strategies.sums import ClientUpdate, ClippedRoundSums, RoundSums
from fedlora.wire import codec
from fedlora.wire.basedelta import BaseLedger, Increment, base_weight_name
from fedlora.wire.messages import EvaluateReply, Request, Task, TrainReply

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

    def start_state(self, received: State, template: State, memory: RecordDict) -> State:
        """The full adapter to train (or evaluate) from. ``template`` is the
        adapter as built under the run seed at this client's rank (it fills
        in whatever is not sent); ``memory`` is the client's persistent state
        (Flower's ``context.state``), e.g. its personal tensors."""
        return {**template, **received}

    def upload(self, start: State, trained: State,
               memory: RecordDict) -> Mapping[str, np.ndarray | codec.SparseTensor]:
        """The tensors to send after local training; the client loop encodes
        them at ``payload-dtype-up`` (``codec.round_trip`` gives what the
        server will decode). ``memory`` is the client's persistent state: the
        same client gets it back in its next round, e.g. for error-feedback
        residuals or the tensors it keeps."""
        return {name: trained[name] for name in self.upload_names(trained)}


@dataclass(frozen=True)
class Plan:
    """What the server asked of one node this round."""

    node_id: int
    partition_id: int
    rank: int


class LoraStrategy(FedAvg, ABC):
    """Server half: Flower's FedAvg interface; sampling, per-node requests,
    reply validation and aggregation here.

    What a strategy declares (class attributes) and may override:

    * ``keys``: its own config keys (``fedlora keys`` lists them under it);
      ``check_config`` refuses combinations it cannot run, in one line.
    * ``rank_for(partition)``: each client's adapter rank (``heterogeneous_ranks``
      strategies take ``client-ranks``); ``download_for(plan)`` what a node
      starts from (by default ``download_at(rank)``, once per rank);
      ``client_factors`` a reply in global units.
    * ``new_sums``/``fold``: what replies fold into (``fold`` may choose a
      reply's aggregation weight); ``merge``: the next
      global adapter; ``base_change``: factors to fold into the frozen base
      weights (``fedlora.wire.basedelta``), which every node is then told about.
    * ``personal``: clients keep parts of the adapter, so each round that is
      evaluated ends with federated evaluation (``personal_accuracy``).
    """

    name: ClassVar[str]
    client_half: ClassVar[type[ClientHalf]]
    keys: ClassVar[Mapping[str, Key]] = {}
    needs_products: ClassVar[bool] = False  # merge reads RoundSums.ideal
    heterogeneous_ranks: ClassVar[bool] = False  # takes client-ranks
    personal: ClassVar[bool] = False  # clients keep personal tensors
    changes_base: ClassVar[bool] = False  # base_change may return an increment
    # central DP clips each client's change to what it was sent and noises the
    # average; a strategy whose merge reads more of the clients than that sets False
    central_dp: ClassVar[bool] = True
    # called as each reply is rejected (the round loop sets it: fedlora.runtime.progress)
    on_rejected: Callable[[], None] = staticmethod(lambda: None)

    @classmethod
    def check_config(cls, config: RunConfig) -> str | None:
        """One line saying why this strategy cannot run ``config``, or None."""
        if config["dp"] == "central" and not cls.central_dp:
            return (f"config key 'dp': central DP cannot cover strategy {cls.name} (its "
                    "server reads more of each client than the clipped change); use dp=local")
        if config["quantization"] != "none" and cls.changes_base:
            return (f"config key 'quantization': strategy {cls.name} adds dense changes to "
                    "the base weights, which a quantised base cannot hold; use "
                    "quantization=none or a strategy that leaves the base alone")
        if cls.heterogeneous_ranks:
            return check_client_ranks(config)
        return None

    @classmethod
    def evaluation_prefix(cls, config: RunConfig) -> str | None:
        """The metric prefix of federated evaluation, None when there is none."""
        if cls.personal:
            return "personal"
        return "fed" if config["federated-eval"] else None

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
        self.global_rank = config["lora-rank"]
        self.scale = config["lora-alpha"] / config["lora-rank"]  # s of the global adapter
        self._outbox: list[Message] = []  # this round's messages (ids given at push)
        self._formed = False  # clients-per-round nodes have been connected once
        self.plans: dict[int, Plan] = {}  # this round's, by node id
        self.roles = self.client_half(config)
        self.state: State = {k: v.copy() for k, v in initial_state.items()}
        self.shapes = {n: tuple(v.shape) for n, v in initial_state.items()}
        self.sent: State = {}  # the full adapter global-rank clients started from this round
        self._sent_at: dict[int, tuple[State, bytes]] = {}  # by rank, this round
        self.upload_shapes = {n: self.shapes[n] for n in self.roles.upload_names(self.shapes)}
        self._downlink_bytes = 0
        self.epsilons: dict[int, float] = {}  # ε spent so far, by partition id (local DP)
        self.central = CentralPrivacy(config) if config["dp"] == "central" else None
        self.robust = RobustAggregation(config) if config["robust"] != "none" else None
        self.attackers = attackers(config)  # simulated malicious partitions (research)
        self.base = BaseLedger({
            base_weight_name(a): (self.shapes[b][0], self.shapes[a][1])
            for a, b in lora_pairs(list(self.shapes))}) if self.changes_base else None

    # -- what subclasses define ------------------------------------------------
    @abstractmethod
    def merge(self, sums: RoundSums) -> State:
        """The next global adapter from the round's sums over accepted updates
        (``self.state`` is the current one, ``self.sent`` what clients started
        from)."""

    def base_change(self, sums: RoundSums, merged: State) -> Increment | None:
        """Factors to add to the base weights after this round (module →
        (left, right), left @ right in nn.Linear's layout, scale included);
        None for strategies that leave the base alone."""
        return None

    def rank_for(self, partition_id: int) -> int:
        """The adapter rank partition ``partition_id`` trains at."""
        return rank_of(self.config, partition_id) if self.heterogeneous_ranks else self.global_rank

    def encode_download(self, tensors: Mapping[str, np.ndarray | codec.SparseTensor]
                        ) -> tuple[State, bytes]:
        """(what the node decodes, the bytes sent) for ``tensors`` at
        ``payload-dtype-down``: the decoded values are what the server keeps
        as sent, so that server and node agree on the start byte for byte."""
        return codec.round_trip(tensors, self.config["payload-dtype-down"])

    def download(self, state: State) -> tuple[State, bytes]:
        """(what global-rank clients start from, its encoding) for this round."""
        sent, blob = self.encode_download({n: state[n]
                                           for n in self.roles.download_names(state)})
        return {**state, **sent}, blob

    def download_at(self, rank: int) -> tuple[State, bytes]:
        """(the full adapter a client of ``rank`` starts from, in its units;
        the encoding of what is sent): the first ``rank`` ranks of ``self.sent``."""
        start = truncate(self.sent, rank, self.global_rank)
        sent, blob = self.encode_download({n: start[n]
                                           for n in self.roles.download_names(start)})
        return {**start, **sent}, blob

    def download_for(self, plan: Plan) -> tuple[State, bytes]:
        """(the full adapter ``plan``'s node starts from, in its units; the
        encoding of what is sent to it). By default one per rank, encoded
        once per round; a strategy that sends nodes their own content
        overrides this."""
        if plan.rank not in self._sent_at:
            self._sent_at[plan.rank] = self.download_at(plan.rank)
        return self._sent_at[plan.rank]

    def client_factors(self, update: ClientUpdate) -> State:
        """The client's full adapter after training, as far as the server can
        tell, in global units: what it started from overwritten by what it sent."""
        plan = self.plans.get(update.node_id)
        start = self.download_for(plan)[0] if plan is not None else self.sent
        return pad({**start, **update.tensors}, update.rank, self.global_rank)

    def upload_of(self, factors: State) -> State:
        """What a client whose adapter ended at ``factors`` would have uploaded
        (the inverse of ``client_factors``, for central DP)."""
        return {n: factors[n] for n in self.upload_shapes}

    def new_sums(self) -> RoundSums:
        """Empty round sums of the kind this run folds updates into."""
        if self.central is not None:
            return ClippedRoundSums(self.central, self.sent, self.upload_shapes, self.upload_of)
        return RoundSums(products=self.needs_products or self.config["agg-residual"])

    def in_global_units(self, update: ClientUpdate) -> tuple[ClientUpdate, State]:
        """(the update with its tensors at the global rank, the client's full
        factors): a reply of another rank, padded (``ranks.pad``)."""
        factors = self.client_factors(update)
        if update.rank != self.global_rank:
            update = replace(update, tensors={n: factors[n] for n in update.tensors})
        return update, factors

    def add_update(self, sums: RoundSums, update: ClientUpdate) -> None:
        """Fold one accepted update into ``sums``."""
        self.fold(sums, *self.in_global_units(update))

    def fold(self, sums: RoundSums, update: ClientUpdate, factors: State) -> None:
        """Fold one update already in global units (with the client's full
        factors) into ``sums``, weighted by its examples."""
        sums.add(update, factors)

    def rebuild(self, update: ClientUpdate, factors: State) -> Candidate:
        """An update in global units whose client ended at ``factors`` (a
        robust mode's changed factors): its upload made consistent with them."""
        return Candidate(replace(update, tensors=self.upload_of(factors)), factors)

    def sums(self, updates: Iterable[ClientUpdate]) -> RoundSums:
        """Fold ``updates`` into fresh round sums (one at a time)."""
        sums = self.new_sums()
        for update in updates:
            self.add_update(sums, update)
        return sums

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state a checkpoint must keep (optimiser moments, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned."""

    def checkpoint(self, completed: int, run_id: str, lineage: str,
                   wall_seconds: float) -> Checkpoint:
        """Everything the server half needs to go on after round ``completed``
        (``fedlora.federation.checkpoint`` says what is left out, and why)."""
        return Checkpoint(
            completed, run_id, lineage, {n: v.copy() for n, v in self.state.items()},
            self.state_dict(), list(self.base.log) if self.base is not None else [],
            dict(self.epsilons),
            list(self.central.accountant.history) if self.central is not None else [],
            wall_seconds)

    def restore(self, saved: Checkpoint) -> None:
        """Go on from ``saved``: the global adapter, the strategy's state,
        the base changes (replayed: the same float32 sums in the same order),
        the ε clients reported and the central accountant's releases."""
        shapes = {n: tuple(v.shape) for n, v in saved.adapter.items()}
        if shapes != self.shapes or not all(np.all(np.isfinite(v))
                                            for v in saved.adapter.values()):
            raise ConfigError(f"checkpoint of round {saved.round}: its adapter does not "
                              "fit this run's model (other tensors or shapes, or values "
                              "not finite)")
        self.state = {n: v.astype(np.float32) for n, v in saved.adapter.items()}
        self.load_state_dict(saved.strategy)
        if saved.base_log and self.base is None:
            raise ConfigError(f"checkpoint of round {saved.round}: base changes, but "
                              f"strategy {self.name} changes no base")
        for increment in saved.base_log:
            self.base.apply(increment)
        self.epsilons = dict(saved.epsilons)
        if self.central is not None:
            self.central.accountant.history = list(saved.central_history)
        self._formed = saved.round > 0

    # -- sampling and requests --------------------------------------------------
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
            wait(WAIT_FOR_NODES_S)
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

    def _requests(self, server_round: int, config: ConfigRecord,
                  message_type: str) -> list[Message]:
        """One message per planned node: its rank's download and the base
        changes it has not seen. Downloads are encoded once per rank."""
        self._sent_at = {self.global_rank: self.download(self.state)}
        self.sent = self._sent_at[self.global_rank][0]
        messages, self._downlink_bytes = [], 0
        for plan in self.plans.values():
            _, payload = self.download_for(plan)
            since, base = (self.base.update_for(plan.node_id) if self.base is not None
                           else (0, None))
            task = Task(server_round, plan.partition_id, plan.rank,
                        self.base.version if self.base is not None else 0, since)
            request = Request({}, task, payload, base)
            self._downlink_bytes += len(request.payload) + len(base or b"")
            messages.append(request.to_message(plan.node_id, message_type, config))
        return messages

    # -- Flower's Strategy interface --------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.state = from_arrayrecord(arrays)
        self.plans = {node: Plan(node, position, self.rank_for(position))
                      for position, node in self.sample_nodes(server_round, grid)}
        self._outbox = self._requests(server_round, config, MessageType.TRAIN)
        return self._outbox

    def evaluation_requests(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """Federated evaluation: the round's nodes, each asked to evaluate the
        new global adapter (with its personal tensors) on its held-out slice."""
        self._outbox = self._requests(server_round, config, MessageType.EVALUATE)
        return self._outbox

    def aggregate_evaluation(self, server_round: int, replies: Iterable[Message],
                             prefix: str, metric: str = "accuracy") -> MetricRecord:
        """Example-weighted mean of the task's primary ``metric`` and of the
        loss over the valid evaluation replies, the spread of the metric
        across clients (weighted standard deviation) and how many answered;
        invalid ones are logged, not counted."""
        results = []
        for message in replies:
            try:
                reply = EvaluateReply.from_message(message)
                results.append((reply, reply.value(metric)))
            except codec.PayloadError as err:
                LOGGER.warning("round %d: evaluation reply from node %d rejected: %s",
                               server_round, self.node_of(message), err)
        metrics = MetricRecord({f"{prefix}_clients": len(results)})
        if results:
            total = sum(r.num_examples for r, _ in results)
            mean = sum(r.num_examples * value for r, value in results) / total
            spread = sum(r.num_examples * (value - mean) ** 2 for r, value in results) / total
            metrics[f"{prefix}_{metric}"] = mean
            metrics[f"{prefix}_{metric}_sd"] = math.sqrt(spread)
            metrics[f"{prefix}_loss"] = sum(r.num_examples * r.loss for r, _ in results) / total
        return metrics

    # -- replies ----------------------------------------------------------------
    def _note_privacy(self, server_round: int, node: int, reply: TrainReply) -> None:
        """Record the ε a DP client reports (and its decline)."""
        if reply.epsilon is not None:
            self.epsilons[reply.partition_id] = reply.epsilon
        if reply.declined:
            LOGGER.info("round %d: node %d declined: one more round would spend ε=%.3f, "
                        "over the budget", server_round, node,
                        reply.epsilon_after_round or float("nan"))

    def _reply(self, node: int, message: Message) -> TrainReply:
        """The typed reply; for a strategy that changes the base, one that
        trained on another base version than the one sent is refused, and a
        failed node is sent every change again next time (it may have lost
        what it held)."""
        try:
            reply = TrainReply.from_message(message)
            if self.base is not None and reply.base_version != self.base.version:
                raise codec.PayloadError(f"trained on base version {reply.base_version}, "
                                         f"not {self.base.version}")
        except codec.PayloadError:
            if self.base is not None:
                self.base.forget(node)
            raise
        if self.base is not None:
            self.base.acknowledge(node, reply.base_version)
        return reply

    def _decode(self, plan: Plan, reply: TrainReply) -> ClientUpdate:
        """Validate one reply against what its node was asked; raises
        ``PayloadError`` with the reason."""
        tensors = codec.decode(reply.payload, shapes_at(self.upload_shapes, plan.rank),
                               self.config["payload-dtype-up"])
        return ClientUpdate(plan.node_id, plan.partition_id, plan.rank,
                            float(reply.num_examples), tensors, reply.train_loss,
                            reply.compute_seconds)

    def _accepted(self, server_round: int, replies: Iterable[Message],
                  counts: dict[str, float]) -> Iterator[ClientUpdate]:
        """The valid updates among ``replies``, one at a time; declined,
        failed and invalid replies are counted (and the latter two logged)."""
        for message in replies:
            started = time.perf_counter()
            node = self.node_of(message)
            try:
                plan = self.plans.get(node)
                if plan is None:
                    raise codec.PayloadError("no training request was sent to this node")
                reply = self._reply(node, message)
                self._note_privacy(server_round, node, reply)
                if reply.declined:
                    counts["declined"] += 1
                    continue
                counts["uplink_bytes"] += len(reply.payload)
                update = self._decode(plan, reply)
            except codec.PayloadError as err:
                LOGGER.warning("round %d: reply from node %d rejected: %s", server_round,
                               node, err)
                counts["rejected"] += 1
                self.on_rejected()
                continue
            finally:
                counts["decode_s"] += time.perf_counter() - started
            yield update

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        """Fold the replies in as they come (``replies`` may be a generator
        that yields each as it arrives: see fedlora.federation.replies), then merge.

        NumPy's BLAS runs single-threaded here: the matrices are small (rank-r
        factors, one module at a time), and OpenBLAS's spinning worker threads
        on cores the clients are using made a 384×8×384 product 200× slower
        (16 ms instead of 0.08 ms) in the 2-core simulations."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._aggregate(server_round, replies)

    def _fold(self, server_round: int, replies: Iterable[Message],
              counts: dict[str, float]) -> RoundSums:
        """The round's sums over the valid replies; an update too large to add
        exactly (``fedlora.core.exactsum``) is rejected like an invalid one. Under a
        robust mode the round is screened first (``fedlora.strategies.robust``)."""
        sums = self.new_sums()
        if self.robust is not None:
            return self._fold_screened(server_round, replies, counts, sums)
        for update in self._accepted(server_round, replies, counts):
            started = time.perf_counter()
            self._fold_checked(server_round, sums, *self.in_global_units(update),
                               counts=counts)
            sums.fold_s += time.perf_counter() - started
        return sums

    def _fold_checked(self, server_round: int, sums: RoundSums, update: ClientUpdate,
                      factors: State, counts: dict[str, float]) -> None:
        try:
            self.fold(sums, update, factors)
        except OverflowError as err:
            LOGGER.warning("round %d: reply from node %d rejected: %s", server_round,
                           update.node_id, err)
            counts["rejected"] += 1
            self.on_rejected()

    def _fold_screened(self, server_round: int, replies: Iterable[Message],
                       counts: dict[str, float], sums: RoundSums) -> RoundSums:
        """The whole round held, screened by the robust mode, then folded."""
        candidates = [Candidate(*self.in_global_units(update))
                      for update in self._accepted(server_round, replies, counts)]
        started = time.perf_counter()
        screened = self.robust.screen(candidates, self.sent, list(self.upload_shapes),
                                      self.rebuild)
        for candidate, reason in screened.excluded:
            LOGGER.warning("round %d: reply from node %d rejected: %s", server_round,
                           candidate.update.node_id, reason)
            self.on_rejected()
        counts["rejected"] += len(screened.excluded)
        counts["clipped"] = screened.clipped
        for candidate in screened.kept:
            self._fold_checked(server_round, sums, candidate.update, candidate.factors,
                               counts=counts)
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
            "train_loss": sums.loss / sums.examples if sums.count else float("nan"),
            "compute_s": sums.compute_s, "compute_max_s": sums.compute_max_s,
        })
        if self.epsilons:
            metrics["epsilon"] = max(self.epsilons.values())
        if self.config["attack"] != "none":
            metrics["attackers"] = sum(p.partition_id in self.attackers
                                       for p in self.plans.values())
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
        merged, increment = merged
        self.state = merged
        if increment:
            self.base.apply(increment)
        # decoding and folding happen while replies arrive; merging after the last
        metrics["aggregate_s"] = decode_s + sums.fold_s + time.perf_counter() - started
        if sums.products:
            metrics["agg_residual"] = sums.residual(self.state, self._base_step(increment))
            # the same clients' factors averaged separately (FedIT): the baseline
            metrics["agg_residual_fedavg"] = sums.residual(sums.factor_mean())
        if self.base is not None:
            metrics["base_version"] = self.base.version
        return to_arrayrecord(self.state), metrics

    def _base_step(self, increment: Increment | None):
        """For the residual: what ``increment`` added to a module's weight,
        in adapter units (÷ s), by lora_A name."""
        if not increment:
            return None

        def step(a_name: str) -> np.ndarray | None:
            factors = increment.get(base_weight_name(a_name))
            if factors is None:
                return None
            return factors[0].astype(np.float64) @ factors[1] / self.scale

        return step

    def _checked_merge(self, server_round: int, sums: RoundSums
                       ) -> tuple[State, Increment | None] | None:
        """(``merge``, ``base_change``), or None (logged, strategy state as
        before) when they fail numerically or give something not finite: a
        bad round leaves the global adapter and base unchanged instead of
        crashing or poisoning them."""
        before = self.state_dict()
        try:
            merged = self.merge(sums)
            increment = self.base_change(sums, merged) if self.base is not None else None
            values = [*merged.items(), *((f"base change of {m}", f) for m, pair in
                                          (increment or {}).items() for f in pair)]
            problem = next((f"merged {name} is not finite" for name, value in values
                            if not np.all(np.isfinite(value))), None)
        except (ArithmeticError, np.linalg.LinAlgError) as err:
            problem = f"merge failed ({type(err).__name__}: {err})"
        if problem is None:
            return merged, increment
        LOGGER.warning("round %d: %s: global adapter unchanged", server_round, problem)
        self.load_state_dict(before)
        return None

    def summary(self) -> None:
        LOGGER.info("fedlora strategy: %s", self.name)
        super().summary()
