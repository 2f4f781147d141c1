"""Bad input ends in one line naming the key, file, row or class, and a non-zero exit.

Each check is tested where it lives (``load_splits``, ``load_node_examples``)
or, where the behaviour is the CLI's (one ``fedlora: error:`` line, exit 2,
before anything heavy loads), through ``cli.main`` in this process. One real
``fedlora simulate`` checks that a Ray left behind does not stop a run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import LABEL_WORDS
from processes import describe, ours, stop, watch

from fedlora.commands import cli
from fedlora.core.config import ConfigError
from fedlora.federation.results import RunWriter
from fedlora.learning import features
from fedlora.learning.models import ModelSpec, build_lora_model
from fedlora.learning.tasks import task_for
from fedlora.learning.tasks.labels import load_node_examples, load_splits
from fedlora.learning.training import train_local
from fedlora.strategies import resolve


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _write_rows(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def _copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: error: "), err
    return lines[0]


# ------------------------------------------------------------------ 1. empty label


def test_empty_label_cell_names_file_and_row(tmp_path, topic_dataset):
    """Rows count as in a spreadsheet: a header-less file's first example is
    row 1, a file with a header's is row 2."""
    for name, row in (("train.csv", 5), ("test.csv", 7)):
        data = _copy_dataset(topic_dataset, tmp_path / name.split(".")[0])
        rows = _rows(data / name)
        rows[row - 1][1] = ""
        _write_rows(data / name, rows)
        with pytest.raises(ConfigError) as raised:
            load_splits(str(data))
        assert f"{data / name}, row {row}: empty label" in str(raised.value)

    node = _write_rows(tmp_path / "node" / "train.csv",
                       [["text", "label"], ["a b", "tech"], ["c d", ""], ["e f", "world"]])
    with pytest.raises(ConfigError) as raised:
        load_node_examples(str(node.parent), LABEL_WORDS)
    assert str(raised.value) == (f"data-path {node.parent}: train.csv, row 3: empty label "
                                 "(column 'label')")


# ------------------------------------------------------------------ 2. not UTF-8


def test_non_utf8_first_row_names_the_file(tmp_path, topic_dataset):
    data = _copy_dataset(topic_dataset, tmp_path / "latin1")
    train = data / "train.csv"
    train.write_bytes('"caf\u00e9 prices rise",2\n'.encode("latin-1") + train.read_bytes())
    with pytest.raises(ConfigError) as raised:
        load_splits(str(data))
    assert str(raised.value) == (f"dataset: {train} is not UTF-8 text (byte 0xe9 on line 1); "
                                 "save it as UTF-8")


# ------------------------------------------------------------------ 3. max-seq-len


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_max_seq_len_beyond_the_models_positions(model, request, capsys, tmp_path,
                                                 topic_dataset, quiet_datasets):  # noqa: F811
    """Refused in preflight from the model's config, though every text here is
    short enough; the unreachable ray-address would be the error, had the run
    got as far as Ray."""
    out = tmp_path / "run"
    code = cli.main(["simulate", "--out", str(out), "--set",
                     f"model={request.getfixturevalue(model)}", f"dataset={topic_dataset}",
                     "max-seq-len=129", "ray-address=127.0.0.1:1"])
    line = _one_error_line(capsys, code)
    assert "'max-seq-len': 129 is more than the 128 positions" in line
    assert not out.exists()


# ------------------------------------------------------------------ 4. --out


def test_out_that_cannot_be_made_fails_before_loading(capsys, tmp_path):
    """The dataset and model named do not exist: the --out error must come first."""
    afile = tmp_path / "afile"
    afile.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root writes through file modes; mkdir in /sys fails even for root
    unwritable = locked if os.geteuid() else Path("/sys")
    missing = ["--set", f"dataset={tmp_path / 'no-data'}", f"model={tmp_path / 'no-model'}"]
    for out, reason in ((afile / "run", f"{afile} is a file, not a directory"),
                        (unwritable / "run", f"cannot write in {unwritable}")):
        line = _one_error_line(capsys, cli.main(["simulate", "--out", str(out), *missing]))
        assert line.startswith(f"fedlora: error: --out {out}: {reason}"), line
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ 5. classes


