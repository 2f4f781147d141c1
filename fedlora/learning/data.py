"""Datasets: load (Hub id or local files) → (text, label) splits → partitions.

Everything here is computed once per process and looked up by key: a Ray
worker that serves hundreds of virtual clients loads the dataset and computes
the partition assignment once, not per client message. HF ``datasets`` keeps
an on-disk Arrow cache of loaded files, so the second process to load the same
files (another Ray worker, ``fedlora evaluate``) reads them from the cache.

Local formats: CSV, TSV, JSON, JSONL, Parquet; a directory holds
``train.*`` and ``test.*`` (``dev.*`` / ``validation.*`` stand in for a missing
test file, as for GLUE SST-2 whose test labels are hidden). A CSV/TSV whose
first row contains an integer field has no header (AG News): its columns are
then named ``text``/``label`` by content.

A bad file is one ``ConfigError`` line naming it: a byte that is not UTF-8 (with
its line), a header and no examples, a row that does not parse (the parser's
reason, with its line), an empty label cell (with its row, counted as a
spreadsheet counts them: a header is row 1), labels that are names in one
place and integers in another, fewer than two classes in the train split, a
test class the train split lacks (with its count).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from fedlora.core.config import ConfigError, RunConfig
from fedlora.runtime.partitioners import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
_TEST_NAMES = ("test", "dev", "validation", "valid")
_TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "question")
_LABEL_CANDIDATES = ("label", "labels", "class", "target", "category")
HELD_OUT_FRACTION = 0.1  # test share when a single file is given


@dataclass(frozen=True)
class LabeledSplits:
    """Train and test splits with exactly two columns, ``text`` and ``label``
    (int in 0..C-1), and the label names (used as answers for causal LMs)."""

    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]
    test_source: str = ""  # the file (or Hub split) the test split came from, for messages

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _find_split_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in _FORMATS:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _not_utf8(path: Path) -> ConfigError | None:
    """A one-line error naming ``path`` and the line of its first byte that is
    not UTF-8, or None when it is all UTF-8 (read whole: only after a failure)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return ConfigError(f"dataset: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} "
                           f"on line {line}); save it as UTF-8")
    return None


