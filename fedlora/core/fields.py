"""The names of what a run records: the fields of a ``metrics.jsonl`` row
(``Round``, with federated evaluation's ``ClientEval``), of ``summary.json``
(``Summary``) and the columns of ``fedlora compare``'s ``summary.csv``
(``Compared``).

The round loop and the strategies write them; progress, results, report,
compare and the CLI read them. Naming each once means a misspelt field is an
AttributeError where it is written, not a ``None`` read from a row in a
report. The strings themselves are the files' format: renaming one changes
the files, and older run directories would no longer be read as before.

Plain string constants (not an Enum): a row is a JSON object, and
``row[Round.ACCURACY]`` must be the very ``str`` that ``json`` and Flower's
``MetricRecord`` take as a key.
"""

from __future__ import annotations

from collections.abc import Iterable


class Round:
    """One ``metrics.jsonl`` row: one server round (null where a round has none).
    The central evaluation's fields are the run's task's (``Task.metrics``):
    ACCURACY and LOSS for classification, the four sft ones for task=sft."""

    ROUND = "round"  # the server round, 1..rounds
    ACCURACY = "accuracy"  # central test accuracy of the round's global adapter; null unevaluated
    LOSS = "loss"  # central test loss, evaluated with ACCURACY
    EVAL_LOSS = "eval_loss"  # sft: mean cross-entropy per response token (central test)
    PERPLEXITY = "perplexity"  # sft: exp(EVAL_LOSS)
    TOKEN_ACCURACY = "token_accuracy"  # sft: response tokens predicted right (teacher forcing)
    EXACT_MATCH = "exact_match"  # sft: greedy generations equal to the response; null if none
    TRAIN_LOSS = "train_loss"  # example-weighted mean training loss of the folded updates
    CLIENTS = "clients"  # updates folded into the round's aggregate
    REJECTED = "rejected"  # replies refused: invalid, too large to sum exactly, screened out
    DECLINED = "declined"  # local-DP clients that declined: one more round would pass their ε
    SAMPLED = "sampled"  # training requests sent
    MISSING = "missing"  # sampled nodes that did not answer before the round went on
    UPLINK_BYTES = "uplink_bytes"  # update payload bytes received from the clients
    DOWNLINK_BYTES = "downlink_bytes"  # payload bytes sent to the clients (adapter, base changes)
    EPSILON = "epsilon"  # DP ε spent so far: the largest client's (local), the run's (central)
    SECONDS = "seconds"  # wall-clock seconds of the whole round
    UPDATED = "updated"  # whether the global adapter changed this round
    ATTACKERS = "attackers"  # sampled clients that attack (attack != none)
    CLIPPED = "clipped"  # updates a robust screen cut: claimed weight capped, change clipped
    AGG_RESIDUAL = "agg_residual"  # ‖ΔW* − merged ΔW‖ / ‖ΔW*‖, ΔW* the clients' mean B·A
    AGG_RESIDUAL_FEDAVG = "agg_residual_fedavg"  # the same gap for factors averaged apart (FedIT)
    BASE_VERSION = "base_version"  # version of the base weights after the round (base-changing)
    COMPUTE_S = "compute_s"  # the clients' training seconds, summed
    COMPUTE_MAX_S = "compute_max_s"  # the slowest client's training seconds
    AGGREGATE_S = "aggregate_s"  # the server's decode, fold and merge seconds
    EVALUATE_S = "evaluate_s"  # the server's central evaluation seconds

    # the classification tasks' evaluation fields, and the sft task's
    CLASSIFICATION = (ACCURACY, LOSS)
    SFT = (EVAL_LOSS, PERPLEXITY, TOKEN_ACCURACY, EXACT_MATCH)
    # every row holds these, after ROUND and the task's evaluation fields, in this order
    TRAINING = (TRAIN_LOSS, CLIENTS, REJECTED, UPLINK_BYTES, DOWNLINK_BYTES, EPSILON, SECONDS)
    # a classification row's first fields, in this order; a round's other fields follow
    FIXED = (ROUND, *CLASSIFICATION, *TRAINING)

    @staticmethod
    def fixed(metrics: Iterable[str]) -> tuple[str, ...]:
        """A row's first fields, in order, for a task evaluated on ``metrics``."""
        return (Round.ROUND, *metrics, *Round.TRAINING)


class ClientEval:
    """Federated evaluation's fields in a round row, ``<prefix>_<name>``: the
    prefix says which model the clients evaluated on their held-out slices
    (``LoraStrategy.evaluation_prefix``)."""

    FED = "fed"  # the global adapter (federated-eval = true)
    PERSONAL = "personal"  # each client's own model (strategies with personal parts)

    CLIENTS = "clients"  # clients whose evaluation reply was valid
    ACCURACY = "accuracy"  # example-weighted mean accuracy over them
    ACCURACY_SD = "accuracy_sd"  # example-weighted standard deviation of it across them
    LOSS = "loss"  # example-weighted mean loss over them

    @staticmethod
    def field(prefix: str, name: str) -> str:
        """The row's field: ``field(ClientEval.FED, ClientEval.ACCURACY)`` is ``fed_accuracy``."""
        return f"{prefix}_{name}"


def client_fields(metric: str) -> tuple[str, ...]:
    """The clients' own ``metric`` in a row, whichever model they evaluated
    (personal first); ``metric``: the task's primary one."""
    return tuple(ClientEval.field(prefix, metric)
                 for prefix in (ClientEval.PERSONAL, ClientEval.FED))