def test_dataset_with_one_class(tmp_path):
    path = _write_rows(tmp_path / "one.csv",
                       [["text", "label"]] + [[f"text {i}", "pos"] for i in range(20)])
    with pytest.raises(ConfigError) as raised:
        load_splits(str(path))
    assert str(raised.value) == (f"dataset {path}: the train split has 1 class (pos); "
                                 "classification needs at least 2")


# ------------------------------------------------------------------ 6. evaluate


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert, topic_dataset):
    """A run directory as `fedlora simulate` leaves it, with an adapter trained
    well enough to tell the classes apart (so that mixing them up shows), and
    its accuracy on the run's eval-examples sample."""
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "max-seq-len": 32, "eval-examples": 30, "seed": 5})
    names = features.splits_for(config).label_names
    model = build_lora_model(ModelSpec.from_config(config, names))
    train_local(model, [p for p in model.peft.parameters() if p.requires_grad],
                features.encoded_splits(config).train, task=task_for(config), epochs=5,
                max_steps=0, batch_size=16, lr=0.05, optimizer="adamw", seed=5)
    accuracy = task_for(config).evaluate(model, features.central_test_set(config))["accuracy"]
    assert accuracy > 0.6
    out = tmp_path_factory.mktemp("finished") / "run"
    writer = RunWriter(out, config)
    writer.save_adapter(model.peft)
    writer.finish({"label_names": list(names)})
    return out, accuracy


def _evaluate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["evaluate", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_evaluate_maps_classes_by_name(capsys, tmp_path, topic_dataset, finished_run,
                                       quiet_datasets):  # noqa: F811
    """The same examples with the classes listed in another order score the
    same; a class the run does not know, or an integer past its classes, is
    refused naming it and the file."""
    run, accuracy = finished_run
    assert _evaluate(capsys, str(run))["accuracy"] == accuracy
    reordered = tmp_path / "reordered"
    order = LABEL_WORDS[::-1]
    for name in ("train.csv", "test.csv"):
        _write_rows(reordered / name, [[text, order.index(LABEL_WORDS[int(label)])]
                                       for text, label in _rows(topic_dataset / name)])
    (reordered / "classes.txt").write_text("\n".join(order) + "\n")
    report = _evaluate(capsys, str(run), "--dataset", str(reordered))
    assert report["accuracy"] == accuracy and report["examples"] == 30

    cooking = _copy_dataset(reordered, tmp_path / "cooking")
    (cooking / "classes.txt").write_text("\n".join(("cooking",) + order[1:]) + "\n")
    line = _one_error_line(capsys, cli.main(["evaluate", str(run), "--dataset", str(cooking)]))
    assert f"dataset {cooking / 'test.csv'}: class 'cooking' not among the run's" in line



def test_evaluate_takes_integer_classes_only_with_a_label_map(capsys, tmp_path, topic_dataset,
                                                              finished_run, quiet_datasets):
    """Another dataset's bare 0..C-1 say nothing about which of the run's
    classes they are (SST-2's 0/1 are not world/sports): refused unless
    --label-map says; with the map the run's own examples score as they did."""
    run, accuracy = finished_run
    integers = tmp_path / "integers"  # no classes.txt: the labels are bare integers
    integers.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy(topic_dataset / name, integers / name)
    line = _one_error_line(capsys, cli.main(["evaluate", str(run), "--dataset", str(integers)]))
    assert (f"dataset {integers / 'test.csv'}: classes '0', '1', '2', '3' not among the "
            f"run's ({', '.join(LABEL_WORDS)}); map them with --label-map, e.g. "
            "--label-map 0=world") in line
    mapping = ",".join(f"{i}={word}" for i, word in enumerate(LABEL_WORDS))
    report = _evaluate(capsys, str(run), "--dataset", str(integers), "--label-map", mapping)
    assert report["accuracy"] == accuracy
    for bad, needle in (("0=cooking", "--label-map: 'cooking' is not one of the run's"),
                        ("9=world", "--label-map: '9' is not a class of dataset"),
                        ("0world", "--label-map '0world': expected CLASS=RUN_CLASS")):
        line = _one_error_line(capsys, cli.main(["evaluate", str(run), "--dataset",
                                                 str(integers), "--label-map", bad]))
        assert needle in line, line


def test_evaluate_a_damaged_run_is_one_line(capsys, tmp_path, finished_run, quiet_datasets):
    run, _ = finished_run
    truncated = tmp_path / "truncated"
    shutil.copytree(run, truncated)
    weights = truncated / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    line = _one_error_line(capsys, cli.main(["evaluate", str(truncated)]))
    assert f"{truncated}: the trained adapter cannot be loaded (SafetensorError" in line

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "config.json").write_text('{"rounds": 2,')
    line = _one_error_line(capsys, cli.main(["evaluate", str(corrupt)]))
    assert line.startswith(f"fedlora: error: {corrupt / 'config.json'}: not valid JSON"), line
    (corrupt / "config.json").write_text('["rounds"]')
    line = _one_error_line(capsys, cli.main(["evaluate", str(corrupt)]))
    assert f"{corrupt / 'config.json'}: expected a JSON object, got list" in line


