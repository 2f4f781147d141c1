"""Labelled data: (text, label) splits for the classification tasks
(``seq_cls``, ``causal_lm``), and for classification data run as
instructions (``sft``).

The splits have exactly two columns, ``text`` and ``label`` (a ClassLabel,
0..C-1), and the class names. Columns are detected (or named by
``text-column`` / ``label-column``); a header-less CSV (AG News) has its
integer column as the label and its longest text as the text. Integer labels
are named by a ``classes.txt`` beside the data when there is one.

A bad file is one ``ConfigError`` line naming it: an empty label cell (with
its row, counted as a spreadsheet counts them: a header is row 1), labels
that are names in one place and integers in another, fewer than two classes
in the train split, a test class the train split lacks (with its count), a
node's label the server does not know.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict

from fedlora.core.config import ConfigError
from fedlora.learning.data import Raw, load_raw, node_file, pick_column, read_file, with_test_split
from fedlora.learning.tasks.base import TaskSplits

TEXT, LABEL = "text", "label"  # the columns of labelled splits
TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "question")
LABEL_CANDIDATES = ("label", "labels", "class", "target", "category")


def _is_integer(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return value.strip().lstrip("+-").isdigit()
    return isinstance(value, int)


def _headerless_columns(ds: Dataset) -> tuple[str | None, str | None]:
    """(text, label) of a header-less file: the one column holding an
    integer in the first row is the label, and the longest other field of
    that row the text."""
    if len(ds) == 0:
        return None, None
    first = ds[0]
    ints = [name for name, value in first.items() if _is_integer(value)]
    if len(ints) != 1:
        return None, None
    others = [name for name in ds.column_names if name != ints[0]]
    text = max(others, key=lambda name: len(str(first[name])), default=None)
    return text, ints[0]


def detect(raw: Raw, ds: Dataset, text_column: str, label_column: str,
           source: str) -> tuple[str | None, str | None]:
    """(text, label) columns of ``ds``: named by the keys, else detected
    (None where none is found)."""
    text = pick_column(ds, text_column, TEXT_CANDIDATES, "text", "text-column", source)
    label = pick_column(ds, label_column, LABEL_CANDIDATES, "label", "label-column", source)
    if raw.headerless:
        guessed_text, guessed_label = _headerless_columns(ds)
        text, label = text or guessed_text, label or guessed_label
    return text, label


def _require(column: str | None, ds: Dataset, role: str, key: str, source: str) -> str:
    if column is None:
        raise ConfigError(f"dataset {source}: cannot detect the {role} column among "
                          f"{', '.join(ds.column_names)}; set '{key}'")
    return column


def _check_labels_present(ds: Dataset, column: str, where: str, first_row: int) -> None:
    """An empty label cell reads as None (a CSV number column turns float
    around it): name the first such row instead of failing on it later."""
    if None in ds.unique(column):
        row = ds[column].index(None) + first_row
        raise ConfigError(f"{where}, row {row}: empty label (column {column!r})")


def _check_classes(train: Dataset, column: str, source: str) -> None:
    """A classifier needs two classes to tell apart (one class would even make
    a one-output head, which transformers trains as a regression)."""
    found = train.unique(column)
    if len(found) < 2:
        feature = train.features[column]
        shown = [feature.int2str(v) if isinstance(feature, ClassLabel) else v for v in found]
        raise ConfigError(f"dataset {source}: the train split has {len(found)} class"
                          f"{'' if len(found) == 1 else 'es'} ({', '.join(map(str, shown))}); "
                          "classification needs at least 2")


def _label_kind(value: object) -> str:
    """``integer`` for 3, 3.0 and "3"; ``name`` for anything else."""
    return "integer" if _is_integer(value) else "name"


def _check_label_kinds(raw: DatasetDict, column: str, sources: Mapping[str, str]) -> None:
    """Labels are class names in every split or integers in every split: a
    file of ``0``/``1`` next to one of ``negative``/``positive`` would make
    four classes, two of which no test example can be right about."""
    seen: dict[str, tuple[object, str]] = {}  # kind → (a value of it, its file)
    for split, ds in raw.items():
        if isinstance(ds.features[column], ClassLabel):
            continue
        for value in ds.unique(column):
            seen.setdefault(_label_kind(value), (value, sources[split]))
    if len(seen) > 1:
        (name, name_file), (number, number_file) = seen["name"], seen["integer"]
        raise ConfigError(f"dataset: labels mix class names and integers ({name!r} in "
                          f"{name_file}, {number!r} in {number_file}); use names in every "
                          "split or integers in every split")


def _check_test_classes(splits: Mapping[str, Dataset], names: list[str], where: str) -> None:
    """A test class the train split lacks: no model trained there can predict
    it, so every such example would count as wrong. Refused, with its count."""
    trained = set(splits["train"].unique(LABEL))
    counts = Counter(splits["test"][LABEL])
    unseen = sorted(set(counts) - trained)
    if unseen:
        listed = ", ".join(f"{names[c]!r} ({counts[c]} example{'s' * (counts[c] != 1)})"
                           for c in unseen)
        raise ConfigError(f"dataset {where}: test class{'es' * (len(unseen) > 1)} {listed} "
                          "not in the train split; a model trained on it cannot predict "
                          f"{'them' if len(unseen) > 1 else 'it'}")


def _label_names(train: Dataset, test: Dataset, column: str,
                 home: Path | None) -> tuple[list[str], dict | None]:
    """Label names, and a value→index map when labels are not already 0..C-1."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = sorted(set(train.unique(column)) | set(test.unique(column)))
    if all(isinstance(v, int) for v in values):
        if values and values[0] >= 0:
            count = values[-1] + 1
            names_file = home / "classes.txt" if home else None
            if names_file and names_file.is_file():
                names = [line.strip() for line in names_file.read_text().splitlines()
                         if line.strip()]
                if len(names) >= count:
                    return names, None
            if count <= 2 * len(values):
                return [str(i) for i in range(count)], None
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


