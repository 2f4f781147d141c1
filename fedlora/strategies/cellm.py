"""CELLM sparse updates, by the published mechanism (FLASC; docs/algorithms.md §4).

Download: one global top-k mask over |θ| at ``cellm-down-density`` (all LoRA
tensors and the head flattened together); clients start from θ ⊙ mask.
Local training is dense. Upload: δ_k = θ_received − θ_k, global top-k at
``cellm-up-density``; with ``cellm-error-feedback`` the dropped remainder is
kept in the client's persistent state and added to the next δ. With a
quantised payload (``payload-dtype-up``, ``payload-dtype-down``) the
remainder includes the quantisation error of what was sent, and both sides
take the decoded download as θ_received. Server: the
weighted average Δ of the sparse δ_k applied by SGD (θ − lr·Δ) or used as the
pseudo-gradient of a server Adam (``cellm-server-optimizer``,
``cellm-server-lr``), whose moments are strategy state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedlora.core.adapters import State
from fedlora.core.config import Key, density, one_of, positive
from fedlora.strategies.base import ClientUpdate, LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.wire import codec
from fedlora.wire.sparsity import top_k

RESIDUAL_KEY = "cellm-residual"  # the client's error-feedback remainder in context.state
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class CellmClient(FedAvgClient):
    """Dense local training of everything, as FedAvg; the upload is the top-k
    of the change (plus the kept remainder)."""

    def upload(self, start: State, trained: State,
               memory: RecordDict) -> Mapping[str, codec.SparseTensor]:
        delta = {n: start[n] - trained[n] for n in self.upload_names(trained)}
        feedback = self.config.cellm_error_feedback
        if feedback and RESIDUAL_KEY in memory.array_records:
            kept = memory.array_records[RESIDUAL_KEY]
            delta = {n: delta[n] + kept[n].numpy() for n in delta}
        sent = top_k(delta, self.config.cellm_up_density)
        if feedback:  # the remainder: what was meant minus what the server will decode
            received, _ = codec.round_trip(sent, self.config.payload_dtype_up)
            memory.array_records[RESIDUAL_KEY] = ArrayRecord(
                {n: Array(delta[n] - received[n]) for n in delta})
        return sent


class Cellm(LoraStrategy):
    """Sparse down, sparse up, server SGD or Adam on the averaged delta."""

    name = "cellm"
    client_half = CellmClient
    keys = {
        "cellm-up-density": Key(float, 0.05, "CELLM share of update entries uploaded",
                                density),
        "cellm-down-density": Key(float, 1.0, "CELLM share of global entries downloaded",
                                  density),
        "cellm-error-feedback": Key(bool, False, "CELLM: keep the dropped residual per "
                                    "client and add it next round"),
        "cellm-server-optimizer": Key(str, "sgd", "CELLM server update rule",
                                      one_of("sgd", "adam")),
        "cellm-server-lr": Key(float, 1.0, "CELLM server learning rate (FLASC: 1 for sgd, "
                               "1e-3 for adam)", positive),
    }

    def __init__(self, config, initial_state: State) -> None:
        super().__init__(config, initial_state)
        self.step = 0
        self.moments: dict[str, np.ndarray] = {}

    def download(self, state: State) -> tuple[State, bytes]:
        density = self.config.cellm_down_density
        if density >= 1.0:
            return super().download(state)
        return self.encode_download(top_k(state, density))

    def client_factors(self, update: ClientUpdate) -> State:
        return {n: self.sent[n] - update.tensors[n] for n in self.sent}

    def upload_of(self, factors: State) -> State:
        return {n: self.sent[n] - factors[n] for n in self.upload_shapes}

    def merge(self, sums: RoundSums) -> State:
        delta = sums.mean()
        lr = self.config.cellm_server_lr
        if self.config.cellm_server_optimizer == "sgd":
            return {n: self.state[n] - lr * delta[n] for n in self.state}
        self.step += 1
        (beta1, beta2), merged = ADAM_BETAS, {}
        for name, grad in delta.items():
            m = beta1 * self.moments.get(f"m/{name}", 0.0) + (1 - beta1) * grad
            v = beta2 * self.moments.get(f"v/{name}", 0.0) + (1 - beta2) * grad**2
            self.moments[f"m/{name}"], self.moments[f"v/{name}"] = m, v
            m_hat, v_hat = m / (1 - beta1**self.step), v / (1 - beta2**self.step)
            merged[name] = (self.state[name] - lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
                            ).astype(np.float32)
        return merged

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"step": np.array(self.step), **self.moments}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.step = int(np.asarray(state.get("step", 0)).item())
        self.moments = {k: np.asarray(v) for k, v in state.items() if k != "step"}
