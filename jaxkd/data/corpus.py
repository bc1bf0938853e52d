"""Tokenized raw-text corpora for general (task-agnostic) distillation, larger than memory.

Pipeline: `jaxkd.data.rawtext` (files -> `Source`s, checked, streamed as documents) ->
`tokenize` (documents in read order, grouped into chunks of about `chunk_bytes` of text; chunk
i tokenized by a spawned worker process into the memory-mapped shard i, resumable) -> `Corpus`
(the shards as one token stream, read by position) -> `PackedRows` (fixed-length [CLS] window
[SEP] rows, read by index). `word_starts` marks the tokens that begin a word (whole-word masking).

Owns the on-disk layout of a tokenized corpus (a keyed directory, `corpus_key`, of
`shard-<i>.npy` files and, written last, `corpus.json`) and the packing. Imports from
`jaxkd.util` and `jaxkd.data.config` / `.encoded` / `.rawtext` only.
"""
from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxkd import util
from jaxkd.data.config import DataError
from jaxkd.data.encoded import tokenizer_fingerprint
from jaxkd.data.rawtext import Source, check_sources, documents

log = logging.getLogger(__name__)

MANIFEST = "corpus.json"
_FORMAT_VERSION = 1  # bump when shards or corpus.json change meaning
_PROGRESS_EVERY_S = 5.0


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


def _backend_spec(tokenizer) -> str:
    """The fast (Rust) tokenizer's JSON; a slow tokenizer is converted."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from transformers.convert_slow_tokenizer import \
            convert_slow_tokenizer  # pylint: disable=import-outside-toplevel
        backend = convert_slow_tokenizer(tokenizer)
    return backend.to_str()


def corpus_key(srcs: Sequence[Source], tokenizer, chunk_bytes: int, skip_invalid: bool) -> str:
    """The directory name of a tokenized corpus: what its shards depend on (the tokenizer, each
    source's kind, column and content (`util.path_key`: a copy or a new mtime finds the same
    shards), the chunk size, skip_invalid). A Hub split is keyed by its name and column only:
    a dataset changed upstream is not noticed."""
    parts = [f"corpus-v{_FORMAT_VERSION}", tokenizer_fingerprint(tokenizer),
             f"chunk={chunk_bytes} skip={skip_invalid}"]
    for src in srcs:
        if src.kind == "hub":
            parts.append(json.dumps([src.path, src.kind, src.text_column]))
            continue
        parts.append(json.dumps([src.kind, src.text_column, util.path_key(src.path)]))
    return util.content_hash([part.encode() + b"\0" for part in parts], length=24)


_worker_tokenizer = None  # the worker process's tokenizer, built once by _init_worker


def _exit_with(parent: int) -> None:
    """Ends this worker once the process that started it is gone: a parent killed with SIGKILL
    cannot stop its pool, and the workers would otherwise wait on it for ever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access


def _init_worker(spec: str) -> None:
    global _worker_tokenizer  # pylint: disable=global-statement
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers  # pylint: disable=import-outside-toplevel

    _worker_tokenizer = tokenizers.Tokenizer.from_str(spec)
    _worker_tokenizer.no_truncation()
    _worker_tokenizer.no_padding()


def _encode_chunk(docs: list[str], sep_id: int, dtype: str, path: str) -> int:
    """Writes the token ids of `docs` (no special tokens), each followed by `sep_id`, to the .npy
    `path` (atomically); returns the token count. Runs in a worker process."""
    # encode_batch_fast: the same ids without the character offsets, which nothing here reads
    encodings = _worker_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
    ids = np.empty(int(lengths.sum()), dtype)
    at = 0
    for encoding, length in zip(encodings, lengths):
        ids[at:at + length - 1] = encoding.ids
        ids[at + length - 1] = sep_id
        at += length
    util.write_atomic(path, lambda tmp: np.save(tmp, ids))
    return len(ids)


