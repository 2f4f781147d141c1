"""The ``fedlora`` command: simulate | evaluate | compare | report | keys | bench-scale |
trainer | supernode.

Bad input of any kind (unknown key, bad value, missing file or column, model
that does not load) ends with one ``fedlora: error: …`` line and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from fedlora.core.config import ConfigError, RunConfig, load_toml, parse_set_option
from fedlora.core.metric import Metric
from fedlora.runtime import quiet
from fedlora.runtime.progress import Lines, for_command


def _quiet_environment() -> None:
    """Quiet libraries, fedlora's own warnings (rejected replies) to stderr. The
    switches of libraries already imported (``quiet.libraries``) are thrown
    where a command imports the training stack (``fedlora.commands.prepare``,
    ``cmd_evaluate``): importing transformers here would delay every command,
    and Ray's start, by half a second."""
    quiet.environment()
    quiet.fedlora_logger("fedlora")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    from fedlora.commands.prepare import absolute_paths
    from fedlora.strategies import resolve

    overrides = load_toml(args.config) if args.config else {}
    for item in args.set or []:
        key, value = parse_set_option(item)
        overrides[key] = value
    return resolve(absolute_paths(overrides))


def _check_out_creatable(out: Path) -> None:
    """The run directory is made only when the rounds start, after the model
    and data are loaded: find a file in its way, or a parent it cannot be made
    in, now. A real try, not ``os.access``, which says yes to root everywhere."""
    try:
        parent = out
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {parent} "
                          f"({err.strerror or err})") from None


def _new_run_config(args: argparse.Namespace) -> RunConfig:
    """``simulate --out DIR``: a new run; DIR checked before anything heavy."""
    from fedlora.federation.results import check_out_dir

    if args.out is None:
        raise ConfigError("simulate needs --out DIR (a new run) or --resume DIR")
    out = str(Path(args.out).expanduser().resolve())
    check_out_dir(out)
    _check_out_creatable(Path(out))
    config = _config_from_args(args)
    if config["resume-from"]:
        raise ConfigError("config key 'resume-from': use `fedlora simulate --resume DIR`")
    return RunConfig({**config.to_dict(), "out-dir": out})


def _resumed_config(args: argparse.Namespace) -> RunConfig:
    """``simulate --resume DIR``: the run's own config (a ``--set`` that would
    change it is refused), its checkpoint checked before anything heavy."""
    from fedlora.federation import checkpoint
    from fedlora.federation.resume import RESUME_FREE_KEYS, check_unchanged, saved_config
    from fedlora.strategies import resolve

    if args.out is not None or args.config is not None:
        raise ConfigError("--resume DIR continues DIR with its own config: no --out or "
                          "--config")
    run_dir = Path(args.resume).expanduser().resolve()
    saved = saved_config(run_dir)
    overrides = dict(parse_set_option(item) for item in args.set or [])
    check_unchanged(saved, overrides)
    checkpoint.load(run_dir)  # a corrupt one is refused now, in one line
    free = {k: v for k, v in overrides.items() if k in RESUME_FREE_KEYS}
    return resolve({**saved.to_dict(), **free})


def _farewell(config: RunConfig, progress: Lines) -> Callable[[int], str]:
    """The line an interrupted simulation ends with (the live display, which
    the exit would leave behind, gone first)."""
    def line(signum: int) -> str:
        from fedlora.federation import checkpoint

        progress.close()
        out, name = Path(config["out-dir"]), signal.Signals(signum).name
        if not (out / "config.json").is_file():
            return f"fedlora: stopped by {name} before the run started; nothing was written"
        if (out / "summary.json").is_file():
            return f"fedlora: stopped by {name} after the run finished; results in {out}"
        try:
            saved = checkpoint.load(out)
        except ConfigError:
            saved = None
        done = saved.round if saved is not None else 0
        return (f"fedlora: stopped by {name}: {done} of "
                f"{config['rounds']} rounds complete in {out} (no summary.json: not a "
                f"finished run); continue with: fedlora simulate --resume {out}")

    return line


