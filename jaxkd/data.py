"""Task-independent data: reading files and Hub splits, encoded splits, and fixed-shape,
length-bucketed, resumable batches.

Pipeline: a task (`jaxkd.tasks`) reads and validates a split (`read_split` here) and encodes it
into an `Encoded` (token ids back to back, cached on disk with `cached_arrays`) ->
`TrainBatches` (infinite, shuffled, bucketed, resumable) or `EvalBatches` (every row once) ->
`jaxkd.sharding.global_batch` (jax Arrays over a mesh, each process giving its own rows).

A batch is a dict of host NumPy arrays, built here and nowhere else (`batch_rows`):
  input_ids, attention_mask (1 = token), token_type_ids   int32 [B, L]
  labels    per row [B] (int32, or float32 for regression; -1 / NaN where the split has no
            labels), or per token [B, L] int32 (-1 on tokens without a label), as the task lays
            them out in `Encoded.labels`
  weights   float32 [B]: 1 for real rows, 0 for rows that pad a final evaluation batch
  hard_weights  float32 [B]: the row's weight in the hard-label loss: its `weights` on labelled
            rows, 0 on transfer rows (unlabeled or augmented text the teacher alone labels, see
            `Encoded.hard_weights`); KD and the intermediate terms weigh rows by `weights`
  index     int32 [B]: the row's position in its split (in `Encoded`), -1 for padding rows
  teacher_logits   only from the teacher cache (`jaxkd.cache.attach`), laid out like the model's
L is one of `bucket_lengths(max_seq_len, bucket_multiple)`, picked from the whole global batch so
that every process agrees; B is the global batch size divided by the process count.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

LOCAL_SUFFIXES = (".tsv", ".txt", ".csv", ".jsonl", ".json", ".parquet", ".conll")
FORMATS = ("tsv", "csv", "jsonl", "json", "parquet", "conll")
_CACHE_VERSION = 2  # bump when the cached arrays change meaning


class DataError(ValueError):
    """Bad task or data input; the message names the file, row or key to fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are batched (YAML section `data`)."""

    # Hub dataset id, used when train/eval/test name a split, not a file; None: the task
    # preset's (glue for GLUE tasks, conll2003 for NER)
    dataset: str | None = None
    train: str | None = None  # a split name ("train") or a file (.tsv .txt .csv .jsonl .json .parquet .conll)
    eval: str | None = None  # None = the task's validation split(s)
    test: str | None = None
    # A seeded share of the training file held out as the eval split (model selection), when
    # data.eval is not given: no config then selects on the split it reports.
    eval_fraction: float | None = None
    batch_size: int = 32  # global: summed over all processes and devices
    eval_batch_size: int | None = None  # None = batch_size
    # Longer sentence(-pair)s are truncated (longest first for pairs); longer token-classification
    # sentences and QA contexts are split into windows, so every word is still labelled.
    max_seq_len: int = 128
    # Question answering: tokens shared by neighbouring context windows; None: max_seq_len // 4
    # (96 for 384), as predict and evaluate default it.
    doc_stride: int | None = None
    # Batch lengths are multiples of this, spaced geometrically up to max_seq_len (see
    # `bucket_lengths`). 8 keeps SST-2 (median 10 tokens) under 25% padding; 16 gives ~38%.
    bucket_multiple: int = 8
    cache_dir: str | None = None  # token and Hub caches; None = the caller's default (workdir)
    skip_invalid: bool = False  # skip rows with empty text / bad labels (counted, logged) vs. error
    # File format; None: by suffix (.tsv and .txt tab-separated, or CoNLL columns for a
    # token-classification task; .conll CoNLL columns; .csv .jsonl .json .parquet).
    format: str | None = None
    # Transfer data: text with no labels (files, or splits of data.dataset) in the task's text
    # columns (a label column is ignored). The teacher labels it; it trains the KD term only.
    unlabeled: str | tuple[str, ...] | None = None
    # Share of every distillation batch taken by transfer rows (unlabeled and augmented), when
    # there are any; an epoch stays one pass over the labelled rows (see `MixedBatches`).
    unlabeled_ratio: float = 0.5

    @property
    def window_stride(self) -> int:
        """data.doc_stride, or its default for data.max_seq_len."""
        return self.doc_stride if self.doc_stride is not None else max(1, self.max_seq_len // 4)

    def __post_init__(self):
        if isinstance(self.unlabeled, str):  # one source given as a plain string
            object.__setattr__(self, "unlabeled", (self.unlabeled,))
        if self.unlabeled is not None and not self.unlabeled:
            raise DataError("data.unlabeled must name at least one file or split, or be null")
        if not 0.0 < self.unlabeled_ratio < 1.0:
            raise DataError(f"data.unlabeled_ratio must be in (0, 1) (the transfer rows' share of "
                            f"a batch), got {self.unlabeled_ratio}")
        for key in ("batch_size", "max_seq_len", "bucket_multiple", "doc_stride"):
            value = getattr(self, key)
            if key == "doc_stride" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise DataError(f"data.{key} must be a positive integer, got {value!r}")
        if self.eval_batch_size is not None and (
                not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1):
            raise DataError(f"data.eval_batch_size must be a positive integer or null, "
                            f"got {self.eval_batch_size!r}")
        if self.max_seq_len < 3:
            raise DataError(f"data.max_seq_len must be >= 3 ([CLS] token [SEP]), got {self.max_seq_len}")
        if self.eval_fraction is not None:
            if not 0.0 < self.eval_fraction < 0.5:
                raise DataError(f"data.eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
            if self.eval is not None:
                raise DataError("data.eval_fraction carves the eval split out of data.train: "
                                "remove data.eval, or data.eval_fraction")
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"data.format {self.format!r} is unknown{nearest(self.format, FORMATS)}; "
                            f"use one of {', '.join(FORMATS)}, or leave it unset to go by suffix")


def holdout(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) example indices, each sorted: a seeded `fraction` of them held out."""
    held = max(1, round(num_examples * fraction))
    order = np.random.default_rng((seed, 0x5EED)).permutation(num_examples)
    return np.sort(order[held:]), np.sort(order[:held])


