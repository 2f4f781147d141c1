"""The client's mods (fedlora.node.mods): which client gets which wrapper, and
what each wrapper changes around a fake training step (nothing else). The
attacks' maths are tested in tests/learning/test_attacks.py, real client
messages there too."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from fedlora.core.adapters import tensor_kind
from fedlora.core.config import KEYS
from fedlora.core.seeding import attack_rng
from fedlora.learning.attacks import attack_change, attackers
from fedlora.learning.tasks.seq_cls import SeqCls
from fedlora.learning.training import TrainResult
from fedlora.node import mods
from fedlora.node.mods import Trained
from fedlora.node.session import Session
from fedlora.strategies import resolve
from fedlora.strategies.base import ClientHalf

NAMES = ("m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight")
HONEST = Trained({n: np.full((2, 3), i + 1, np.float32) for i, n in enumerate(NAMES)},
                 TrainResult(num_examples=10, steps=2, mean_loss=0.5, compute_seconds=0.1))


class _Half(ClientHalf):
    """Uploads A and the head, trains A and B: only A is both."""

    def download_names(self, names):
        return list(names)

    def upload_names(self, names):
        return [n for n in names if tensor_kind(n) != "lora_B"]

    def trains(self, kind):
        return kind != "head"


def _config(attack: str = "none", **keys):
    extra = {} if attack == "none" else {"attack": attack, "attack-fraction": 0.5}
    return resolve({"num-clients": 4, "clients-per-round": 2, "seed": 3, **extra, **keys})


def _session(config, identity: int = 1, labels=(0, 1, 2, 3)) -> Session:
    model = SimpleNamespace(spec=SimpleNamespace(task="sequence-classification",
                                                 label_names=("a", "b", "c", "d")))
    start = {n: np.zeros((2, 3), np.float32) for n in NAMES}
    return Session(request=SimpleNamespace(task=SimpleNamespace(server_round=2)),
                   config=config, task=SeqCls(config), role=_Half(config), model=model,
                   train=Dataset.from_dict({"label": list(labels)}), held_out=None,
                   identity=identity, start=start, base_version=0, store=None)


def _step(seen: list):
    def step(session):
        seen.append(session)
        return HONEST
    return step


def test_every_attack_the_config_accepts_has_a_mod():
    choices = set(KEYS["attack"].check.choices)
    assert set(mods.ATTACKS) == choices - {"none"}


@pytest.mark.parametrize("attack", ["none", "scale", "noise", "inflate-weight", "label-flip"])
def test_only_the_seeded_attackers_are_wrapped(attack):
    config = _config(attack)
    bad = attackers(config)
    assert len(bad) == (0 if attack == "none" else 2)
    for partition in range(4):
        chosen = mods.attack_for(config, partition)
        assert chosen is (mods.ATTACKS[attack] if partition in bad else mods.honest)
    step = _step([])
    assert mods.honest(step) is step


def test_inflate_weight_changes_the_count_alone():
    config = _config("inflate-weight", **{"attack-scale": 2.5})
    seen: list = []
    session = _session(config)
    out = mods.inflate_weight(_step(seen))(session)
    assert seen == [session]
    assert out.result == TrainResult(25, 2, 0.5, 0.1) and out.state is HONEST.state
    tiny = _config("inflate-weight", **{"attack-scale": 0.01})
    assert mods.inflate_weight(_step([]))(_session(tiny)).result.num_examples == 1


def test_label_flip_trains_the_step_on_flipped_labels():
    session = _session(_config("label-flip"))
    seen: list = []
    assert mods.label_flip(_step(seen))(session) is HONEST
    assert seen[0].train["label"] == [3, 2, 1, 0]
    assert session.train["label"] == [0, 1, 2, 3]  # the client's own data untouched
    assert seen[0].start is session.start and seen[0].role is session.role


@pytest.mark.parametrize("attack", ["sign-flip", "noise"])
def test_a_change_attack_rewrites_what_the_client_trains_and_uploads(attack):
    config = _config(attack, **{"attack-scale": 1.0})
    session = _session(config, identity=3)
    out = mods.change_attack(_step([]))(session)
    assert out.result is HONEST.result
    a, b, head = NAMES  # only A is both trained and uploaded
    assert not np.array_equal(out.state[a], HONEST.state[a])
    assert np.array_equal(out.state[b], HONEST.state[b])
    assert np.array_equal(out.state[head], HONEST.state[head])
    # the draws of this client in this round, as the harness defines them
    expected = attack_change(config, session.start, HONEST.state, [a], attack_rng(3, 2, 3))
    assert all(np.array_equal(out.state[n], expected[n]) for n in NAMES)