def _output(args: argparse.Namespace) -> None:
    """``--quiet``: fedlora's own lines only (its warnings and errors, the round
    and done lines); ``--verbose``: Flower's and Ray's logs too."""
    if args.quiet and args.verbose:
        raise ConfigError("--quiet and --verbose contradict each other; give one")
    if args.quiet:
        logging.getLogger("fedlora").setLevel(logging.WARNING)
        warnings.simplefilter("ignore")


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.runtime.stopping import stop_on_signals

    _output(args)
    # on a terminal the live display starts now: resolving the config and
    # starting Ray take seconds (fedlora.runtime.progress)
    with for_command(quiet=args.quiet) as progress:
        config = _resumed_config(args) if args.resume else _new_run_config(args)
        overrides_out = config["out-dir"]
        server_done = threading.Event()
        server_done.set()  # the round loop is not running yet
        with stop_on_signals(_farewell(config, progress), server_done):
            from fedlora.commands.prepare import preflight
            from fedlora.commands.simulation import simulate

            simulate(config, verbose=args.verbose, server_done=server_done,
                     prepare=functools.partial(preflight, config), progress=progress)
    summary_path = Path(overrides_out) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError("the simulation ended without writing summary.json")
    summary = json.loads(summary_path.read_text())
    primary = Metric.of_summary(summary).name
    final = summary[f"final_{primary}"]
    print(f"done: final {primary.replace('_', ' ')} "
          f"{'-' if final is None else format(final, '.4f')} after "
          f"{summary['rounds']} rounds ({summary['client_updates']} client updates, "
          f"{summary['rejected_updates']} rejected); results in {overrides_out}")
    if summary["client_updates"] == 0:
        print("fedlora: error: no client update was accepted in any round (see the "
              "'rejected' lines above)", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlora.commands.prepare import absolute_paths
    from fedlora.learning.features import evaluation_set, splits_for
    from fedlora.learning.models import ModelSpec, load_trained
    from fedlora.learning.tasks import task_for
    from fedlora.strategies import resolve
    from fedlora.wire.basedelta import BASE_DELTA_FILE

    quiet.libraries()
    run_dir = Path(args.run_dir)
    config_path, adapter_dir = run_dir / "config.json", run_dir / "adapter"
    summary_path = run_dir / "summary.json"
    if not all(p.is_file() for p in (config_path, adapter_dir / "adapter_config.json",
                                     summary_path)):
        raise ConfigError(f"{run_dir}: not a finished run (needs config.json, adapter/ "
                          "and summary.json)")
    saved = json.loads(config_path.read_text())
    # the classes the adapter was trained on: recorded in summary.json, or for
    # runs from before that, those of the run's own dataset
    classes = tuple(json.loads(summary_path.read_text()).get("label_names")
                    or splits_for(resolve(saved)).label_names)
    if args.dataset:
        saved["dataset"] = absolute_paths({"dataset": args.dataset})["dataset"]
    config = resolve(saved)
    spec = ModelSpec.from_config(config, classes)
    base_delta = run_dir / BASE_DELTA_FILE
    model = load_trained(spec, adapter_dir, base_delta if base_delta.is_file() else None)
    # the run's own evaluation set (its seeded eval-examples sample), so the
    # numbers match the run's final metrics; --all for the whole test split;
    # --dataset's test split is mapped onto the run's classes by name
    test = evaluation_set(config, model, whole=args.all)
    metrics = task_for(config).evaluate(model, test)
    print(json.dumps({"run_dir": str(run_dir), "dataset": config["dataset"],
                      "examples": len(test), **metrics}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedlora.commands.compare import RunFailed, compare

    try:
        return compare(args.comparison, args.seeds, args.out)
    except RunFailed as err:  # not bad input: exit 1, not 2
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 1


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.commands.report import report

    return report(args.run_dirs, args.out)


def cmd_keys(args: argparse.Namespace) -> int:
    """The core keys, then each strategy's own; ``--markdown``: README's table."""
    from fedlora.commands import keytable

    print(keytable.markdown() if args.markdown else keytable.plain(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated LoRA simulation on Ray",
                         epilog="Run-config keys: `fedlora keys` lists every key with its "
                                "default and choices (`fedlora keys --markdown`: as a table).")
    sim.add_argument("--config", help="TOML file with run-config keys")
    sim.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                     help="override run-config keys (see `fedlora keys`)")
    sim.add_argument("--out", help="run directory to create")
    sim.add_argument("--resume", metavar="DIR",
                     help="continue the interrupted run in DIR after its last complete "
                          "round, with its own config")
    sim.add_argument("--verbose", action="store_true",
                     help="show Flower and Ray logs (with the progress display on a terminal)")
    sim.add_argument("--quiet", action="store_true",
                     help="only fedlora's own lines: each round's line, the done line, "
                          "warnings and errors (no progress display)")
    sim.set_defaults(run=cmd_simulate)
    ev = sub.add_parser("evaluate", help="reload a run's adapter and evaluate it")
    ev.add_argument("run_dir")
    ev.add_argument("--dataset", help="evaluate on this dataset's test split instead")
    ev.add_argument("--all", action="store_true",
                    help="the whole test split, not the run's eval-examples sample")
    ev.set_defaults(run=cmd_evaluate)
    cmp = sub.add_parser(
        "compare", help="run a set of simulations over several seeds and compare them",
        description="Run every [[run]] of a comparison TOML ([base] keys plus each run's "
                    "label, group and differing keys) once per seed, each as `fedlora "
                    "simulate` into OUT/<label>/seed-<s> (finished runs are reused), then "
                    "write OUT/summary.csv, summary.md and accuracy plots (mean and 95% "
                    "CI over seeds). See fedlora/commands/compare.py.")
    cmp.add_argument("comparison", metavar="CONFIG.toml", help="comparison file")
    cmp.add_argument("--seeds", metavar="N|LIST",
                     help="N = seeds 1..N, or a comma list such as 1,5,9 (default: one "
                          "seed, [base]'s seed key if it has one, else 1)")
    cmp.add_argument("--out", required=True, help="comparison directory (created or resumed)")
    cmp.set_defaults(run=cmd_compare)
    rep = sub.add_parser(
        "report", help="a table and accuracy plots for any set of finished runs",
        description="Read finished run directories (written by `fedlora simulate`, or "
                    "`fedlora compare`'s OUT/<label>/seed-<s>) and write DIR/report.md "
                    "(final and best accuracy, uplink and downlink bytes, ε, seconds per "
                    "round) and DIR/accuracy_vs_round.png, accuracy_vs_uplink.png. See "
                    "fedlora/commands/report.py.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directory")
    rep.add_argument("--out", required=True, help="report directory (created if missing)")
    rep.set_defaults(run=cmd_report)
    keys = sub.add_parser("keys", help="list the run-config keys, defaults and choices")
    keys.add_argument("--markdown", action="store_true",
                      help="as the markdown table in README.md (built-in strategies)")
    keys.set_defaults(run=cmd_keys)
    # parsed by fedlora.commands.bench_scale itself (main() hands it the rest of the line)
    sub.add_parser("bench-scale", add_help=False,
                   help="measure simulation overhead at 10/100/500 clients vs the stock "
                        "Flower pattern (see `fedlora bench-scale --help`)")
    sub.add_parser("supernode", add_help=False,
                   help="flower-supernode with a shorter poll (see `fedlora supernode "
                        "--help`)")
    sub.add_parser("trainer", add_help=False,
                   help="serve a deployed node's warm trainer over gRPC (see `fedlora "
                        "trainer --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-scale"]:
        from fedlora.commands import bench_scale

        run = functools.partial(bench_scale.main, argv[1:])
    elif argv[:1] == ["trainer"]:  # its own flags, and no training stack before it listens
        from fedlora.node import trainer

        return trainer.main(argv[1:])
    elif argv[:1] == ["supernode"]:  # flower-supernode's flags
        from fedlora.node import supernode

        return supernode.main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        run = functools.partial(args.run, args)
    _quiet_environment()
    try:
        return run()
    except ConfigError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
