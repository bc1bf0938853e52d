"""Raw-text corpora for general (task-agnostic) distillation, larger than memory.

Pipeline: `sources` (files -> `Source`, kind by suffix) -> `check_sources` (cheap, before any
work) -> `tokenize` (documents in read order, grouped into chunks of about `chunk_bytes` of
text; chunk i tokenized by a spawned worker process into the memory-mapped shard i, resumable)
-> `Corpus` (the shards as one token stream, read by position) -> `PackedRows` (fixed-length
[CLS] window [SEP] rows, read by index). `documents` streams one source's documents;
`word_starts` marks the tokens that begin a word (whole-word masking).

Owns the source kinds (`KINDS`, `SUFFIXES`) and the writing of a tokenized corpus (a keyed
directory of `shard-<i>.npy` files and, written last, `corpus.json`); reading it and the
packing are `jaxkd.data.packed`'s (re-exported here).
"""
from __future__ import annotations

import codecs
import collections
import concurrent.futures
import dataclasses
import gzip
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np

from jaxkd import util
from jaxkd.data.config import DataError, nearest
from jaxkd.data.encoded import tokenizer_fingerprint
from jaxkd.data.packed import MANIFEST, Corpus, PackedRows, backend_spec, word_starts  # noqa: F401

log = logging.getLogger(__name__)

KINDS = ("lines", "paragraphs", "jsonl", "parquet")
# Suffix -> kind; "text" is the `documents` argument of `sources` (lines or paragraphs).
SUFFIXES = {".txt": "text", ".txt.gz": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
            ".json": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet"}
_FORMAT_VERSION = 1  # bump when shards or corpus.json change meaning
_HEAD_BYTES = 1 << 20  # check_sources reads this much of each text file
_PARQUET_BATCH = 8192  # rows per parquet read
_PROGRESS_EVERY_S = 5.0


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class Source:
    """One file of raw text. kind: lines (a document per line), paragraphs (documents separated
    by blank lines, their lines joined with "\\n"), jsonl (a JSON object per line, the text in
    `text_column`) or parquet (the text in `text_column`). A .gz suffix: gzip (text kinds)."""

    path: str
    kind: str
    text_column: str = "text"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"{self.path}: source kind {self.kind!r} is unknown"
                            f"{nearest(self.kind, KINDS)}; use one of {', '.join(KINDS)}")

    @property
    def gzipped(self) -> bool:
        return self.path.endswith(".gz")


def _suffix(path: str) -> str:
    name = pathlib.Path(path).name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def sources(paths: str | Iterable[str], documents: str = "lines",
            text_column: str = "text") -> tuple[Source, ...]:
    """A `Source` per path, its kind from the suffix: .txt / .txt.gz -> `documents` ("lines" or
    "paragraphs"), .jsonl / .jsonl.gz / .json / .json.gz -> jsonl, .parquet -> parquet."""
    if documents not in ("lines", "paragraphs"):
        raise DataError(f"documents={documents!r}: plain-text documents are 'lines' (one per line) "
                        f"or 'paragraphs' (separated by blank lines)")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DataError("no corpus files given: name at least one file of raw text")
    out = []
    for path in map(str, paths):
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


def documents(src: Source, skip_invalid: bool, counts: collections.Counter) -> Iterator[str]:
    """Every non-blank document of `src`, in file order, streamed (memory of one document).

    A line that is not UTF-8 (jsonl: not JSON, or without text) is a DataError naming the file,
    line and byte offset (in the decompressed bytes of a .gz), or with `skip_invalid` skipped and
    counted in `counts` ("not utf-8", "not json", "no text in 'text'"). Blank documents and null
    texts are skipped uncounted."""
    if src.kind == "parquet":
        return _parquet(src)
    read = {"lines": _lines, "paragraphs": _paragraphs, "jsonl": _jsonl}[src.kind]
    return read(src, skip_invalid, counts)


def _chunks(srcs: Sequence[Source], chunk_bytes: int, skip_invalid: bool,
            counts: collections.Counter) -> Iterator[list[str]]:
    """The documents of all sources in order, grouped into consecutive lists of at least
    `chunk_bytes` of UTF-8 text (the last may be smaller). A DataError when there is none."""
    chunk, size, yielded = [], 0, False
    for src in srcs:
        for doc in documents(src, skip_invalid, counts):
            chunk.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= chunk_bytes:
                yield chunk
                chunk, size, yielded = [], 0, True
    if chunk:
        yield chunk
    elif not yielded:
        skipped = f" ({dict(counts)} skipped)" if counts else ""
        raise DataError(f"empty corpus: no document in {', '.join(s.path for s in srcs)}{skipped}; "
                        f"give files with text")


# ----------------------------------------------------------------------------- tokenizing

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.npy"


def corpus_key(srcs: Sequence[Source], tokenizer, chunk_bytes: int, skip_invalid: bool) -> str:
    """The directory name of a tokenized corpus: what its shards depend on (the tokenizer, each
    source's resolved path, kind, column, size and mtime, the chunk size, skip_invalid)."""
    parts = [f"corpus-v{_FORMAT_VERSION}", tokenizer_fingerprint(tokenizer),
             f"chunk={chunk_bytes} skip={skip_invalid}"]
    for src in srcs:
        stat = os.stat(src.path)
        parts.append(json.dumps([os.path.abspath(src.path), src.kind, src.text_column,
                                 stat.st_size, stat.st_mtime_ns]))
    return util.content_hash([part.encode() + b"\0" for part in parts], length=24)


_worker_tokenizer = None  # the worker process's tokenizer, built once by _init_worker


def _init_worker(spec: str) -> None:
    global _worker_tokenizer  # pylint: disable=global-statement
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers  # pylint: disable=import-outside-toplevel

    _worker_tokenizer = tokenizers.Tokenizer.from_str(spec)
    _worker_tokenizer.no_truncation()
    _worker_tokenizer.no_padding()


