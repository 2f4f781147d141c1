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
  ``attack-scale`` is not used. Each task rewrites its own encoding
  (``Task.relabel``): a label-word answer, or the response of classification
  data run as instructions; free-text instruction data has no label to flip,
  and such a run is refused before it starts.

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

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.seeding import attacker_partitions

if TYPE_CHECKING:  # the server imports ``attackers``: no datasets, torch or PEFT for it
    from datasets import Dataset

    from fedlora.core.adapters import State
    from fedlora.learning.models import LoraModel
    from fedlora.learning.tasks import Task

# attacks that rewrite the trained change (``attack_change``)
CHANGE_ATTACKS = ("scale", "sign-flip", "noise")


def attackers(config: RunConfig) -> frozenset[int]:
    """The malicious partitions of this run: none when ``attack`` is none,
    else a seeded ``attack-fraction`` of the ``num-clients`` partitions. The
    server uses this to report how many took part in a round; the client's
    mod (``fedlora.node.mods.attack_for``) to decide whether it attacks."""
    if config.attack == "none":
        return frozenset()
    return attacker_partitions(config.seed, config.num_clients,
                               config.attack_fraction)


def refuse_deployed(config: RunConfig) -> None:
    """Raise (one line, naming key 'attack') when a deployed node is sent a run
    with an attack: the harness exists for simulations, where the malicious
    clients are ours; a real node must never be asked to sabotage a run."""
    if config.attack != "none":
        raise ConfigError(f"config key 'attack': attack is for simulations only; this node "
                          f"(node config data-path) refuses attack={config.attack}")


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
    attack, strength = config.attack, config.attack_scale
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


def flip_labels(dataset: Dataset, task: Task, model: LoraModel) -> Dataset:
    """The data a label-flip attacker trains on: every label y becomes
    C − 1 − y for C classes (a fixed permutation with no fixed point for an
    even number of classes; with an odd number the middle class keeps its
    label), in memory, the original untouched. The task rewrites its own
    encoding to match (a causal LM's answer tokens, an instruction's
    response); free text has no label and is refused (``Task.relabel``)."""
    classes = len(model.spec.label_names)
    return task.relabel(dataset, model, lambda label: classes - 1 - label)
