"""``task=sft``: supervised instruction tuning of a decoder.

Data: any instruction shape, or labelled data as instructions
(``fedlora.learning.tasks.instructions``). Prompt: a template
(``fedlora.learning.tasks.templates``, ``sft-template``).

Encoding: prompt ids, then the response's ids and EOS; the loss is on the
response tokens only (``prompt_len`` marks where they start). Truncation to
``max-seq-len`` keeps at least one response token (a short one whole) and
the prompt's head and closing tokens (``join``).
The training loss is the mean over response tokens; with ``dp=local`` the
mean over examples of each example's own mean, so that DP-SGD's per-example
clipping sees one example per row (not a long answer's many tokens).

Evaluation, token-weighted over the response tokens of the evaluation set:
``eval_loss`` (mean NLL), ``perplexity`` (its exp) and ``token_accuracy``
(greedy next-token hits); and, with ``max-new-tokens`` > 0, ``exact_match``:
greedy generation (batched, left-padded) compared with the reference after
normalising case, whitespace and trailing punctuation, both read back through
the tokenizer so that its spelling (a WordPiece "sci / tech") does not count.
The primary metric is exact match (higher is better), or perplexity (lower)
without generation.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.fields import Round
from fedlora.core.metric import Metric
from fedlora.learning.models import autocast, detect_task, resolve_model_path
from fedlora.learning.tasks import instructions, templates
from fedlora.learning.tasks.base import (
    Task,
    TaskSplits,
    inputs,
    pad_batch,
    safe_exp,
)
from fedlora.learning.tasks.instructions import INPUT, MESSAGES, RESPONSE
from fedlora.learning.tasks.labels import LABEL

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlora.learning.models import LoraModel

PROMPT_LEN = "prompt_len"  # the encoded column: where the response starts
IGNORE = -100  # a target position without loss (torch's ignore_index)
# a batch's logits are examples × tokens × vocabulary: 16 × 256 × 49k float32
# (SmolLM2) is 0.8 GB, where the classification tasks' 64 short rows are small
EVAL_BATCH_SIZE = 16
EXACT_MATCH = Metric(Round.EXACT_MATCH, higher_is_better=True)
PERPLEXITY = Metric(Round.PERPLEXITY, higher_is_better=False)
_TRAILING = string.punctuation + string.whitespace


def join(prompt: Sequence[int], response: Sequence[int], max_len: int,
         closing: Sequence[int] = ()) -> tuple[list[int], int]:
    """(ids, prompt length) of prompt + response cut to ``max_len``.

    The response keeps what the prompt leaves, but at least one token and at
    least half of ``max_len`` where it has that many: a short answer (a
    class name, with its EOS) stays whole, because a model that never sees
    the EOS after a short answer never learns to stop, and its greedy
    replies never match.
    A prompt that must be cut keeps its head and its ``closing`` tokens (the
    template's end of the user turn and start of the answer, e.g.
    ``<|im_end|>\n<|im_start|>assistant\n``), so a truncated example still
    asks for an answer where generation will."""
    whole = min(len(response), max_len // 2)
    answer = max(1, whole, max_len - len(prompt))
    room = max_len - min(answer, len(response))
    if len(prompt) <= room:
        return [*prompt, *response[: max_len - len(prompt)]], len(prompt)
    tail = list(closing) if len(closing) < room else []
    kept = [*prompt[: room - len(tail)], *tail]
    return [*kept, *response[: max_len - room]], room


def targets_of(ids: torch.Tensor, mask: torch.Tensor, prompt_lens: Sequence[int]) -> torch.Tensor:
    """LM targets: the ids on response tokens, ``IGNORE`` on prompt and padding."""
    targets = ids.clone()
    targets[mask == 0] = IGNORE
    for i, start in enumerate(prompt_lens):
        targets[i, :start] = IGNORE
    return targets


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL per position, which positions count) for next-token prediction:
    position t of ``logits`` predicts target t + 1."""
    shifted, wanted = logits[:, :-1].float(), targets[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), wanted, ignore_index=IGNORE,
                          reduction="none")
    return nll, wanted != IGNORE


