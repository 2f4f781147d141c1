"""``task=causal-lm``: a decoder answers with the label word.

An example frames the text as a prompt and the label word as the answer::

    Text: <text>\\nLabel: <label word><eos>

with ``prompt_len`` marking where the answer starts: only answer tokens carry
loss. Evaluation compares the model's scores for the label words' first
tokens at the last prompt position, so the words' first tokens must differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from fedlora.core.config import ConfigError
from fedlora.learning.tasks.base import pad_batch
from fedlora.learning.tasks.classify import Classification
from fedlora.learning.tasks.labels import LABEL, TEXT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedlora.learning.models import LoraModel

PROMPT_PREFIX = "Text: "
PROMPT_SUFFIX = "\nLabel:"
PROMPT_LEN = "prompt_len"  # the encoded column: where the answer starts


def answer_tokens(tokenizer: PreTrainedTokenizerBase,
                  label_names: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Each class's answer tokens (" <label word>")."""
    return tuple(tuple(tokenizer(" " + name, add_special_tokens=False)["input_ids"])
                 for name in label_names)


@functools.lru_cache(maxsize=8)
def label_token_ids(tokenizer: PreTrainedTokenizerBase,
                    label_names: tuple[str, ...]) -> tuple[int, ...]:
    """First token of " <label word>" for each label; they must differ, because
    the model is evaluated by comparing its scores for these tokens."""
    ids = []
    for name, tokens in zip(label_names, answer_tokens(tokenizer, label_names)):
        if not tokens:
            raise ConfigError(f"label word {name!r} tokenizes to nothing")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ConfigError(
            "config key 'model': its tokenizer maps two label words "
            f"({', '.join(label_names)}) to the same first token; causal-LM "
            "evaluation needs distinct ones"
        )
    return tuple(ids)


class CausalLm(Classification):
    name = "causal-lm"

    def encoder(self, model: LoraModel) -> Callable[[dict], dict]:
        tokenizer, max_len = model.tokenizer, self.config.max_seq_len
        label_token_ids(tokenizer, model.spec.label_names)  # distinct, or one line now

        def pieces(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prefix, suffix = pieces(PROMPT_PREFIX), pieces(PROMPT_SUFFIX)
        answers = [list(a) for a in answer_tokens(tokenizer, model.spec.label_names)]
        budget = (max_len - len(bos) - len(prefix) - len(suffix) - len(eos)
                  - max(map(len, answers)))
        if budget < 1:
            raise ConfigError(f"config key 'max-seq-len': {max_len} leaves no room for the "
                              "text after the prompt and the answer")

        def encode(batch: dict) -> dict:
            texts = tokenizer(batch[TEXT], add_special_tokens=False, truncation=True,
                              max_length=budget)["input_ids"]
            ids, prompt_lens = [], []
            for text_ids, label in zip(texts, batch[LABEL]):
                prompt = bos + prefix + text_ids + suffix
                ids.append(prompt + answers[label] + eos)
                prompt_lens.append(len(prompt))
            return {"input_ids": ids, PROMPT_LEN: prompt_lens, LABEL: batch[LABEL]}

        return encode

    def collate(self, rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Padded ids; LM targets cover only the answer."""
        batch = pad_batch(rows, pad_id)
        batch[LABEL] = torch.tensor([row[LABEL] for row in rows], dtype=torch.long)
        targets = batch["input_ids"].clone()
        targets[batch["attention_mask"] == 0] = -100
        for i, row in enumerate(rows):
            targets[i, : row[PROMPT_LEN]] = -100
        batch["lm_labels"] = targets
        batch[PROMPT_LEN] = torch.tensor([row[PROMPT_LEN] for row in rows])
        return batch

    def loss_of(self, model: LoraModel, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                *, per_example: bool) -> torch.Tensor:
        """transformers' own causal-LM loss on the answer tokens. The answer
        is one label word and EOS, about as long for every class: the token
        mean stands in for the per-example mean."""
        return ForCausalLMLoss(logits, batch["lm_labels"].to(logits.device), logits.shape[-1])

    def class_scores(self, model: LoraModel, batch: dict[str, torch.Tensor],
                     logits: torch.Tensor) -> torch.Tensor:
        last = (batch[PROMPT_LEN] - 1).to(model.device)
        rows = torch.arange(logits.shape[0], device=model.device)
        ids = label_token_ids(model.tokenizer, model.spec.label_names)
        return logits[rows, last][:, list(ids)]

    def rewrite(self, columns: dict[str, list], model: LoraModel, old: list[int],
                new: list[int]) -> None:
        """The answer tokens inside ``input_ids`` (after ``prompt_len``) are
        rewritten too; an example whose answer is not its label's (an
        encoding that drifted from ``encoder``) is an error, not a silent
        no-op."""
        answers = answer_tokens(model.tokenizer, model.spec.label_names)
        rewritten = []
        for ids, start, before, after in zip(columns["input_ids"], columns[PROMPT_LEN],
                                             old, new):
            end = start + len(answers[before])
            if list(ids[start:end]) != list(answers[before]):
                raise ValueError("causal-LM example whose answer tokens are not its label's")
            rewritten.append(list(ids[:start]) + list(answers[after]) + list(ids[end:]))
        columns["input_ids"] = rewritten