def _encode_chunk(docs: list[str], sep_id: int, dtype: str, path: str) -> int:
    """Writes the token ids of `docs` (no special tokens), each followed by `sep_id`, to the .npy
    `path` (atomically); returns the token count. Runs in a worker process."""
    encodings = _worker_tokenizer.encode_batch(docs, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
    ids = np.empty(int(lengths.sum()), dtype)
    at = 0
    for encoding, length in zip(encodings, lengths):
        ids[at:at + length - 1] = encoding.ids
        ids[at + length - 1] = sep_id
        at += length
    util.write_atomic(path, lambda tmp: np.save(tmp, ids))
    return len(ids)


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenize(srcs: Sequence[Source], tokenizer, out_dir: str | os.PathLike, *,
             workers: int | None = None, chunk_bytes: int = 4 << 20, skip_invalid: bool = False,
             progress: bool = True) -> Corpus:
    """The corpus of `srcs` tokenized by `tokenizer` under `out_dir/<corpus_key>`.

    Documents, in read order, are grouped into chunks of about `chunk_bytes` of text; chunk i
    becomes shard i (`shard_name(i)`): the token ids of each document, no special tokens, each
    followed by `tokenizer.sep_token_id`, uint16 or uint32 (`token_dtype`). Chunks are tokenized
    by `workers` spawned processes (default: the cores this process may use), at most 2 per
    worker in flight, so memory does not grow with the corpus. `corpus.json`, written last,
    marks the corpus complete: when it exists nothing is done. A run that was interrupted is
    resumed: shards already on disk are kept (the text is still read, to find the chunks) and
    only the missing chunks are tokenized, giving the same shards as one uninterrupted run.
    corpus.json's "tokenized_shards" lists the shards the finishing run tokenized itself.
    Workers are spawned, so a script that calls this needs the `if __name__ == "__main__":`
    guard; each worker imports jaxkd (and so JAX) to unpickle its task.
    """
    srcs = tuple(srcs)
    if not srcs:
        raise DataError("no corpus sources given")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise DataError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    if tokenizer.sep_token_id is None:
        raise DataError("the tokenizer has no separator token (sep_token_id): documents are "
                        "joined by it; use a BERT-family tokenizer")
    check_sources(srcs, skip_invalid)
    directory = pathlib.Path(out_dir) / corpus_key(srcs, tokenizer, chunk_bytes, skip_invalid)
    if (directory / MANIFEST).is_file():
        return Corpus.open(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    started = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    shards, tokenized = _tokenize_chunks(
        _chunks(srcs, chunk_bytes, skip_invalid, counts), backend_spec(tokenizer),
        tokenizer.sep_token_id, dtype, directory, workers, progress)
    manifest = {
        "version": _FORMAT_VERSION, "dtype": dtype.name,
        "shards": shards,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "skipped": dict(sorted(counts.items())),
        "sources": [dataclasses.asdict(s) for s in srcs],
        "tokenizer": util.content_hash([tokenizer_fingerprint(tokenizer).encode()], length=16),
        "sep_token_id": tokenizer.sep_token_id,
        "chunk_bytes": chunk_bytes,
        "tokenized_shards": tokenized,  # by the run that finished the corpus (the rest resumed)
        "seconds": round(time.perf_counter() - started, 3),
    }
    util.write_atomic(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    log.info("corpus %s: %d documents, %d tokens in %d shards (%d tokenized now) in %.1f s",
             directory, manifest["documents"], manifest["tokens"], len(shards), len(tokenized),
             manifest["seconds"])
    return Corpus.open(directory)


def _shard_tokens(path: pathlib.Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


def _tokenize_chunks(chunks: Iterator[list[str]], spec: str, sep_id: int, dtype: np.dtype,
                     directory: pathlib.Path, workers: int,
                     progress: bool) -> tuple[list[dict], list[int]]:
    """Each chunk's shard in `directory`, tokenized by the pool unless already there.
    Returns ([{file, documents, tokens}] per shard, indices of the shards tokenized now)."""
    shards: list[dict] = []
    tokenized: list[int] = []
    pending: dict[concurrent.futures.Future, int] = {}
    rate = _Rate(progress)
    context = multiprocessing.get_context("spawn")  # the parent has JAX loaded: never fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(spec,)) as pool:
        def collect(done: Iterable[concurrent.futures.Future]) -> None:
            for future in done:
                index = pending.pop(future)
                shards[index]["tokens"] = future.result()
                rate.add(shards[index]["tokens"])

        for index, docs in enumerate(chunks):
            path = directory / shard_name(index)
            shards.append({"file": path.name, "documents": len(docs), "tokens": None})
            if path.is_file():
                shards[index]["tokens"] = _shard_tokens(path)
                continue
            if len(pending) >= 2 * workers:
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                collect(done)
            pending[pool.submit(_encode_chunk, docs, sep_id, dtype.name, str(path))] = index
            tokenized.append(index)
        collect(concurrent.futures.as_completed(list(pending)))
    rate.close()
    return shards, tokenized


class _Rate:
    """Tokens per second on stderr every few seconds (and once at the end) when enabled."""

    def __init__(self, enabled: bool):
        self.enabled, self.tokens = enabled, 0
        self.started = self.last = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        if self.enabled and time.perf_counter() - self.last >= _PROGRESS_EVERY_S:
            self.line()

    def line(self) -> None:
        self.last = time.perf_counter()
        seconds = max(self.last - self.started, 1e-9)
        print(f"tokenize: {self.tokens / 1e6:.1f}M tokens, {self.tokens / seconds:,.0f} tokens/s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.line()
