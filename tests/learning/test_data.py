"""Loading datasets into text/label splits, and partitioning them into clients."""

from __future__ import annotations

import collections
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from datasets import ClassLabel, Dataset

from fedlora.core.config import ConfigError
from fedlora.learning import features
from fedlora.learning.data import HELD_OUT_FRACTION
from fedlora.learning.tasks.labels import load_splits
from fedlora.strategies import resolve

TOPIC_TRAIN_SIZE = 320  # conftest.write_topic_dataset's default


def _texts(ds: Dataset) -> list[str]:
    return list(ds["text"])


def _assert_text_label(ds: Dataset, names) -> None:
    assert sorted(ds.column_names) == ["label", "text"]
    assert isinstance(ds.features["label"], ClassLabel)
    assert tuple(ds.features["label"].names) == tuple(names)
    labels = ds["label"]
    assert min(labels) >= 0 and max(labels) < len(names)


# ----------------------------------------------------------------- shared data


def test_ag_news_directory():
    splits = load_splits(str(SHARED_DATA / "ag_news"))
    assert len(splits.train) == 5000
    assert len(splits.test) == 1000  # test.csv, not dev.csv
    assert splits.label_names == ("world", "sports", "business", "tech")
    assert splits.num_labels == 4
    _assert_text_label(splits.train, splits.label_names)
    _assert_text_label(splits.test, splits.label_names)
    first = splits.train[0]
    assert first["text"].startswith("BEA buzzing")
    assert first["label"] == 3  # "...",3 in train.csv: tech
    assert set(splits.train["label"]) == {0, 1, 2, 3}


@pytest.mark.slow
def test_sst2_directory_uses_dev_as_test():
    splits = load_splits(str(SHARED_DATA / "sst2"))
    assert len(splits.test) == 872
    assert len(splits.train) == 67349
    assert splits.num_labels == 2
    _assert_text_label(splits.train, splits.label_names)
    _assert_text_label(splits.test, splits.label_names)
    assert set(splits.test["label"]) == {0, 1}
    with open(SHARED_DATA / "sst2" / "dev.tsv", encoding="utf-8") as handle:
        handle.readline()  # header
        first_text, first_label = handle.readline().rstrip("\n").split("\t")
    assert splits.test[0]["text"] == first_text
    assert splits.test[0]["label"] == int(first_label)


# ----------------------------------------------------------------- local files


def _write_csv(path: Path, header: list[str] | None, rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(count: int, labels=(0, 1, 2)) -> list[tuple[str, object]]:
    return [(f"example number {i} about {labels[i % len(labels)]}", labels[i % len(labels)])
            for i in range(count)]


def test_single_csv_gets_deterministic_held_out_split(tmp_path):
    rows = _rows(100)
    path = _write_csv(tmp_path / "all.csv", ["text", "label"], rows)
    first = load_splits(str(path), seed=7)
    test_size = round(len(rows) * HELD_OUT_FRACTION)
    assert len(first.test) == test_size
    assert len(first.train) == len(rows) - test_size
    train, test = _texts(first.train), _texts(first.test)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(text for text, _ in rows)
    _assert_text_label(first.train, ("0", "1", "2"))

    load_splits.cache_clear()  # really load again, not the memoised result
    again = load_splits(str(path), seed=7)
    assert again is not first
    assert _texts(again.test) == test and _texts(again.train) == train
    other = load_splits(str(path), seed=8)
    assert set(_texts(other.test)) != set(test)


def test_csv_with_header_and_string_labels(tmp_path):
    rows = _rows(60, labels=("pos", "neg", "meh"))
    path = _write_csv(tmp_path / "reviews.csv", ["text", "label"], rows)
    splits = load_splits(str(path))
    assert splits.label_names == ("meh", "neg", "pos")
    truth = dict(rows)
    for ds in (splits.train, splits.test):
        _assert_text_label(ds, splits.label_names)
        for example in ds:
            assert splits.label_names[example["label"]] == truth[example["text"]]


def test_headerless_csv_with_explicit_test_file(tmp_path):
    _write_csv(tmp_path / "train.csv", None, _rows(40))
    _write_csv(tmp_path / "test.csv", None, _rows(9))
    splits = load_splits(str(tmp_path))
    assert len(splits.train) == 40 and len(splits.test) == 9
    assert splits.train[0]["text"] == "example number 0 about 0"
    assert splits.train[1]["label"] == 1


def test_jsonl_file_loads(tmp_path):
    rows = _rows(50, labels=(0, 1))
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "sentence": t, "label": y}) + "\n"
                            for i, (t, y) in enumerate(rows)))
    splits = load_splits(str(path))
    assert len(splits.train) + len(splits.test) == 50
    assert splits.label_names == ("0", "1")
    truth = dict(rows)
    for ds in (splits.train, splits.test):
        _assert_text_label(ds, splits.label_names)
        for example in ds:
            assert truth[example["text"]] == example["label"]


