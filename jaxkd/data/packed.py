"""Reading a tokenized corpus (`jaxkd.data.corpus.tokenize`'s output): `Corpus`, its shards
memory-mapped as one token stream; `PackedRows`, fixed-length [CLS] window [SEP] rows read by
index; `word_starts`, the tokens that begin a word (whole-word masking).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd.data.config import DataError

MANIFEST = "corpus.json"  # written last by tokenize: the corpus is complete when it exists


def backend_spec(tokenizer) -> str:
    """The fast (Rust) tokenizer's JSON; a slow tokenizer is converted."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from transformers.convert_slow_tokenizer import \
            convert_slow_tokenizer  # pylint: disable=import-outside-toplevel
        backend = convert_slow_tokenizer(tokenizer)
    return backend.to_str()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: its shards memory-mapped, read as one stream of token ids (documents
    each followed by [SEP]). Holds O(#shards) in memory, never O(tokens)."""

    directory: pathlib.Path
    shards: tuple[np.ndarray, ...]  # uint16 / uint32 [tokens of shard i], memory-mapped
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
        shards = tuple(np.load(directory / s["file"], mmap_mode="r") for s in manifest["shards"])
        for shard, record in zip(shards, manifest["shards"]):
            if shard.shape != (record["tokens"],) or shard.dtype != np.dtype(manifest["dtype"]):
                raise DataError(f"{directory / record['file']}: {shard.dtype}{shard.shape}, but "
                                f"{MANIFEST} says {manifest['dtype']}({record['tokens']},); delete "
                                f"the directory and tokenize again")
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards], dtype=np.int64)])
        return cls(directory, shards, offsets, manifest)

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
            take = min(count - at, len(self.shards[shard]) - begin)
            out[at:at + take] = self.shards[shard][begin:begin + take]
            at += take
            shard += 1
        return out


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """RoBERTa's "full sentences" rows over a corpus: the token stream is cut into consecutive
    windows of seq_len - 2 tokens, row r = [CLS] window r [SEP]; the last partial window is
    dropped. Every row is `seq_len` long; a row may span documents (joined by [SEP])."""

    corpus: Corpus
    seq_len: int
    cls_id: int
    sep_id: int

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
        return self.corpus.tokens // self.window

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int32 [len(indices), seq_len]: the rows at `indices` (each in 0..len-1)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must be in 0..{len(self) - 1}, got "
                             f"{indices.min()}..{indices.max()}")
        out = np.empty((len(indices), self.seq_len), np.int32)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        for i, row in enumerate(indices):
            out[i, 1:-1] = self.corpus.read(int(row) * self.window, self.window)
        return out


def word_starts(tokenizer) -> np.ndarray:
    """bool [len(tokenizer)]: whether each token id begins a word (for whole-word masking).

    WordPiece (BERT): tokens without the continuing-subword prefix ("##"). Byte-level BPE
    (RoBERTa) and SentencePiece: tokens starting with "Ġ" or "▁". Special and added tokens
    always begin a word. (A document's first BPE token has no "Ġ", so it reads as continuing
    the [SEP] before it, a special token: a masker never joins a word to a special token.)"""
    model = json.loads(backend_spec(tokenizer))["model"]
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
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    starts[sorted(i for i in special if 0 <= i < len(starts))] = True
    return starts
