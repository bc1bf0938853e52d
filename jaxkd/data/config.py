"""What the `data` section of a config says, and the data layer's error.

Owns `DataConfig` (the YAML section `data`, validated on construction), `DataError` (raised
for bad task or data input anywhere in the data layer and the tasks), `FORMATS` (the values
of `data.format`), `nearest` (the " (did you mean ...?)" hint of its messages) and `holdout`
(the seeded eval share of a training file, `data.eval_fraction`). Imports no other part of
`jaxkd.data`, so every other part can import it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxkd import util

# The values of data.format; `jaxkd.data.read` reads all but conll (read by the token task).
FORMATS = ("tsv", "csv", "jsonl", "json", "parquet", "conll")


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
    # At most this many transfer rows, drawn from all data.unlabeled sources together (each
    # source keeps its rows in file order; `sample_rows`): the same rows for every seed, so the
    # seeds of an experiment share the teacher's cache. None: every row.
    unlabeled_max_rows: int | None = None

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
        if self.unlabeled_max_rows is not None and self.unlabeled is None:
            raise DataError("data.unlabeled_max_rows caps the rows of data.unlabeled, which is "
                            "not set: name the unlabelled sources, or remove the cap")
        for key in ("batch_size", "max_seq_len", "bucket_multiple", "doc_stride", "unlabeled_max_rows"):
            value = getattr(self, key)
            if key in ("doc_stride", "unlabeled_max_rows") and value is None:
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


def sample_rows(sizes: Sequence[int], limit: int) -> list[np.ndarray]:
    """For sources of `sizes` rows, the sorted row indices each keeps so that `limit` rows are
    kept in all (every row when there are no more): a uniform sample of the rows of all sources
    together, with a fixed seed, so it is the same for every run seed."""
    total = sum(sizes)
    if total <= limit:
        return [np.arange(n) for n in sizes]
    chosen = np.sort(np.random.default_rng(0x5A3B1E).permutation(total)[:limit])
    bounds = np.cumsum([0, *sizes])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def nearest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    return util.did_you_mean(name, choices, cutoff=0.4)