# the clients' own accuracy in a row, whichever model they evaluated (personal first)
CLIENT_ACCURACY = client_fields(ClientEval.ACCURACY)


class Summary:
    """``summary.json``: a finished run, over all its rounds. The task's
    evaluation fields appear as ``final(m)`` for each and ``best(primary)``,
    ``final_client(primary)``: for classification the constants below, for
    sft ``final_eval_loss`` … ``final_exact_match``, ``best_exact_match`` (or
    ``best_perplexity`` without generation)."""

    ROUNDS = "rounds"  # rounds in metrics.jsonl
    FINAL_ROUND = "final_round"  # the last round the primary metric was evaluated in
    FINAL_ACCURACY = "final_accuracy"  # central test accuracy at FINAL_ROUND
    FINAL_LOSS = "final_loss"  # central test loss at FINAL_ROUND
    BEST_ACCURACY = "best_accuracy"  # the highest central test accuracy of any round
    PRIMARY_METRIC = "primary_metric"  # the round field the run is judged by (task's)
    PRIMARY_DIRECTION = "primary_direction"  # "higher" or "lower": which is better
    UPLINK_BYTES = "uplink_bytes"  # Round.UPLINK_BYTES summed over the rounds
    DOWNLINK_BYTES = "downlink_bytes"  # Round.DOWNLINK_BYTES summed over the rounds
    CLIENT_UPDATES = "client_updates"  # Round.CLIENTS summed: updates folded in
    REJECTED_UPDATES = "rejected_updates"  # Round.REJECTED summed
    SECONDS = "seconds"  # Round.SECONDS summed (this attempt's and earlier ones' rounds)
    EPSILON = "epsilon"  # the last round's ε; null without DP
    FINAL_CLIENT_ACCURACY = "final_client_accuracy"  # CLIENT_ACCURACY at FINAL_ROUND
    STRATEGY = "strategy"  # the strategy's name
    LABEL_NAMES = "label_names"  # the classes the adapter predicts (`fedlora evaluate`)
    EPSILON_PER_CLIENT = "epsilon_per_client"  # partition → its ε (local DP); null otherwise
    WALL_SECONDS = "wall_seconds"  # wall-clock of the run, resumed attempts included
    OUT_DIR = "out_dir"  # the run directory

    @staticmethod
    def final(metric: str) -> str:
        """The field of ``metric``'s value at FINAL_ROUND: ``final_accuracy``."""
        return f"final_{metric}"

    @staticmethod
    def best(metric: str) -> str:
        """The field of ``metric``'s best value over the rounds: ``best_accuracy``."""
        return f"best_{metric}"

    @staticmethod
    def final_client(metric: str) -> str:
        """The field of the clients' own ``metric`` at FINAL_ROUND."""
        return f"final_client_{metric}"


class Compared:
    """``fedlora compare``'s summary.csv: one row per run, over its seeds
    (``*_mean``: mean over the seeds; ``*_ci95``: Student-t 95% half-width)."""

    GROUP = "group"  # the run's group: a plot panel and a table
    RUN = "run"  # the run's label
    SEEDS = "seeds"  # how many seeds
    FINAL_ACCURACY_MEAN = "final_accuracy_mean"  # of Summary.FINAL_ACCURACY
    FINAL_ACCURACY_CI95 = "final_accuracy_ci95"
    BEST_ACCURACY_MEAN = "best_accuracy_mean"  # of Summary.BEST_ACCURACY
    UPLINK_MB = "uplink_mb"  # mean Summary.UPLINK_BYTES, in MB
    DOWNLINK_MB = "downlink_mb"  # mean Summary.DOWNLINK_BYTES, in MB
    SECONDS_PER_ROUND_MEAN = "seconds_per_round_mean"  # mean of Summary.SECONDS / ROUNDS
    BEST_ACCURACY_CI95 = "best_accuracy_ci95"
    FINAL_ACCURACY_MIN = "final_accuracy_min"  # the lowest seed's Summary.FINAL_ACCURACY
    FINAL_ACCURACY_MAX = "final_accuracy_max"  # the highest seed's
    AGG_RESIDUAL_MEAN = "agg_residual_mean"  # mean over seeds of each's mean Round.AGG_RESIDUAL
    EPSILON_MEAN = "epsilon_mean"  # of Summary.EPSILON
    CLIENT_ACCURACY_MEAN = "client_accuracy_mean"  # of the last round's CLIENT_ACCURACY
    CLIENT_ACCURACY_CI95 = "client_accuracy_ci95"
    SEED_LIST = "seed_list"  # the seeds themselves, "1;2;3"

    # summary.csv's header, in this order (for runs judged by accuracy)
    COLUMNS = (GROUP, RUN, SEEDS, FINAL_ACCURACY_MEAN, FINAL_ACCURACY_CI95, BEST_ACCURACY_MEAN,
               UPLINK_MB, DOWNLINK_MB, SECONDS_PER_ROUND_MEAN, BEST_ACCURACY_CI95,
               FINAL_ACCURACY_MIN, FINAL_ACCURACY_MAX, AGG_RESIDUAL_MEAN, EPSILON_MEAN,
               CLIENT_ACCURACY_MEAN, CLIENT_ACCURACY_CI95, SEED_LIST)

    @staticmethod
    def header(metric: str) -> tuple[str, ...]:
        """summary.csv's header for runs judged by ``metric`` (their primary
        one): COLUMNS with ``accuracy`` read as it (``final_exact_match_mean``)."""
        return tuple(c.replace(ClientEval.ACCURACY, metric) for c in Compared.COLUMNS)