def finished(srcs: Sequence[Source], tokenizer, out_dir: str | os.PathLike, *,
             chunk_bytes: int = 4 << 20, skip_invalid: bool = False) -> Corpus | None:
    """The corpus `tokenize` with these arguments gives, if it is complete on disk under
    `out_dir` (its corpus.json written); None otherwise. Reads only."""
    return _complete(pathlib.Path(out_dir) / corpus_key(tuple(srcs), tokenizer, chunk_bytes,
                                                         skip_invalid))


def _complete(directory: pathlib.Path) -> Corpus | None:
    """The corpus in `directory` if its corpus.json, written last, is there; else None."""
    return Corpus.open(directory) if (directory / MANIFEST).is_file() else None


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
    guard; each worker imports `jaxkd.data` to unpickle its task (not JAX: jaxkd's public names
    are imported on first use).
    """
    srcs = tuple(srcs)
    if not srcs:
        raise DataError("no corpus sources given")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise DataError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    workers = util.usable_cores() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    if tokenizer.sep_token_id is None:
        raise DataError("the tokenizer has no separator token (sep_token_id): documents are "
                        "joined by it; use a BERT-family tokenizer")
    check_sources(srcs, skip_invalid)
    directory = pathlib.Path(out_dir) / corpus_key(srcs, tokenizer, chunk_bytes, skip_invalid)
    done = _complete(directory)
    if done is not None:
        return done
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    started = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    shards, tokenized = _tokenize_chunks(
        _chunks(srcs, chunk_bytes, skip_invalid, counts), _backend_spec(tokenizer),
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


# ----------------------------------------------------------------------------- reading

def _shard_header(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
    """A .npy file's shape and dtype (its map closed again at once)."""
    shard = np.load(path, mmap_mode="r")
    return shard.shape, shard.dtype