def test_parquet_directory_with_validation_split(tmp_path):
    train_rows, valid_rows = _rows(30, labels=("b", "a")), _rows(8, labels=("b", "a"))
    for name, rows in (("train", train_rows), ("validation", valid_rows)):
        Dataset.from_dict({"content": [t for t, _ in rows],
                           "category": [y for _, y in rows]}
                          ).to_parquet(str(tmp_path / f"{name}.parquet"))
    splits = load_splits(str(tmp_path))
    assert len(splits.train) == 30 and len(splits.test) == 8
    assert splits.label_names == ("a", "b")
    _assert_text_label(splits.test, ("a", "b"))
    assert _texts(splits.test) == [t for t, _ in valid_rows]
    assert [splits.label_names[y] for y in splits.test["label"]] == [y for _, y in valid_rows]


def test_missing_file_is_config_error(tmp_path):
    missing = tmp_path / "absent.csv"
    with pytest.raises(ConfigError) as info:
        load_splits(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError):
        load_splits(str(tmp_path / "no" / "such" / "dir"))


def test_missing_text_column_is_config_error(tmp_path, topic_dataset):
    path = _write_csv(tmp_path / "body.csv", ["body", "label"], _rows(20))
    with pytest.raises(ConfigError, match="text-column"):
        load_splits(str(path))
    with pytest.raises(ConfigError, match="text-column") as info:
        load_splits(str(topic_dataset), text_column="nope")
    assert "nope" in str(info.value)


def test_missing_label_column_is_config_error(tmp_path):
    path = _write_csv(tmp_path / "nolabel.csv", ["text", "stars"], _rows(20))
    with pytest.raises(ConfigError, match="label-column"):
        load_splits(str(path))
    with pytest.raises(ConfigError, match="label-column"):
        load_splits(str(path), label_column="rating")
    splits = load_splits(str(path), label_column="stars")
    assert splits.num_labels == 3


# ----------------------------------------------------------------- labels and bad files


def _write(path: Path, rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def _sentiment(count: int, labels=("negative", "positive")) -> list[list]:
    return [["text", "label"]] + [[f"review {i}", labels[i % 2]] for i in range(count)]


@pytest.mark.parametrize("empty", ["train.csv", "test.csv"])
def test_header_only_csv_is_named_in_one_line(tmp_path, empty, capfd, quiet_datasets):
    """Not HF's 'Instruction "train" corresponds to no data!'."""
    for name in ("train.csv", "test.csv"):
        _write(tmp_path / name, _sentiment(0 if name == empty else 20))
    with pytest.raises(ConfigError) as info:
        load_splits(str(tmp_path))
    assert str(info.value) == f"dataset: {tmp_path / empty} has a header but no examples"
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("train_labels, test_labels", [
    (("negative", "positive"), (0, 1)),  # silently four classes, accuracy 0
    ((0, 1), ("negative", "positive")),  # HF: "An error occurred while generating ..."
])
def test_labels_are_all_names_or_all_integers(tmp_path, train_labels, test_labels, capfd,
                                              quiet_datasets):
    _write(tmp_path / "train.csv", _sentiment(20, train_labels))
    _write(tmp_path / "test.csv", _sentiment(6, test_labels))
    with pytest.raises(ConfigError) as info:
        load_splits(str(tmp_path))
    message = str(info.value)
    assert message.startswith("dataset: labels mix class names and integers ("), message
    assert "'negative' in" in message and str(tmp_path / "train.csv") in message
    assert str(tmp_path / "test.csv") in message and "\n" not in message
    assert capfd.readouterr().err == ""


def test_a_test_class_unseen_in_training_is_refused_with_its_count(tmp_path):
    _write(tmp_path / "train.csv", _sentiment(20))
    _write(tmp_path / "test.csv", _sentiment(6) + [["meh", "neutral"], ["so-so", "neutral"]])
    with pytest.raises(ConfigError) as info:
        load_splits(str(tmp_path))
    assert str(info.value) == (f"dataset {tmp_path / 'test.csv'}: test class 'neutral' "
                               "(2 examples) not in the train split; a model trained on it "
                               "cannot predict it")


def test_a_ragged_tsv_is_one_line_naming_file_and_line(tmp_path, capfd, quiet_datasets):
    """Not HF's logged 'Failed to read file ...' line before ours."""
    rows = [["sentence", "label"]] + [[f"s {i}", i % 2] for i in range(30)]
    rows.insert(20, ["an extra", 1, "field"])
    train = _write(tmp_path / "train.tsv", rows, "\t")
    _write(tmp_path / "dev.tsv", [["sentence", "label"], ["a", 0], ["b", 1]], "\t")
    with pytest.raises(ConfigError) as info:
        load_splits(str(tmp_path))
    assert str(info.value) == (f"dataset: cannot read {train}: Error tokenizing data. "
                               "C error: Expected 2 fields in line 21, saw 3")
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------- partitions


def _config(tiny_bert: Path, topic_dataset: Path, **overrides):
    values = {"model": str(tiny_bert), "dataset": str(topic_dataset), "max-seq-len": 32,
              "num-clients": 6, "clients-per-round": 2, "seed": 11}
    values.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return resolve(values)


def _clear_caches() -> None:
    features.partitioner_for.cache_clear()
    features.encoded_splits.cache_clear()
    load_splits.cache_clear()


def _clients(config) -> list[Dataset]:
    with warnings.catch_warnings():  # flwr-datasets warns on Dirichlet re-draws
        warnings.simplefilter("ignore")
        return [features.client_dataset(config, i) for i in range(config["num-clients"])]


def _examples(ds: Dataset) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(ids), label) for ids, label in zip(ds["input_ids"], ds["label"])]


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_deterministic_for_seed(partition, tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition=partition, seed=21)
    first = [_examples(ds) for ds in _clients(config)]
    _clear_caches()  # recompute from scratch, as another process would
    second = [_examples(ds) for ds in _clients(config)]
    assert first == second
    assert all(first)
    other = [_examples(ds) for ds in _clients(
        _config(tiny_bert, topic_dataset, partition=partition, seed=22))]
    assert other != first
    if partition != "pathological":  # which examples go where changes, not just order
        assert ({frozenset(map(tuple, c)) for c in other}
                != {frozenset(map(tuple, c)) for c in first})


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_disjoint_and_cover_train(partition, tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition=partition)
    clients = _clients(config)
    train = features.encoded_splits(config).train
    assert len(train) == TOPIC_TRAIN_SIZE
    assert sum(len(ds) for ds in clients) == len(train)
    union = collections.Counter()
    for ds in clients:
        assert len(ds) > 0
        union.update(_examples(ds))
    # every example in exactly one client (as a multiset: duplicates counted)
    assert union == collections.Counter(_examples(train))


