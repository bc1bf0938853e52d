"""Masked-LM batches of packed corpus rows: the training iterator (shuffled, resumable, each
process reading only its own rows) and the held-out batches (every row once, fixed masks).

Rows come from anything with `len()` and `rows(indices) -> int32 [n, L]` (a
`jaxkd.data.corpus.PackedRows`); every row is exactly L tokens, so every batch has one shape.
The epoch order is a keyed permutation of the row indices computed per index (`permute`), so
memory does not grow with the corpus. Masks come from `jaxkd.data.masking.mask_batch`, keyed by
(seed, step, the row's place in the global batch): a resumed run, or one over another number
of processes, draws the same masks. A batch is `jaxkd.data.batches.make_batch`'s, with
`positions` [B, P] (the masked positions) and `labels` [B, P] (their original ids, -1 in unused
slots); `attention_mask` is all ones and `token_type_ids` all zeros.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxkd.data.batches import Batch, make_batch
from jaxkd.data.config import DataError
from jaxkd.data.masking import MaskingConfig, mask_batch


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a bijective scramble of 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A permutation of 0..n-1 evaluated at `index` (int64 array), keyed by `key`: a 4-round
    Feistel network over the smallest even-width power of two >= n, walked until it lands below
    n. O(1) memory whatever n; the same (n, key) always gives the same permutation."""
    if n < 1:
        raise DataError("cannot permute an empty range")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    seed = np.uint64(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))
    rounds = [_mix(np.array([seed + np.uint64(r + 1)], np.uint64))[0] for r in range(4)]
    with np.errstate(over="ignore"):
        x = np.asarray(index, np.uint64)
        todo = np.ones(x.shape, bool)
        while todo.any():
            left, right = x[todo] >> np.uint64(half), x[todo] & low
            for k in rounds:
                left, right = right, left ^ (_mix(right ^ k) & low)
            x[todo] = (left << np.uint64(half)) | right
            todo = x >= np.uint64(n)
    return x.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What masking needs of the tokenizer: [MASK], the ids never masked, the vocabulary size,
    and optionally which ids begin a word (whole-word masking) and token counts (smoothing)."""

    mask_id: int
    special_ids: tuple[int, ...]
    size: int
    word_starts: np.ndarray | None = None  # bool [V]
    counts: np.ndarray | None = None  # int64 [V]


def _local_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's places in a global batch: [i*B/P, (i+1)*B/P)."""
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"the global batch size {batch_size} must be a positive multiple of "
                        f"the process count {process_count}")
    share = batch_size // process_count
    return np.arange(process_index * share, (process_index + 1) * share)


def _masked(ids_BxL: np.ndarray, rows_B: np.ndarray, cfg: MaskingConfig, vocab: Vocabulary,
            seed: int, step, weights_B: np.ndarray) -> Batch:
    masked, positions, labels = mask_batch(
        ids_BxL, cfg=cfg, seed=seed, step=step, rows_B=rows_B, mask_id=vocab.mask_id,
        special_ids=vocab.special_ids, vocab_size=vocab.size, word_starts_V=vocab.word_starts,
        token_counts_V=vocab.counts)
    return make_batch(masked, np.ones_like(masked), np.zeros_like(masked), labels, weights_B,
                      positions=positions)


class MaskedBatches(Iterator[Batch]):
    """Infinite masked training batches: epoch e visits the rows in the order `permute(., N,
    (seed, e))`, B rows a step (the last partial batch of an epoch is dropped); process i of P
    reads rows [i*B/P, (i+1)*B/P) of each global batch and nothing else. `position` (JSON)
    resumes exactly; the masks of global step s are keyed by (seed, s)."""

    def __init__(self, rows, batch_size: int, *, cfg: MaskingConfig, vocab: Vocabulary, seed: int,
                 position: Mapping[str, Any] | None = None, process_index: int = 0,
                 process_count: int = 1):
        self._local = _local_rows(batch_size, process_index, process_count)
        self._rows, self._cfg, self._vocab, self._seed = rows, cfg, vocab, seed
        self._batch_size = batch_size
        self.epoch_steps = len(rows) // batch_size
        if self.epoch_steps == 0:
            raise DataError(f"{len(rows)} corpus rows do not fill one batch of {batch_size}")
        self._fingerprint = {"seed": seed, "num_examples": len(rows), "batch_size": batch_size}
        self.epoch, self.step = 0, 0
        if position is not None:
            for key, value in self._fingerprint.items():
                if position.get(key) != value:
                    raise DataError(f"data position was saved with {key}={position.get(key)}, now "
                                    f"{value}: resume with the same corpus and batch settings")
            self.epoch, self.step = int(position["epoch"]), int(position["step"])

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint}

    def __next__(self) -> Batch:
        global_step = self.epoch * self.epoch_steps + self.step
        order = self.step * self._batch_size + self._local
        rows_b = permute(order, len(self._rows), (self._seed, self.epoch))
        batch = _masked(self._rows.rows(rows_b), self._local, self._cfg, self._vocab, self._seed,
                        global_step, np.ones(len(rows_b), np.float32))
        self.step += 1
        if self.step == self.epoch_steps:
            self.epoch, self.step = self.epoch + 1, 0
        return batch


EVAL_MASK_BLOCK = 32  # held-out row g draws its masks from (seed, g // 32, g % 32)


class MaskedEvalBatches(Iterable[Batch]):
    """Every row once, in order, each masked from its own index g: `default_rng((seed, g //
    EVAL_MASK_BLOCK, g % EVAL_MASK_BLOCK))`, so the masks are the same on every pass, for every
    model, and whatever the batch size or process count. The last batch is filled with copies
    of its first row at weight 0."""

    def __init__(self, rows, batch_size: int, *, cfg: MaskingConfig, vocab: Vocabulary,
                 seed: int, process_index: int = 0, process_count: int = 1):
        self._local = _local_rows(batch_size, process_index, process_count)
        self._rows, self._cfg, self._vocab, self._seed = rows, cfg, vocab, seed
        self._batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self._rows) // self._batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self._rows)
        for k in range(len(self)):
            rows_B = np.arange(k * self._batch_size, (k + 1) * self._batch_size)
            real_B = rows_B < n
            rows_B = np.where(real_B, rows_B, k * self._batch_size)[self._local]
            yield _masked(self._rows.rows(rows_B), rows_B % EVAL_MASK_BLOCK, self._cfg, self._vocab,
                          self._seed, rows_B // EVAL_MASK_BLOCK, real_B[self._local].astype(np.float32))