class _Shards(collections.abc.Sequence):
    """A corpus's shard files as a sequence of memory maps, opened when read and at most
    `OPEN_SHARDS` open at once (each map holds a file descriptor: a corpus of thousands of
    shards must not exhaust the process's limit)."""

    OPEN_SHARDS = 64

    def __init__(self, paths: Sequence[pathlib.Path]):
        self._paths = tuple(paths)
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        with self._lock:
            shard = self._open.pop(index, None)
            if shard is None:
                shard = np.load(self._paths[index], mmap_mode="r")
                while len(self._open) >= self.OPEN_SHARDS:
                    self._open.popitem(last=False)
            self._open[index] = shard
        return shard


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: its shards memory-mapped when read, read as one stream of token ids
    (documents each followed by [SEP]). Holds O(#shards) in memory, never O(tokens), and keeps
    at most `_Shards.OPEN_SHARDS` files open."""

    directory: pathlib.Path
    shards: Sequence[np.ndarray]  # uint16 / uint32 [tokens of shard i], memory-mapped
    offsets: np.ndarray  # int64 [#shards + 1]: shard i holds stream positions offsets[i]:offsets[i+1]
    manifest: dict[str, Any]  # corpus.json

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Corpus:
        """The corpus in `directory` (a `tokenize` output: shards and corpus.json)."""
        directory = pathlib.Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError as err:
            raise DataError(f"{directory}: no {MANIFEST}, so not a complete tokenized corpus; run "
                            f"tokenize again (it resumes)") from err
        paths = [directory / record["file"] for record in manifest["shards"]]
        for path, record in zip(paths, manifest["shards"]):
            shape, dtype = _shard_header(path)
            if shape != (record["tokens"],) or dtype != np.dtype(manifest["dtype"]):
                raise DataError(f"{path}: {dtype}{shape}, but {MANIFEST} says "
                                f"{manifest['dtype']}({record['tokens']},); delete the directory "
                                f"and tokenize again")
        sizes = [record["tokens"] for record in manifest["shards"]]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        return cls(directory, _Shards(paths), offsets, manifest)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def read(self, start: int, count: int) -> np.ndarray:
        """int32 [count]: the stream's tokens start..start+count, across shard boundaries."""
        if start < 0 or count < 0 or start + count > self.tokens:
            raise IndexError(f"tokens {start}..{start + count} are outside the corpus "
                             f"(0..{self.tokens})")
        out = np.empty(count, np.int32)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        at = 0
        while at < count:
            begin = start + at - int(self.offsets[shard])
            take = min(count - at, int(self.offsets[shard + 1] - self.offsets[shard]) - begin)
            out[at:at + take] = self.shards[shard][begin:begin + take]
            at += take
            shard += 1
        return out


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """RoBERTa's "full sentences" rows over a corpus: the token stream is cut into consecutive
    windows of seq_len - 2 tokens, row r = [CLS] window r [SEP]; the last partial window is
    dropped. Every row is `seq_len` long; a row may span documents (joined by [SEP]). `start`
    and `stop` select a contiguous range of those rows (`split`); None: to the end."""

    corpus: Corpus
    seq_len: int
    cls_id: int
    sep_id: int
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise DataError(f"seq_len must be an integer >= 3 ([CLS] token [SEP]), got {self.seq_len!r}")

    @classmethod
    def of(cls, corpus: Corpus, tokenizer, seq_len: int) -> PackedRows:
        """The rows of `corpus` with the tokenizer's [CLS] and [SEP]."""
        return cls(corpus, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)

    @property
    def window(self) -> int:
        return self.seq_len - 2

    def __len__(self) -> int:
        stop = self.corpus.tokens // self.window if self.stop is None else self.stop
        return stop - self.start

    def split(self, fraction: float) -> tuple[PackedRows, PackedRows]:
        """(kept, held out): the last `fraction` of the rows (at least one) held out. A
        contiguous tail, so held-out text shares at most the one document that straddles the
        cut with training, where seeded rows would hold out pieces of many training documents."""
        held = max(1, round(len(self) * fraction))
        if held >= len(self):
            raise DataError(f"{len(self)} rows of {self.seq_len} tokens cannot give "
                            f"{fraction:g} of them to held-out text and keep some for training")
        cut = self.start + len(self) - held
        return dataclasses.replace(self, stop=cut), dataclasses.replace(self, start=cut)

    def token_chunks(self, size: int = 1 << 22) -> Iterator[np.ndarray]:
        """The tokens of these rows' windows (no [CLS] / [SEP] added), `size` at a time."""
        begin, end = self.start * self.window, (self.start + len(self)) * self.window
        for at in range(begin, end, size):
            yield self.corpus.read(at, min(size, end - at))

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int32 [len(indices), seq_len]: the rows at `indices` (each in 0..len-1)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must be in 0..{len(self) - 1}, got "
                             f"{indices.min()}..{indices.max()}")
        out = np.empty((len(indices), self.seq_len), np.int32)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        for i, row in enumerate(indices):
            out[i, 1:-1] = self.corpus.read((self.start + int(row)) * self.window, self.window)
        return out


def word_starts(tokenizer) -> np.ndarray:
    """bool [len(tokenizer)]: whether each token id begins a word (for whole-word masking).

    WordPiece (BERT): tokens without the continuing-subword prefix ("##"). Byte-level BPE
    (RoBERTa) and SentencePiece: tokens starting with "Ġ" or "▁". Special and added tokens
    always begin a word. (A document's first BPE token has no "Ġ", so it reads as continuing
    the [SEP] before it, a special token: a masker never joins a word to a special token.)"""
    model = json.loads(_backend_spec(tokenizer))["model"]
    vocab = tokenizer.get_vocab()
    starts = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), bool)
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for token, index in vocab.items():
            starts[index] = not token.startswith(prefix)
    elif model["type"] in ("BPE", "Unigram"):
        for token, index in vocab.items():
            starts[index] = token.startswith(("Ġ", "▁"))
    else:
        raise DataError(f"word_starts: tokenizer model {model['type']!r} is not supported "
                        f"(WordPiece, BPE, Unigram)")
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    starts[sorted(i for i in set(tokenizer.all_special_ids) | added if 0 <= i < len(starts))] = True
    return starts
