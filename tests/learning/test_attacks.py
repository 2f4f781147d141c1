"""The attack harness (fedlora.learning.attacks): which partitions attack, what each
attack does to an update, label flipping for both task encodings, the
config's scoping, and real client messages handled in-process (a tiny BERT):
an attacker's reply differs from its honest one exactly as the attack says,
an honest partition's reply is byte-identical, and a deployed node refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from fakes import request
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedlora.core.config import ConfigError
from fedlora.core.seeding import attack_rng, attacker_partitions
from fedlora.learning.attacks import attack_change, attackers, flip_labels
from fedlora.strategies import resolve, strategies
from fedlora.wire import codec
from fedlora.wire.messages import LABEL_NAMES, Task, TrainReply

# ----------------------------------------------------------------- who attacks


def test_attacker_partitions_are_a_function_of_the_seed():
    drawn = {}
    for seed in range(20):
        chosen = attacker_partitions(seed, 20, 0.25)
        assert len(chosen) == 5 and all(0 <= p < 20 for p in chosen)
        assert chosen == attacker_partitions(seed, 20, 0.25)
        drawn[seed] = chosen
    assert len(set(drawn.values())) > 1  # seeds differ
    assert attacker_partitions(3, 20, 0.0) == frozenset()
    assert attacker_partitions(3, 10, 0.34) == attacker_partitions(3, 10, 0.3)  # 3 of 10
    assert len(attacker_partitions(3, 10, 0.34)) == 3
    assert attacker_partitions(3, 3, 0.99) == {0, 1, 2}  # round(2.97) = all three


def test_attackers_follow_the_config():
    assert attackers(resolve({"num-clients": 10})) == frozenset()  # attack=none
    config = resolve({"num-clients": 10, "attack": "scale", "attack-fraction": 0.3,
                      "seed": 5})
    assert attackers(config) == attacker_partitions(5, 10, 0.3)
    assert len(attackers(config)) == 3


# ----------------------------------------------------------------- the change

NAMES = ("m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight")


def _pair(seed: int = 0, shape=(6, 5)) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    start = {n: rng.standard_normal(shape).astype(np.float32) for n in NAMES}
    trained = {n: (t + 0.1 * rng.standard_normal(shape)).astype(np.float32)
               for n, t in start.items()}
    return start, trained


def _attack(name: str, scale: float):
    return resolve({"attack": name, "attack-scale": scale})


@pytest.mark.parametrize("name, factor", [("scale", 3.0), ("sign-flip", -3.0)])
def test_scale_and_sign_flip_multiply_the_change(name, factor):
    start, trained = _pair()
    attacked = NAMES[:2]
    out = attack_change(_attack(name, 3.0), start, trained, attacked,
                        np.random.default_rng(0))
    assert set(out) == set(trained) and all(v.dtype == np.float32 for v in out.values())
    for n in attacked:
        np.testing.assert_allclose(out[n] - start[n], factor * (trained[n] - start[n]),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[NAMES[2]], trained[NAMES[2]])  # not named: as trained


def test_sign_flip_at_scale_one_sends_the_negated_change():
    start, trained = _pair(1)
    out = attack_change(_attack("sign-flip", 1.0), start, trained, NAMES,
                        np.random.default_rng(0))
    for n in NAMES:
        np.testing.assert_allclose(out[n], 2 * start[n] - trained[n], rtol=1e-5, atol=1e-6)


def test_noise_has_the_asked_size_and_repeats_with_its_generator():
    start, trained = _pair(2, shape=(300, 300))
    config = _attack("noise", 4.0)
    out = attack_change(config, start, trained, NAMES[:2], attack_rng(42, 3, 7))
    again = attack_change(config, start, trained, NAMES[:2], attack_rng(42, 3, 7))
    other = attack_change(config, start, trained, NAMES[:2], attack_rng(42, 4, 7))
    for n in NAMES[:2]:
        change = trained[n].astype(np.float64) - start[n]
        noise = out[n].astype(np.float64) - start[n]
        want = 4.0 * np.sqrt(np.mean(change**2))
        assert np.sqrt(np.mean(noise**2)) == pytest.approx(want, rel=0.02)
        assert abs(np.mean(noise)) < 0.02 * want  # centred
        assert abs(np.corrcoef(noise.ravel(), change.ravel())[0, 1]) < 0.02  # not the change
        np.testing.assert_array_equal(out[n], again[n])
        assert not np.array_equal(out[n], other[n])  # another round, other noise
    np.testing.assert_array_equal(out[NAMES[2]], trained[NAMES[2]])


@pytest.mark.parametrize("name", ["inflate-weight", "label-flip"])
def test_attacks_on_weight_or_data_leave_the_change_alone(name):
    start, trained = _pair(3)
    out = attack_change(_attack(name, 5.0), start, trained, NAMES, np.random.default_rng(0))
    for n in NAMES:
        np.testing.assert_array_equal(out[n], trained[n])


# ----------------------------------------------------------------- label flipping


def test_flip_labels_maps_y_to_c_minus_one_minus_y():
    features = Features({"input_ids": Sequence(Value("int32")),
                         "label": ClassLabel(names=["a", "b", "c", "d", "e"])})
    data = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6], [7], [8]],
                              "label": [0, 1, 2, 3, 4]}, features=features)
    flipped = flip_labels(data, 5)
    assert flipped["label"] == [4, 3, 2, 1, 0]
    assert flipped["input_ids"] == data["input_ids"]
    assert flipped.features == data.features
    assert data["label"] == [0, 1, 2, 3, 4]  # the original is untouched
    with pytest.raises(ValueError, match="outside"):
        flip_labels(data, 3)


def test_flip_labels_rewrites_a_causal_lm_answer(tiny_llama, topic_dataset):
    from fedlora.learning.features import answer_tokens, encoded_splits, model_for

    config = resolve({"model": str(tiny_llama), "dataset": str(topic_dataset),
                      "max-seq-len": 48})
    model = model_for(config)
    assert model.spec.task == "causal-lm"
    answers = answer_tokens(model)
    data = encoded_splits(config).train.select(range(40))
    flipped = flip_labels(data, 4, answers)
    for row, new in zip(data, flipped):
        start, y = row["prompt_len"], row["label"]
        assert new["label"] == 3 - y and new["prompt_len"] == start
        assert new["input_ids"][:start] == row["input_ids"][:start]  # same prompt
        end = start + len(answers[3 - y])
        assert new["input_ids"][start:end] == list(answers[3 - y])  # the flipped answer
        assert new["input_ids"][end:] == row["input_ids"][start + len(answers[y]):]  # eos
    with pytest.raises(ValueError, match="answer tokens"):
        flip_labels(data, 4)


# ----------------------------------------------------------------- config


@pytest.mark.parametrize("key, value", [("attack-fraction", 0.3), ("attack-scale", 2.0)])
def test_attack_keys_refused_without_an_attack(key, value):
    with pytest.raises(ConfigError) as err:
        resolve({key: value})
    message = str(err.value)
    assert "\n" not in message and f"'{key}'" in message and "attack" in message


@pytest.mark.parametrize("overrides", [{"attack": "backdoor"},
                                       {"attack": "scale", "attack-fraction": 1.0},
                                       {"attack": "scale", "attack-scale": 0.0}])
def test_bad_attack_values_refused(overrides):
    with pytest.raises(ConfigError, match="config key 'attack"):
        resolve(overrides)


# ----------------------------------------------------------------- real client messages


def _config(tiny_bert, topic_dataset, **keys):
    return resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                    "num-clients": 4, "clients-per-round": 2, "partition": "iid",
                    "batch-size": 8, "local-steps": 3, "lora-dropout": 0.3, **keys})


def _message(config, partition: int, server_round: int = 2) -> tuple[Message, dict]:
    """The server's training request for ``partition`` and the adapter it sends."""
    from fedlora.learning.features import model_for

    model = model_for(config)
    strategy = strategies()[config["strategy"]](config, model.initial_state)
    sent_state, blob = strategy.download(model.initial_state)
    sent = {**config.to_dict(), LABEL_NAMES: list(model.spec.label_names)}
    asked = request(2, sent, Task(server_round, partition, config["lora-rank"]), blob,
                    message_id=f"r{server_round}-{partition}")
    return asked, sent_state