def response_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """(summed NLL, correct greedy predictions, count) over the response tokens."""
    nll, counted = token_losses(logits, targets)
    hits = (logits[:, :-1].argmax(dim=-1) == targets[:, 1:]) & counted
    return float(nll[counted].sum()), int(hits.sum()), int(counted.sum())


def normalise(text: str) -> str:
    """Case, runs of whitespace and trailing punctuation do not count."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(_TRAILING)


class Sft(Task):
    name = "sft"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        path = resolve_model_path(config.model, config.gguf_file, config.model_cache)
        if detect_task(path) != "causal-lm":
            raise ConfigError(f"config key 'task': sft trains a decoder, and model "
                              f"{config.model} is an encoder")

    @property
    def generates(self) -> bool:
        return self.config.max_new_tokens > 0

    @property
    def metrics(self) -> tuple[str, ...]:
        return Round.SFT if self.generates else Round.SFT[:-1]  # exact match by generation

    @property
    def primary(self) -> Metric:
        return EXACT_MATCH if self.generates else PERPLEXITY

    def progress(self, record: dict) -> str:
        line = super().progress(record)
        if record.get(Round.PERPLEXITY) is not None and self.primary is not PERPLEXITY:
            line += f" ppl {record[Round.PERPLEXITY]:.3f}"
        return line

    def reply_values(self, metrics: dict[str, float]) -> tuple[float, float, float | None]:
        return (metrics[Round.TOKEN_ACCURACY], metrics[Round.EVAL_LOSS],
                metrics[self.primary.name])

    # -- data ----------------------------------------------------------------------
    def splits(self) -> TaskSplits:
        return instructions.load_instructions(self.config)

    def node_examples(self, data_path: str, label_names: tuple[str, ...]) -> Dataset:
        return instructions.node_instructions(self.config, data_path, label_names)

    def encoded_columns(self) -> tuple[str, ...]:
        return (MESSAGES, INPUT)  # the response text stays: exact match compares it

    def _template(self, model: LoraModel) -> str:
        return templates.choose(self.config.sft_template, model.tokenizer,
                                self.config.model)

    def _eos(self, model: LoraModel) -> int:
        eos = model.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"config key 'model': the tokenizer of {self.config.model} "
                              "has no EOS token, which task sft appends to every response")
        return int(eos)

    def prompt_ids(self, model: LoraModel, prompt: str) -> list[int]:
        """``prompt`` as one user turn, written as this run's examples were
        (``sft-template``): what ``fedlora generate`` asks a trained model."""
        return templates.prompt_ids(self._template(model), model.tokenizer,
                                    [{"role": "user", "content": prompt}], "")

    def response_ids(self, model: LoraModel, response: str) -> list[int]:
        return [*model.tokenizer(response, add_special_tokens=False)["input_ids"],
                self._eos(model)]

    def encoder(self, model: LoraModel) -> Callable[[dict], dict]:
        template, tokenizer = self._template(model), model.tokenizer
        max_len = self.config.max_seq_len
        if max_len < 2:
            raise ConfigError(f"config key 'max-seq-len': {max_len} leaves no room for a "
                              "prompt token and a response token")
        self._eos(model)
        closing = templates.closing_ids(template, tokenizer)

        def encode(batch: dict) -> dict:
            ids, starts = [], []
            for turns, context, response in zip(batch[MESSAGES], batch[INPUT],
                                                 batch[RESPONSE]):
                prompt = templates.prompt_ids(template, tokenizer, turns, context)
                joined, start = join(prompt, self.response_ids(model, response), max_len,
                                     closing)
                ids.append(joined)
                starts.append(start)
            return {"input_ids": ids, PROMPT_LEN: starts}

        return encode

    # -- batches and loss --------------------------------------------------------------
    def collate(self, rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_batch(rows, pad_id)
        batch["targets"] = targets_of(batch["input_ids"], batch["attention_mask"],
                                      [row[PROMPT_LEN] for row in rows])
        return batch

    def loss_of(self, model: LoraModel, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                *, per_example: bool) -> torch.Tensor:
        nll, counted = token_losses(logits, batch["targets"].to(logits.device))
        if per_example:
            return (nll.sum(dim=1) / counted.sum(dim=1).clamp(min=1)).mean()
        return nll.sum() / counted.sum().clamp(min=1)

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: LoraModel, data: Dataset) -> dict[str, float]:
        model.peft.eval()
        total, correct, count = 0.0, 0, 0
        for batch in self.batches(model, data, EVAL_BATCH_SIZE):
            with autocast(model.device):
                logits = model.peft(**inputs(model, batch)).logits
            nll, hits, tokens = response_stats(logits, batch["targets"].to(model.device))
            total, correct, count = total + nll, correct + hits, count + tokens
        loss = total / max(count, 1)
        metrics = {Round.EVAL_LOSS: loss, Round.PERPLEXITY: safe_exp(loss),
                   Round.TOKEN_ACCURACY: correct / max(count, 1)}
        if self.generates:
            metrics[EXACT_MATCH.name] = self.exact_match(model, data)
        return metrics

    def generate(self, model: LoraModel, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy continuations (up to ``max-new-tokens``, cut at EOS) of a
        batch of prompts, left-padded."""
        pad, eos = model.pad_token_id, self._eos(model)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        from transformers import GenerationConfig

        greedy = GenerationConfig(max_new_tokens=self.config.max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=pad)
        with warnings.catch_warnings(), autocast(model.device):
            warnings.simplefilter("ignore")
            out = model.peft.generate(input_ids=ids.to(model.device),
                                      attention_mask=mask.to(model.device),
                                      generation_config=greedy)
        replies = []
        for row in out[:, width:].tolist():
            replies.append(row[:row.index(eos)] if eos in row else row)
        return replies

    def exact_match(self, model: LoraModel, data: Dataset) -> float:
        """Share of ``data`` whose greedy reply is the reference, normalised."""
        tokenizer, hits, rows = model.tokenizer, 0, data.to_list()
        for begin in range(0, len(rows), EVAL_BATCH_SIZE):
            chunk = rows[begin:begin + EVAL_BATCH_SIZE]
            replies = self.generate(model, [row["input_ids"][:row[PROMPT_LEN]] for row in chunk])
            for row, reply in zip(chunk, replies):
                reference = tokenizer(row[RESPONSE], add_special_tokens=False)["input_ids"]
                said = tokenizer.decode(reply, skip_special_tokens=True)
                meant = tokenizer.decode(reference, skip_special_tokens=True)
                hits += normalise(said) == normalise(meant)
        return hits / max(len(rows), 1)

    # -- attacks -----------------------------------------------------------------------
    def relabel(self, data: Dataset, model: LoraModel,
                new_label: Callable[[int], int]) -> Dataset:
        """Labelled data as instructions: the response swapped for the new
        label's class name (free text has no label to flip: refused)."""
        classes = model.spec.label_names
        if not classes or LABEL not in data.column_names:
            return super().relabel(data, model, new_label)
        from datasets import Dataset

        columns = data.to_dict()
        max_len = self.config.max_seq_len
        labels = [int(y) for y in columns[LABEL]]
        if any(not 0 <= y < len(classes) for y in labels):
            raise ValueError(f"a label outside 0..{len(classes) - 1}")
        flipped = [new_label(y) for y in labels]
        rewritten = [join(ids[:start], self.response_ids(model, classes[label]), max_len)
                     for ids, start, label in zip(columns["input_ids"], columns[PROMPT_LEN],
                                                  flipped)]
        columns["input_ids"] = [ids for ids, _ in rewritten]
        columns[RESPONSE] = [classes[label] for label in flipped]
        columns[LABEL] = flipped
        return Dataset.from_dict(columns, features=data.features)