def test_compare_out_that_cannot_be_written_is_one_line(capsys, tmp_path, tiny_bert,
                                                        topic_dataset):
    comparison = tmp_path / "compare.toml"
    comparison.write_text(f'[base]\nmodel = "{tiny_bert}"\ndataset = "{topic_dataset}"\n'
                          '[[run]]\nlabel = "a"\ngroup = "g"\n')
    afile = tmp_path / "afile"
    afile.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    unwritable = locked if os.geteuid() else Path("/sys")  # root writes through modes
    for out in (afile / "out", unwritable / "out"):
        line = _one_error_line(capsys, cli.main(["compare", str(comparison), "--out",
                                                 str(out)]))
        assert line.startswith(f"fedlora: error: --out {out}: cannot write there ("), line


@pytest.mark.slow
def test_evaluate_sample_whole_split_and_unfinished_run(capsys, finished_run):
    run, accuracy = finished_run
    sample = _evaluate(capsys, str(run))
    assert (sample["examples"], sample["accuracy"]) == (30, accuracy)
    assert _evaluate(capsys, str(run), "--all")["examples"] == 80
    unfinished = run.parent / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    line = _one_error_line(capsys, cli.main(["evaluate", str(unfinished)]))
    assert "not a finished run" in line and str(unfinished) in line


# ------------------------------------------------------------------ 7. Ray


def test_a_ray_address_that_is_not_a_ray_head_is_one_line(capfd):
    """Something listens there but does not speak Ray's GCS protocol: one
    line within seconds, where ray.init retried for minutes and printed 21
    lines of its C++ client's log before ours."""
    import socket
    import time

    from fedlora.commands.simulation import start_ray

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError) as info:
            start_ray(resolve({"ray-address": address}))
    assert str(info.value) == (f"config key 'ray-address': {address} does not answer as a Ray "
                               "head (DEADLINE_EXCEEDED after 5 s); is it the head's GCS port "
                               "(`ray start --head --port`)?")
    assert time.monotonic() - started < 30
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------ 8. Ray left behind


@pytest.mark.e2e
def test_simulate_starts_its_own_ray_despite_a_stale_cluster(tmp_path, tiny_bert,
                                                             topic_dataset):
    """A cluster file left by a `ray start` never stopped, and RAY_ADDRESS,
    both naming a dead cluster: a run without ray-address starts its own Ray.
    Ray's temp directory is a private one (short: Ray's socket paths live in
    it), so the machine's /tmp/ray is not touched."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fl-ray-"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    home = str(tmp_path / "flwr-home")
    env = dict(os.environ, FLWR_HOME=home, RAY_TMPDIR=str(ray_tmp),
               RAY_ADDRESS="127.0.0.1:1")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedlora", "simulate", "--out", str(out), "--set",
               f"model={tiny_bert}", f"dataset={topic_dataset}", "max-seq-len=32",
               "num-clients=2", "clients-per-round=2", "rounds=1", "batch-size=32"]
    try:
        code, _, _ = watch(command, env, home, tmp_path / "simulate.log", timeout=300)
        assert code == 0, (tmp_path / "simulate.log").read_text()[-3000:]
        _, alive = psutil.wait_procs(ours(home), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop(ours(home))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_updates"] == 2
    assert summary["label_names"] == list(LABEL_WORDS)  # what `evaluate` maps onto
