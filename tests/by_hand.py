"""What the per-strategy tests (tests/strategies/test_<strategy>.py) share:
small non-square adapters at per-client ranks, one round driven through the
server's own path, and the hand computations of docs/algorithms.md
("global units", §0) they are checked against; and small square adapters
whose updates are folded and merged without a round.

Rounds go through ``ServerRound``: its training requests over a fake grid
(so the strategy's ``sent`` and per-rank downloads are what a real round
sets), pushed as a link would, replies built with ``TrainReply.to_message``
answering them, then ``aggregate_train``. The hand computations never call
``ranks.pad``/``truncate``: they redo the algebra in float64.
"""

from __future__ import annotations

import numpy as np
from fakes import Grid, aggregate, pushed, server_identity
from flwr.app import ConfigRecord, Message

from fedlora.federation.fold import Fold
from fedlora.federation.round import ServerRound
from fedlora.strategies import resolve
from fedlora.strategies.sums import ClientUpdate
from fedlora.wire import codec
from fedlora.wire.messages import Request, TrainReply

D, K, R = 10, 12, 8  # non-square (d ≠ k) modules; global rank 8
ALPHA = 16.0
S = ALPHA / R  # the global scale
MODULES = ("m.q", "m.v")
A_NAMES = [f"{m}.lora_A.weight" for m in MODULES]
B_NAMES = [f"{m}.lora_B.weight" for m in MODULES]
HEAD = ("m.classifier.weight", "m.classifier.bias")
NODES = (101, 102, 103)  # sorted: node at position i trains partition i
EXAMPLES = {0: 10, 1: 30, 2: 60}  # p = 0.1, 0.3, 0.6
RANKS = "2,4,8"  # partition 0 → 2, 1 → 4, 2 → 8


def adapter_shapes(rank: int = R, d: int = D, k: int = K) -> dict[str, tuple[int, ...]]:
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = (rank, k)
        out[f"{m}.lora_B.weight"] = (d, rank)
    out["m.classifier.weight"] = (3, d)
    out["m.classifier.bias"] = (3,)
    return out


def random_adapter(rng: np.random.Generator, rank: int = R, d: int = D, k: int = K
          ) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(s).astype(np.float32)
            for n, s in adapter_shapes(rank, d, k).items()}


def strategy_config(strategy: str, **keys):
    return resolve({"num-clients": len(NODES), "clients-per-round": len(NODES),
                    "strategy": strategy, "lora-rank": R, "lora-alpha": ALPHA, **keys})


def ask(server: ServerRound, server_round: int = 1) -> dict[int, Message]:
    """The round's training requests (pushed), by partition id."""
    with server_identity():
        messages = server.train_requests(server_round, ConfigRecord(), Grid(NODES))
    return {Request.from_message(m).task.partition_id: m
            for m in pushed(messages, server_round)}


def train_replies(requests: dict[int, Message], uploads: dict[int, dict], order=None
            ) -> list[Message]:
    """Each partition's reply with its upload, answering its request."""
    out = []
    for partition in order or sorted(uploads):
        request = requests[partition]
        task = Request.from_message(request).task
        out.append(TrainReply(partition, EXAMPLES[partition], 0.5, 1, 0.0,
                              codec.encode(uploads[partition]), task.base_version
                              ).to_message(request))
    return out


def run_round(server: ServerRound, uploads, server_round=1, order=None):
    """One round through the server's path: (requests, merged state, metrics)."""
    requests = ask(server, server_round)
    merged, metrics = aggregate(server, train_replies(requests, uploads, order), server_round)
    assert merged is not None, metrics
    return requests, merged, metrics


def client_uploads(rng, ranks=(2, 4, 8)) -> dict[int, dict[str, np.ndarray]]:
    """Trained adapters of partitions 0..2 at their own ranks (all tensors)."""
    return {p: random_adapter(rng, rank) for p, rank in enumerate(ranks)}


def global_units(tensors: dict, rank: int) -> dict[str, np.ndarray]:
    """By hand: A'=[A; 0], B'=[(s_k/s)·B, 0] = [(R/r_k)·B, 0], float64."""
    out = {}
    for name, value in tensors.items():
        value = value.astype(np.float64)
        if ".lora_A." in name:
            out[name] = np.zeros((R, value.shape[1]))
            out[name][:rank] = value
        elif ".lora_B." in name:
            out[name] = np.zeros((value.shape[0], R))
            out[name][:, :rank] = value * (R / rank)
        else:
            out[name] = value
    return out


def ideal_delta(uploads, ranks, module: str) -> np.ndarray:
    """ΔW* = Σ p_k s_k B_k A_k (float64), p_k by examples."""
    total = sum(EXAMPLES[p] for p in uploads)
    return sum(EXAMPLES[p] / total * (ALPHA / ranks[p])
               * uploads[p][f"{module}.lora_B.weight"].astype(np.float64)
               @ uploads[p][f"{module}.lora_A.weight"] for p in uploads)


def relative(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# -- square adapters, folded without a round --------------------------------------
SQ_D, SQ_K, SQ_R = 12, 12, 3  # square modules, as the attention projections LoRA targets
SQUARE_SHAPES = {
    "m.q.lora_A.weight": (SQ_R, SQ_K), "m.q.lora_B.weight": (SQ_D, SQ_R),
    "m.v.lora_A.weight": (SQ_R, SQ_K), "m.v.lora_B.weight": (SQ_D, SQ_R),
    "m.classifier.weight": (4, SQ_D),
}
SQUARE_LORA = [n for n in SQUARE_SHAPES if ".lora_" in n]


def square_adapter(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (scale * rng.standard_normal(s)).astype(np.float32)
            for n, s in SQUARE_SHAPES.items()}


def square_updates(rng, count=4, names=SQUARE_SHAPES) -> list[ClientUpdate]:
    """Heterogeneous clients: independent random factors, unequal weights."""
    return [ClientUpdate(i, i, SQ_R, float(10 + 20 * i),
                         {n: s for n, s in square_adapter(rng).items() if n in names})
            for i in range(count)]


def square_strategy(cls, rng, **keys):
    """A strategy on a square adapter, its round started (``sent`` set)."""
    config = resolve({"num-clients": 10, "clients-per-round": 4, "lora-rank": SQ_R,
                      "strategy": cls.name, **keys})
    strategy = cls(config, square_adapter(rng))
    strategy.start_round(strategy.state)
    return strategy


def merge_of(strategy, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """The strategy's merge of ``updates`` folded through the run's pipeline."""
    return strategy.merge(Fold(strategy).sums(updates))


def download_shapes(strategy) -> dict[str, tuple[int, ...]]:
    return {n: strategy.shapes[n] for n in strategy.roles.download_names(strategy.shapes)}