def nearest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_columns(table: "Table", wanted: Mapping[str, str]) -> None:
    """Every wanted column (config key -> column name) is in the table, or a DataError naming it."""
    available = list(table.columns)
    for key, column in wanted.items():
        if column not in table.columns:
            raise DataError(f"{table.source}: no column {column!r} ({key}){nearest(column, available)}; "
                            f"available columns: {available}. Set {key} to one of them.")


# ----------------------------------------------------------------------------- reading


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


# ----------------------------------------------------------------------------- encoded splits


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a split, back to back: row i is `input_ids[offsets[i]:offsets[i + 1]]`.

    A row is what the model sees at once: an example, or a window of a long one (token tasks).
    `labels` is per row ([N], or [N, ...]) or, with `labels_per_token`, per token ([T], aligned
    with input_ids, -1 where a token has no label). `extras` holds host-side arrays a task needs
    to turn outputs back into predictions (word indices, windows); batches never carry them.
    """

    input_ids: np.ndarray  # int32 [T]
    token_type_ids: np.ndarray  # int8 [T]
    offsets: np.ndarray  # int64 [N + 1]
    labels: np.ndarray
    has_labels: bool
    labels_per_token: bool = False
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # float32 [N], each row's weight in the hard-label loss: 0 marks transfer rows, whose labels
    # come from the teacher alone. None: every row is labelled.
    hard_weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]],
                   labels: np.ndarray, has_labels: bool = True) -> Encoded:
        ids, lengths = flatten(input_ids, np.int32)
        types, _ = flatten(token_type_ids, np.int8)
        return cls(ids, types, offsets_of(lengths), np.asarray(labels), has_labels)


def with_transfer(labelled: Encoded, transfer: Sequence[Encoded]) -> Encoded:
    """The distillation set: `labelled` rows first (hard weight 1), then every transfer set's
    rows (hard weight 0). Labels per row or per token (every part alike); the labelled set's
    extras, which describe its rows alone, are not carried."""
    if not transfer:
        return labelled
    if any(t.labels_per_token != labelled.labels_per_token for t in transfer):
        raise DataError("transfer rows must carry labels as the labelled rows do (per row or per token)")
    parts = [labelled, *transfer]
    lengths = np.concatenate([p.lengths for p in parts])
    # Transfer rows keep their labels or "no label" value (-1 / NaN): their hard weight 0
    # excludes them from the hard term (a per-token set's labels still place the KD term).
    labels = np.concatenate([np.asarray(p.labels, labelled.labels.dtype) for p in parts])
    hard = np.concatenate([np.ones(len(labelled), np.float32)]
                          + [np.zeros(len(t), np.float32) for t in transfer])
    return Encoded(np.concatenate([p.input_ids for p in parts]),
                   np.concatenate([p.token_type_ids for p in parts]), offsets_of(lengths), labels,
                   labelled.has_labels, labels_per_token=labelled.labels_per_token,
                   hard_weights=hard)


def flatten(lists: Sequence[Sequence[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lists back to back, and their lengths."""
    lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype, count=int(lengths.sum()))
    return flat, lengths


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    """What a tokenizer's output depends on: vocab, normaliser (lower-casing), pre-tokeniser
    (RoBERTa's prefix space), special tokens, and whether it gives token types."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # A call with truncation=... stores that setting here; it must not change the key.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        if not gives_token_types(tokenizer):  # marked only then: BERT tokenizers keep their keys
            spec["token_type_ids"] = False
        return json.dumps(spec, sort_keys=True)
    return json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                       gives_token_types(tokenizer)])


def gives_token_types(tokenizer) -> bool:
    """Whether the tokenizer's model reads token types (BERT, ELECTRA); rows of the others
    (RoBERTa, XLM-R, DistilBERT) get all-zero token types."""
    return "token_type_ids" in tokenizer.model_input_names


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] and [SEP] for BERT, <s>
    and </s> for RoBERTa), read off its encoding of a one-word probe."""
    out = tokenizer([["a"]], is_split_into_words=True)
    ids, words = out["input_ids"][0], out.word_ids(0)
    first, last = words.index(0), len(words) - 1 - words[::-1].index(0)
    return list(ids[:first]), list(ids[last + 1:])


