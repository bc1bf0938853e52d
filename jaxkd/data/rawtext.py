"""Raw text files as streams of documents: the input of general distillation's corpus.

Owns `Source` (a file, or a Hub dataset split, and how its documents are laid out), the kinds
(`KINDS`) and suffixes (`SUFFIXES`) it knows, `sources` (paths -> sources by suffix),
`check_sources` (cheap checks before any work) and `documents` (one source's documents,
streamed in constant memory). A Hub split is named `hub:<dataset>:<split>` or
`hub:<dataset>:<config>:<split>` and read with `datasets.load_dataset(..., streaming=True)`:
nothing of it is downloaded beyond what is read.
Tokenizing them is `jaxkd.data.corpus`'s. Imports from `jaxkd.data.config` only.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import gzip
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from jaxkd.data.config import DataError, nearest

KINDS = ("lines", "paragraphs", "jsonl", "parquet", "hub")
HUB = "hub:"  # the prefix of a Hub dataset split: hub:<dataset>[:<config>]:<split>
# Suffix -> kind; "text" is the `documents` argument of `sources` (lines or paragraphs).
SUFFIXES = {".txt": "text", ".txt.gz": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
            ".json": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet"}
_HEAD_BYTES = 1 << 20  # check_sources reads this much of each text file
_PARQUET_BATCH = 8192  # rows per parquet read


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class Source:
    """One file of raw text. kind: lines (a document per line), paragraphs (documents separated
    by blank lines, their lines joined with "\\n"), jsonl (a JSON object per line, the text in
    `text_column`), parquet (the text in `text_column`) or hub (a Hub dataset split streamed,
    `path` being `hub:<dataset>[:<config>]:<split>`, the text in `text_column`). A .gz suffix:
    gzip (text kinds)."""

    path: str
    kind: str
    text_column: str = "text"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"{self.path}: source kind {self.kind!r} is unknown"
                            f"{nearest(self.kind, KINDS)}; use one of {', '.join(KINDS)}")
        if self.kind == "hub":
            _ = self.hub  # a malformed name is refused now

    @property
    def gzipped(self) -> bool:
        return self.path.lower().endswith(".gz")  # as the suffix is matched

    @property
    def hub(self) -> tuple[str, str | None, str]:
        """(dataset, config or None, split) of a hub source."""
        parts = self.path[len(HUB):].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise DataError(f"{self.path}: a Hub split is named hub:<dataset>:<split> or "
                            f"hub:<dataset>:<config>:<split>, e.g. "
                            f"hub:wikitext:wikitext-103-raw-v1:train")
        return parts[0], parts[1] if len(parts) == 3 else None, parts[-1]


def _suffix(path: str) -> str:
    name = pathlib.Path(path).name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def sources(paths: str | Iterable[str], documents: str = "lines",
            text_column: str = "text") -> tuple[Source, ...]:
    """A `Source` per path, its kind from the suffix: .txt / .txt.gz -> `documents` ("lines" or
    "paragraphs"), .jsonl / .jsonl.gz / .json / .json.gz -> jsonl, .parquet -> parquet; a path
    starting `hub:` -> hub."""
    if documents not in ("lines", "paragraphs"):
        raise DataError(f"documents={documents!r}: plain-text documents are 'lines' (one per line) "
                        f"or 'paragraphs' (separated by blank lines)")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DataError("no corpus files given: name at least one file of raw text")
    out = []
    for path in map(str, paths):
        if path.startswith(HUB):
            out.append(Source(path, "hub", text_column))
            continue
        kind = SUFFIXES.get(_suffix(path))
        if kind is None:
            raise DataError(f"{path}: unknown corpus file suffix; use one of {', '.join(SUFFIXES)}")
        out.append(Source(path, documents if kind == "text" else kind, text_column))
    return tuple(out)


def _open_binary(src: Source) -> BinaryIO:
    return gzip.open(src.path, "rb") if src.gzipped else open(src.path, "rb")


def _schema_text_field(src: Source):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    schema = pq.read_schema(src.path)
    if src.text_column not in schema.names:
        raise DataError(f"{src.path}: no column {src.text_column!r}{nearest(src.text_column, schema.names)}; "
                        f"its columns: {schema.names}. Set the text column to one of them.")
    return schema.field(src.text_column)


def check_sources(srcs: Sequence[Source], skip_invalid: bool = False) -> None:
    """Cheap checks before any work, each a DataError naming the file: it exists and is not
    empty; its first MiB (decompressed) is UTF-8 (unless `skip_invalid`); jsonl: the first
    non-blank line is a JSON object with the text column; parquet: the schema has it as text."""
    for src in srcs:
        if src.kind == "hub":
            _check_hub(src)
            continue
        path = pathlib.Path(src.path)
        if not path.is_file():
            raise DataError(f"{src.path}: corpus file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{src.path}: the corpus file is empty")
        if src.kind == "parquet":
            field = _schema_text_field(src)
            if str(field.type) not in ("string", "large_string", "string_view"):
                raise DataError(f"{src.path}: column {src.text_column!r} holds {field.type}, not text")
            continue
        try:
            with _open_binary(src) as f:
                head = f.read(_HEAD_BYTES)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{src.path}: cannot be read ({err})") from err
        if not head:
            raise DataError(f"{src.path}: the corpus file is empty")
        if not skip_invalid:
            try:  # final=False: a character cut at the end of the head is not an error
                codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            except UnicodeDecodeError as err:
                raise DataError(f"{src.path}: not UTF-8 at byte offset {err.start}; convert the file "
                                f"to UTF-8, or set data.skip_invalid: true to skip such lines") from err
        if src.kind == "jsonl":
            _check_first_json(src)


def _open_hub(src: Source):
    """The split streamed (`datasets.load_dataset(..., streaming=True)`); a DataError saying
    what to do when it cannot be opened (offline, a wrong name)."""
    import datasets  # pylint: disable=import-outside-toplevel

    dataset, config, split = src.hub
    try:
        return datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as err:  # the Hub raises many types; all mean "not available here"
        raise DataError(f"{src.path}: cannot open the Hub split ({type(err).__name__}: {err}); "
                        f"check the dataset, config and split names, or offline "
                        f"(HF_DATASETS_OFFLINE) give local files instead") from err


def _check_hub(src: Source) -> None:
    """The split opens, has a first row, and that row has the text column as text."""
    stream = _open_hub(src)
    try:
        first = next(iter(stream), None)
    except Exception as err:  # reading the first shard failed (network, format)
        raise DataError(f"{src.path}: cannot read the Hub split ({type(err).__name__}: {err})") from err
    if first is None:
        raise DataError(f"{src.path}: the Hub split has no rows")
    if src.text_column not in first:
        raise DataError(f"{src.path}: no column {src.text_column!r}{nearest(src.text_column, first)}; "
                        f"its columns: {list(first)}. Set the text column to one of them.")
    if not isinstance(first[src.text_column], (str, type(None))):
        raise DataError(f"{src.path}: column {src.text_column!r} holds "
                        f"{type(first[src.text_column]).__name__}, not text")


def _check_first_json(src: Source) -> None:
    with _open_binary(src) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as err:
                raise DataError(f"{src.path} line {number}: not JSON ({err})") from err
            if not isinstance(obj, dict):
                raise DataError(f"{src.path} line {number}: a JSON {type(obj).__name__}, "
                                f"not an object with a {src.text_column!r} field")
            if src.text_column not in obj:
                raise DataError(f"{src.path} line {number}: no field {src.text_column!r}"
                                f"{nearest(src.text_column, obj)}; its fields: {list(obj)}. "
                                f"Set the text column to one of them.")
            return


# ----------------------------------------------------------------------------- documents

def _decoded_lines(src: Source, skip_invalid: bool,
                   counts: collections.Counter) -> Iterator[tuple[int, str | None]]:
    """(line number, text without its line ending) of every line; text None for a line that
    is not UTF-8 and is skipped (counted in counts["not utf-8"])."""
    offset = 0  # of the line, in the decompressed bytes
    with _open_binary(src) as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if not skip_invalid:
                    raise DataError(f"{src.path} line {number}: not UTF-8 at byte offset "
                                    f"{offset + err.start}; convert the file to UTF-8, or set "
                                    f"data.skip_invalid: true to skip such lines") from err
                counts["not utf-8"] += 1
                text = None
            offset += len(raw)
            yield number, None if text is None else text.rstrip("\r\n")


def _lines(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    for _, line in _decoded_lines(src, skip_invalid, counts):
        if line is not None and line.strip():
            yield line


def _paragraphs(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _decoded_lines(src, skip_invalid, counts):
        if line is None:
            continue
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    column = src.text_column
    for number, line in _decoded_lines(src, skip_invalid, counts):
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            if not skip_invalid:
                raise DataError(f"{src.path} line {number}: not JSON ({err}); fix the line, or set "
                                f"data.skip_invalid: true to skip such lines") from err
            counts["not json"] += 1
            continue
        text = obj.get(column) if isinstance(obj, dict) else None
        if isinstance(text, str):
            if text.strip():
                yield text
        elif not (isinstance(obj, dict) and column in obj and text is None):  # null: blank
            if not skip_invalid:
                raise DataError(f"{src.path} line {number}: no text in field {column!r} (the line "
                                f"holds {type(obj).__name__} {line[:80]!r}); fix the line, or set "
                                f"data.skip_invalid: true to skip such lines")
            counts[f"no text in {column!r}"] += 1


def _parquet(src: Source) -> Iterator[str]:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    _schema_text_field(src)
    with pq.ParquetFile(src.path) as f:
        for batch in f.iter_batches(batch_size=_PARQUET_BATCH, columns=[src.text_column]):
            for text in batch.column(0).to_pylist():
                if text is not None and text.strip():
                    yield text


def _hub(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    column = src.text_column
    for number, row in enumerate(_open_hub(src), 1):
        text = row.get(column)
        if isinstance(text, str):
            if text.strip():
                yield text
        elif text is not None:
            if not skip_invalid:
                raise DataError(f"{src.path} row {number}: no text in column {column!r} (it holds "
                                f"{type(text).__name__}); set data.skip_invalid: true to skip such rows")
            counts[f"no text in {column!r}"] += 1


def documents(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    """Every non-blank document of `src`, in file order, streamed (memory of one document).

    A line that is not UTF-8 (jsonl: not JSON, or without text) is a DataError naming the file,
    line and byte offset (in the decompressed bytes of a .gz), or with `skip_invalid` skipped and
    counted in `counts` ("not utf-8", "not json", "no text in 'text'"). Blank documents and null
    texts are skipped uncounted."""
    if src.kind == "parquet":
        return _parquet(src)
    read = {"lines": _lines, "paragraphs": _paragraphs, "jsonl": _jsonl, "hub": _hub}[src.kind]
    return read(src, skip_invalid, counts)