def _train(config, partition: int, node_config=None) -> tuple[TrainReply, dict, dict]:
    """(reply, decoded upload, the adapter the client started from)."""
    from fedlora.learning.features import model_for
    from fedlora.node.client_loop import handle_train

    asked, start = _message(config, partition)
    context = Context(run_id=1, node_id=5, node_config=node_config or {"partition-id": 0},
                      state=RecordDict(), run_config={})
    reply = TrainReply.from_message(handle_train(asked, context))
    assert reply.partition_id == partition
    template = model_for(config).initial_state
    names = strategies()[config["strategy"]].client_half(config).upload_names(template)
    upload = codec.decode(reply.payload, {n: template[n].shape for n in names})
    return reply, upload, start


def _split(config) -> tuple[int, int]:
    """(an attacking partition, an honest one)."""
    bad = attackers(config)
    assert len(bad) == 2
    return min(bad), min(set(range(config["num-clients"])) - bad)


@pytest.mark.usefixtures("run_identity")
def test_sign_flip_client_sends_the_negated_change_and_honest_ones_are_untouched(
        tiny_bert, topic_dataset):
    honest = _config(tiny_bert, topic_dataset)
    attack = _config(tiny_bert, topic_dataset, attack="sign-flip",
                     **{"attack-scale": 1.0, "attack-fraction": 0.5})
    bad, good = _split(attack)
    reply, upload, start = _train(attack, bad)
    honest_reply, honest_upload, _ = _train(honest, bad)
    assert reply.num_examples == honest_reply.num_examples
    moved = 0.0
    for n, trained in honest_upload.items():
        np.testing.assert_allclose(upload[n], 2 * start[n] - trained, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.abs(trained - start[n]).max()))
    assert moved > 0  # training did change the adapter, so the test can tell
    # a partition outside the attackers sends exactly what it would without an attack
    assert _train(attack, good)[0].payload == _train(honest, good)[0].payload


