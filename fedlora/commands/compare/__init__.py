"""``fedlora compare``: run a set of simulations over several seeds, side by side.

A comparison file (TOML) holds the shared run config under ``[base]`` and one
``[[run]]`` table per simulation: a ``label`` (its directory name), a ``group``
(one plot panel and one table per group) and the run-config keys that differ.
Every run is simulated once per seed, each as a real ``fedlora simulate`` in a
child process, into ``OUT/<label>/seed-<s>`` with its output in
``OUT/<label>/seed-<s>.log``. Then ``OUT/summary.csv``, ``OUT/summary.md``,
``OUT/accuracy_vs_round.png`` and ``OUT/accuracy_vs_uplink.png`` are written.

Trackers: with a ``tracker`` key in ``[base]`` each run × seed is logged as
its own tracker run, all under one experiment (``tracker-project``) in one
store (``tracker-dir``, by default ``OUT/tracker``), tagged with its label,
group and seed (``tracker-tags``). The tracker keys change no result: a
finished run is reused whatever they say (``fedlora report --tracker``
uploads it).

Running the same command again continues a comparison, so hours of finished
work are never redone: a finished run (one with ``summary.json``) is reused;
an unfinished one that was started with this comparison's settings goes on
after its last checkpointed round (``fedlora simulate --resume``, its log
appended to); any other unfinished one (other settings, no ``config.json``, a
resume refused for a corrupt checkpoint) is removed and run from round 1.

SIGINT or SIGTERM stops the comparison the way it stops ``fedlora
simulate``: the signal is passed on to the running child, which saves where
it is, stops Ray and exits (killed with its processes if it takes more than
``CHILD_STOP_S``); then no further run starts, no summary is written, one line
says how to continue and the exit code is 128 + the signal's number (130,
143). The signal is always passed on, also when a terminal's Ctrl-C has
already reached the child through the process group: a second signal only
makes the child skip the grace its round loop gets, and a ``kill`` aimed at
``fedlora compare`` alone must reach the child too.

Seeds: ``--seeds 3`` means seeds 1, 2, 3 and ``--seeds 1,5,9`` exactly those.
Without ``--seeds`` the comparison runs one seed: ``[base]``'s ``seed`` key if
it has one, else seed 1. A ``seed`` key together with ``--seeds`` (or in a
``[[run]]`` table at all) is an error: every run gets the same seeds.

``summary.csv`` has one row per run; ``seeds`` is the number of seeds (the
seeds themselves are in ``seed_list``, e.g. ``1;2;3``). ``*_mean`` is the mean
over seeds and ``*_ci95`` the half-width of the Student-t 95% interval of that
mean; an empty cell means "not applicable" (a ci95 of one seed, ε without DP).
Its columns are named, with their meanings, in ``fedlora.core.fields.Compared``. Runs are
judged by their task's primary metric (``primary_metric`` in summary.json:
accuracy, or exact match / perplexity for task=sft), which every run of a
comparison must share; the ``accuracy`` columns are then named after it
(``final_exact_match_mean``).

The package, one job a module: ``plan`` (the comparison file and its checks),
``child`` (one child process and the signals passed on to it), ``runs`` (one
run at one seed: reused, resumed or run afresh), ``stats`` (mean and Student-t
ci95 over the seeds), ``output`` (summary.csv, summary.md, the plots) and
``command`` (the whole command).
"""

from fedlora.commands.compare.child import SIGNALS, CompareInterrupted
from fedlora.commands.compare.command import compare
from fedlora.commands.compare.output import OUTPUTS
from fedlora.commands.compare.plan import Run, load_plan, parse_seeds, run_dir
from fedlora.commands.compare.runs import RunFailed
from fedlora.commands.compare.stats import curve, mean_ci95

__all__ = ["OUTPUTS", "SIGNALS", "CompareInterrupted", "Run", "RunFailed", "compare", "curve",
           "load_plan", "mean_ci95", "parse_seeds", "run_dir"]
