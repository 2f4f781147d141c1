"""What the command line keeps quiet, shared by ``fedlora`` and ``fedlora trainer``.

Libraries read some settings at import and others only through their own
switches, so this comes in two steps: ``environment()`` before the training
stack is imported (also inherited by Ray workers), ``libraries()`` after.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def environment() -> None:
    """No progress bars per client, no tokenizer thread pools fighting the
    actors for cores, no library deprecation notices (they are for their
    callers' authors, not for someone running an experiment)."""
    for name, value in (("TOKENIZERS_PARALLELISM", "false"),
                        ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("RAY_DEDUP_LOGS", "0"),
                        ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"(transformers|peft|opacus|torch|datasets)\.")


def libraries() -> None:
    """The progress bars of libraries already imported (the variables of
    ``environment`` come too late for them: "Loading weights" per model)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def fedlora_logger(prefix: str) -> None:
    """fedlora's own lines to stderr, once each: Opacus calls
    ``logging.basicConfig`` at import, so through the root logger each line
    would be printed a second time."""
    logger = logging.getLogger("fedlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prefix}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
