"""A task's loss is computed from the model's logits (``Task.loss_of``), so
that one forward pass can serve a cohort's clients. For the classifier and
the label-word LM it must stay, bit for bit, the loss transformers computes
when given the labels: runs keep their bytes."""

from __future__ import annotations

import pytest
import torch

from fedlora.learning.features import client_dataset, model_for
from fedlora.learning.tasks import task_for
from fedlora.learning.tasks.base import inputs
from fedlora.strategies import resolve


def _first_batch(model, task, config):
    data = client_dataset(config, 0)
    return next(iter(task.batches(model, data, 6, torch.Generator().manual_seed(0))))


def _config(model_dir, dataset, **keys):
    return resolve({"model": str(model_dir), "dataset": str(dataset), "num-clients": 2,
                    "clients-per-round": 2, "max-seq-len": 24, **keys})


@pytest.mark.parametrize(("model_fixture", "keys", "labels"), [
    ("tiny_bert", {}, "label"),                          # seq-cls: the classifier
    ("tiny_llama", {"task": "causal-lm"}, "lm_labels"),  # causal-lm: the label word
], ids=["seq-cls", "causal-lm"])
def test_the_loss_is_transformers_own(model_fixture, keys, labels, request, topic_dataset,
                                      quiet_datasets):
    config = _config(request.getfixturevalue(model_fixture), topic_dataset, **keys)
    model, task = model_for(config), task_for(config)
    batch = _first_batch(model, task, config)
    model.peft.eval()
    with torch.no_grad():
        theirs = model.peft(**inputs(model, batch), labels=batch[labels]).loss
        ours = task.loss(model, batch, per_example=False)
    assert torch.equal(ours, theirs)
