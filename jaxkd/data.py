"""Task data: GLUE presets and local files to fixed-shape, length-bucketed, resumable batches.

Pipeline: `resolve_task` -> `load_split` (validated rows) -> `tokenize` (token ids, cached on
disk) -> `train_batches` (infinite, shuffled, bucketed, resumable) or `eval_batches` (every
example once) -> `jaxkd.sharding.global_batch` (jax Arrays over a mesh, each process giving its own rows).

A batch is a dict of host NumPy arrays:
  input_ids, attention_mask (1 = token), token_type_ids   int32 [B, L]
  labels    int32 [B] (float32 for regression); -1 (NaN) where the split has no labels
  weights   float32 [B]: 1 for real examples, 0 for rows that pad a final evaluation batch
  index     int32 [B]: the example's position in its split (in `Encoded`), -1 for padding rows
L is one of `bucket_lengths(max_seq_len, bucket_multiple)`, picked from the whole global batch so
that every process agrees; B is the global batch size divided by the process count.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
REGRESSION_METRICS = ("pearson", "spearman")
LOCAL_SUFFIXES = (".tsv", ".txt", ".csv", ".jsonl", ".json", ".parquet")
_TOKENIZE_CHUNK = 10_000  # rows per tokenizer call: bounds the Python lists held at once
_CACHE_VERSION = 1  # bump when the cached arrays change meaning


class DataError(ValueError):
    """Bad task or data input; the message names the file, row or key to fix."""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to learn (YAML section `task`)."""

    name: str = "sst2"  # a GLUE preset (cola sst2 mrpc qqp stsb mnli qnli rte wnli) or "custom"
    text: str | None = None  # text column; None = the preset's
    text_pair: str | None = None  # second text column of a pair task; None = the preset's
    label: str | None = None  # label column; None = the preset's ("label")
    # Label names; a string label becomes its position here. None = the preset's, or (custom)
    # the sorted distinct values of the training labels.
    labels: tuple[str, ...] | None = None
    metric: str | None = None  # primary metric; None = the preset's. pearson/spearman = regression

    def __post_init__(self):
        if self.name != "custom" and self.name not in PRESETS:
            raise DataError(f"unknown task.name {self.name!r}{_nearest(self.name, PRESETS)}; "
                            f"known: {', '.join(PRESETS)} or 'custom'")
        if self.metric is not None and self.metric not in METRICS:
            raise DataError(f"unknown task.metric {self.metric!r}{_nearest(self.metric, METRICS)}; "
                            f"known: {', '.join(METRICS)}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise DataError(f"task.labels must be a non-empty list of distinct names, "
                                f"got {list(self.labels)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are batched (YAML section `data`)."""

    dataset: str = "glue"  # Hub dataset id, used when train/eval/test name a split, not a file
    train: str | None = None  # a split name ("train") or a file (.tsv .txt .csv .jsonl .json .parquet)
    eval: str | None = None  # None = the task's validation split(s)
    test: str | None = None
    batch_size: int = 32  # global: summed over all processes and devices
    eval_batch_size: int | None = None  # None = batch_size
    max_seq_len: int = 128  # longer inputs are truncated (longest first for pairs)
    # Batch lengths are multiples of this, spaced geometrically up to max_seq_len (see
    # `bucket_lengths`). 8 keeps SST-2 (median 10 tokens) under 25% padding; 16 gives ~38%.
    bucket_multiple: int = 8
    cache_dir: str | None = None  # token and Hub caches; None = the caller's default (workdir)
    skip_invalid: bool = False  # skip rows with empty text / bad labels (counted, logged) vs. error

    def __post_init__(self):
        for key in ("batch_size", "max_seq_len", "bucket_multiple"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise DataError(f"data.{key} must be a positive integer, got {value!r}")
        if self.eval_batch_size is not None and (
                not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1):
            raise DataError(f"data.eval_batch_size must be a positive integer or null, "
                            f"got {self.eval_batch_size!r}")
        if self.max_seq_len < 3:
            raise DataError(f"data.max_seq_len must be >= 3 ([CLS] token [SEP]), got {self.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class _Preset:
    text: str
    text_pair: str | None
    labels: tuple[str, ...]  # () = regression
    metrics: tuple[str, ...]  # primary first
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)


# Column and label names as the Hub's `glue` dataset has them.
PRESETS: dict[str, _Preset] = {
    "cola": _Preset("sentence", None, ("unacceptable", "acceptable"), ("matthews",)),
    "sst2": _Preset("sentence", None, ("negative", "positive"), ("accuracy",)),
    "mrpc": _Preset("sentence1", "sentence2", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "qqp": _Preset("question1", "question2", ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": _Preset("sentence1", "sentence2", (), ("pearson", "spearman")),
    "mnli": _Preset("premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                    ("accuracy",), ("validation_matched", "validation_mismatched"),
                    ("test_matched", "test_mismatched")),
    "qnli": _Preset("question", "sentence", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": _Preset("sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": _Preset("sentence1", "sentence2", ("not_entailment", "entailment"), ("accuracy",)),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """A resolved task: columns, labels and metrics, nothing left to default."""

    name: str
    text: str
    text_pair: str | None
    label: str
    label_names: tuple[str, ...]  # id -> name (id2label at export); () for regression
    metrics: tuple[str, ...]  # primary first
    eval_splits: tuple[str, ...]  # Hub splits evaluated when data.eval is not given
    test_splits: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


def _nearest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _label_key(value: Any) -> str | None:
    """Label value -> the string it is matched by; None when missing."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(value)
    key = str(value).strip()
    return key or None


def _is_int(key: str) -> bool:
    return key.lstrip("-").isdigit()


def infer_label_names(values: Iterable[Any]) -> tuple[str, ...]:
    """Distinct label values, sorted (numerically when all are integers)."""
    keys = {k for k in map(_label_key, values) if k is not None}
    if not keys:
        raise DataError("cannot infer task.labels: the training labels are all empty")
    if all(_is_int(k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def resolve_task(cfg: TaskConfig, label_values: Iterable[Any] | None = None) -> Task:
    """Fills `cfg` from its preset. A custom classification task without `labels` needs the
    training labels (`label_values`) to infer them from; `load_task` reads them for you."""
    if cfg.name == "custom":
        if cfg.text is None:
            raise DataError("task.name 'custom' needs task.text (the name of the text column)")
        metric = cfg.metric or "accuracy"
        preset = _Preset(cfg.text, cfg.text_pair, (), (metric,), ("validation",), ("test",))
        regression = metric in REGRESSION_METRICS
    else:
        preset = PRESETS[cfg.name]
        regression = not preset.labels
    if regression:
        if cfg.labels is not None:
            raise DataError(f"task {cfg.name!r} is a regression (metric pearson/spearman): "
                            f"remove task.labels")
        names: tuple[str, ...] = ()
    elif cfg.labels is not None:
        names = cfg.labels
    elif preset.labels:
        names = preset.labels
    elif label_values is not None:
        names = infer_label_names(label_values)
    else:
        raise DataError("task.name 'custom' needs task.labels (the label names), "
                        "or training labels to infer them from")
    metrics = _metrics(cfg, preset, regression, len(names))
    return Task(name=cfg.name, text=cfg.text or preset.text, text_pair=cfg.text_pair or preset.text_pair,
                label=cfg.label or "label", label_names=names, metrics=metrics,
                eval_splits=preset.eval_splits, test_splits=preset.test_splits)


def _metrics(cfg: TaskConfig, preset: _Preset, regression: bool, num_labels: int) -> tuple[str, ...]:
    primary = cfg.metric or preset.metrics[0]
    metrics = (primary,) + tuple(m for m in preset.metrics if m != primary)
    for metric in metrics:
        if (metric in REGRESSION_METRICS) != regression:
            kind = "regression" if regression else "classification"
            raise DataError(f"task.metric {metric!r} does not fit the {kind} task {cfg.name!r}")
        if metric == "f1" and num_labels != 2:
            raise DataError(f"task.metric 'f1' (of the positive class) needs 2 labels, "
                            f"task {cfg.name!r} has {num_labels}")
    return metrics


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Table:
    """Raw rows of one split, column-wise; `lines` locate rows in their file for messages."""

    source: str
    columns: dict[str, list]
    lines: list[int] | None = None
    malformed: tuple[tuple[str, str], ...] = ()  # (where, reason) of rows that could not be read

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), ()))

    def where(self, i: int) -> str:
        return f"{self.source} line {self.lines[i]}" if self.lines else f"{self.source} row {i}"


def is_local_path(split_or_path: str) -> bool:
    """A file path (by suffix, separator or existence) rather than a Hub split name."""
    return (pathlib.Path(split_or_path).suffix.lower() in LOCAL_SUFFIXES
            or os.sep in split_or_path or os.path.isfile(split_or_path))


def _read_delimited(path: pathlib.Path, delimiter: str, quoting: int) -> _Table:
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
    return _Table(str(path), columns, lines, tuple(malformed))


def _records_to_columns(records: Sequence[Any], source: str) -> dict[str, list]:
    names: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{source} row {i}: expected a JSON object, got {type(record).__name__}")
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_jsonl(path: pathlib.Path) -> _Table:
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
    return _Table(str(path), _records_to_columns(records, str(path)), lines)


def _read_json(path: pathlib.Path) -> _Table:
    with path.open(encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(data, Mapping) and all(isinstance(v, list) for v in data.values()):
        return _Table(str(path), {str(k): list(v) for k, v in data.items()})
    if isinstance(data, list):
        return _Table(str(path), _records_to_columns(data, str(path)))
    raise DataError(f"{path}: expected a list of objects or an object of column lists")


def _read_parquet(path: pathlib.Path) -> _Table:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    return _Table(str(path), pq.read_table(path).to_pydict())


def read_file(path: str | os.PathLike) -> _Table:
    """Reads a local split. .tsv/.txt: tab-separated with quoting off, so text is never altered
    (SST-2 and MRPC have unbalanced quotes); .csv: comma-separated with standard quoting."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (absolute: {path.absolute()})")
    readers = {
        ".tsv": lambda: _read_delimited(path, "\t", csv.QUOTE_NONE),
        ".txt": lambda: _read_delimited(path, "\t", csv.QUOTE_NONE),
        ".csv": lambda: _read_delimited(path, ",", csv.QUOTE_MINIMAL),
        ".jsonl": lambda: _read_jsonl(path),
        ".json": lambda: _read_json(path),
        ".parquet": lambda: _read_parquet(path),
    }
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        return readers[suffix]()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err


def _read_hub(data_cfg: DataConfig, task_name: str, split: str) -> _Table:
    import datasets  # pylint: disable=import-outside-toplevel

    config = task_name if task_name in PRESETS else None
    cache = str(pathlib.Path(data_cfg.cache_dir) / "hub") if data_cfg.cache_dir else None
    source = f"{data_cfg.dataset}" + (f"/{config}" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(data_cfg.dataset, config, split=split, cache_dir=cache)
    except Exception as err:  # the Hub raises many types; all mean "not available here"
        raise DataError(
            f"could not load {source} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no network) give local files "
            f"instead, e.g. data.train: path/to/train.tsv ({' '.join(LOCAL_SUFFIXES)})") from err
    return _Table(source, ds.to_dict())


def read_split(data_cfg: DataConfig, task_name: str, split_or_path: str) -> _Table:
    """Raw rows of a local file or a Hub split (`data.dataset`, config = the preset's name)."""
    if is_local_path(split_or_path):
        return read_file(split_or_path)
    return _read_hub(data_cfg, task_name, split_or_path)


def load_task(task_cfg: TaskConfig, data_cfg: DataConfig) -> Task:
    """`resolve_task`, reading the training labels when a custom task must infer its label names."""
    needs_labels = (task_cfg.name == "custom" and task_cfg.labels is None
                    and (task_cfg.metric or "accuracy") not in REGRESSION_METRICS)
    if not needs_labels:
        return resolve_task(task_cfg)
    if data_cfg.train is None:
        raise DataError("task.name 'custom' without task.labels needs data.train to infer them from")
    table = read_split(data_cfg, task_cfg.name, data_cfg.train)
    label = task_cfg.label or "label"
    _check_columns(table, {"task.label": label})
    return resolve_task(task_cfg, label_values=table.columns[label])


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class Examples:
    """Validated rows of one split."""

    source: str
    texts: list[str]
    pairs: list[str] | None  # second texts of a pair task
    labels: np.ndarray  # int32 ids, or float32 for regression; -1 / NaN when has_labels is False
    has_labels: bool
    row_ids: np.ndarray  # int64: each example's row among the readable rows of the source
    skipped: dict[str, int]  # reason -> count of rows left out (only with data.skip_invalid)

    def __len__(self) -> int:
        return len(self.texts)


class _BadRow(Exception):

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _check_columns(table: _Table, wanted: Mapping[str, str]) -> None:
    available = list(table.columns)
    for key, column in wanted.items():
        if column not in table.columns:
            raise DataError(f"{table.source}: no column {column!r} ({key}){_nearest(column, available)}; "
                            f"available columns: {available}. Set {key} to one of them.")


def _text(value: Any, column: str) -> str:
    if value is None:
        raise _BadRow("empty text", f"null text in column {column!r}")
    if not isinstance(value, str):
        raise _BadRow("bad text", f"text in column {column!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise _BadRow("empty text", f"empty text in column {column!r}")
    return value


def _label(value: Any, task: Task) -> float | int:
    key = _label_key(value)
    if key is None:
        raise _BadRow("missing label", f"missing label in column {task.label!r}")
    if task.is_regression:
        try:
            number = float(key)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise _BadRow("bad label", f"label {value!r} in column {task.label!r} is not a finite number")
        return number
    if key in task.label_names:
        return task.label_names.index(key)
    if _is_int(key) and 0 <= int(key) < task.num_labels:
        return int(key)
    raise _BadRow("bad label", f"label {value!r} in column {task.label!r} is not one of "
                  f"{list(task.label_names)} nor an id 0..{task.num_labels - 1} (task.labels)")


def _unlabeled(label_column: list | None) -> bool:
    # Hub test splits keep the column but fill it with -1.
    return label_column is None or all(_label_key(v) in (None, "-1") for v in label_column)


def load_split(data_cfg: DataConfig, task: Task, split_or_path: str,
               require_labels: bool = True) -> Examples:
    """Reads and validates one split (a local file or a Hub split name).

    Every row is checked before anything else runs: an empty or null text, a missing label or a
    label outside `task.label_names` raises a `DataError` naming the file and line, unless
    `data_cfg.skip_invalid`, which skips such rows and counts them in `Examples.skipped` (logged).
    With `require_labels=False` (test splits) a missing or all -1 label column gives unlabeled
    examples.
    """
    table = read_split(data_cfg, task.name, split_or_path)
    wanted = {"task.text": task.text}
    if task.text_pair is not None:
        wanted["task.text_pair"] = task.text_pair
    if require_labels or task.label in table.columns:
        wanted["task.label"] = task.label
    _check_columns(table, wanted)
    if len(table) == 0 and not table.malformed:
        raise DataError(f"{table.source}: the split is empty (no data rows)")
    label_column = table.columns.get(task.label)
    has_labels = require_labels or not _unlabeled(label_column)
    skipped = collections.Counter("wrong field count" for _ in table.malformed)
    problems = list(table.malformed)
    texts, pairs, labels, row_ids = [], [], [], []
    pair_column = table.columns.get(task.text_pair) if task.text_pair else None
    for i, text in enumerate(table.columns[task.text]):
        try:
            row = (_text(text, task.text),
                   _text(pair_column[i], task.text_pair) if pair_column is not None else None,
                   _label(label_column[i], task) if has_labels else None)
        except _BadRow as bad:
            skipped[bad.kind] += 1
            problems.append((table.where(i), str(bad)))
            continue
        texts.append(row[0])
        pairs.append(row[1])
        labels.append(row[2])
        row_ids.append(i)
    if problems and not data_cfg.skip_invalid:
        where, reason = problems[0]
        raise DataError(f"{where}: {reason}. Fix the row, or set data.skip_invalid: true to skip "
                        f"and count such rows ({len(problems)} bad rows in all).")
    if problems:
        log.warning("%s: skipped %d invalid rows (%s); first: %s: %s", table.source, len(problems),
                    dict(skipped), *problems[0])
    if not texts:
        raise DataError(f"{table.source}: no valid rows left (all {len(problems)} were invalid)")
    return Examples(source=table.source, texts=texts, pairs=pairs if pair_column is not None else None,
                    labels=_label_array(labels, task, has_labels), has_labels=has_labels,
                    row_ids=np.asarray(row_ids, np.int64), skipped=dict(skipped))


def _label_array(labels: list, task: Task, has_labels: bool) -> np.ndarray:
    dtype = np.float32 if task.is_regression else np.int32
    if has_labels:
        return np.asarray(labels, dtype)
    return np.full(len(labels), np.nan if task.is_regression else -1, dtype)


# ----------------------------------------------------------------------------- tokenisation


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a split, back to back: example i is `input_ids[offsets[i]:offsets[i + 1]]`."""

    input_ids: np.ndarray  # int32 [T]
    token_type_ids: np.ndarray  # int8 [T]
    offsets: np.ndarray  # int64 [N + 1]
    labels: np.ndarray  # int32 or float32 [N]
    has_labels: bool

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]],
                   labels: np.ndarray, has_labels: bool = True) -> Encoded:
        ids, lengths = _flatten(input_ids, np.int32)
        types, _ = _flatten(token_type_ids, np.int8)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(ids, types, offsets, np.asarray(labels), has_labels)


def _flatten(lists: Sequence[Sequence[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype, count=int(lengths.sum()))
    return flat, lengths


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # vocab, normaliser (lower-casing) and special tokens in one string
        spec = json.loads(backend.to_str())
        # A call with truncation=... stores that setting here; it must not change the key.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        return json.dumps(spec, sort_keys=True)
    return json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])


def _cache_key(examples: Examples, tokenizer, max_seq_len: int) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION} len{max_seq_len} ".encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for texts in (examples.texts, examples.pairs or []):
        digest.update(b"\x00texts\x00")
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:24]


def _run_tokenizer(examples: Examples, tokenizer, max_seq_len: int) -> dict[str, np.ndarray]:
    ids, types, lengths = [], [], []
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        pairs = examples.pairs[start:stop] if examples.pairs is not None else None
        out = tokenizer(examples.texts[start:stop], pairs, truncation="longest_first",
                        max_length=max_seq_len, return_token_type_ids=True,
                        return_attention_mask=False)
        chunk_ids, chunk_lengths = _flatten(out["input_ids"], np.int32)
        ids.append(chunk_ids)
        types.append(_flatten(out["token_type_ids"], np.int8)[0])
        lengths.append(chunk_lengths)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    return {"input_ids": np.concatenate(ids), "token_type_ids": np.concatenate(types),
            "offsets": offsets}


def tokenize(examples: Examples, tokenizer, max_seq_len: int,
             cache_dir: str | os.PathLike | None = None) -> Encoded:
    """Token ids of every example ([CLS] a [SEP] (b [SEP])), truncated longest-first to max_seq_len.

    Uses the (fast) tokenizer in batch mode. With `cache_dir`, the ids are kept in
    `cache_dir/tokens-<key>.npz`, key = hash of the texts, the tokenizer (vocab, normaliser)
    and max_seq_len, so a second run (or another process) does not tokenise again.
    """
    path = None
    if cache_dir is not None:
        path = pathlib.Path(cache_dir) / f"tokens-{_cache_key(examples, tokenizer, max_seq_len)}.npz"
    if path is not None and path.is_file():
        with np.load(path) as cached:
            arrays = {name: cached[name] for name in cached.files}
    else:
        arrays = _run_tokenizer(examples, tokenizer, max_seq_len)
        if path is not None:
            _save_atomic(path, arrays)
    return Encoded(labels=examples.labels, has_labels=examples.has_labels, **arrays)


def _save_atomic(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    # Several processes may write the same key at once; a rename never leaves a half file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- batching


def bucket_lengths(max_seq_len: int, multiple: int) -> tuple[int, ...]:
    """Allowed batch lengths: multiples of `multiple`, each step at least `multiple` and at most
    half the largest power of two below the current length, capped by max_seq_len.

    (128, 8) -> 8 16 24 32 48 64 96 128; (512, 8) adds 192 256 384 512: few shapes to compile,
    at most a third of a row wasted to rounding.
    """
    lengths, n = [], multiple
    while n < max_seq_len:
        lengths.append(n)
        step = max(multiple, (1 << (n.bit_length() - 1)) // 2)
        n += -(-step // multiple) * multiple
    return tuple(lengths) + (max_seq_len,)


def epoch_order(lengths_N: np.ndarray, batch_size: int, seed: int, epoch: int,
                chunk_batches: int = 100) -> np.ndarray:
    """Example indices [S, B] of one training epoch, S = N // B (the remainder is dropped).

    Shuffled from (seed, epoch); sorted by length within chunks of `chunk_batches` batches so a
    batch holds similar lengths; then the batch order is shuffled, so lengths do not trend.
    """
    rng = np.random.default_rng((seed, epoch))
    steps = len(lengths_N) // batch_size
    perm_N = rng.permutation(len(lengths_N))[:steps * batch_size]
    chunk = chunk_batches * batch_size
    chunks = np.split(perm_N, range(chunk, len(perm_N), chunk))
    pieces = [c[np.argsort(lengths_N[c], kind="stable")] for c in chunks]
    order_SxB = np.concatenate(pieces).reshape(steps, batch_size)
    return order_SxB[rng.permutation(steps)]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Batch geometry shared by training and evaluation."""

    batch_size: int
    max_seq_len: int
    bucket_multiple: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.batch_size < 1 or self.batch_size % self.process_count:
            raise DataError(f"the global batch size {self.batch_size} must be a positive multiple of "
                            f"the process count {self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise DataError(f"process_index {self.process_index} is outside 0..{self.process_count - 1}")

    @property
    def buckets(self) -> np.ndarray:
        return np.asarray(bucket_lengths(self.max_seq_len, self.bucket_multiple))

    def bucket(self, longest):
        """The shortest bucket length that holds `longest` tokens (scalar or array)."""
        buckets = self.buckets
        return buckets[np.searchsorted(buckets, longest)]

    def batch(self, encoded: Encoded, rows_B: np.ndarray, real_B: np.ndarray) -> Batch:
        """This process's rows of the global batch `rows_B`; L is fixed by the whole batch."""
        length = int(self.bucket(encoded.lengths[rows_B].max()))
        share = self.batch_size // self.process_count
        local = slice(self.process_index * share, (self.process_index + 1) * share)
        rows_b, real_b = rows_B[local], real_B[local]
        start_b = encoded.offsets[rows_b]
        pos_bxL = np.arange(length)
        mask_bxL = pos_bxL < (encoded.offsets[rows_b + 1] - start_b)[:, None]
        # Positions past a row's end read a clipped index, then are zeroed by the mask.
        flat_bxL = np.minimum(start_b[:, None] + pos_bxL, len(encoded.input_ids) - 1)
        return {
            "input_ids": np.where(mask_bxL, encoded.input_ids[flat_bxL], 0).astype(np.int32),
            "attention_mask": mask_bxL.astype(np.int32),
            "token_type_ids": np.where(mask_bxL, encoded.token_type_ids[flat_bxL], 0).astype(np.int32),
            "labels": encoded.labels[rows_b],
            "weights": real_b.astype(np.float32),
            "index": np.where(real_b, rows_b, -1).astype(np.int32),
        }


def _position(position: Mapping[str, Any] | None, expected: Mapping[str, int],
              epoch_steps: int) -> tuple[int, int]:
    """(epoch, step) from a saved position, checked against the data it was saved with."""
    if position is None:
        return 0, 0
    missing = [key for key in ("epoch", "step", *expected) if key not in position]
    if missing:
        raise DataError(f"data position {dict(position)} lacks {missing}")
    for key, value in expected.items():
        if position[key] != value:
            raise DataError(f"data position was saved with {key}={position[key]}, now {value}: "
                            f"resume with the same data and batch settings")
    epoch, step = int(position["epoch"]), int(position["step"])
    if epoch < 0 or not 0 <= step < epoch_steps:
        raise DataError(f"data position epoch={epoch} step={step} is outside 0..{epoch_steps - 1}")
    return epoch, step


class TrainBatches(Iterator[Batch]):
    """Infinite training batches: one shuffled, length-bucketed epoch after another.

    The last partial batch of each epoch is dropped (fixed shapes); a different remainder is
    dropped each epoch. `position` (JSON-serialisable) is where the next batch comes from;
    constructed again with it, the iterator continues exactly as an uninterrupted one would, for
    any process count. Each process gets rows [i*B/P, (i+1)*B/P) of each global batch.
    """

    def __init__(self, encoded: Encoded, batch_size: int, *, seed: int, bucket_multiple: int,
                 max_seq_len: int, position: Mapping[str, Any] | None = None,
                 process_index: int = 0, process_count: int = 1, chunk_batches: int = 100):
        self._encoded = encoded
        self._layout = _Layout(batch_size, max_seq_len, bucket_multiple, process_index, process_count)
        self._seed, self._chunk_batches = seed, chunk_batches
        self.epoch_steps = len(encoded) // batch_size
        if self.epoch_steps == 0:
            raise DataError(f"{len(encoded)} training examples do not fill one batch of {batch_size}")
        self._fingerprint = {"seed": seed, "num_examples": len(encoded), "batch_size": batch_size}
        self._epoch, self._step = _position(position, self._fingerprint, self.epoch_steps)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self._epoch, "step": self._step, **self._fingerprint}

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            order = epoch_order(self._encoded.lengths, self._layout.batch_size, self._seed, self._epoch,
                                self._chunk_batches)
            self._order = (self._epoch, order)
        return self._order[1]

    def __next__(self) -> Batch:
        rows_B = self._epoch_order()[self._step]
        batch = self._layout.batch(self._encoded, rows_B, np.ones(len(rows_B), bool))
        self._step += 1
        if self._step == self.epoch_steps:
            self._epoch, self._step = self._epoch + 1, 0
        return batch


class EvalBatches(Iterable[Batch]):
    """Every example exactly once, in length order; re-iterable.

    The last batch is filled to the full global size with copies of its first example that carry
    weight 0 and index -1 (copies keep every row a valid input: no all-masked rows).
    """

    def __init__(self, encoded: Encoded, batch_size: int, *, bucket_multiple: int, max_seq_len: int,
                 process_index: int = 0, process_count: int = 1):
        self._encoded = encoded
        self._layout = _Layout(batch_size, max_seq_len, bucket_multiple, process_index, process_count)

    def __len__(self) -> int:
        return -(-len(self._encoded) // self._layout.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order_N = np.argsort(self._encoded.lengths, kind="stable")
        size = self._layout.batch_size
        for start in range(0, len(order_N), size):
            rows = order_N[start:start + size]
            fill = size - len(rows)
            rows_B = np.concatenate([rows, np.full(fill, rows[0])])
            real_B = np.arange(size) < len(rows)
            yield self._layout.batch(self._encoded, rows_B, real_B)


# The names the trainer calls; the classes carry the signatures and docs.
train_batches = TrainBatches
eval_batches = EvalBatches


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    pad_fraction: float  # padding slots / all token slots over one epoch
    shapes: tuple[tuple[int, int], ...]  # distinct (B, L) batch shapes, sorted
    num_batches: int


def padding_stats(encoded: Encoded, batch_size: int, *, bucket_multiple: int, max_seq_len: int,
                  seed: int = 0, epoch: int = 0, chunk_batches: int = 100) -> PaddingStats:
    """How much of one bucketed training epoch is padding, and which shapes it compiles."""
    layout = _Layout(batch_size, max_seq_len, bucket_multiple)
    lengths_N = encoded.lengths
    order_SxB = epoch_order(lengths_N, batch_size, seed, epoch, chunk_batches)
    length_S = layout.bucket(lengths_N[order_SxB].max(axis=1))
    slots = int(length_S.sum()) * batch_size
    return PaddingStats(pad_fraction=1.0 - int(lengths_N[order_SxB].sum()) / slots,
                        shapes=tuple((batch_size, int(n)) for n in np.unique(length_S)),
                        num_batches=len(length_S))