def _mean_top_label_share(config) -> float:
    shares = []
    for ds in _clients(config):
        counts = collections.Counter(ds["label"])
        shares.append(max(counts.values()) / len(ds))
    return float(np.mean(shares))


@pytest.mark.slow
def test_dirichlet_skews_labels(tiny_bert, topic_dataset):
    iid = np.mean([_mean_top_label_share(_config(tiny_bert, topic_dataset,
                                                  partition="iid", seed=s))
                   for s in (31, 32)])
    skewed = np.mean([_mean_top_label_share(_config(
        tiny_bert, topic_dataset, partition="dirichlet", dirichlet_alpha=0.1, seed=s))
        for s in (31, 32)])
    assert iid < 0.45  # 4 balanced-ish topics: about a quarter each
    assert skewed > iid + 0.2


def test_pathological_one_label_per_client(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition="pathological",
                     labels_per_client=1, num_clients=8)
    clients = _clients(config)
    held = [set(ds["label"]) for ds in clients]
    assert all(len(labels) == 1 for labels in held), held
    assert set().union(*held) == {0, 1, 2, 3}


def test_pathological_two_labels_per_client(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition="pathological",
                     labels_per_client=2, num_clients=4)
    assert all(len(set(ds["label"])) == 2 for ds in _clients(config))


def test_more_labels_per_client_than_labels_rejected(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition="pathological",
                     labels_per_client=5)
    with pytest.raises(ConfigError, match="labels-per-client"):
        features.client_dataset(config, 0)


def test_partition_id_out_of_range(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition="iid")
    for bad in (-1, config["num-clients"]):
        with pytest.raises(ConfigError):
            features.client_dataset(config, bad)


def test_more_clients_than_examples_rejected(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, partition="iid",
                     num_clients=TOPIC_TRAIN_SIZE + 1)
    with pytest.raises(ConfigError, match="num-clients"):
        features.partitioner_for(config)


# ----------------------------------------------------------------- tokenisation


def test_encoded_splits_built_once(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, seed=41)
    first = features.encoded_splits(config)
    assert features.encoded_splits(config) is first
    # keys that do not change the data share the same tokenised splits
    assert features.encoded_splits(_config(tiny_bert, topic_dataset, seed=41, lr=0.5,
                                           num_clients=3, partition="iid")) is first
    # one that does gives new ones
    longer = features.encoded_splits(_config(tiny_bert, topic_dataset, seed=41,
                                             max_seq_len=64))
    assert longer is not first
    assert set(first.train.column_names) == {"input_ids", "label"}
    assert max(len(ids) for ids in first.train["input_ids"]) <= 32
    assert len(first.train) == TOPIC_TRAIN_SIZE and len(first.test) == 80
