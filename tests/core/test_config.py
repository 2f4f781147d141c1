"""The run configuration: defaults, validation, --set parsing, TOML files, and
how the CLI reports bad input (one line, exit code 2, nothing written)."""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from fedlora.commands import cli
from fedlora.core.config import (
    KEYS,
    ConfigError,
    Key,
    RunConfig,
    attribute_name,
    load_toml,
    parse_set_option,
)
from fedlora.strategies import registry, resolve, strategies, strategy_keys

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------- defaults


def _table(built_in_only: bool) -> dict[str, Key]:
    """The core keys plus the strategies' own: the built-in strategies' (what
    pyproject.toml lists) or every registered one's (what ``resolve`` knows)."""
    modules = {reference.partition(":")[0] for reference in registry.BUILT_IN}
    table = dict(KEYS)
    for name, keys in strategy_keys().items():
        if not built_in_only or strategies()[name].__module__ in modules:
            table.update(keys)
    return table


def _defaults(table: dict[str, Key]) -> dict:
    return {k: v.default for k, v in table.items()}


def test_pyproject_defaults_equal_keys_table():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flower_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    built_in = _table(built_in_only=True)
    assert set(KEYS) < set(built_in)  # the strategies do declare keys of their own
    assert flower_defaults == _defaults(built_in)
    # and the types agree too (Flower hands these values over as they are)
    for key, value in flower_defaults.items():
        assert type(value) is type(built_in[key].default), key
    # resolving Flower's defaults gives exactly the defaults
    assert resolve(flower_defaults).to_dict() == _defaults(_table(built_in_only=False))


def test_every_default_is_valid():
    config = resolve({})
    for key, spec in _table(built_in_only=False).items():
        assert config[key] == spec.default
        assert isinstance(config[key], spec.type), key


# ----------------------------------------------------------------- attributes


def test_every_key_reads_as_an_attribute():
    """``config.lora_rank`` is ``config["lora-rank"]``, for the core keys and
    every strategy's; a distinct value per key shows that no attribute
    reads another key or a method of its own (``to_dict``, ``target_modules``)."""
    table = _table(built_in_only=False)
    assert set(KEYS) < set(table)
    marks = {key: object() for key in table}
    config = RunConfig(marks)
    for key, mark in marks.items():
        assert getattr(config, attribute_name(key)) is mark, key


def test_resolved_values_read_as_attributes():
    config = resolve({"lora-rank": 4, "strategy": "cellm", "cellm-up-density": 0.25})
    assert (config.lora_rank, config.strategy, config.cellm_up_density) == (4, "cellm", 0.25)
    assert config.dp == "off" and config.client_ranks == config.values["client-ranks"]
    assert {"lora_rank", "cellm_up_density"} <= set(dir(config))


@pytest.mark.parametrize("name, message", [
    ("lora_rnk", "run config has no key 'lora-rnk' (read as config.lora_rnk); did you mean "
                 "config.lora_rank? `fedlora keys` lists them"),
    ("no_such_thing", "run config has no key 'no-such-thing' (read as "
                      "config.no_such_thing); `fedlora keys` lists them"),
])
def test_a_misspelt_attribute_names_the_key(name, message):
    config = resolve({})
    with pytest.raises(AttributeError) as raised:
        getattr(config, name)
    assert str(raised.value) == message
    assert not hasattr(config, name)


def test_a_config_survives_pickle_and_copy():
    """pickle and copy look up dunder methods on a config whose ``values``
    is not set yet: they must not reach the keys."""
    config = resolve({"lora-rank": 4})
    for clone in (pickle.loads(pickle.dumps(config)), copy.copy(config), copy.deepcopy(config)):
        assert clone == config and clone.lora_rank == 4


# ----------------------------------------------------------------- resolve()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'no-such-key'"):
        resolve({"rounds": 3, "no-such-key": 1})


@pytest.mark.parametrize("key, value", [
    ("rounds", "abc"),
    ("rounds", 3.5),
    ("rounds", True),
    ("rounds", [3]),
    ("num-clients", "1e9x"),
    ("lr", "x"),
    ("lr", math.nan),
    ("lr", "nan"),
    ("lr", math.inf),
    ("lr", "-inf"),
    ("lr", True),
    ("dirichlet-alpha", None),
    ("model", 3),
    ("dataset", ["a"]),
])
def test_wrong_type_is_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        resolve({key: value})
    message = str(info.value)
    assert f"'{key}'" in message
    assert "\n" not in message


def test_integral_float_accepted_for_int_key():
    config = resolve({"rounds": 3.0, "num-clients": "7", "lr": 1, "client-cpus": "0.5"})
    assert config["rounds"] == 3 and type(config["rounds"]) is int
    assert config["num-clients"] == 7 and type(config["num-clients"]) is int
    assert config["lr"] == 1.0 and type(config["lr"]) is float
    assert config["client-cpus"] == 0.5


