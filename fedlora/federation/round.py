"""The server's round: it holds the strategy and does everything around it.

``ServerRound`` samples the round's nodes, plans each one's task with the
strategy (``rank_for``), builds the requests (the strategy's downloads, the
base changes a node has not seen), takes in and validates the replies
(``fedlora.federation.intake``), keeps the ε each local-DP client reports,
folds and merges through the fold pipeline (``fedlora.federation.fold``:
robust screening, central DP, the checked merge), keeps the base-weight
ledger, counts attackers, and returns a typed ``RoundRecord``. Its state
between rounds goes through ``state_dict``/``load_state_dict`` (the
checkpoint, ``fedlora.federation.checkpoint``). The round loop
(``fedlora.federation.loop``) uses only its public methods.

Sampling: each round takes ``clients-per-round`` of the connected nodes, or
all of them when fewer are connected. The first round waits until
``clients-per-round`` nodes are connected (the federation forms, as with
Flower's sampler); later rounds wait only until ``min-clients`` are, so a node
that died does not stall the rest of the run (Flower's sampler would wait for
it forever). Which ones is a function of (seed, round) over positions in the
sorted node ids (``fedlora.core.seeding``), never of Flower's random node ids:
the message to the node at position p names partition p, and a simulated
client trains that partition, so the same seed asks the same data in every run.

Every payload goes through ``fedlora.wire.codec``: downloads at
``payload-dtype-down``, uploads at ``payload-dtype-up``. What the strategy
keeps as sent is what the node decodes from the bytes, so both judge a reply
against the same start. Replies that fail to bind, decode or validate are
rejected and logged per node ("reply from node N rejected: …") and never
folded; when fewer than ``min-clients`` remain the global adapter stays as it
was and the round's record says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.common import MessageType
from flwr.serverapp import Grid
from threadpoolctl import threadpool_limits

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.config import ConfigError
from fedlora.core.seeding import sample_positions
from fedlora.federation.fold import Fold, base_step
from fedlora.federation.intake import Requests, decode_update, typed_reply
from fedlora.federation.record import RoundRecord
from fedlora.learning.attacks import attackers
from fedlora.runtime.stopping import wait
from fedlora.strategies.base import LoraStrategy, Plan
from fedlora.strategies.sums import ClientUpdate
from fedlora.wire import codec
from fedlora.wire.basedelta import BaseLedger, base_weight_name
from fedlora.wire.messages import (
    EvaluateReply,
    Request,
    Task,
    TrainReply,
    cohort_message,
    cohort_size,
    is_cohort,
)

LOGGER = logging.getLogger(__name__)
WAIT_FOR_NODES_S = 1.0  # how often the connected nodes are counted while too few are


def cohorts_of(nodes: list[int], size: int) -> list[tuple[int, ...]]:
    """The round's sampled nodes, in their sampled order (a function of
    (seed, round) alone: ``sample_positions``), cut into cohorts of ``size``
    (the last one may be smaller). Never a function of the workers or
    machines, so neither are a run's bytes."""
    return [tuple(nodes[i:i + size]) for i in range(0, len(nodes), size)]


def _not_a_reply_to(message: Message, clients: int) -> codec.PayloadError | None:
    """Why ``message`` cannot be the reply to a cohort of ``clients``, or None."""
    try:
        if not is_cohort(message):
            return codec.PayloadError("not a cohort's reply")
        if cohort_size(message) != clients:
            return codec.PayloadError(f"{cohort_size(message)} clients in a reply to a "
                                      f"cohort of {clients}")
    except codec.PayloadError as err:
        return err
    return None


def _own_copy(state: Mapping[str, np.ndarray]) -> State:
    """float32, C-ordered copies: what the global adapter is between rounds."""
    return {name: np.array(value, dtype=np.float32, order="C") for name, value in state.items()}


