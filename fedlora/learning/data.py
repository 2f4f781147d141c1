"""Datasets as read: a Hub id, a file or a directory → train and test splits,
and the partitioner that cuts the train split among the clients.

What the columns mean is a task's business (``fedlora.learning.tasks``):
this module reads files and names columns only where a file names none.

Everything here is computed once per process and looked up by key: a Ray
worker that serves hundreds of virtual clients loads the dataset and computes
the partition assignment once, not per client message. HF ``datasets`` keeps
an on-disk Arrow cache of loaded files, so the second process to load the same
files (another Ray worker, ``fedlora evaluate``) reads them from the cache.

Local formats: CSV, TSV, JSON, JSONL, Parquet; a directory holds
``train.*`` and ``test.*`` (``dev.*`` / ``validation.*`` stand in for a missing
test file, as for GLUE SST-2 whose test labels are hidden). A CSV/TSV whose
first row contains an integer field has no header (AG News): the task that
reads it names its columns by content (``Raw.first_row`` is then 1).

A bad file is one ``ConfigError`` line naming it: a byte that is not UTF-8 (with
its line), a header and no examples, a row that does not parse (the parser's
reason, with its line). What its labels must be is the task's to check
(``fedlora.learning.tasks.labels``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from fedlora.core.config import ConfigError, RunConfig
from fedlora.runtime.partitioners import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
_TEST_NAMES = ("test", "dev", "validation", "valid")
HELD_OUT_FRACTION = 0.1  # test share when a single file is given


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


def _read_local(files: dict[str, Path]) -> tuple[DatasetDict, int, bool]:
    """Load local split files with HF datasets, detecting header-less CSV/TSV;
    returns them, the row number of a file's first example (2 after a
    header), so that a bad example can be named by its row, and whether the
    file had no header."""
    suffixes = {path.suffix.lower() for path in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FORMATS:
        raise ConfigError(
            f"dataset: unsupported or mixed file types {sorted(suffixes)} in "
            f"{', '.join(str(p) for p in files.values())} "
            f"(supported: {', '.join(_FORMATS)})"
        )
    suffix = next(iter(suffixes))
    kwargs: dict = {}
    first_row, headerless = 1, False
    if _FORMATS[suffix] == "csv":
        delimiter = "\t" if suffix == ".tsv" else ","
        kwargs["delimiter"] = delimiter
        if delimiter == "\t":
            kwargs["quoting"] = csv.QUOTE_NONE  # SST-2 text contains bare quotes
        rows = {split: _first_rows(path, delimiter) for split, path in files.items()}
        row = rows["train"][0]
        if any(_is_int(field) for field in row):
            kwargs["column_names"] = [f"column_{i}" for i in range(len(row))]
            headerless = True
        else:
            first_row = 2
            for split, path in files.items():
                if len(rows[split]) < 2:
                    raise ConfigError(f"dataset: {path} has a header but no examples")
    try:
        return _load_files(_FORMATS[suffix], files, kwargs), first_row, headerless
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
    the labelled tasks report in terms of the labels. HF's own log line about the
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


@dataclass(frozen=True)
class Raw:
    """Splits as read: ``train``, and ``test`` when the source has one."""

    splits: DatasetDict
    home: Path | None  # where a classes.txt may name integer labels
    sources: dict[str, str]  # split -> its file (or Hub split), for messages
    first_row: int = 1  # a file's row holding the first example
    headerless: bool = False  # a CSV/TSV without a header: columns are column_0, column_1…


def load_raw(source: str) -> Raw:
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
        raw, first_row, headerless = _read_local(files)
        return Raw(raw, path, {split: str(file) for split, file in files.items()}, first_row,
                   headerless)
    if path.is_file():
        return read_file(path)
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
    return Raw(splits, None, sources)


def read_file(path: Path) -> Raw:
    """One data file as a train split."""
    raw, first_row, headerless = _read_local({"train": path})
    return Raw(raw, path.parent, {"train": str(path)}, first_row, headerless)


def node_file(path: Path) -> Path:
    """A deployed node's data file: ``path`` itself, or the ``train.*`` file
    of a directory; a ConfigError saying what is there otherwise."""
    if path.is_dir():
        file = _find_split_file(path, ("train",))
        if file is None:
            found = sorted(p.name for p in path.iterdir())
            raise ConfigError(f"no train.{{csv,tsv,json,jsonl,parquet}} file "
                              f"(found: {', '.join(found) or 'nothing'})")
        return file
    if path.is_file():
        return path
    raise ConfigError("no such file or directory")


def with_test_split(raw: Raw, seed: int) -> DatasetDict:
    """``raw``'s train and test splits; a source without a test split gives
    a seeded ``HELD_OUT_FRACTION`` of its train split."""
    if "test" in raw.splits:
        return raw.splits
    held_out = raw.splits["train"].train_test_split(test_size=HELD_OUT_FRACTION, seed=seed)
    return DatasetDict(train=held_out["train"], test=held_out["test"])


def pick_column(ds: Dataset, wanted: str, candidates: tuple[str, ...], role: str,
                key: str, source: str) -> str | None:
    """The column config key ``key`` names (refused when ``ds`` lacks it), else
    the first of ``candidates`` that ``ds`` has, else None."""
    if wanted:
        if wanted not in ds.column_names:
            raise ConfigError(
                f"config key '{key}': column {wanted!r} not in dataset {source} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        return wanted
    return next((name for name in candidates if name in ds.column_names), None)


def make_partitioner(config: RunConfig, train_size: int, seed: int,
                     partition_by: str | None) -> Partitioner:
    """The flwr-datasets partitioner the config names, drawn with ``seed``.
    Label-skew partitions (dirichlet, pathological) cut by ``partition_by``,
    the task's label column (None: the data has no labels); ``natural`` by
    the ``client-column``, one client per value. Dirichlet partitions must
    hold at least one example each."""
    clients, kind = config.num_clients, config.partition
    if clients > train_size:
        raise ConfigError(
            f"config key 'num-clients': {clients} clients but the train split has only "
            f"{train_size} examples"
        )
    if kind == "iid":
        return IidPartitioner(num_partitions=clients)
    if kind == "natural":
        return NaturalIdPartitioner(partition_by=config.client_column)
    if partition_by is None:
        raise ConfigError(f"config key 'partition': {kind} cuts by label, and dataset "
                          f"{config.dataset} has none here (free text); use iid or natural")
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=clients, partition_by=partition_by,
            alpha=config.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=clients, partition_by=partition_by,
        num_classes_per_partition=config.labels_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
    )
