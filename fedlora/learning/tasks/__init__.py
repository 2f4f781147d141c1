"""Tasks: what a run fine-tunes for (``fedlora.learning.tasks.base`` has the
contract). One module per task; ``task_for(config)`` is the run's.

- ``seq-cls``: an encoder with a classification head (accuracy ↑);
- ``causal-lm``: a decoder answering with the label word (accuracy ↑);
- ``sft``: instruction tuning of a decoder (exact match ↑, or perplexity ↓).

``task=auto`` picks seq-cls or causal-lm from the model's architecture; sft
is asked for by name.
"""

from __future__ import annotations

from fedlora.core.config import RunConfig
from fedlora.core.metric import Metric
from fedlora.learning.models import detect_task, resolve_model_path
from fedlora.learning.tasks.base import Task, TaskSplits
from fedlora.learning.tasks.causal_lm import CausalLm
from fedlora.learning.tasks.seq_cls import SeqCls
from fedlora.learning.tasks.sft import Sft

TASKS: dict[str, type[Task]] = {task.name: task for task in (SeqCls, CausalLm, Sft)}


def task_name(config: RunConfig) -> str:
    """The run's task: ``task``, or for ``auto`` the model's kind."""
    if config.task != "auto":
        return config.task
    return detect_task(resolve_model_path(config.model, config.gguf_file,
                                          config.model_cache))


def task_for(config: RunConfig) -> Task:
    """The run's task (light: it holds the config; see ``Task``)."""
    return TASKS[task_name(config)](config)


__all__ = ["TASKS", "Metric", "Task", "TaskSplits", "task_for", "task_name"]
