"""The names of what a run records (``fedlora.core.fields``): each named once,
and the writers write exactly the named fields."""

from __future__ import annotations

import math
import re

import pytest

from fedlora.commands.compare.plan import Run
from fedlora.commands.compare.stats import summarize
from fedlora.core.fields import CLIENT_ACCURACY, ClientEval, Compared, Round, Summary
from fedlora.core.metric import Metric
from fedlora.federation.results import RunWriter


def _names(cls: type) -> dict[str, str]:
    return {k: v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}


@pytest.mark.parametrize("cls", [Round, ClientEval, Summary, Compared])
def test_each_name_is_one_field(cls):
    names = _names(cls)
    assert names and all(re.fullmatch(r"[a-z][a-z0-9_]*", v) for v in names.values())
    assert len(set(names.values())) == len(names)  # no two constants name one field
    assert all(k.lower() == v for k, v in names.items())  # the constant reads as the field


def test_the_fixed_round_fields_and_the_columns_are_named():
    assert set(Round.FIXED) <= set(_names(Round).values()) and Round.FIXED[0] == "round"
    assert sorted(Compared.COLUMNS) == sorted(_names(Compared).values())
    assert CLIENT_ACCURACY == ("personal_accuracy", "fed_accuracy")


def test_summary_json_holds_the_named_fields(tmp_path):
    writer = RunWriter(tmp_path, None)
    writer.add_round({Round.ROUND: 1, Round.ACCURACY: 0.5, Round.UPLINK_BYTES: 10,
                      Round.DOWNLINK_BYTES: 20, Round.CLIENTS: 2, Round.REJECTED: 0,
                      Round.SECONDS: 1.0})
    extra = {Summary.STRATEGY: "fedavg", Summary.LABEL_NAMES: ["a", "b"],
             Summary.EPSILON_PER_CLIENT: None, Summary.WALL_SECONDS: 1.5,
             Summary.OUT_DIR: str(tmp_path)}  # what the round loop adds
    summary = writer.finish(extra)
    assert sorted(summary) == sorted(_names(Summary).values())
    assert summary[Summary.FINAL_ACCURACY] == 0.5 and summary[Summary.UPLINK_BYTES] == 10


def test_a_summary_csv_row_holds_the_columns():
    summary = {Summary.FINAL_ACCURACY: 0.5, Summary.BEST_ACCURACY: 0.6, Summary.UPLINK_BYTES: 1,
               Summary.DOWNLINK_BYTES: 2, Summary.SECONDS: 3.0, Summary.ROUNDS: 1}
    row = summarize(Run("a", "g", {}), {1: (summary, [{Round.ROUND: 1}])})
    assert list(row) == list(Compared.COLUMNS)
    assert row[Compared.FINAL_ACCURACY_MEAN] == 0.5 and math.isnan(row[Compared.EPSILON_MEAN])


def test_an_sft_summary_names_its_task_metrics(tmp_path):
    writer = RunWriter(tmp_path, None)
    writer.add_round({Round.ROUND: 1, Round.EXACT_MATCH: 0.25, Round.PERPLEXITY: 3.0,
                      Round.UPLINK_BYTES: 10, Round.DOWNLINK_BYTES: 20, Round.CLIENTS: 2,
                      Round.REJECTED: 0, Round.SECONDS: 1.0}, Round.SFT)
    assert list(writer.rounds[0])[:6] == list(Round.fixed(Round.SFT))[:6]
    summary = writer.finish({}, Round.SFT, Metric(Round.EXACT_MATCH))
    classification_only = {Summary.FINAL_ACCURACY, Summary.FINAL_LOSS, Summary.BEST_ACCURACY,
                           Summary.FINAL_CLIENT_ACCURACY}
    named = {*(Summary.final(m) for m in Round.SFT), Summary.best(Round.EXACT_MATCH),
             Summary.final_client(Round.EXACT_MATCH)}
    extra = {Summary.STRATEGY, Summary.LABEL_NAMES, Summary.EPSILON_PER_CLIENT,
             Summary.WALL_SECONDS, Summary.OUT_DIR}  # the round loop adds these
    assert set(summary) == (set(_names(Summary).values()) - classification_only - extra) | named
    assert (summary[Summary.PRIMARY_METRIC], summary[Summary.best(Round.EXACT_MATCH)]) == (
        Round.EXACT_MATCH, 0.25)


def test_summary_csv_is_named_after_the_primary_metric():
    header = Compared.header(Round.EXACT_MATCH)
    assert header[3] == "final_exact_match_mean" and len(header) == len(Compared.COLUMNS)
    assert Compared.header(Round.ACCURACY) == Compared.COLUMNS
