"""What a malicious simulated client does: an attack harness for robustness
research (config keys ``attack``, ``attack-fraction``, ``attack-scale``).

Threat model. A fixed, seeded share of the partitions is malicious:
``round(attack-fraction × num-clients)`` of them, drawn from the run seed
alone (``fedlora.core.seeding.attacker_partitions``), so the same clients attack in
every round, two runs with one seed attack with the same clients, and a
robust aggregator (or a defence under study) can be scored against a known
ground truth. An attacker follows the protocol in every other respect: it
downloads, trains (honestly, except for label-flip), passes its strategy's
client half, encodes a well-formed payload and reports plausible metrics;
it only changes what it sends. Per ``attack``:

* ``scale``: the change (trained − start) of every tensor it uploads is
  multiplied by ``attack-scale`` (a boosted, model-replacement style update);
* ``sign-flip``: the change is replaced by −``attack-scale`` × the change
  (gradient ascent on the federation's objective);
* ``noise``: the change is replaced by Gaussian noise whose per-entry SD is
  ``attack-scale`` × the RMS of that tensor's honest change (a Byzantine
  client whose update is as large as an honest one's, times the scale), drawn
  from the seed (``fedlora.core.seeding.attack_rng``), so a run repeats;
* ``inflate-weight``: the update is honest, the claimed example count is
  ``attack-scale`` × the true one (rounded, at least 1): an attack on
  example-weighted averaging;
* ``label-flip``: the client trains on its data with label y replaced by
  C − 1 − y (data poisoning; the change it sends is honest for that data);
  ``attack-scale`` is not used.

The change is attacked before the strategy's client half computes its upload,
so every strategy's upload (a CELLM sparse δ, FedSA's A alone, …) carries the
attack in that strategy's own form. This module computes the attacks; the
client loop applies them as mods around its honest training step
(``fedlora.node.mods``).

Simulations only: attacks run in simulated clients (no ``data-path`` node
config; identity = the partition id). A deployed node that is sent a run
with an attack refuses it (``refuse_deployed``): real nodes are never told to
misbehave, and a run that asks them to is a misconfiguration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.seeding import attacker_partitions

if TYPE_CHECKING:  # the server imports ``attackers``: no datasets, torch or PEFT for it
    from datasets import Dataset

    from fedlora.core.adapters import State

# attacks that rewrite the trained change (``attack_change``)
CHANGE_ATTACKS = ("scale", "sign-flip", "noise")
LABEL_COLUMN = "label"  # the encoded datasets' label column (fedlora.learning.features)
PROMPT_LEN_COLUMN = "prompt_len"  # present in causal-LM encodings only


def attackers(config: RunConfig) -> frozenset[int]:
    """The malicious partitions of this run: none when ``attack`` is none,
    else a seeded ``attack-fraction`` of the ``num-clients`` partitions. The
    server uses this to report how many took part in a round; the client's
    mod (``fedlora.node.mods.attack_for``) to decide whether it attacks."""
    if config["attack"] == "none":
        return frozenset()
    return attacker_partitions(config["seed"], config["num-clients"],
                               config["attack-fraction"])


def refuse_deployed(config: RunConfig) -> None:
    """Raise (one line, naming key 'attack') when a deployed node is sent a run
    with an attack: the harness exists for simulations, where the malicious
    clients are ours; a real node must never be asked to sabotage a run."""
    if config["attack"] != "none":
        raise ConfigError(f"config key 'attack': attack is for simulations only; this node "
                          f"(node config data-path) refuses attack={config['attack']}")


def _rms(array: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(array)))) if array.size else 0.0


def attack_change(config: RunConfig, start: State, trained: State, names: Iterable[str],
                  rng: np.random.Generator) -> State:
    """``trained`` with the change (trained − start) of each tensor in
    ``names`` replaced as ``attack`` says (scale, sign-flip, noise; see the
    module docstring); every other tensor, and every tensor for any other
    attack, is returned unchanged. All float32. ``rng`` draws the noise (one
    draw per named tensor, in sorted name order, so the result is a function
    of the rng's state)."""
    attack, strength = config["attack"], config["attack-scale"]
    out = {n: np.asarray(t, dtype=np.float32).copy() for n, t in trained.items()}
    if attack not in CHANGE_ATTACKS:
        return out
    for name in sorted(set(names)):
        begin = np.asarray(start[name], dtype=np.float64)
        change = np.asarray(trained[name], dtype=np.float64) - begin
        if attack == "scale":
            sent = strength * change
        elif attack == "sign-flip":
            sent = -strength * change
        else:  # noise
            sent = rng.normal(0.0, strength * _rms(change), size=change.shape)
        out[name] = (begin + sent).astype(np.float32)
    return out


def flip_labels(dataset: Dataset, num_labels: int,
                answers: Sequence[Sequence[int]] | None = None) -> Dataset:
    """The data a label-flip attacker trains on: every label y becomes
    ``num_labels`` − 1 − y (a fixed permutation with no fixed point for an
    even number of classes; with an odd number the middle class keeps its
    label), in memory, the original untouched.

    Sequence classification trains on the ``label`` column alone. A causal LM
    trains on the answer tokens inside ``input_ids`` (after ``prompt_len``),
    so for such data ``answers`` (``fedlora.learning.features.answer_tokens``) must be given and
    the answer is rewritten too; an example whose answer is not its label's
    (an encoding that drifted from ``fedlora.learning.features``) is an error, not a
    silent no-op."""
    from datasets import Dataset

    columns = dataset.to_dict()
    labels = [int(y) for y in columns[LABEL_COLUMN]]
    if any(not 0 <= y < num_labels for y in labels):
        raise ValueError(f"a label outside 0..{num_labels - 1}")
    flipped = [num_labels - 1 - y for y in labels]
    if PROMPT_LEN_COLUMN in columns:
        if answers is None or len(answers) != num_labels:
            raise ValueError("causal-LM data: label-flip needs each class's answer tokens")
        rewritten = []
        for ids, start, old, new in zip(columns["input_ids"], columns[PROMPT_LEN_COLUMN],
                                        labels, flipped):
            end = start + len(answers[old])
            if list(ids[start:end]) != list(answers[old]):
                raise ValueError("causal-LM example whose answer tokens are not its label's")
            rewritten.append(list(ids[:start]) + list(answers[new]) + list(ids[end:]))
        columns["input_ids"] = rewritten
    columns[LABEL_COLUMN] = flipped
    return Dataset.from_dict(columns, features=dataset.features)
