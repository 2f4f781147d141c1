"""Client mods: research features that wrap a client's training step instead
of branching inside it, the way a Flower mod wraps a ClientApp.

The client loop (``fedlora.node.client_loop``) has one honest training step,
``TrainStep``: a prepared session in, the trained adapter and the training
result out. A ``Mod`` takes a step and returns another with the same
signature, which may change what goes in (the session's data) or what comes
out (the trained adapter, the example count). ``attack_for`` picks the mod
of one client, once per message: ``honest`` (the step itself) for every
partition outside the run's seeded attackers, else the run's ``attack``:

* ``label-flip`` trains the honest step on flipped labels;
* ``scale``, ``sign-flip``, ``noise`` rewrite the trained change after the
  honest step, before the strategy's client half computes the upload, so
  every strategy's upload (a CELLM sparse δ, FedSA's A alone, …) carries it;
* ``inflate-weight`` claims more examples than the honest step trained on.

What each attack computes, and the threat model, are in
``fedlora.learning.attacks``; here is only where it sits in the client's
update. A deployed node never gets this far with an attack: it refuses the
run when it opens the session (``fedlora.node.session``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from fedlora.core.adapters import State, tensor_kind
from fedlora.core.config import RunConfig
from fedlora.core.seeding import attack_rng
from fedlora.learning.attacks import CHANGE_ATTACKS, attack_change, attackers, flip_labels
from fedlora.learning.training import TrainResult
from fedlora.node.session import Session


@dataclass(frozen=True)
class Trained:
    """What a training step hands on to the upload: the adapter after
    training, and what training reports (examples, loss, steps, seconds)."""

    state: State
    result: TrainResult


TrainStep = Callable[[Session], Trained]
Mod = Callable[[TrainStep], TrainStep]


def honest(step: TrainStep) -> TrainStep:
    """The mod of an honest client: the step as it is."""
    return step


def label_flip(step: TrainStep) -> TrainStep:
    """Train on the client's data with label y replaced by C − 1 − y (the
    task rewrites its own encoding to match: ``Task.relabel``)."""
    def flipped(session: Session) -> Trained:
        data = flip_labels(session.train, session.task, session.model)
        return step(replace(session, train=data))
    return flipped


def change_attack(step: TrainStep) -> TrainStep:
    """Rewrite the trained change of every tensor the client trains and
    uploads (scale, sign-flip, noise), drawing noise from the client's
    attack generator for this round."""
    def attacked(session: Session) -> Trained:
        trained = step(session)
        role, config = session.role, session.config
        sent = [n for n in role.upload_names(trained.state) if role.trains(tensor_kind(n))]
        rng = attack_rng(config.seed, session.request.task.server_round, session.identity)
        return replace(trained, state=attack_change(config, session.start, trained.state,
                                                    sent, rng))
    return attacked


def inflate_weight(step: TrainStep) -> TrainStep:
    """Claim ``attack-scale`` × the examples trained on (rounded, at least 1)."""
    def inflated(session: Session) -> Trained:
        trained = step(session)
        claimed = max(1, round(trained.result.num_examples * session.config.attack_scale))
        return replace(trained, result=replace(trained.result, num_examples=claimed))
    return inflated


ATTACKS: dict[str, Mod] = {"label-flip": label_flip, "inflate-weight": inflate_weight,
                           **dict.fromkeys(CHANGE_ATTACKS, change_attack)}


def attack_for(config: RunConfig, identity: int) -> Mod:
    """The mod of the simulated client ``identity`` (its partition id): the
    run's ``attack`` if the partition is one of the run's attackers, else
    ``honest``."""
    return ATTACKS[config.attack] if identity in attackers(config) else honest
