"""Encoded splits: token ids back to back, what a tokenizer's output depends on, and the
disk cache of tokenised arrays.

Owns `Encoded` (and `with_transfer`, the distillation set of labelled and transfer rows), the
flat-array helpers `flatten` / `offsets_of`, the tokenizer facts the tasks encode with
(`tokenizer_fingerprint`, `gives_token_types`, `special_tokens_around`), tokenising rows of
text (`tokenize_rows`, what sentence tasks share) and the token cache:
`content_key` names a cache file, `cached_arrays` reads it or computes and writes it (only
reads it in a `ReadOnlyDir`).
Laying tokens out for a task is each task's (`jaxkd.tasks`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import pathlib
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd import util
from jaxkd.data.config import DataError

log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # bump when the cached arrays change meaning


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

    def output_rows(self, per_token: bool) -> int:
        """Rows of a model-output table of this split (the prediction path's, the teacher
        cache's): one per example, or (per_token) one per token, back to back."""
        return int(self.offsets[-1]) if per_token else len(self)

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
    """Row starts and the end, int64 [N + 1], of rows of `lengths` [N] back to back."""
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


_TOKENIZE_CHUNK = 10_000  # rows per tokenizer call: bounds the Python lists held at once


def tokenize_rows(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None,
                  max_seq_len: int) -> dict[str, np.ndarray]:
    """Token ids of texts (with `pairs`, text-pair rows as the tokenizer joins them), truncated
    longest-first to `max_seq_len`: the arrays of an `Encoded` (token types all 0 for
    tokenizers that give none)."""
    ids, types, lengths = [], [], []
    with_types = gives_token_types(tokenizer)
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        out = tokenizer(list(texts[start:stop]), None if pairs is None else list(pairs[start:stop]),
                        truncation="longest_first", max_length=max_seq_len,
                        return_token_type_ids=with_types, return_attention_mask=False)
        chunk_ids, chunk_lengths = flatten(out["input_ids"], np.int32)
        ids.append(chunk_ids)
        types.append(flatten(out["token_type_ids"], np.int8)[0] if with_types
                     else np.zeros(len(chunk_ids), np.int8))
        lengths.append(chunk_lengths)
    return {"input_ids": np.concatenate(ids), "token_type_ids": np.concatenate(types),
            "offsets": offsets_of(np.concatenate(lengths))}


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] and [SEP] for BERT, <s>
    and </s> for RoBERTa), read off its encoding of a one-word probe."""
    out = tokenizer([["a"]], is_split_into_words=True)
    ids, words = out["input_ids"][0], out.word_ids(0)
    first, last = words.index(0), len(words) - 1 - words[::-1].index(0)
    return list(ids[:first]), list(ids[last + 1:])


def content_key(*parts: Any) -> str:
    """A short hash of strings, lists of strings and NumPy arrays (cache file names).

    The first 24 hex digits of a SHA-256 over f"v{_CACHE_VERSION}", then per part a separator
    and the part: an array's dtype, shape and bytes, a string's UTF-8, or each item's str()
    followed by a NUL. A key written once names the same file in every later version."""
    return util.content_hash(_key_chunks(parts), algorithm="sha256", length=24)


def _key_chunks(parts: Sequence[Any]) -> Iterator[bytes | np.ndarray]:
    yield f"v{_CACHE_VERSION}".encode()
    for part in parts:
        yield b"\x00part\x00"
        if isinstance(part, np.ndarray):
            yield part  # content_hash feeds its dtype, shape and bytes
        elif isinstance(part, str):
            yield part.encode()
        else:
            for item in part:
                yield str(item).encode()
                yield b"\x00"


@dataclasses.dataclass(frozen=True)
class ReadOnlyDir:
    """A cache directory to read what it already holds from, never to write: what a plan that
    writes nothing (`train.py --check`) passes where a run passes the directory itself."""

    path: pathlib.Path


def cache_location(cache_dir: str | os.PathLike | ReadOnlyDir | None
                   ) -> tuple[pathlib.Path | None, bool]:
    """(the directory or None, whether it may be written) of a cache_dir argument."""
    if isinstance(cache_dir, ReadOnlyDir):
        return pathlib.Path(cache_dir.path), False
    return (None, False) if cache_dir is None else (pathlib.Path(cache_dir), True)


def cached_arrays(cache_dir: str | os.PathLike | ReadOnlyDir | None, key: str,
                  compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, kept in `cache_dir/tokens-<key>.npz`, so a second run (or another
    process) does not tokenise again; no caching without a directory, and nothing written to
    a `ReadOnlyDir`. Several processes may write the same key at once: each writes the whole
    file atomically (`util.write_atomic`), then its record (`util.write_check`); a file whose
    record is missing or does not match is tokenised again, with a warning naming it."""
    directory, writable = cache_location(cache_dir)
    path = None if directory is None else directory / f"tokens-{key}.npz"
    if path is not None and path.is_file():
        try:
            with np.load(path) as cached:
                arrays = {name: cached[name] for name in cached.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            problem = f"it is unreadable ({err})"
        else:
            problem = util.check_problem(path, arrays)
        if problem is None:
            return arrays
        log.warning("token cache %s is not used: %s; tokenising again", path, problem)
    arrays = dict(compute())
    if path is not None and writable:
        util.write_atomic(path, lambda tmp: np.savez(tmp, **arrays))
        util.write_check(path, arrays)
    return arrays