def content_key(*parts: Any) -> str:
    """A short hash of strings, lists of strings and NumPy arrays (cache file names)."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for part in parts:
        digest.update(b"\x00part\x00")
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, str):
            digest.update(part.encode())
        else:
            for item in part:
                digest.update(str(item).encode())
                digest.update(b"\x00")
    return digest.hexdigest()[:24]


def cached_arrays(cache_dir: str | os.PathLike | None, key: str,
                  compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, kept in `cache_dir/tokens-<key>.npz`, so a second run (or another
    process) does not tokenise again; no caching without a directory."""
    path = None if cache_dir is None else pathlib.Path(cache_dir) / f"tokens-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    arrays = dict(compute())
    if path is not None:
        _save_atomic(path, arrays)
    return arrays


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
                chunk_batches: int = 100, stream: int = 0) -> np.ndarray:
    """Example indices [S, B] of one training epoch, S = N // B (the remainder is dropped).

    Shuffled from (seed, epoch) (and `stream`, when several row groups are drawn at once); sorted
    by length within chunks of `chunk_batches` batches so a batch holds similar lengths; then the
    batch order is shuffled, so lengths do not trend.
    """
    rng = np.random.default_rng((seed, epoch, stream) if stream else (seed, epoch))
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
        return batch_rows(encoded, rows_B[local], real_B[local], length)

    def local(self, rows_B: np.ndarray) -> np.ndarray:
        """This process's share of the global rows `rows_B`."""
        share = len(rows_B) // self.process_count
        return rows_B[self.process_index * share:(self.process_index + 1) * share]


class TokenGather:
    """Where rows `rows_b` of a split sit in its flat token arrays, at batch length L."""

    def __init__(self, offsets: np.ndarray, rows_b: np.ndarray, length: int):
        start_b = offsets[rows_b]
        pos_bxL = np.arange(length)
        self.mask_bxL = pos_bxL < (offsets[rows_b + 1] - start_b)[:, None]
        # Positions past a row's end read a clipped index, then are overwritten by the fill.
        self.flat_bxL = np.minimum(start_b[:, None] + pos_bxL, max(int(offsets[-1]) - 1, 0))

    def __call__(self, flat_T: np.ndarray, fill) -> np.ndarray:
        """[b, L, ...] from a flat [T, ...] array; `fill` past each row's end."""
        values = flat_T[self.flat_bxL]
        mask = self.mask_bxL.reshape(self.mask_bxL.shape + (1,) * (values.ndim - 2))
        return np.where(mask, values, np.asarray(fill, values.dtype))


def batch_rows(encoded: Encoded, rows_b: np.ndarray, real_b: np.ndarray, length: int) -> Batch:
    """The batch of rows `rows_b` at length L (see the module docstring for the keys)."""
    gather = TokenGather(encoded.offsets, rows_b, length)
    if encoded.labels_per_token:
        labels = gather(encoded.labels, -1)
    else:
        labels = encoded.labels[rows_b]
    weights_b = real_b.astype(np.float32)
    hard_b = weights_b if encoded.hard_weights is None else weights_b * encoded.hard_weights[rows_b]
    return {
        "input_ids": gather(encoded.input_ids, 0).astype(np.int32),
        "attention_mask": gather.mask_bxL.astype(np.int32),
        "token_type_ids": gather(encoded.token_type_ids, 0).astype(np.int32),
        "labels": labels,
        "weights": weights_b,
        "hard_weights": hard_b.astype(np.float32),
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


class _Epochs:
    """Global batches of row indices from `rows` (default: every row): one shuffled,
    length-bucketed epoch after another, and the position of the next one."""

    def __init__(self, lengths_N: np.ndarray, batch_size: int, seed: int, chunk_batches: int,
                 rows: np.ndarray | None = None, stream: int = 0):
        self._rows = np.arange(len(lengths_N)) if rows is None else np.asarray(rows)
        self._lengths = lengths_N[self._rows]
        self._batch_size, self._seed, self._chunk, self._stream = batch_size, seed, chunk_batches, stream
        self.epoch_steps = len(self._rows) // batch_size
        self.fingerprint = {"seed": seed, "num_examples": len(self._rows), "batch_size": batch_size}
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def seek(self, position: Mapping[str, Any] | None) -> None:
        self.epoch, self.step = _position(position, self.fingerprint, self.epoch_steps)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, **self.fingerprint}

    def next_rows(self) -> np.ndarray:
        """The next global batch's row indices [B]; advances the position."""
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self._lengths, self._batch_size, self._seed, self.epoch,
                                self._chunk, self._stream)
            self._order = (self.epoch, order)
        rows_B = self._rows[self._order[1][self.step]]
        self.step += 1
        if self.step == self.epoch_steps:
            self.epoch, self.step = self.epoch + 1, 0
        return rows_B


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
        self._epochs = _Epochs(encoded.lengths, batch_size, seed, chunk_batches)
        self.epoch_steps = self._epochs.epoch_steps
        if self.epoch_steps == 0:
            raise DataError(f"{len(encoded)} training examples do not fill one batch of {batch_size}")
        self._epochs.seek(position)

    @property
    def position(self) -> dict[str, int]:
        return self._epochs.position

    def __next__(self) -> Batch:
        rows_B = self._epochs.next_rows()
        return self._layout.batch(self._encoded, rows_B, np.ones(len(rows_B), bool))


