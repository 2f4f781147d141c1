"""What a run shows while it goes, fed by the driver only (the round loop).

Two reporters with one interface:

* ``Lines`` prints each round's line on stdout when the round ends, nothing
  else. It is ``run_federation``'s default (library use, ``server/app.py``),
  and what ``fedlora simulate`` uses off a terminal (CI, log files: no
  control characters) and under ``--quiet``.
* ``Display`` (``fedlora simulate`` where stderr is a terminal) adds one live
  line on stderr, drawn by rich: "starting: …" while Ray, its workers and the
  driver's data get ready, then the round (r/R), the clients done of those
  sampled (rejected replies apart), the round's elapsed time, its ETA from the
  rate of replies so far and the run's from the rounds before. The round lines
  still go to stdout, printed above it; the line is gone when the run ends.

The round loop (``fedlora.federation.loop``) calls ``round_started``, passes the
round's train replies through ``counted``, hands the server round
(``fedlora.federation.round``) ``rejected`` to call on each rejection, and
calls ``evaluating`` and ``round_ended`` with the round's ``round_line``;
``fedlora.commands.simulation`` calls ``warming`` once Ray is up. Every count
is of replies the server has pulled: Ray workers report nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from fedlora.core.fields import Round

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

T = TypeVar("T")
REFRESH_PER_S = 2


def clock(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour); ``-`` when not known."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def round_line(record: dict[str, Any], rounds: int, evaluation: str,
               client_keys: tuple[str, ...]) -> str:
    """The one line shown per round, from its metrics.jsonl record (a count
    that is zero and a metric the round lacks are left out). ``evaluation``
    is the central evaluation's part, as the run's task writes it
    (``Task.progress``); ``client_keys`` the federated evaluation's fields."""
    parts = [f"round {record[Round.ROUND]}/{rounds}", evaluation,
             f"train_loss {record[Round.TRAIN_LOSS]:.4f}", f"clients {record[Round.CLIENTS]}"]
    parts += [f"{key} {record[key]:.4f}" for key in client_keys
              if record.get(key) is not None]
    parts += [f"{key} {record[key]}" for key in (Round.REJECTED, Round.DECLINED, Round.MISSING)
              if record.get(key)]
    if record[Round.EPSILON] is not None:
        parts.append(f"eps {record[Round.EPSILON]:.3f}")
    parts += [f"up {record[Round.UPLINK_BYTES] / 1e6:.2f}MB",
              f"down {record[Round.DOWNLINK_BYTES] / 1e6:.2f}MB",
              f"{record[Round.SECONDS]:.1f}s"]
    return "  ".join(parts)


