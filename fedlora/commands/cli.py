"""The ``fedlora`` command: simulate | evaluate | export | generate | compare | report |
keys | bench-scale | trainer | supernode.

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

from fedlora.core.config import (
    ConfigError,
    RunConfig,
    check_file_types,
    load_toml,
    parse_set_option,
)
from fedlora.core.fields import Summary
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
    from fedlora.strategies import resolve, strategy_keys

    overrides = load_toml(args.config) if args.config else {}
    check_file_types(overrides, strategy_keys(), f"config file {args.config}")
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
    if config.resume_from:
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
        out, name = Path(config.out_dir), signal.Signals(signum).name
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
                f"{config.rounds} rounds complete in {out} (no summary.json: not a "
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
    from fedlora.federation import trackers
    from fedlora.runtime.stopping import stop_on_signals

    _output(args)
    # on a terminal the live display starts now: resolving the config and
    # starting Ray take seconds (fedlora.runtime.progress)
    with for_command(quiet=args.quiet) as progress:
        config = _resumed_config(args) if args.resume else _new_run_config(args)
        trackers.check(config)  # before Ray starts; the round loop checks again (flwr run)
        overrides_out = config.out_dir
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
    final = summary[Summary.final(primary)]
    print(f"done: final {primary.replace('_', ' ')} "
          f"{'-' if final is None else format(final, '.4f')} after "
          f"{summary[Summary.ROUNDS]} rounds ({summary[Summary.CLIENT_UPDATES]} client "
          f"updates, {summary[Summary.REJECTED_UPDATES]} rejected); results in {overrides_out}")
    if summary[Summary.CLIENT_UPDATES] == 0:
        print("fedlora: error: no client update was accepted in any round (see the "
              "'rejected' lines above)", file=sys.stderr)
        return 1
    return 0


def _json_object(path: Path) -> dict:
    """A run file that must hold a JSON object, or one line saying it does not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_label_map(text: str | None) -> dict[str, str]:
    """``--label-map 0=world,1=sports`` → {"0": "world", "1": "sports"}."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not source or not target:
            raise ConfigError(f"--label-map {text!r}: expected CLASS=RUN_CLASS pairs "
                              "separated by commas, e.g. 0=world,1=sports")
        if source in mapping:
            raise ConfigError(f"--label-map {text!r}: class {source!r} is mapped twice")
        mapping[source] = target
    return mapping


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlora.commands.prepare import absolute_paths
    from fedlora.learning.features import evaluation_set, splits_for
    from fedlora.learning.models import ModelSpec, load_trained
    from fedlora.learning.tasks import task_for
    from fedlora.strategies import resolve
    from fedlora.wire.basedelta import BASE_DELTA_FILE

    quiet.libraries()
    label_map = parse_label_map(args.label_map)
    run_dir = Path(args.run_dir)
    config_path, adapter_dir = run_dir / "config.json", run_dir / "adapter"
    summary_path = run_dir / "summary.json"
    if not all(p.is_file() for p in (config_path, adapter_dir / "adapter_config.json",
                                     summary_path)):
        raise ConfigError(f"{run_dir}: not a finished run (needs config.json, adapter/ "
                          "and summary.json)")
    saved = _json_object(config_path)
    try:
        resolve(saved)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None
    # the classes the adapter was trained on: recorded in summary.json, or for
    # runs from before that, those of the run's own dataset
    classes = tuple(_json_object(summary_path).get(Summary.LABEL_NAMES)
                    or splits_for(resolve(saved)).label_names)
    if args.dataset:
        saved["dataset"] = absolute_paths({"dataset": args.dataset})["dataset"]
    config = resolve(saved)
    spec = ModelSpec.from_config(config, classes)
    base_delta = run_dir / BASE_DELTA_FILE
    try:
        model = load_trained(spec, adapter_dir, base_delta if base_delta.is_file() else None)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file is bad input, one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"{run_dir}: the trained adapter cannot be loaded "
                          f"({type(err).__name__}: {reason}); is adapter/ or "
                          f"{BASE_DELTA_FILE} damaged?") from None
    # the run's own evaluation set (its seeded eval-examples sample), so the
    # numbers match the run's final metrics; --all for the whole test split;
    # --dataset's test split is mapped onto the run's classes by name
    test = evaluation_set(config, model, whole=args.all, label_map=label_map)
    metrics = task_for(config).evaluate(model, test)
    print(json.dumps({"run_dir": str(run_dir), "dataset": config.dataset,
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
    """The report (``--out``), the upload to trackers (``--tracker``), or both."""
    from fedlora.commands.report import report
    from fedlora.commands.upload import plan, upload

    if args.out is None and args.tracker is None:
        raise ConfigError("report needs --out DIR, --tracker KIND or both")
    if args.tracker is None and (args.tracker_dir or args.tracker_uri):
        raise ConfigError("--tracker-dir and --tracker-uri go with --tracker KIND")
    if args.tracker is not None and args.tracker.strip() == "none":
        raise ConfigError("--tracker none: name the trackers to log the runs to")
    uploads = []
    if args.tracker is not None:  # checked before the report is written
        directory = Path(args.tracker_dir or Path(args.out or ".") / "tracker").resolve()
        uploads = plan(args.run_dirs, {
            "tracker": args.tracker, "tracker-dir": str(directory),
            "tracker-uri": args.tracker_uri or "", "tracker-project": args.tracker_project})
    code = report(args.run_dirs, args.out) if args.out is not None else 0
    return (upload(uploads) if uploads else 0) or code


def cmd_export(args: argparse.Namespace) -> int:
    from fedlora.commands.export import export_merged

    out = export_merged(args.run_dir, args.merge, args.round)
    print(f"exported the merged model of {args.run_dir} to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedlora.commands.generate import generate

    print(generate(args.run_dir, args.prompt, args.max_new_tokens, args.round))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The core keys, then each strategy's own; ``--markdown``: docs/cli.md's table."""
    from fedlora.commands import keytable

    print(keytable.markdown() if args.markdown else keytable.plain(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated LoRA simulation on Ray",
                         epilog="Run-config keys: `fedlora keys` lists every key with its "
                                "default and choices (`fedlora keys --markdown`: as a table).")
    sim.add_argument("--config", help="TOML file with run-config keys, each value of its "
                                      "key's type (rounds = 3, not \"3\")")
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
    ev.add_argument("--label-map", metavar="CLASS=RUN_CLASS,...",
                    help="--dataset's classes by the run's names, e.g. 0=world,1=sports "
                         "(classes are matched by name; bare integers need this)")
    ev.set_defaults(run=cmd_evaluate)
    cmp = sub.add_parser(
        "compare", help="run a set of simulations over several seeds and compare them",
        description="Run every [[run]] of a comparison TOML ([base] keys plus each run's "
                    "label, group and differing keys) once per seed, each as `fedlora "
                    "simulate` into OUT/<label>/seed-<s> (finished runs are reused), then "
                    "write OUT/summary.csv, summary.md and accuracy plots (mean and 95% "
                    "CI over seeds). See fedlora/commands/compare/.")
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
    rep.add_argument("--out", help="report directory (created if missing)")
    rep.add_argument("--tracker", metavar="KIND[,KIND]",
                     help="also log each run to these trackers (tensorboard, mlflow, wandb), "
                          "as if logged while it ran (docs/trackers.md)")
    rep.add_argument("--tracker-dir", metavar="DIR",
                     help="where the trackers write (default: OUT/tracker, or ./tracker "
                          "without --out)")
    rep.add_argument("--tracker-uri", metavar="URI",
                     help="MLflow tracking URI (default: sqlite:///TRACKER_DIR/mlflow.db)")
    rep.add_argument("--tracker-project", metavar="NAME", default="fedlora",
                     help="MLflow experiment and W&B project (default: fedlora)")
    rep.set_defaults(run=cmd_report)
    exp = sub.add_parser("export", help="a run's model merged into one Hugging Face model",
                         description="Add the run's base change (FLoRA, FedEx-LoRA), merge its "
                                     "LoRA adapter (PEFT merge_and_unload) and save the model "
                                     "and tokenizer to OUT, loadable with from_pretrained. "
                                     "See fedlora/commands/export.py.")
    exp.add_argument("run_dir")
    exp.add_argument("--merge", required=True, metavar="OUT",
                     help="directory to write (must not exist, or be empty)")
    exp.add_argument("--round", type=int, metavar="T",
                     help="export the round-T snapshot (save-every) instead")
    exp.set_defaults(run=cmd_export)
    gen = sub.add_parser("generate", help="a reply from a decoder run's model (greedy)")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.add_argument("--max-new-tokens", type=int, default=64,
                     help="longest reply in tokens (default 64)")
    gen.add_argument("--round", type=int, metavar="T",
                     help="answer with the round-T snapshot (save-every)")
    gen.set_defaults(run=cmd_generate)
    keys = sub.add_parser("keys", help="list the run-config keys, defaults and choices")
    keys.add_argument("--markdown", action="store_true",
                      help="as the markdown table in docs/cli.md (built-in strategies)")
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