class ServerRound:
    """A run's server side, one round at a time, around its strategy."""

    def __init__(self, strategy: LoraStrategy,
                 on_rejected: Callable[[], None] = lambda: None) -> None:
        """``on_rejected`` is called as each reply is rejected (the round
        loop passes ``fedlora.runtime.progress``'s count)."""
        config = strategy.config
        self.strategy = strategy
        self.config = config
        self.fold = Fold(strategy)
        self._on_rejected = on_rejected
        self._adapter = _own_copy(strategy.state)
        self._per_round, self._min_replies = config.clients_per_round, config.min_clients
        self._formed = False  # clients-per-round nodes have been connected once
        self._completed = 0
        self.plans: dict[int, Plan] = {}  # this round's, by node id
        self._requests = Requests()
        self._downlink_bytes = 0
        self._decode_s = 0.0  # this round's, decoding and validating replies
        self._epsilons: dict[int, float] = {}  # ε spent so far, by partition id (local DP)
        self._attackers = attackers(config)  # simulated malicious partitions (research)
        shapes = strategy.shapes
        self.base = BaseLedger({
            base_weight_name(a): (shapes[b][0], shapes[a][1])
            for a, b in lora_pairs(list(shapes))}) if strategy.changes_base else None

    # -- what the round loop reads ------------------------------------------------
    @property
    def adapter(self) -> State:
        """The global adapter after the last round (float32)."""
        return self._adapter

    @property
    def base_delta(self) -> dict[str, np.ndarray] | None:
        """The base weights' cumulative change; None when the strategy changes no base."""
        return self.base.cumulative if self.base is not None else None

    @property
    def epsilons(self) -> dict[int, float]:
        """The ε each local-DP client reported last, by partition id."""
        return dict(self._epsilons)

    # -- training -----------------------------------------------------------------
    def train_requests(self, server_round: int, config: ConfigRecord,
                       grid: Grid) -> list[Message]:
        """Sample the round's nodes, plan them, and one training request each
        (or each cohort of them: ``cohort-size``)."""
        self.plans = {node: Plan(node, position, self.strategy.rank_for(position))
                      for position, node in self._sample(server_round, grid)}
        return self._ask(server_round, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> RoundRecord:
        """Fold the replies in as they come (``replies`` may be a generator
        that yields each as it arrives: see fedlora.federation.replies), then
        merge; the round's record.

        NumPy's BLAS runs single-threaded here: the matrices are small (rank-r
        factors, one module at a time), and OpenBLAS's spinning worker threads
        on cores the clients are using made a 384×8×384 product 200× slower
        (16 ms instead of 0.08 ms) in the 2-core simulations."""
        with threadpool_limits(limits=1, user_api="blas"):
            record = self._aggregate(server_round, replies)
        self._completed = server_round
        return record

    def _aggregate(self, server_round: int, replies: Iterable[Message]) -> RoundRecord:
        record = RoundRecord(round=server_round, sampled=len(self._requests),
                             downlink_bytes=self._downlink_bytes)
        self._decode_s = 0.0
        sums, record.clipped = self.fold.run(
            self._updates(server_round, replies, record),
            lambda node, reason: self._reject(server_round, node, reason, record))
        started = time.perf_counter()
        record.missing = len(self._requests) - self._requests.answered
        record.clients, record.compute_s = sums.count, sums.compute_s
        record.compute_max_s = sums.compute_max_s
        record.train_loss = sums.loss / sums.examples if sums.count else math.nan
        if self._epsilons:
            record.epsilon = max(self._epsilons.values())
        if self.config.attack != "none":
            record.attackers = sum(p.partition_id in self._attackers
                                   for p in self.plans.values())
        central = self.fold.central
        if sums.count < self._min_replies:
            LOGGER.warning("round %d: %d valid replies (< %d): global adapter unchanged",
                           server_round, sums.count, self._min_replies)
            merged = None
        else:
            merged = self.fold.merge(server_round, sums, self.base is not None)
        if central is not None:
            record.epsilon = central.epsilon()
        if merged is None:
            return record
        merged, increment = merged
        if increment:
            self.base.apply(increment)
        # decoding and folding happen while replies arrive; merging after the last
        record.aggregate_s = self._decode_s + sums.fold_s + time.perf_counter() - started
        if sums.products:
            record.agg_residual = sums.residual(merged,
                                                base_step(increment, self.strategy.scale))
            # the same clients' factors averaged separately (FedIT): the baseline
            record.agg_residual_fedavg = sums.residual(sums.factor_mean())
        if self.base is not None:
            record.base_version = self.base.version
        self._adapter = _own_copy(merged)
        record.updated = True
        return record

    def _updates(self, server_round: int, replies: Iterable[Message],
                 record: RoundRecord) -> Iterator[ClientUpdate]:
        """The valid updates among ``replies``, one at a time (a cohort's
        reply gives each of its clients'); declined, failed and invalid
        replies are counted in ``record`` (the latter two logged)."""
        for message in replies:
            if self._requests.cohorts is not None:
                yield from self._cohort_updates(server_round, message, record)
                continue
            update = self._bound_update(server_round, self._requests.node_of(message),
                                        message, None, record,
                                        partial(self._requests.bind, message))
            if update is not None:
                yield update

    def _cohort_updates(self, server_round: int, message: Message,
                        record: RoundRecord) -> Iterator[ClientUpdate]:
        """Each client's update in a cohort's reply, bound, validated and
        rejected one client at a time as single replies are; a reply that
        fails as a whole (a failed worker, an unbound or malformed reply)
        rejects each of the clients it answers."""
        started = time.perf_counter()
        try:
            asked, nodes = self._requests.cohort_of(message)
        except codec.PayloadError as err:
            self._reject(server_round, self._requests.node_of(message), str(err), record)
            self._decode_s += time.perf_counter() - started
            return
        whole = None if message.has_error() else _not_a_reply_to(message, len(nodes))
        self._decode_s += time.perf_counter() - started
        for index, node in enumerate(nodes):
            update = self._bound_update(server_round, node, message, index, record,
                                        partial(self._claim, asked, node, whole))
            if update is not None:
                yield update

    def _claim(self, asked: Message, node: int, whole: codec.PayloadError | None) -> int:
        """Client ``node`` of cohort request ``asked`` answered (``whole``:
        why its reply fails as a whole, raised after the claim)."""
        self._requests.claim(asked, node)
        if whole is not None:
            raise whole
        return node

    def _bound_update(self, server_round: int, node: int, message: Message, index: int | None,
                      record: RoundRecord, bind: Callable[[], int]) -> ClientUpdate | None:
        """Client ``index``'s update in ``message`` (the whole reply's for
        None) once ``bind`` ties it to its request and returns its node; a
        ``PayloadError`` on the way rejects the client (``node`` until bound)
        and gives None, as does a declined client. Counted as decoding time."""
        started = time.perf_counter()
        try:
            node = bind()
            return self._update(server_round, node, message, index, record)
        except codec.PayloadError as err:
            self._reject(server_round, node, str(err), record)
            return None
        finally:
            self._decode_s += time.perf_counter() - started

    def _update(self, server_round: int, node: int, message: Message, index: int | None,
                record: RoundRecord) -> ClientUpdate | None:
        """Node ``node``'s update in ``message`` (client ``index``'s of a
        cohort reply), validated against its plan; None when it declined."""
        plan = self.plans[node]
        reply = typed_reply(node, message, self.base, index)
        if index is not None and reply.partition_id != plan.partition_id:
            raise codec.PayloadError(f"client {index} of the cohort answers as partition "
                                     f"{reply.partition_id}, not {plan.partition_id}")
        self._note_privacy(server_round, node, reply)
        if reply.declined:
            record.declined += 1
            return None
        record.uplink_bytes += len(reply.payload)
        return decode_update(plan, reply, self.strategy.upload_shapes,
                             self.config.payload_dtype_up)

    def _reject(self, server_round: int, node: int, reason: str, record: RoundRecord) -> None:
        LOGGER.warning("round %d: reply from node %d rejected: %s", server_round, node, reason)
        record.rejected += 1
        self._on_rejected()

    def _note_privacy(self, server_round: int, node: int, reply: TrainReply) -> None:
        """The ε ledger: record the ε a DP client reports (and its decline)."""
        if reply.epsilon is not None:
            self._epsilons[reply.partition_id] = reply.epsilon
        if reply.declined:
            LOGGER.info("round %d: node %d declined: one more round would spend ε=%.3f, "
                        "over the budget", server_round, node,
                        reply.epsilon_after_round or float("nan"))

    # -- evaluation ---------------------------------------------------------------
    def evaluation_requests(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """Federated evaluation: the round's nodes, each asked to evaluate the
        new global adapter (with its personal tensors) on its held-out slice."""
        return self._ask(server_round, config, MessageType.EVALUATE)

    def aggregate_evaluation(self, server_round: int, replies: Iterable[Message],
                             prefix: str, metric: str = "accuracy") -> dict[str, float]:
        """Example-weighted mean of the task's primary ``metric`` and of the
        loss over the valid evaluation replies, the spread of the metric
        across clients (weighted standard deviation) and how many answered;
        invalid ones (unbound ones too) are logged, not counted."""
        results = []
        for message in replies:
            try:
                self._requests.bind(message)
                reply = EvaluateReply.from_message(message)
                results.append((reply, reply.value(metric)))
            except codec.PayloadError as err:
                LOGGER.warning("round %d: evaluation reply from node %d rejected: %s",
                               server_round, self._requests.node_of(message), err)
        metrics: dict[str, float] = {f"{prefix}_clients": len(results)}
        if results:
            total = sum(r.num_examples for r, _ in results)
            mean = sum(r.num_examples * value for r, value in results) / total
            spread = sum(r.num_examples * (value - mean) ** 2 for r, value in results) / total
            metrics[f"{prefix}_{metric}"] = mean
            metrics[f"{prefix}_{metric}_sd"] = math.sqrt(spread)
            metrics[f"{prefix}_loss"] = sum(r.num_examples * r.loss for r, _ in results) / total
        return metrics

    # -- sampling and requests ------------------------------------------------------
    def _sample(self, server_round: int, grid: Grid) -> list[tuple[int, int]]:
        """(position, node id) of ``clients-per-round`` of the connected nodes
        (all when fewer are connected), once ``clients-per-round`` (first
        round) or ``min-clients`` (later rounds) are; positions index the
        sorted node ids and are drawn from (seed, round)."""
        key, needed = (("min-clients", self._min_replies) if self._formed
                       else ("clients-per-round", self._per_round))
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            LOGGER.warning("round %d: %d nodes connected, waiting for %s=%d",
                           server_round, len(nodes), key, needed)
            wait(WAIT_FOR_NODES_S)
        self._formed = True
        if len(nodes) < self._per_round:
            LOGGER.warning("round %d: %d nodes connected, fewer than clients-per-round=%d; "
                           "sampling all of them", server_round, len(nodes), self._per_round)
        positions = sample_positions(self.config.seed, server_round, len(nodes),
                                     min(self._per_round, len(nodes)))
        return [(position, nodes[position]) for position in positions]

    def _ask(self, server_round: int, config: ConfigRecord,
             message_type: str) -> list[Message]:
        """One message per planned node (one per cohort of the planned nodes
        for training with ``cohort-size`` > 1): each client's download (the
        strategy encodes it once per rank) and the base changes it has not
        seen. A cohort's clients keep no copy of the base between messages
        (the worker that trains them changes), so with cohorts every message
        carries the whole change, from version 0."""
        self.strategy.start_round(_own_copy(self._adapter))
        self._downlink_bytes = 0
        cohorts = self.config.cohort_size > 1
        requests = {node: self._request(server_round, plan, forget_base=cohorts)
                    for node, plan in self.plans.items()}
        if cohorts and message_type == MessageType.TRAIN:
            groups = cohorts_of(list(self.plans), self.config.cohort_size)
            messages = [cohort_message([requests[node] for node in group], group[0], config)
                        for group in groups]
            self._requests = Requests(messages, groups)
        else:
            messages = [request.to_message(node, message_type, config)
                        for node, request in requests.items()]
            self._requests = Requests(messages)
        return messages

    def _request(self, server_round: int, plan: Plan, forget_base: bool) -> Request:
        """One client's request: its download and the base changes."""
        _, payload = self.strategy.download_for(plan)
        if self.base is not None and forget_base:
            self.base.forget(plan.node_id)
        since, base = (self.base.update_for(plan.node_id) if self.base is not None
                       else (0, None))
        task = Task(server_round, plan.partition_id, plan.rank,
                    self.base.version if self.base is not None else 0, since)
        request = Request({}, task, payload, base)
        self._downlink_bytes += len(request.payload) + len(base or b"")
        return request

    # -- checkpoint -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the server needs to go on after the last round
        (``fedlora.federation.checkpoint`` says what is left out, and why):
        the fields of a ``Checkpoint`` that are the server's."""
        central = self.fold.central
        return {"round": self._completed, "adapter": _own_copy(self._adapter),
                "strategy": self.strategy.state_dict(),
                "base_log": list(self.base.log) if self.base is not None else [],
                "epsilons": dict(self._epsilons),
                "central_history": (list(central.accountant.history) if central is not None
                                    else [])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from ``state``: the global adapter, the strategy's state,
        the base changes (replayed: the same float32 sums in the same order),
        the ε clients reported and the central accountant's releases."""
        completed, adapter = state["round"], state["adapter"]
        shapes = {n: tuple(v.shape) for n, v in adapter.items()}
        if shapes != self.strategy.shapes or not all(np.all(np.isfinite(v))
                                                     for v in adapter.values()):
            raise ConfigError(f"checkpoint of round {completed}: its adapter does not "
                              "fit this run's model (other tensors or shapes, or values "
                              "not finite)")
        self._adapter = _own_copy(adapter)
        self.strategy.load_state_dict(state["strategy"])
        if state["base_log"] and self.base is None:
            raise ConfigError(f"checkpoint of round {completed}: base changes, but "
                              f"strategy {self.strategy.name} changes no base")
        for increment in state["base_log"]:
            self.base.apply(increment)
        self._epsilons = dict(state["epsilons"])
        if self.fold.central is not None:
            self.fold.central.accountant.history = list(state["central_history"])
        self._completed = completed
        self._formed = completed > 0