@functools.lru_cache(maxsize=4)
def load_splits(source: str, text_column: str = "", label_column: str = "",
                seed: int = 42) -> TaskSplits:
    """The dataset as ``text``/``label`` train and test splits (cached per process)."""
    return labelled_splits(load_raw(source), source, text_column, label_column, seed)


def labelled_splits(loaded: Raw, source: str, text_column: str, label_column: str,
                    seed: int) -> TaskSplits:
    """``loaded`` as ``text``/``label`` train and test splits."""
    raw = loaded.splits
    text, label = detect(loaded, raw["train"], text_column, label_column, source)
    text = _require(text, raw["train"], "text", "text-column", source)
    label = _require(label, raw["train"], "label", "label-column", source)
    if text == label:
        raise ConfigError(f"dataset {source}: text and label column are both {text!r}")
    for split, ds in raw.items():
        if label not in ds.column_names or text not in ds.column_names:
            raise ConfigError(f"dataset {source}: {split} split lacks column "
                              f"{text!r} or {label!r}")
        _check_labels_present(ds, label, f"dataset: {loaded.sources[split]}",
                              loaded.first_row)
    _check_label_kinds(raw, label, loaded.sources)
    raw = with_test_split(loaded, seed)  # rows are checked above: the file's, in order
    names, mapping = _label_names(raw["train"], raw["test"], label, loaded.home)

    def normalise(batch: dict) -> dict:
        labels = batch[label]
        if mapping is not None:
            labels = [mapping[v] for v in labels]
        return {TEXT: [str(t) for t in batch[text]], LABEL: labels}

    splits = {}
    for split in ("train", "test"):
        ds = raw[split]
        ds = ds.map(normalise, batched=True, remove_columns=list(ds.column_names),
                    desc=f"normalising {split}")
        splits[split] = ds.cast_column(LABEL, ClassLabel(names=names))
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ConfigError(f"dataset {source}: train or test split is empty")
    _check_classes(splits["train"], LABEL, source)
    test_source = loaded.sources.get("test", loaded.sources["train"])
    _check_test_classes(splits, names, test_source)
    return TaskSplits(splits["train"], splits["test"], tuple(names), test_source, LABEL)