@pytest.mark.usefixtures("run_identity")
def test_inflate_weight_claims_more_examples_with_an_honest_update(tiny_bert, topic_dataset):
    attack = _config(tiny_bert, topic_dataset, attack="inflate-weight",
                     **{"attack-scale": 2.5, "attack-fraction": 0.5})
    bad, good = _split(attack)
    honest = _config(tiny_bert, topic_dataset)
    reply, honest_reply = _train(attack, bad)[0], _train(honest, bad)[0]
    assert reply.num_examples == round(2.5 * honest_reply.num_examples)
    assert reply.payload == honest_reply.payload
    assert _train(attack, good)[0].num_examples == _train(honest, good)[0].num_examples


@pytest.mark.usefixtures("run_identity")
def test_scale_reaches_the_cellm_delta(tiny_bert, topic_dataset):
    """CELLM uploads δ = start − trained (sparse): the attack on the trained
    adapter comes out as δ × attack-scale."""
    keys = {"strategy": "cellm", "cellm-up-density": 1.0}
    honest = _config(tiny_bert, topic_dataset, **keys)
    attack = _config(tiny_bert, topic_dataset, attack="scale",
                     **{"attack-scale": 3.0, "attack-fraction": 0.5}, **keys)
    bad, _ = _split(attack)
    upload, honest_upload = _train(attack, bad)[1], _train(honest, bad)[1]
    assert any(np.abs(d).max() > 0 for d in honest_upload.values())
    for n, delta in honest_upload.items():
        np.testing.assert_allclose(upload[n], 3.0 * delta, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("run_identity")
def test_noise_and_label_flip_clients_send_something_else(tiny_bert, topic_dataset):
    honest = _config(tiny_bert, topic_dataset)
    for name in ("noise", "label-flip"):
        attack = _config(tiny_bert, topic_dataset, attack=name,
                         **{"attack-fraction": 0.5})
        bad, good = _split(attack)
        first = _train(attack, bad)[0].payload
        assert first != _train(honest, bad)[0].payload
        assert _train(attack, bad)[0].payload == first  # seeded: the run repeats
        assert _train(attack, good)[0].payload == _train(honest, good)[0].payload


@pytest.mark.usefixtures("run_identity")
def test_a_deployed_node_refuses_an_attack_and_the_server_sees_why(
        tiny_bert, topic_dataset, tmp_path):
    from fedlora.node.client_loop import handle_train

    attack = _config(tiny_bert, topic_dataset, attack="scale")
    asked, _ = _message(attack, 0)
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(tmp_path)},
                      state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="attack is for simulations only") as err:
        handle_train(asked, context)
    # Flower turns the exception into an error reply, formatted as below
    # (flwr.supernode.runtime.run_clientapp); the server rejects it naming the reason
    reason = str(type(err.value)) + ":<'" + str(err.value) + "'>"
    failed = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                     reply_to=asked)
    with pytest.raises(codec.PayloadError, match="attack is for simulations only"):
        TrainReply.from_message(failed)