def transfer_batch_size(batch_size: int, ratio: float, process_count: int = 1) -> int:
    """Transfer rows per global batch: `ratio` of it, rounded to a multiple of the process count
    (every process takes the same share), leaving at least one labelled row per process."""
    if batch_size < 2 * process_count:
        raise DataError(f"data.batch_size {batch_size} cannot hold labelled and transfer rows on "
                        f"each of {process_count} processes: use at least {2 * process_count}")
    share = round(ratio * batch_size / process_count) * process_count
    return int(min(max(share, process_count), batch_size - process_count))


class MixedBatches(Iterator[Batch]):
    """Distillation batches of a set built by `with_transfer`: every global batch holds
    `transfer_size` transfer rows (hard weight 0) and the rest labelled rows.

    Each group is drawn in its own shuffled, length-bucketed epochs; the batch length fits the
    longest row of both. An epoch (`epoch_steps`) is one pass over the labelled rows, as without
    transfer data; the transfer rows cycle through their own epochs at their own pace (a smaller
    transfer set repeats, a larger one is seen partly per labelled epoch). Each process takes its
    share of the labelled rows, then its share of the transfer rows. `position` resumes both.
    """

    def __init__(self, encoded: Encoded, batch_size: int, transfer_size: int, *, seed: int,
                 bucket_multiple: int, max_seq_len: int, position: Mapping[str, Any] | None = None,
                 process_index: int = 0, process_count: int = 1, chunk_batches: int = 100):
        if encoded.hard_weights is None:
            raise DataError("MixedBatches needs a set with transfer rows (data.with_transfer)")
        if not 0 < transfer_size < batch_size or transfer_size % process_count:
            raise DataError(f"{transfer_size} transfer rows do not fit a batch of {batch_size} "
                            f"over {process_count} processes")
        self._encoded = encoded
        self._layout = _Layout(batch_size, max_seq_len, bucket_multiple, process_index, process_count)
        labelled = np.flatnonzero(encoded.hard_weights > 0)
        transfer = np.flatnonzero(encoded.hard_weights == 0)
        self._labelled = _Epochs(encoded.lengths, batch_size - transfer_size, seed, chunk_batches,
                                 labelled)
        self._transfer = _Epochs(encoded.lengths, transfer_size, seed, chunk_batches, transfer,
                                 stream=1)
        self.epoch_steps = self._labelled.epoch_steps
        for name, group, size in (("labelled", self._labelled, batch_size - transfer_size),
                                  ("transfer", self._transfer, transfer_size)):
            if group.epoch_steps == 0:
                raise DataError(f"{group.fingerprint['num_examples']} {name} rows do not fill the "
                                f"{size} {name} rows of one batch")
        position = position or {}
        self._labelled.seek(position.get("labelled"))
        self._transfer.seek(position.get("transfer"))

    @property
    def position(self) -> dict[str, dict[str, int]]:
        return {"labelled": self._labelled.position, "transfer": self._transfer.position}

    def __next__(self) -> Batch:
        labelled_B, transfer_B = self._labelled.next_rows(), self._transfer.next_rows()
        lengths = self._encoded.lengths
        length = int(self._layout.bucket(max(lengths[labelled_B].max(), lengths[transfer_B].max())))
        rows_b = np.concatenate([self._layout.local(labelled_B), self._layout.local(transfer_B)])
        return batch_rows(self._encoded, rows_b, np.ones(len(rows_b), bool), length)


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
