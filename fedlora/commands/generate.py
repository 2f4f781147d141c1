"""``fedlora generate RUN --prompt TEXT``: a reply from the run's model.

The run's base with its trained adapter (and base change), as ``fedlora
evaluate`` loads it; greedy decoding through the tokenizer's chat template
where it has one (``fedlora.learning.generation``); an sft run's prompt is
written with its own ``sft-template``, as its examples were. ``--round t`` answers
with a snapshot (``save-every``) instead of the final adapter. A classifier
run (``seq-cls``) has no decoder to answer with and is refused in one line.
"""

from __future__ import annotations

from fedlora.core.config import ConfigError


def generate(run_dir: str, prompt: str, max_new_tokens: int, round_: int | None) -> str:
    from fedlora.commands.runmodel import load_run_model
    from fedlora.learning.generation import reply

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    config, model = load_run_model(run_dir, round_)
    if model.spec.task == "seq-cls":
        raise ConfigError(f"{run_dir}: a seq-cls run (a classifier) cannot generate text; "
                          "generate needs a decoder run")
    ids = None
    if model.spec.task == "sft":  # asked as its examples were written (sft-template)
        from fedlora.learning.tasks import task_for

        ids = task_for(config).prompt_ids(model, prompt)
    return reply(model.peft, model.tokenizer, prompt, max_new_tokens, ids)