def onto_classes(ds: Dataset, classes: tuple[str, ...], where: str,
                 label_map: Mapping[str, str] | None = None) -> Dataset:
    """``ds`` (a labelled split) with its labels re-indexed onto
    ``classes``, a trained model's, by name: the same classes in another order
    score the same. ``label_map`` renames ``ds``'s classes first (``0`` →
    ``world``). A class the model does not know by name is refused, naming it
    and ``where`` the data came from — bare integers too: ``0``/``1`` of
    another dataset say nothing about which of the run's classes they are."""
    names = ds.features[LABEL].names
    label_map = dict(label_map or {})
    strays = sorted(set(label_map) - set(names))
    if strays:
        raise ConfigError(f"--label-map: {strays[0]!r} is not a class of dataset {where} "
                          f"(its classes: {', '.join(names)})")
    wrong = sorted(set(label_map.values()) - set(classes))
    if wrong:
        raise ConfigError(f"--label-map: {wrong[0]!r} is not one of the run's classes "
                          f"({', '.join(classes)})")
    index = {name: i for i, name in enumerate(classes)}
    mapping, unknown = {}, []
    for value in sorted(ds.unique(LABEL)):
        name = label_map.get(names[value], names[value])
        if name in index:
            mapping[value] = index[name]
        else:
            unknown.append(names[value])
    if unknown:
        raise ConfigError(f"dataset {where}: class{'es' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} not among the run's "
                          f"({', '.join(classes)}); map them with --label-map, e.g. "
                          f"--label-map {unknown[0]}={classes[0]}")
    features = ds.features.copy()
    features[LABEL] = ClassLabel(names=list(classes))
    return ds.map(lambda batch: {LABEL: [mapping[v] for v in batch[LABEL]]},
                  batched=True, features=features, desc="mapping classes")


def load_node_examples(source: str, label_names: tuple[str, ...], text_column: str = "",
                       label_column: str = "") -> Dataset:
    """A SuperNode's own training examples (``text``, ``label``) from its ``data-path``.

    In a deployment every node holds private data, so there is no shared dataset
    to partition: ``source`` is a directory with a ``train.*`` file (or one data
    file) in any format ``load_splits`` reads, with the same column keys. The
    label indices must mean what they mean on the server, whose test set fixes
    the classes (``label_names``, sent with every message): a value maps to the
    class of the same name, else an integer is taken as the class index (AG News
    files). Anything else — a missing or empty directory, missing columns, a
    label the server does not know — is one ``data-path …`` ConfigError line, so
    the node's ClientApp fails clearly and the server goes on without it.
    """
    try:
        return _node_examples(Path(source).expanduser(), label_names, text_column,
                              label_column)
    except ConfigError as err:
        raise ConfigError(f"data-path {source}: {str(err).removeprefix('dataset: ')}"
                          ) from None


def _node_examples(path: Path, label_names: tuple[str, ...], text_column: str,
                   label_column: str) -> Dataset:
    file = node_file(path)
    loaded = read_file(file)
    raw = loaded.splits["train"]
    if len(raw) == 0:
        raise ConfigError(f"{file.name} has no examples")
    text, label = detect(loaded, raw, text_column, label_column, file.name)
    text = _require(text, raw, "text", "text-column", file.name)
    label = _require(label, raw, "label", "label-column", file.name)
    _check_labels_present(raw, label, file.name, loaded.first_row)
    feature = raw.features[label]
    index = {name: i for i, name in enumerate(label_names)}
    mapping = {}
    for value in raw.unique(label):
        name = feature.int2str(value) if isinstance(feature, ClassLabel) else value
        if str(name) in index:
            mapping[value] = index[str(name)]
        elif isinstance(name, int) and 0 <= name < len(label_names):
            mapping[value] = name
        else:
            raise ConfigError(f"label {name!r} in column {label!r} is not one of the "
                              f"server's classes ({', '.join(label_names)})")

    def normalise(batch: dict) -> dict:
        return {TEXT: [str(t) for t in batch[text]],
                LABEL: [mapping[v] for v in batch[label]]}

    examples = raw.map(normalise, batched=True, remove_columns=raw.column_names,
                       desc="normalising node data")
    return examples.cast_column(LABEL, ClassLabel(names=list(label_names)))
