"""Instruction data for ``task=sft``: any of the usual shapes, as one.

Shapes (columns detected, or named by the keys in brackets):

- Alpaca: ``instruction``, optional ``input``, ``output``;
- prompt/response pairs: a prompt column (``prompt``, ``question``, ``query``;
  [``prompt-column``]) and a response column (``response``, ``completion``,
  ``answer``; [``response-column``]);
- chat: a ``messages`` column [``messages-column``] of role/content lists
  (``conversations`` with ShareGPT's from/value too), whose last turn is the
  assistant's answer;
- labelled classification data (``text``/``label``, as the classification
  tasks read it): each text becomes an instruction through ``sft-prompt`` (a
  format string with ``{text}``, and ``{classes}`` for the class names) and
  its class name the response. Label-skew partitions still cut by its labels.

Every shape becomes the same columns: ``messages`` (the conversation before
the answer: system, user, assistant… turns, the last one the user's),
``input`` (Alpaca's context, "" if none), ``response``, plus ``label`` for
labelled data and the ``client-column`` for ``partition=natural``. Templates
turn them into text later (``fedlora.learning.tasks.templates``), when the
tokenizer is known.

A malformed example is one ``ConfigError`` line naming its file and row
(a header is row 1). An example with an empty response teaches nothing: it
is dropped, and the number dropped is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict

from fedlora.core.config import ConfigError, RunConfig, cached_by
from fedlora.learning.data import Raw, load_raw, node_file, pick_column, read_file, with_test_split
from fedlora.learning.tasks.base import TaskSplits
from fedlora.learning.tasks.labels import (
    LABEL,
    TEXT,
    detect,
    labelled_splits,
    load_node_examples,
)

LOGGER = logging.getLogger(__name__)
MESSAGES, INPUT, RESPONSE = "messages", "input", "response"  # the normalised columns
PROMPT_CANDIDATES = ("instruction", "prompt", "question", "query")
RESPONSE_CANDIDATES = ("output", "response", "completion", "answer")
MESSAGES_CANDIDATES = ("messages", "conversations", "conversation")
ALPACA_INPUT = "input"  # beside an ``instruction`` column
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}  # ShareGPT's names too
SFT_KEYS = ("dataset", "prompt-column", "response-column", "messages-column", "text-column",
            "label-column", "sft-prompt", "client-column", "seed")


class Malformed(ValueError):
    """What is wrong with one example (the caller names its file and row)."""


def _text(value, what: str) -> str:
    """A cell as text: strings, and numbers (a CSV column of answers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Malformed(f"{what} is {type(value).__name__}, not text")
    return str(value)


def _turn(message, number: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise Malformed(f"message {number} is not a role/content object")
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    if role not in ROLES:
        raise Malformed(f"message {number} has role {role!r} (expected system, user or "
                        "assistant)")
    if content is None:
        raise Malformed(f"message {number} has no content")
    return {"role": ROLES[role], "content": _text(content, f"message {number}'s content")}


def _from_messages(conversation) -> tuple[list[dict], str, str]:
    """(prompt turns, input, response) of a chat example."""
    if not isinstance(conversation, list) or not conversation:
        raise Malformed("messages is not a non-empty list")
    turns = [_turn(message, i) for i, message in enumerate(conversation, start=1)]
    if turns[-1]["role"] != "assistant":
        raise Malformed("the last message is not the assistant's")
    if not any(turn["role"] == "user" for turn in turns[:-1]):
        raise Malformed("no user message before the answer")
    return turns[:-1], "", turns[-1]["content"]


def _detect(raw: Raw, config: RunConfig, source: str) -> tuple[str, dict[str, str]]:
    """The shape of ``raw``'s train split and its columns."""
    train = raw.splits["train"]
    messages = pick_column(train, config.messages_column, MESSAGES_CANDIDATES, "messages",
                           "messages-column", source)
    if messages and not (config.prompt_column or config.response_column):
        return "chat", {MESSAGES: messages}
    prompt = pick_column(train, config.prompt_column, PROMPT_CANDIDATES, "prompt",
                         "prompt-column", source)
    response = pick_column(train, config.response_column, RESPONSE_CANDIDATES,
                           "response", "response-column", source)
    if prompt and response:
        columns = {"prompt": prompt, RESPONSE: response}
        if prompt == "instruction" and ALPACA_INPUT in train.column_names:
            columns[INPUT] = ALPACA_INPUT
        return "pairs", columns
    text, label = detect(raw, train, config.text_column, config.label_column, source)
    if text and label and not (prompt or response):
        return "labelled", {}
    raise ConfigError(f"dataset {source}: cannot detect instruction data among columns "
                      f"{', '.join(train.column_names)}; set 'prompt-column' and "
                      "'response-column', or 'messages-column' (or label data for "
                      "classification as instructions)")


def _rows(ds: Dataset, shape: str, columns: dict[str, str], keep: list[str],
          where: str, first_row: int) -> tuple[dict[str, list], int]:
    """``ds`` in the normalised columns (plus the ``keep`` columns as they
    are), and how many examples with an empty response were dropped."""
    out: dict[str, list] = {MESSAGES: [], INPUT: [], RESPONSE: [], **{k: [] for k in keep}}
    dropped = 0
    for index, row in enumerate(ds):
        try:
            if shape == "chat":
                turns, context, response = _from_messages(row[columns[MESSAGES]])
            else:
                prompt = row[columns["prompt"]]
                if prompt is None or not _text(prompt, "the prompt").strip():
                    raise Malformed(f"empty prompt (column {columns['prompt']!r})")
                turns = [{"role": "user", "content": _text(prompt, "the prompt")}]
                context = row.get(columns.get(INPUT, ""))
                context = "" if context is None else _text(context, "the input")
                response = row[columns[RESPONSE]]
                response = "" if response is None else _text(response, "the response")
        except Malformed as err:
            raise ConfigError(f"{where}, row {index + first_row}: {err}") from None
        if not response.strip():
            dropped += 1
            continue
        out[MESSAGES].append(turns)
        out[INPUT].append(context)
        out[RESPONSE].append(response)
        for key in keep:
            out[key].append(row[key])
    return out, dropped


def _client_columns(config: RunConfig, ds: Dataset, source: str) -> list[str]:
    """The column ``partition=natural`` cuts by (``client-column``), kept."""
    column = config.client_column
    if not column:
        return []
    if column not in ds.column_names:
        raise ConfigError(f"config key 'client-column': column {column!r} not in dataset "
                          f"{source} (columns: {', '.join(ds.column_names)})")
    return [column]


def _prompt_format(config: RunConfig) -> Callable[[str, tuple[str, ...]], str]:
    """``sft-prompt`` as a function of (text, classes), checked once."""
    template = config.sft_prompt
    if "{text}" not in template:
        raise ConfigError(f"config key 'sft-prompt': {template!r} has no {{text}} field")
    try:
        template.format(text="", classes="")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"config key 'sft-prompt': {template!r} is not a format string "
                          f"with {{text}} and {{classes}} ({err})") from None
    return lambda text, classes: template.format(text=text, classes=", ".join(classes))


def as_instructions(ds: Dataset, classes: tuple[str, ...], config: RunConfig) -> Dataset:
    """Labelled ``text``/``label`` examples as instructions: the
    ``sft-prompt`` question and the class name as the response."""
    ask = _prompt_format(config)

    def convert(batch: dict) -> dict:
        return {MESSAGES: [[{"role": "user", "content": ask(text, classes)}]
                           for text in batch[TEXT]],
                INPUT: [""] * len(batch[TEXT]),
                RESPONSE: [classes[label] for label in batch[LABEL]]}

    return ds.map(convert, batched=True, remove_columns=[TEXT], desc="as instructions")


def _free_text(raw: Raw, shape: str, columns: dict[str, str], config: RunConfig,
               source: str) -> TaskSplits:
    keep = _client_columns(config, raw.splits["train"], source)
    normalised, dropped = {}, 0
    for split, ds in raw.splits.items():
        rows, count = _rows(ds, shape, columns, keep if split == "train" else [],
                            f"dataset: {raw.sources[split]}", raw.first_row)
        normalised[split], dropped = Dataset.from_dict(rows), dropped + count
        if len(normalised[split]) == 0:
            raise ConfigError(f"dataset: {raw.sources[split]}: no example with a response")
    if dropped:
        LOGGER.warning("dataset %s: %d example%s with an empty response dropped", source,
                       dropped, "" if dropped == 1 else "s")
    splits = with_test_split(Raw(DatasetDict(normalised), raw.home, raw.sources), config.seed)
    return TaskSplits(splits["train"], splits["test"], (),
                      raw.sources.get("test", raw.sources["train"]), None)


@cached_by(*SFT_KEYS)
def load_instructions(config: RunConfig) -> TaskSplits:
    """The run's dataset as instruction splits (cached per process)."""
    source = config.dataset
    raw = load_raw(source)
    shape, columns = _detect(raw, config, source)
    if shape != "labelled":
        return _free_text(raw, shape, columns, config, source)
    labelled = labelled_splits(raw, source, config.text_column, config.label_column,
                               config.seed)
    classes = labelled.label_names
    return TaskSplits(as_instructions(labelled.train, classes, config),
                      as_instructions(labelled.test, classes, config), classes,
                      labelled.test_source, LABEL)


def node_instructions(config: RunConfig, data_path: str,
                      label_names: tuple[str, ...]) -> Dataset:
    """A deployed node's own instruction examples from its ``data-path``;
    labelled data is labelled by the server's classes (``label_names``)."""
    if label_names:
        examples = load_node_examples(data_path, label_names, config.text_column,
                                      config.label_column)
        return as_instructions(examples, label_names, config)
    try:
        file = node_file(Path(data_path).expanduser())
        raw = read_file(file)
        shape, columns = _detect(raw, config, file.name)
        if shape == "labelled":
            raise ConfigError("labelled data, but the server's run is free text")
        rows, dropped = _rows(raw.splits["train"], shape, columns, [], file.name,
                              raw.first_row)
    except ConfigError as err:
        raise ConfigError(f"data-path {data_path}: {str(err).removeprefix('dataset: ')}"
                          ) from None
    if dropped:
        LOGGER.warning("data-path %s: %d example%s with an empty response dropped",
                       data_path, dropped, "" if dropped == 1 else "s")
    return Dataset.from_dict(rows)

