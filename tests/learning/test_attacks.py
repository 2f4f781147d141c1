"""The attack harness (fedlora.learning.attacks): which partitions attack, what each
attack does to an update, label flipping for both task encodings, the
config's scoping, and real client messages handled in-process (a tiny BERT):
an attacker's reply differs from its honest one exactly as the attack says,
an honest partition's reply is byte-identical, and a deployed node refuses.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from fedlora.core.seeding import attack_rng, attacker_partitions
from fedlora.learning.attacks import attack_change, attackers, flip_labels
from fedlora.strategies import resolve

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


def _classes(names, tokenizer=None) -> SimpleNamespace:
    """What label flipping reads of a model: its classes (and tokenizer)."""
    return SimpleNamespace(spec=SimpleNamespace(label_names=tuple(names)), tokenizer=tokenizer)


def test_flip_labels_maps_y_to_c_minus_one_minus_y():
    from fedlora.learning.tasks.seq_cls import SeqCls

    features = Features({"input_ids": Sequence(Value("int32")),
                         "label": ClassLabel(names=["a", "b", "c", "d", "e"])})
    data = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6], [7], [8]],
                              "label": [0, 1, 2, 3, 4]}, features=features)
    task = SeqCls(resolve({}))
    flipped = flip_labels(data, task, _classes("abcde"))
    assert flipped["label"] == [4, 3, 2, 1, 0]
    assert flipped["input_ids"] == data["input_ids"]
    assert flipped.features == data.features
    assert data["label"] == [0, 1, 2, 3, 4]  # the original is untouched
    with pytest.raises(ValueError, match="outside"):
        flip_labels(data, task, _classes("abc"))


def test_flip_labels_rewrites_a_causal_lm_answer(tiny_llama, topic_dataset):
    from fedlora.learning.features import encoded_splits, model_for
    from fedlora.learning.tasks import task_for
    from fedlora.learning.tasks.causal_lm import answer_tokens

    config = resolve({"model": str(tiny_llama), "dataset": str(topic_dataset),
                      "max-seq-len": 48})
    model, task = model_for(config), task_for(config)
    assert model.spec.task == "causal-lm" and task.name == "causal-lm"
    answers = answer_tokens(model.tokenizer, model.spec.label_names)
    data = encoded_splits(config).train.select(range(40))
    flipped = flip_labels(data, task, model)
    for row, new in zip(data, flipped):
        start, y = row["prompt_len"], row["label"]
        assert new["label"] == 3 - y and new["prompt_len"] == start
        assert new["input_ids"][:start] == row["input_ids"][:start]  # same prompt
        end = start + len(answers[3 - y])
        assert new["input_ids"][start:end] == list(answers[3 - y])  # the flipped answer
        assert new["input_ids"][end:] == row["input_ids"][start + len(answers[y]):]  # eos
    other = _classes(("sports", "world", "business", "tech"), model.tokenizer)
    with pytest.raises(ValueError, match="answer tokens"):  # an encoding that drifted
        flip_labels(data, task, other)