@pytest.mark.parametrize("key, value", [
    ("partition", "zipf"), ("optimizer", "lbfgs"), ("task", "regression"),
])
def test_choices_rejected(key, value):
    with pytest.raises(ConfigError) as info:
        resolve({key: value})
    assert f"'{key}'" in str(info.value)
    assert value in str(info.value)


def test_choices_accepted():
    for partition in ("iid", "dirichlet", "pathological"):
        assert resolve({"partition": partition})["partition"] == partition
    assert resolve({"optimizer": "sgd"})["optimizer"] == "sgd"


def test_more_clients_per_round_than_clients_rejected():
    with pytest.raises(ConfigError, match="clients-per-round"):
        resolve({"num-clients": 3, "clients-per-round": 4})
    # equal is fine
    assert resolve({"num-clients": 4, "clients-per-round": 4})["clients-per-round"] == 4


def test_unknown_strategy_lists_available():
    assert strategies(), "the registry must not be empty"
    with pytest.raises(ConfigError) as info:
        resolve({"strategy": "fedmagic"})
    message = str(info.value)
    assert "'strategy'" in message and "fedmagic" in message
    for name in strategies():
        assert name in message
    for name in strategies():
        assert resolve({"strategy": name})["strategy"] == name


@pytest.mark.parametrize("key, value", [
    ("rounds", 0), ("rounds", -2), ("lr", -1), ("lr", 0), ("lora-rank", 0),
    ("batch-size", 0), ("num-clients", 0), ("clients-per-round", 0),
    ("dirichlet-alpha", 0.0), ("local-steps", -1), ("client-gpus", -0.5),
    ("lora-dropout", 1.0), ("lora-dropout", -0.1),
])
def test_out_of_range_rejected(key, value):
    with pytest.raises(ConfigError) as info:
        resolve({key: value})
    assert f"'{key}'" in str(info.value)


def test_zero_allowed_where_documented():
    config = resolve({"local-steps": 0, "client-gpus": 0, "lora-dropout": 0})
    assert config["local-steps"] == 0 and config["client-gpus"] == 0.0


# ----------------------------------------------------------------- --set


def test_parse_set_option_types():
    key, value = parse_set_option("rounds=3")
    assert (key, value) == ("rounds", 3) and type(value) is int
    key, value = parse_set_option("lr=0.5")
    assert (key, value) == ("lr", 0.5) and type(value) is float
    assert parse_set_option("dataset=../x/y") == ("dataset", "../x/y")
    assert parse_set_option("model='a b'") == ("model", "a b")
    assert parse_set_option('model="q"') == ("model", "q")
    assert parse_set_option("lora-target-modules=query,value") == (
        "lora-target-modules", "query,value")
    # only the first '=' splits
    assert parse_set_option("dataset=/d/a=b") == ("dataset", "/d/a=b")
    assert parse_set_option("text-column=") == ("text-column", "")


def test_parse_set_option_values_resolve():
    overrides = dict(parse_set_option(item) for item in
                     ("rounds=3", "lr=0.5", "dataset=../x/y", "model='a b'"))
    config = resolve(overrides)
    assert config["rounds"] == 3 and config["lr"] == 0.5
    assert config["dataset"] == "../x/y" and config["model"] == "a b"


def test_parse_set_option_missing_equals():
    with pytest.raises(ConfigError, match="rounds"):
        parse_set_option("rounds")


# ----------------------------------------------------------------- load_toml


def test_load_toml_top_level(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 3\nlr = 0.25\nmodel = "m"\n')
    assert load_toml(path) == {"rounds": 3, "lr": 0.25, "model": "m"}
    assert resolve(load_toml(str(path)))["rounds"] == 3


def test_load_toml_pyproject_table(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "x"\n\n'
        '[tool.flwr.app]\npublisher = "p"\n\n'
        '[tool.flwr.app.config]\nrounds = 4\npartition = "iid"\n'
    )
    assert load_toml(path) == {"rounds": 4, "partition": "iid"}


def test_load_toml_repo_pyproject():
    assert load_toml(REPO / "pyproject.toml") == _defaults(_table(built_in_only=True))


def test_load_toml_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)


def test_load_toml_invalid(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3\n[[[")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00rounds")
    with pytest.raises(ConfigError) as info:
        load_toml(binary)
    assert str(binary) in str(info.value)


def test_load_toml_directory_is_config_error(tmp_path):
    """A directory given as the config file is bad input, not a crash."""
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path)
    assert str(tmp_path) in str(info.value)


# ----------------------------------------------------------------- CLI


def _run_cli(capsys, out: Path, *sets: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    capsys.readouterr()
    args = ["simulate", *extra, "--out", str(out)]
    if sets:
        args += ["--set", *sets]
    code = cli.main(args)
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].strip() and lines[0].startswith("fedlora: error:"), err
    assert any(needle in lines[0] for needle in needles), (needles, err)
    assert not out.exists()


def _base(tiny_bert: Path, topic_dataset: Path) -> list[str]:
    return [f"model={tiny_bert}", f"dataset={topic_dataset}", "num-clients=4",
            "clients-per-round=2", "max-seq-len=32", "rounds=1"]


def test_cli_unknown_key(capsys, tmp_path, tiny_bert, topic_dataset, quiet_datasets):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset), "foo=1")
    _assert_one_line_error(code, err, out, "'foo'")


