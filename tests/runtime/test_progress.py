"""What `fedlora simulate` shows while it runs (``fedlora.runtime.progress``).

Off a terminal only the plain round lines; on a terminal (a rich console
forced to be one, writing to a string) a live line with the clients done of
those sampled and ETAs; ``--quiet`` leaves fedlora's own lines only, checked
on one real tiny run; ``--quiet --verbose`` is refused in one line.
"""

from __future__ import annotations

import io
import re

import pytest
from processes import ours, stop
from rich.console import Console
from runs import _env, run_fedlora

from fedlora.commands import cli
from fedlora.core.fields import CLIENT_ACCURACY
from fedlora.runtime import progress
from fedlora.runtime.progress import Display, Lines, for_command, round_line

ROUND_LINE = "round 1/5  acc 0.5000 loss 1.2000  train_loss 1.3000  clients 2  up 0.01MB"
FEDLORA_LINE = re.compile(r"(round \d+/\d+  |done: |fedlora: (WARNING|ERROR|error): )")


def _one_round(reporter: Lines) -> None:
    """What the round loop calls in one round: 3 of 4 replies, one rejected."""
    reporter.warming(2)
    reporter.round_started(1, 5, 4)
    for index, _ in enumerate(reporter.counted(["a", "b", "c"])):
        if index == 1:
            reporter.rejected()
    reporter.evaluating()
    reporter.round_ended(ROUND_LINE)


def test_off_a_terminal_only_the_round_lines(capsys):
    reporter = for_command()  # under pytest stderr is no terminal
    assert type(reporter) is Lines
    with reporter:
        _one_round(reporter)
    out, err = capsys.readouterr()
    assert out == ROUND_LINE + "\n"
    assert err == ""


def test_quiet_never_shows_the_display(monkeypatch):
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    assert type(for_command(quiet=True)) is Lines


def test_a_cohort_reply_counts_as_its_clients():
    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    t = [100.0]
    display = Display(console, now=lambda: t[0])
    with display:
        display.round_started(1, 5, 8)  # two cohorts of 4 clients
        replies = display.counted(iter(["first", "second"]), lambda reply: 4)
        next(replies)
        t[0] = 110.0
        assert display.etas()[0] == 10.0  # 4 of 8 clients in 10 s, not 1 of 8
        display.refresh()
    assert "clients 4/8" in console.file.getvalue()


def test_on_a_terminal_counts_and_etas(capsys):
    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    t = [100.0]
    display = Display(console, now=lambda: t[0])
    with display:
        display.warming(2)
        t[0] = 110.0
        display.round_started(1, 5, 8)
        replies = display.counted(iter(range(8)))
        for _ in range(3):
            next(replies)
        display.rejected()
        t[0] = 122.0
        display.refresh()
        # 3 of 8 in 12 s: 20 s to go; 4 more rounds at 12 + 20 s each
        assert display.etas() == (20.0, 20.0 + 4 * 32.0)
        list(replies)
        display.evaluating()
        t[0] = 140.0
        display.round_ended(ROUND_LINE)
        t[0] = 141.0
        display.round_started(2, 5, 8)
        assert display.etas() == (30.0, 30.0 + 3 * 30.0)  # from round 1's 30 s
        display.refresh()
    shown = console.file.getvalue()
    assert "\x1b[" in shown  # drawn in place
    assert "starting: Ray and 2 workers warming up, preparing data" in shown
    assert "round 1/5" in shown
    assert "clients 3/8 (1 rejected)  0:12  ETA round 0:20, run 2:28" in shown
    assert "evaluating" in shown
    assert "clients 0/8  0:00  ETA round 0:30, run 2:00" in shown
    # the round line itself goes to stdout, plain
    assert capsys.readouterr().out == ROUND_LINE + "\n"


def test_the_round_line_shows_what_the_round_has():
    record = {"round": 3, "accuracy": None, "loss": None, "train_loss": 0.61234,
              "clients": 5, "rejected": 0, "declined": 0, "missing": 0, "epsilon": None,
              "uplink_bytes": 1_234_567, "downlink_bytes": 2_500_000, "seconds": 4.26}
    assert round_line(record, 10, "acc -", CLIENT_ACCURACY) == (
        "round 3/10  acc -  train_loss 0.6123  clients 5  up 1.23MB  down 2.50MB  4.3s")
    record |= {"accuracy": 0.81, "loss": 0.5, "fed_accuracy": 0.7, "personal_accuracy": 0.75,
               "rejected": 1, "missing": 2, "epsilon": 1.23456}
    assert round_line(record, 10, "acc 0.8100 loss 0.5000", CLIENT_ACCURACY) == (
        "round 3/10  acc 0.8100 loss 0.5000  train_loss 0.6123  clients 5  "
        "personal_accuracy 0.7500  fed_accuracy 0.7000  rejected 1  missing 2  eps 1.235  "
        "up 1.23MB  down 2.50MB  4.3s")


def test_quiet_and_verbose_refused_in_one_line(tmp_path, capsys):
    code = cli.main(["simulate", "--quiet", "--verbose", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines() == ["fedlora: error: --quiet and --verbose contradict each "
                                "other; give one"]
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_quiet_run_prints_fedlora_lines_only(tmp_path, tiny_bert, topic_dataset):
    settings = {"model": tiny_bert, "dataset": topic_dataset, "num-clients": 4,
                "clients-per-round": 2, "rounds": 2, "batch-size": 8, "partition": "iid",
                "client-cpus": 1}
    try:
        result = run_fedlora(tmp_path, "simulate", "--quiet", "--set",
                             *[f"{k}={v}" for k, v in settings.items()],
                             "--out", str(tmp_path / "run"), timeout=300)
    finally:
        stop(ours(_env(tmp_path)["FLWR_HOME"]))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert [line for line in lines if not FEDLORA_LINE.match(line)] == []
    assert [line.split()[1] for line in result.stdout.splitlines()
            if line.startswith("round ")] == ["1/2", "2/2"]
    assert result.stdout.splitlines()[-1].startswith("done: ")
    assert "\x1b" not in result.stdout + result.stderr
