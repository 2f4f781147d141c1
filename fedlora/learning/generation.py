"""Greedy replies from a decoder, through its chat template where it has one.

``fedlora generate`` answers a prompt with a run's model; the same function
serves any causal LM (the PEFT model of a run, a merged export, a converted
GGUF model). Greedy decoding, so a reply is a function of the weights and
the prompt alone.
"""

from __future__ import annotations

import torch


def prompt_ids(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """``prompt`` as one user turn of the tokenizer's chat template (with the
    assistant's opening), or as plain text when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def reply(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64,
          ids: list[int] | None = None) -> str:
    """The model's greedy continuation of ``prompt``, new tokens only, special
    tokens dropped. ``ids``: the prompt already written as token ids (an sft
    run's own template: ``Sft.prompt_ids``) instead of ``prompt_ids``'."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = prompt_ids(tokenizer, prompt) if ids is None else {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    inputs = {k: v.to(device) for k, v in encoded.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                            skip_special_tokens=True).strip()