def test_cli_unknown_strategy(capsys, tmp_path, tiny_bert, topic_dataset, quiet_datasets):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset), "strategy=fedmagic")
    _assert_one_line_error(code, err, out, "strategy")
    assert "fedmagic" in err


@pytest.mark.e2e
def test_cli_missing_dataset(capsys, tmp_path, tiny_bert, topic_dataset, quiet_datasets):
    out = tmp_path / "run"
    missing = tmp_path / "no" / "such" / "data"
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset), f"dataset={missing}")
    _assert_one_line_error(code, err, out, str(missing))


@pytest.mark.e2e
def test_cli_missing_text_column(capsys, tmp_path, tiny_bert, topic_dataset, quiet_datasets):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset), "text-column=nope")
    _assert_one_line_error(code, err, out, "text-column")
    assert "nope" in err


@pytest.mark.e2e
def test_cli_model_dir_not_a_model(capsys, tmp_path, tiny_bert, topic_dataset,
                                   quiet_datasets):
    out = tmp_path / "run"
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset), f"model={empty}")
    _assert_one_line_error(code, err, out, str(empty.resolve()), str(empty))
    assert "model" in err


@pytest.mark.e2e
def test_cli_more_clients_than_examples(capsys, tmp_path, tiny_bert, topic_dataset,
                                        quiet_datasets):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, out, *_base(tiny_bert, topic_dataset),
                         "num-clients=400", "clients-per-round=2")
    _assert_one_line_error(code, err, out, "num-clients")
    assert "320" in err


def test_cli_bad_value_in_config_file(capsys, tmp_path, tiny_bert, topic_dataset,
                                      quiet_datasets):
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text('rounds = "many"\n')
    code, err = _run_cli(capsys, out, extra=("--config", str(config)))
    _assert_one_line_error(code, err, out, "rounds")


@pytest.mark.parametrize("line, needle", [
    ('rounds = "3"', "key 'rounds': expected an integer, got '3' (a string); write it "
                     "without quotes"),
    ("rounds = 3.0", "key 'rounds': expected an integer, got 3.0 (a float)"),
    ('lr = "0.1"', "key 'lr': expected a number, got '0.1' (a string)"),
    ('agg-residual = "false"', "key 'agg-residual': expected true or false, got 'false'"),
    ("client-ranks = 4", "key 'client-ranks': expected a string, got 4 (an integer)"),
])
def test_cli_config_file_values_have_their_keys_types(capsys, tmp_path, line, needle):
    """A TOML value of another type than its key's is refused, not converted
    (``--set`` values are TOML literals too: ``rounds=3`` is an integer)."""
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    code, err = _run_cli(capsys, out, extra=("--config", str(config)))
    _assert_one_line_error(code, err, out, f"config file {config}: {needle}")


def test_config_file_accepts_an_integer_for_a_float_key(tmp_path):
    from fedlora.core.config import check_file_types
    from fedlora.strategies import strategy_keys

    check_file_types({"lr": 1, "rounds": 3, "robust": "median", "agg-residual": False,
                      "client-ranks": "2,4"}, strategy_keys(), "here")


def test_cli_config_path_is_directory(capsys, tmp_path, quiet_datasets):
    out = tmp_path / "run"
    folder = tmp_path / "conf.d"
    folder.mkdir()
    code, err = _run_cli(capsys, out, extra=("--config", str(folder)))
    _assert_one_line_error(code, err, out, str(folder))


@pytest.mark.e2e
def test_console_script_bad_value(tmp_path):
    script = Path(sys.executable).with_name("fedlora")
    assert script.is_file(), "the fedlora console script is not installed"
    out = tmp_path / "run"
    proc = subprocess.run([str(script), "simulate", "--set", "rounds=abc", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedlora: error:") and "rounds" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_client_accepts_the_full_config_the_server_sent():
    """A client gets every key, resolved by the server: keys of other strategies
    may hold any valid value there (e.g. other defaults) and are not re-judged."""
    from fedlora.strategies import from_message

    sent = {**resolve({}).to_dict(), "fair-steps": 7}
    assert from_message(sent)["fair-steps"] == 7
    with pytest.raises(ConfigError, match="applies to strategy lora-fair"):
        resolve(sent)