class Lines:
    """The plain reporter: the round line on stdout as each round ends."""

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop showing anything live (again: a no-op)."""

    def warming(self, workers: int) -> None:
        """Ray is up with ``workers`` client workers (warming up); the driver prepares."""

    def round_started(self, server_round: int, rounds: int, sampled: int) -> None:
        """Round ``server_round`` of ``rounds`` has sent its ``sampled`` requests."""

    def counted(self, replies: Iterable[T], clients: Callable[[T], int] = lambda _: 1
                ) -> Iterable[T]:
        """``replies`` as they come, each counted as ``clients(reply)`` clients
        done (a cohort's reply answers for several)."""
        return replies

    def rejected(self) -> None:
        """One of the replies was rejected."""

    def evaluating(self) -> None:
        """The round's replies are in; the server evaluates."""

    def round_ended(self, line: str) -> None:
        print(line, flush=True)


class Display(Lines):
    """The plain lines plus a live line on a terminal (``console``: rich's, on
    stderr by default); ``now`` is the time source (tests pass their own)."""

    def __init__(self, console: Console | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.now = now
        self._live: Live | None = None
        self._handlers: list[tuple[logging.StreamHandler, object]] = []
        self._began = now()
        self._workers: int | None = None
        self._round = self._rounds = self._sampled = self._received = self._rejected = 0
        self._round_began: float | None = None
        self._evaluating = False
        self._durations: list[float] = []

    def __enter__(self) -> Display:
        from rich.live import Live

        self._began = self.now()
        self._live = Live(console=self.console, get_renderable=self.render, transient=True,
                          refresh_per_second=REFRESH_PER_S,
                          redirect_stdout=_is_terminal(sys.stdout), redirect_stderr=True)
        self._live.start(refresh=True)
        # a run ended by os._exit (fedlora.runtime.stopping) must not leave it hidden
        self.console.show_cursor(True)
        self._log_above()
        return self

    def close(self) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers = []
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _log_above(self) -> None:
        """Log handlers writing to the terminal (fedlora's, Flower's under
        --verbose) write through rich while the line is live, so that a
        warning is printed above it instead of into it."""
        proxies = {id(proxy.rich_proxied_file): proxy for proxy in (sys.stdout, sys.stderr)
                   if hasattr(proxy, "rich_proxied_file")}
        loggers = [logging.getLogger(), *(logger for logger in
                                          list(logging.root.manager.loggerDict.values())
                                          if isinstance(logger, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                proxy = proxies.get(id(getattr(handler, "stream", None)))
                if isinstance(handler, logging.StreamHandler) and proxy is not None:
                    self._handlers.append((handler, handler.setStream(proxy)))

    def refresh(self) -> None:
        live = self._live
        if live is not None:
            live.refresh()

    # -- the round loop's calls ----------------------------------------------------
    def warming(self, workers: int) -> None:
        self._workers = workers
        self.refresh()

    def round_started(self, server_round: int, rounds: int, sampled: int) -> None:
        self._round, self._rounds, self._sampled = server_round, rounds, sampled
        self._received = self._rejected = 0
        self._evaluating = False
        self._round_began = self.now()
        self.refresh()

    def counted(self, replies: Iterable[T], clients: Callable[[T], int] = lambda _: 1
                ) -> Iterator[T]:
        for reply in replies:
            self._received += clients(reply)
            yield reply

    def rejected(self) -> None:
        self._rejected += 1

    def evaluating(self) -> None:
        self._evaluating = True
        self.refresh()

    def round_ended(self, line: str) -> None:
        if self._round_began is not None:
            self._durations.append(self.now() - self._round_began)
        self._round_began = None
        print(line, flush=True)  # above the live line where stdout is the terminal too
        self.refresh()

    # -- what it shows -------------------------------------------------------------
    def etas(self) -> tuple[float | None, float | None]:
        """(the round's ETA, the run's), in seconds; None where not known yet.
        The round's comes from the rate of replies so far (before the first,
        from the mean round); the run's adds the rounds after this one at
        the mean round (before one has ended, at this round's estimate)."""
        elapsed = 0.0 if self._round_began is None else self.now() - self._round_began
        mean = sum(self._durations) / len(self._durations) if self._durations else None
        round_eta = None
        if self._round_began is None:
            round_eta = 0.0
        elif self._received and not self._evaluating:
            round_eta = elapsed / self._received * max(self._sampled - self._received, 0)
        elif mean is not None:
            round_eta = max(mean - elapsed, 0.0)
        per_round = mean if mean is not None else (
            None if round_eta is None or self._round_began is None else elapsed + round_eta)
        if round_eta is None or per_round is None:
            return round_eta, None
        return round_eta, round_eta + (self._rounds - self._round) * per_round

    def render(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        since = clock(self.now() - self._began)
        if not self._round:
            what = ("Ray" if self._workers is None else
                    f"Ray and {self._workers} workers warming up, preparing data")
            return Text(f"starting: {what}  {since}")
        round_eta, run_eta = self.etas()
        if self._round_began is None:
            if self._round >= self._rounds:
                return Text(f"finishing: saving the results, stopping Ray  {since}")
            return Text(f"round {self._round + 1}/{self._rounds}: sampling  "
                        f"ETA run {clock(run_eta)}")
        clients = f"clients {self._received}/{self._sampled}"
        if self._rejected:
            clients += f" ({self._rejected} rejected)"
        state = "evaluating" if self._evaluating else f"ETA round {clock(round_eta)}"
        line = Table.grid(padding=(0, 1))
        line.add_row(Text(f"round {self._round}/{self._rounds}"),
                     ProgressBar(total=max(self._sampled, 1), completed=self._received,
                                 width=20),
                     Text(f"{clients}  {clock(self.now() - self._round_began)}  {state}, "
                          f"run {clock(run_eta)}"))
        return line


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def for_command(quiet: bool = False) -> Lines:
    """``fedlora simulate``'s reporter: the live display where stderr is a
    terminal (not a dumb one), plain lines elsewhere and under ``--quiet``."""
    if quiet or not _is_terminal(sys.stderr):
        return Lines()
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal or console.is_dumb_terminal:
        return Lines()
    return Display(console)
