"""Prompt templates for ``task=sft``: a conversation (``messages`` and Alpaca's
``input``; ``fedlora.learning.tasks.instructions``) as the token ids that come
before the response.

- ``chat``: the tokenizer's own chat template (``apply_chat_template`` with
  the generation prompt), so an instruct model is trained and asked the way it
  was tuned; the default where the tokenizer has one (``sft-template=auto``).
- ``alpaca``: Stanford Alpaca's prompt (``### Instruction:`` …
  ``### Response:``), with its ``### Input:`` section; the default otherwise.
- ``plain``: the turns' text, one blank line apart, then a newline.

Chat templates write their own special tokens; the others start with the
tokenizer's BOS token where it has one (as the causal-LM task's prompts do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.core.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = ("chat", "alpaca", "plain")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input "
                         "that provides further context. Write a response that appropriately "
                         "completes the request.\n\n")
ALPACA_HEADINGS = {"user": "### Instruction:\n", "assistant": "### Response:\n"}


def choose(template: str, tokenizer: PreTrainedTokenizerBase, model: str) -> str:
    """The template ``sft-template`` names for this tokenizer (``auto``: chat
    where it has a chat template, else alpaca)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise ConfigError(f"config key 'sft-template': chat needs a tokenizer with a chat "
                          f"template, and model {model}'s has none (use alpaca or plain)")
    return template


def _with_input(messages: list[dict], context: str) -> list[dict]:
    """The conversation with Alpaca's input appended to the last user turn."""
    if not context:
        return list(messages)
    last = max(i for i, turn in enumerate(messages) if turn["role"] == "user")
    turns = [dict(turn) for turn in messages]
    turns[last]["content"] = f"{turns[last]['content']}\n\n{context}"
    return turns


def _alpaca(messages: list[dict], context: str) -> str:
    system = [turn["content"] for turn in messages if turn["role"] == "system"]
    parts = ["\n\n".join(system) + "\n\n" if system
             else ALPACA_PREAMBLE_INPUT if context else ALPACA_PREAMBLE]
    parts += [f"{ALPACA_HEADINGS[turn['role']]}{turn['content']}\n\n"
              for turn in messages if turn["role"] != "system"]
    if context:
        parts.append(f"### Input:\n{context}\n\n")
    return "".join(parts) + ALPACA_HEADINGS["assistant"]


def _plain(messages: list[dict], context: str) -> str:
    return "\n\n".join(turn["content"] for turn in _with_input(messages, context)) + "\n"


def prompt_text(template: str, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                context: str) -> str:
    """The text before the response."""
    if template == "chat":
        return tokenizer.apply_chat_template(_with_input(messages, context), tokenize=False,
                                             add_generation_prompt=True)
    return _alpaca(messages, context) if template == "alpaca" else _plain(messages, context)


def prompt_ids(template: str, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
               context: str) -> list[int]:
    """The token ids before the response."""
    text = prompt_text(template, tokenizer, messages, context)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if template != "chat" and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


_CUT = "\u2063"  # a character no prompt ends with: where the last user turn's text stops


def closing_ids(template: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids ``template`` writes after the last user turn's text (the
    turn's end and the answer's start): what a prompt cut to ``max-seq-len``
    keeps at its end (``fedlora.learning.tasks.sft.join``)."""
    text = prompt_text(template, tokenizer, [{"role": "user", "content": _CUT}], "")
    after = text[text.rindex(_CUT) + len(_CUT):]
    return tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
