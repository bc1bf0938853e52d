"""Reading one split into columns: local files (tsv, csv, jsonl, json, parquet) or a Hub split.

Owns `Table` (a split's raw rows, column-wise, with the file lines for messages), the readers
(`read_split` -> `read_file` or `read_hub`), how a file's format is told (`file_format`,
`LOCAL_SUFFIXES`) and whether a source is a file at all (`is_local_path`), and
`check_columns`. What a column means is the task's business (`jaxkd.tasks`), not this one's.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxkd.data.config import DataConfig, DataError, nearest

LOCAL_SUFFIXES = (".tsv", ".txt", ".csv", ".jsonl", ".json", ".parquet", ".conll")


@dataclasses.dataclass(frozen=True)
class Table:
    """Raw rows of one split, column-wise; `lines` locate rows in their file for messages."""

    source: str
    columns: dict[str, list]
    lines: list[int] | None = None
    malformed: tuple[tuple[str, str], ...] = ()  # (where, reason) of rows that could not be read

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), ()))

    def where(self, i: int) -> str:
        return f"{self.source} line {self.lines[i]}" if self.lines else f"{self.source} row {i}"


def check_columns(table: Table, wanted: Mapping[str, str]) -> None:
    """Every wanted column (config key -> column name) is in the table, or a DataError naming it."""
    available = list(table.columns)
    for key, column in wanted.items():
        if column not in table.columns:
            raise DataError(f"{table.source}: no column {column!r} ({key}){nearest(column, available)}; "
                            f"available columns: {available}. Set {key} to one of them.")


def is_local_path(split_or_path: str) -> bool:
    """A file path (by suffix, separator or existence) rather than a Hub split name."""
    return (pathlib.Path(split_or_path).suffix.lower() in LOCAL_SUFFIXES
            or os.sep in split_or_path or os.path.isfile(split_or_path))


def _read_delimited(path: pathlib.Path, delimiter: str, quoting: int) -> Table:
    # utf-8-sig drops a byte-order mark that would otherwise become part of the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: the file is empty (expected a header line with column names)")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DataError(f"{path}: the header repeats the column names {repeated}")
            columns: dict[str, list] = {name: [] for name in header}
            lines, malformed = [], []
            for fields in reader:
                if not fields:  # a blank line holds no example
                    continue
                if len(fields) != len(header):
                    malformed.append((f"{path} line {reader.line_num}",
                                      f"{len(fields)} fields where the header has {len(header)}"))
                    continue
                for values, field in zip(columns.values(), fields):
                    values.append(field)
                lines.append(reader.line_num)
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: {err}") from err
    return Table(str(path), columns, lines, tuple(malformed))


def _records_to_columns(records: Sequence[Any], source: str) -> dict[str, list]:
    names: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{source} row {i}: expected a JSON object, got {type(record).__name__}")
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_jsonl(path: pathlib.Path) -> Table:
    records, lines = [], []
    with path.open(encoding="utf-8-sig") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_num}: not valid JSON ({err.msg})") from err
            lines.append(line_num)
    return Table(str(path), _records_to_columns(records, str(path)), lines)


def _read_json(path: pathlib.Path) -> Table:
    with path.open(encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(data, Mapping) and all(isinstance(v, list) for v in data.values()):
        lengths = {str(k): len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}: its columns have different lengths ({lengths}); each must "
                            "hold one value per row")
        return Table(str(path), {str(k): list(v) for k, v in data.items()})
    if isinstance(data, list):
        return Table(str(path), _records_to_columns(data, str(path)))
    raise DataError(f"{path}: expected a list of objects or an object of column lists")


def _read_parquet(path: pathlib.Path) -> Table:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    return Table(str(path), pq.read_table(path).to_pydict())


_SUFFIX_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json",
                   ".parquet": "parquet", ".conll": "conll"}


def file_format(path: str | os.PathLike, configured: str | None = None) -> str:
    """The format a local file is read in: `data.format` if set, else by suffix."""
    if configured is not None:
        return configured
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)} "
                        f"or set data.format")
    return _SUFFIX_FORMATS[suffix]


def read_file(path: str | os.PathLike, fmt: str | None = None) -> Table:
    """Reads a local split into columns. tsv: tab-separated with quoting off, so text is never
    altered (SST-2 and MRPC have unbalanced quotes); csv: comma-separated with standard quoting.
    CoNLL column files are read by the token-classification task, not here."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (absolute: {path.absolute()})")
    fmt = file_format(path, fmt)
    readers = {
        "tsv": lambda: _read_delimited(path, "\t", csv.QUOTE_NONE),
        "csv": lambda: _read_delimited(path, ",", csv.QUOTE_MINIMAL),
        "jsonl": lambda: _read_jsonl(path),
        "json": lambda: _read_json(path),
        "parquet": lambda: _read_parquet(path),
    }
    if fmt not in readers:
        raise DataError(f"{path}: format {fmt!r} holds no columns of text; this task reads "
                        f"{', '.join(readers)}")
    try:
        return readers[fmt]()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err


def read_split(data_cfg: DataConfig, source: str, hub_dataset: str | None,
               hub_config: str | None = None) -> Table:
    """A split's columns: a local file, or a split of `data.dataset` (default: `hub_dataset`)."""
    if is_local_path(source):
        return read_file(source, data_cfg.format)
    dataset = data_cfg.dataset or hub_dataset
    if dataset is None:
        raise DataError(f"data split {source!r} is not a file and this task has no Hub dataset: "
                        f"set data.dataset, or give a file")
    return read_hub(dataset, hub_config, source, data_cfg.cache_dir)


def read_hub(dataset: str, config: str | None, split: str, cache_dir: str | None) -> Table:
    """A Hub split as columns (`datasets.load_dataset(dataset, config, split=split)`)."""
    import datasets  # pylint: disable=import-outside-toplevel

    cache = str(pathlib.Path(cache_dir) / "hub") if cache_dir else None
    source = f"{dataset}" + (f"/{config}" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(dataset, config, split=split, cache_dir=cache)
    except Exception as err:  # the Hub raises many types; all mean "not available here"
        raise DataError(
            f"could not load {source} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no network) give local files "
            f"instead, e.g. data.train: path/to/train.tsv ({' '.join(LOCAL_SUFFIXES)})") from err
    return Table(source, ds.to_dict())