def _read_local(files: dict[str, Path]) -> tuple[DatasetDict, int]:
    """Load local split files with HF datasets, detecting header-less CSV/TSV;
    returns them and the row number of a file's first example (2 after a
    header), so that a bad example can be named by its row."""
    suffixes = {path.suffix.lower() for path in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FORMATS:
        raise ConfigError(
            f"dataset: unsupported or mixed file types {sorted(suffixes)} in "
            f"{', '.join(str(p) for p in files.values())} "
            f"(supported: {', '.join(_FORMATS)})"
        )
    suffix = next(iter(suffixes))
    kwargs: dict = {}
    first_row = 1
    if _FORMATS[suffix] == "csv":
        delimiter = "\t" if suffix == ".tsv" else ","
        kwargs["delimiter"] = delimiter
        if delimiter == "\t":
            kwargs["quoting"] = csv.QUOTE_NONE  # SST-2 text contains bare quotes
        rows = {split: _first_rows(path, delimiter) for split, path in files.items()}
        row = rows["train"][0]
        if any(_is_int(field) for field in row):
            kwargs["column_names"] = _headerless_names(row)
        else:
            first_row = 2
            for split, path in files.items():
                if len(rows[split]) < 2:
                    raise ConfigError(f"dataset: {path} has a header but no examples")
    try:
        return _load_files(_FORMATS[suffix], files, kwargs), first_row
    except _Unreadable as err:  # noqa: BLE001 - any parser failure is a bad file
        if _FORMATS[suffix] != "parquet":  # the usual cause, worth naming file and line
            encoding = next(filter(None, map(_not_utf8, files.values())), None)
            if encoding is not None:
                raise encoding from None
        raise ConfigError(f"dataset: cannot read {err.path}: {err.reason}") from None


class _Unreadable(Exception):
    """A file HF ``datasets`` could not read, and the innermost reason why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


def _load_files(builder: str, files: dict[str, Path], kwargs: dict) -> DatasetDict:
    """The splits, read by HF ``datasets`` in one go. When that fails, each file
    alone: the file that fails is named with the innermost reason (pandas'
    "Expected 2 fields in line 32, saw 3", not "An error occurred while
    generating the dataset"); when each reads alone, the files only disagree on
    a column's type (integer labels in one, names in another), which
    ``load_splits`` reports in terms of the labels. HF's own log line about the
    failure is held back: the one line is ours."""
    with _datasets_silenced():
        try:
            return datasets.load_dataset(builder, data_files={k: str(v) for k, v in files.items()},
                                         **kwargs)
        except Exception:  # noqa: BLE001 - narrowed down file by file below
            pass
        splits = {}
        for split, path in files.items():
            try:
                splits[split] = datasets.load_dataset(builder, data_files=str(path),
                                                      **kwargs)["train"]
            except Exception as err:  # noqa: BLE001 - any parser failure is a bad file
                raise _Unreadable(path, _reason(err)) from None
        return DatasetDict(splits)


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause of ``err`` (HF wraps the parser's)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    if "corresponds to no data" in text:
        return "no examples"
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _datasets_silenced() -> Iterator[None]:
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_rows(path: Path, delimiter: str) -> list[list[str]]:
    """The first two rows of a CSV/TSV file (fewer if it has fewer)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            rows = [row for _, row in zip(range(2), reader)]
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not rows:
        raise ConfigError(f"dataset: file is empty: {path}")
    return rows


def _is_int(field: str) -> bool:
    try:
        int(field.strip())
    except ValueError:
        return False
    return True


def _headerless_names(row: list[str]) -> list[str]:
    """Column names for a header-less file: ``label`` for the integer column and
    ``text`` for the longest other one when that is unambiguous."""
    names = [f"column_{i}" for i in range(len(row))]
    int_columns = [i for i, field in enumerate(row) if _is_int(field)]
    if len(int_columns) == 1:
        names[int_columns[0]] = "label"
        others = [i for i in range(len(row)) if i != int_columns[0]]
        names[max(others, key=lambda i: len(row[i]))] = "text"
    return names


@dataclass(frozen=True)
class _Raw:
    """Splits as read: ``train``, and ``test`` when the source has one."""

    splits: DatasetDict
    home: Path | None  # where a classes.txt may name integer labels
    sources: dict[str, str]  # split -> its file (or Hub split), for messages
    first_row: int = 1  # a file's row holding the first example


def _load_raw(source: str) -> _Raw:
    """Raw train (and test) splits for a Hub id, a file or a directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        train = _find_split_file(path, ("train",))
        if train is None:
            raise ConfigError(f"dataset: no train.{{csv,tsv,json,jsonl,parquet}} in {path}")
        files = {"train": train}
        test = _find_split_file(path, _TEST_NAMES)
        if test is not None:
            files["test"] = test
        raw, first_row = _read_local(files)
        return _Raw(raw, path, {split: str(file) for split, file in files.items()}, first_row)
    if path.is_file():
        raw, first_row = _read_local({"train": path})
        return _Raw(raw, path.parent, {"train": str(path)}, first_row)
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _FORMATS:
        raise ConfigError(f"dataset: no such file or directory: {source}")
    try:
        raw = datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, ...
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"dataset: {source!r} is not a local path and could not be loaded "
            f"from the Hugging Face Hub ({first_line})"
        ) from None
    if not isinstance(raw, DatasetDict) or "train" not in raw:
        raise ConfigError(f"dataset: {source!r} has no train split")
    splits, sources = DatasetDict(train=raw["train"]), {"train": f"{source} (train split)"}
    test_name = next((name for name in _TEST_NAMES if name in raw), None)
    if test_name:  # the first split named like a test split, as ``test``
        splits["test"], sources["test"] = raw[test_name], f"{source} ({test_name} split)"
    return _Raw(splits, None, sources)


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
    if isinstance(value, bool):
        return "name"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return "integer" if isinstance(value, str) and _is_int(value) else "name"


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
    trained = set(splits["train"].unique("label"))
    counts = Counter(splits["test"]["label"])
    unseen = sorted(set(counts) - trained)
    if unseen:
        listed = ", ".join(f"{names[c]!r} ({counts[c]} example{'s' * (counts[c] != 1)})"
                           for c in unseen)
        raise ConfigError(f"dataset {where}: test class{'es' * (len(unseen) > 1)} {listed} "
                          "not in the train split; a model trained on it cannot predict "
                          f"{'them' if len(unseen) > 1 else 'it'}")


def _pick_column(ds: Dataset, wanted: str, candidates: tuple[str, ...], role: str,
                 key: str, source: str) -> str:
    if wanted:
        if wanted not in ds.column_names:
            raise ConfigError(
                f"config key '{key}': column {wanted!r} not in dataset {source} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        return wanted
    for name in candidates:
        if name in ds.column_names:
            return name
    raise ConfigError(
        f"dataset {source}: cannot detect the {role} column among "
        f"{', '.join(ds.column_names)}; set '{key}'"
    )


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
                seed: int = 42) -> LabeledSplits:
    """The dataset as ``text``/``label`` train and test splits (cached per process)."""
    loaded = _load_raw(source)
    raw = loaded.splits
    text = _pick_column(raw["train"], text_column, _TEXT_CANDIDATES, "text",
                        "text-column", source)
    label = _pick_column(raw["train"], label_column, _LABEL_CANDIDATES, "label",
                         "label-column", source)
    if text == label:
        raise ConfigError(f"dataset {source}: text and label column are both {text!r}")
    for split, ds in raw.items():
        if label not in ds.column_names or text not in ds.column_names:
            raise ConfigError(f"dataset {source}: {split} split lacks column "
                              f"{text!r} or {label!r}")
        _check_labels_present(ds, label, f"dataset: {loaded.sources[split]}",
                              loaded.first_row)
    _check_label_kinds(raw, label, loaded.sources)
    if "test" not in raw:  # rows are checked above: they are the file's in order there
        held_out = raw["train"].train_test_split(test_size=HELD_OUT_FRACTION, seed=seed)
        raw = DatasetDict(train=held_out["train"], test=held_out["test"])
    names, mapping = _label_names(raw["train"], raw["test"], label, loaded.home)

    def normalise(batch: dict) -> dict:
        labels = batch[label]
        if mapping is not None:
            labels = [mapping[v] for v in labels]
        return {"text": [str(t) for t in batch[text]], "label": labels}

    splits = {}
    for split in ("train", "test"):
        ds = raw[split]
        drop = [c for c in ds.column_names]
        ds = ds.map(normalise, batched=True, remove_columns=drop,
                    desc=f"normalising {split}")
        ds = ds.cast_column("label", ClassLabel(names=names))
        splits[split] = ds
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise ConfigError(f"dataset {source}: train or test split is empty")
    _check_classes(splits["train"], "label", source)
    _check_test_classes(splits, names, loaded.sources.get("test", loaded.sources["train"]))
    return LabeledSplits(splits["train"], splits["test"], tuple(names),
                         loaded.sources.get("test", loaded.sources["train"]))


def onto_classes(ds: Dataset, classes: tuple[str, ...], where: str,
                 label_map: Mapping[str, str] | None = None) -> Dataset:
    """``ds`` (a ``LabeledSplits`` split) with its labels re-indexed onto
    ``classes``, a trained model's, by name: the same classes in another order
    score the same. ``label_map`` renames ``ds``'s classes first (``0`` →
    ``world``). A class the model does not know by name is refused, naming it
    and ``where`` the data came from — bare integers too: ``0``/``1`` of
    another dataset say nothing about which of the run's classes they are."""
    names = ds.features["label"].names
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
    for value in sorted(ds.unique("label")):
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
    features["label"] = ClassLabel(names=list(classes))
    return ds.map(lambda batch: {"label": [mapping[v] for v in batch["label"]]},
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
    if path.is_dir():
        file = _find_split_file(path, ("train",))
        if file is None:
            found = sorted(p.name for p in path.iterdir())
            raise ConfigError(f"no train.{{csv,tsv,json,jsonl,parquet}} file "
                              f"(found: {', '.join(found) or 'nothing'})")
    elif path.is_file():
        file = path
    else:
        raise ConfigError("no such file or directory")
    raw, first_row = _read_local({"train": file})
    raw = raw["train"]
    if len(raw) == 0:
        raise ConfigError(f"{file.name} has no examples")
    text = _pick_column(raw, text_column, _TEXT_CANDIDATES, "text", "text-column", file.name)
    label = _pick_column(raw, label_column, _LABEL_CANDIDATES, "label", "label-column",
                         file.name)
    _check_labels_present(raw, label, file.name, first_row)
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
        return {"text": [str(t) for t in batch[text]],
                "label": [mapping[v] for v in batch[label]]}

    examples = raw.map(normalise, batched=True, remove_columns=raw.column_names,
                       desc="normalising node data")
    return examples.cast_column("label", ClassLabel(names=list(label_names)))


def make_partitioner(config: RunConfig, train_size: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner the config names, drawn with ``seed``.
    Dirichlet partitions must hold at least one example each."""
    clients = config["num-clients"]
    if clients > train_size:
        raise ConfigError(
            f"config key 'num-clients': {clients} clients but the train split has only "
            f"{train_size} examples"
        )
    kind = config["partition"]
    if kind == "iid":
        return IidPartitioner(num_partitions=clients)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=clients, partition_by="label",
            alpha=config["dirichlet-alpha"],
            min_partition_size=1, self_balancing=False, shuffle=True, seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=clients, partition_by="label",
        num_classes_per_partition=config["labels-per-client"],
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
    )
