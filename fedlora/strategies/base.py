"""The aggregation contract every LoRA strategy implements, in two halves.

Server half (``LoraStrategy``): what each node trains at (its rank), what it
downloads, how a reply reads in global units, what replies fold into and how
the round's sums become the next global adapter (and, for some strategies, a
change to the frozen base weights), plus the state that must survive a
checkpoint. Client half (``ClientHalf``): what a client starts from (seeing
its persistent memory), which tensor kinds it trains and what it uploads (and
keeps). Both halves of one strategy live in one module under
``fedlora/strategies/``.

Everything else about a round is the round's (``fedlora.federation.round``):
sampling, requests, taking in and validating replies, the ε and base-weight
ledgers, robust screening and central DP around the fold, the checked merge,
the round record and checkpoints. Neither the round nor the client loop
(``fedlora.node.client_loop``) changes when a strategy is added; a strategy
reads no message and no Flower interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import RecordDict

from fedlora.core.adapters import State
from fedlora.core.config import Key, RunConfig
from fedlora.strategies.ranks import check_client_ranks, pad, rank_of, truncate
from fedlora.strategies.sums import ClientUpdate, RoundSums
from fedlora.wire import codec
from fedlora.wire.basedelta import Increment


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


class LoraStrategy(ABC):
    """Server half of a strategy. Subclass it; ``merge`` is the one abstract
    hook, every other method below a "hook" comment has a default to keep or
    override.

    What a strategy reads (set here and by the round, never written by a
    strategy): ``config``; ``state``, the current global adapter; ``sent``,
    the full adapter global-rank clients started from this round;
    ``global_rank`` and ``scale`` (s = α/r of the global adapter);
    ``shapes`` and ``upload_shapes`` (the tensors clients send back);
    ``roles``, an instance of its client half. A strategy's own state between
    rounds (optimiser moments, counters) must be in ``state_dict``.
    """

    # -- hooks: flags (class attributes) --------------------------------------------
    name: ClassVar[str]  # the ``strategy`` value
    client_half: ClassVar[type[ClientHalf]]
    keys: ClassVar[Mapping[str, Key]] = {}  # its own config keys (``fedlora keys``)
    needs_products: ClassVar[bool] = False  # merge reads RoundSums.ideal (streamed: exact)
    heterogeneous_ranks: ClassVar[bool] = False  # takes client-ranks
    personal: ClassVar[bool] = False  # clients keep personal tensors: federated evaluation
    changes_base: ClassVar[bool] = False  # base_change may return an increment
    # central DP clips each client's change to what it was sent and noises the
    # average; a strategy whose merge reads more of the clients than that sets False
    central_dp: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config: RunConfig) -> str | None:
        """Hook: one line saying why this strategy cannot run ``config``, or None."""
        if config.dp == "central" and not cls.central_dp:
            return (f"config key 'dp': central DP cannot cover strategy {cls.name} (its "
                    "server reads more of each client than the clipped change); use dp=local")
        if config.quantization != "none" and cls.changes_base:
            return (f"config key 'quantization': strategy {cls.name} adds dense changes to "
                    "the base weights, which a quantised base cannot hold; use "
                    "quantization=none or a strategy that leaves the base alone")
        if cls.heterogeneous_ranks:
            return check_client_ranks(config)
        return None

    @classmethod
    def evaluation_prefix(cls, config: RunConfig) -> str | None:
        """The metric prefix of federated evaluation, None when there is none
        (from ``personal`` and ``federated-eval``)."""
        if cls.personal:
            return "personal"
        return "fed" if config.federated_eval else None

    def __init__(self, config: RunConfig, initial_state: State) -> None:
        self.config = config
        self.global_rank = config.lora_rank
        self.scale = config.lora_alpha / config.lora_rank  # s of the global adapter
        self.roles = self.client_half(config)
        self.state: State = {k: v.copy() for k, v in initial_state.items()}
        self.shapes = {n: tuple(v.shape) for n, v in initial_state.items()}
        self.upload_shapes = {n: self.shapes[n] for n in self.roles.upload_names(self.shapes)}
        self.sent: State = {}  # the full adapter global-rank clients started from this round
        self._sent_at: dict[int, tuple[State, bytes]] = {}  # by rank, this round

    def start_round(self, state: State) -> None:
        """Called by the round (not a hook) before it asks its nodes:
        ``state`` is the global adapter they start from; downloads are
        encoded afresh, once per rank."""
        self.state = state
        self._sent_at = {self.global_rank: self.download(state)}
        self.sent = self._sent_at[self.global_rank][0]

    # -- hooks: plans ---------------------------------------------------------------
    def rank_for(self, partition_id: int) -> int:
        """The adapter rank partition ``partition_id`` trains at."""
        return rank_of(self.config, partition_id) if self.heterogeneous_ranks else self.global_rank

    # -- hooks: downloads -----------------------------------------------------------
    def encode_download(self, tensors: Mapping[str, np.ndarray | codec.SparseTensor]
                        ) -> tuple[State, bytes]:
        """(what the node decodes, the bytes sent) for ``tensors`` at
        ``payload-dtype-down``: the decoded values are what the server keeps
        as sent, so that server and node agree on the start byte for byte."""
        return codec.round_trip(tensors, self.config.payload_dtype_down)

    def download(self, state: State) -> tuple[State, bytes]:
        """(what global-rank clients start from, its encoding) for this round."""
        sent, blob = self.encode_download({n: state[n]
                                           for n in self.roles.download_names(state)})
        return {**state, **sent}, blob

    def download_for(self, plan: Plan) -> tuple[State, bytes]:
        """(the full adapter ``plan``'s node starts from, in its units; the
        encoding of what is sent to it). By default one per rank
        (``download_at``), encoded once per round; a strategy that sends
        nodes their own content overrides this."""
        if plan.rank not in self._sent_at:
            self._sent_at[plan.rank] = self.download_at(plan.rank)
        return self._sent_at[plan.rank]

    def download_at(self, rank: int) -> tuple[State, bytes]:
        """(the full adapter a client of ``rank`` starts from, in its units;
        the encoding of what is sent): the first ``rank`` ranks of ``sent``."""
        start = truncate(self.sent, rank, self.global_rank)
        sent, blob = self.encode_download({n: start[n]
                                           for n in self.roles.download_names(start)})
        return {**start, **sent}, blob

    # -- hooks: a reply in global units -----------------------------------------------
    def client_factors(self, update: ClientUpdate) -> State:
        """The client's full adapter after training, as far as the server can
        tell, in global units: what it started from overwritten by what it sent."""
        start = self.download_for(Plan(update.node_id, update.partition_id, update.rank))[0]
        return pad({**start, **update.tensors}, update.rank, self.global_rank)

    def upload_of(self, factors: State) -> State:
        """What a client whose adapter ended at ``factors`` would have uploaded
        (the inverse of ``client_factors``, for central DP and robust modes)."""
        return {n: factors[n] for n in self.upload_shapes}

    # -- hooks: fold and merge ------------------------------------------------------
    def new_sums(self) -> RoundSums:
        """Empty round sums of the kind this strategy's replies fold into."""
        return RoundSums(products=self.needs_products or self.config.agg_residual,
                         streamed_products=self.needs_products)

    def fold(self, sums: RoundSums, update: ClientUpdate, factors: State) -> None:
        """Fold one update already in global units (with the client's full
        factors) into ``sums``; by default weighted by its examples."""
        sums.add(update, factors)

    @abstractmethod
    def merge(self, sums: RoundSums) -> State:
        """The next global adapter from the round's sums over accepted updates
        (``self.state`` is the current one, ``self.sent`` what clients started
        from). A strategy with state changes it here, and the round restores
        ``state_dict`` when the merge fails or is not finite."""

    # -- hooks: base change ---------------------------------------------------------
    def base_change(self, sums: RoundSums, merged: State) -> Increment | None:
        """Factors to add to the base weights after this round (module →
        (left, right), left @ right in nn.Linear's layout, scale included);
        None for strategies that leave the base alone. Called only for
        ``changes_base`` strategies; every node is then told of the change
        (``fedlora.wire.basedelta``)."""
        return None

    # -- hooks: state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state a checkpoint must keep (optimiser moments, ...), as
        NumPy arrays; a snapshot that a later merge does not change."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned."""
