"""Fixed-shape, length-bucketed, resumable batches of an `Encoded` split.

A batch (`Batch`) is a dict of host NumPy arrays, built by `make_batch` here and nowhere else
(the teacher cache adds `teacher_logits` to one, `jaxkd.cache.TeacherLogits.attach`):
  input_ids, attention_mask (1 = token), token_type_ids   int32 [B, L]
  labels    per row [B] (int32, or float32 for regression; -1 / NaN where the split has no
            labels), or per token [B, L] int32 (-1 on tokens without a label), as the task lays
            them out in `Encoded.labels`
  weights   float32 [B]: 1 for real rows, 0 for rows that pad a final evaluation batch
  hard_weights  float32 [B]: the row's weight in the hard-label loss: its `weights` on labelled
            rows, 0 on transfer rows (unlabeled or augmented text the teacher alone labels, see
            `Encoded.hard_weights`); KD and the intermediate terms weigh rows by `weights`
  index     int32 [B]: the row's position in its split (in `Encoded`), -1 for padding rows
  teacher_logits   only from the teacher cache (`jaxkd.cache.TeacherLogits.attach`), laid out
            like the model's
  positions  only in masked-LM batches (`jaxkd.data.masked`): int32 [B, P], the masked
            positions the head scores; `labels` is then [B, P], -1 in unused slots
L is one of `bucket_lengths(max_seq_len, bucket_multiple)`, picked from the whole global batch so
that every process agrees; B is the global batch size divided by the process count.

Owns the batch layout above, the bucket lengths and epoch order, `TrainBatches` (infinite,
resumable), `MixedBatches` (labelled and transfer rows in every batch), `EvalBatches` (every
row once), `TokenGather` (rows of flat per-token arrays at a batch length) and `padding_stats`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NotRequired, TypedDict

import numpy as np

from jaxkd.data.config import DataError
from jaxkd.data.encoded import Encoded

class Batch(TypedDict):
    """One batch; the keys as the module docstring lays them out. Every key but
    `teacher_logits` and `positions` (masked-LM batches) is always there."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    hard_weights: np.ndarray
    index: np.ndarray
    teacher_logits: NotRequired[np.ndarray]
    positions: NotRequired[np.ndarray]


def make_batch(input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray,
               labels: np.ndarray, weights: np.ndarray, hard_weights: np.ndarray | None = None,
               index: np.ndarray | None = None, positions: np.ndarray | None = None) -> Batch:
    """The one constructor of a batch: dtypes fixed, `hard_weights` = `weights` (every row
    labelled) and `index` = 0..B-1 unless given; `positions` only for masked-LM rows."""
    weights = np.asarray(weights, np.float32)
    extra = {} if positions is None else {"positions": np.asarray(positions, np.int32)}
    return Batch(input_ids=np.asarray(input_ids, np.int32),
                 attention_mask=np.asarray(attention_mask, np.int32),
                 token_type_ids=np.asarray(token_type_ids, np.int32),
                 labels=np.asarray(labels),
                 weights=weights,
                 hard_weights=weights if hard_weights is None else np.asarray(hard_weights, np.float32),
                 index=np.arange(len(weights), dtype=np.int32) if index is None
                 else np.asarray(index, np.int32), **extra)


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


def padded_batch(encoded: Encoded, rows_b: np.ndarray, *, max_seq_len: int,
                 bucket_multiple: int) -> Batch:
    """The batch of exactly the rows `rows_b` (every one real), at the bucket length of its
    longest row, as the batch iterators lay out theirs."""
    layout = _Layout(len(rows_b), max_seq_len, bucket_multiple)
    return layout.batch(encoded, np.asarray(rows_b), np.ones(len(rows_b), bool))


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
    return make_batch(gather(encoded.input_ids, 0), gather.mask_bxL, gather(encoded.token_type_ids, 0),
                      labels, weights_b, hard_b, np.where(real_b, rows_b, -1))


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
    """How much of one bucketed training epoch is padding, and which shapes it compiles. Rows
    of one length (packed text) need no epoch order: one shape, without memory per row."""
    layout = _Layout(batch_size, max_seq_len, bucket_multiple)
    lengths_N = encoded.lengths
    steps = len(lengths_N) // batch_size
    if steps and lengths_N.min() == lengths_N.max():
        length = int(layout.bucket(np.asarray([lengths_N[0]]))[0])
        return PaddingStats(pad_fraction=1.0 - int(lengths_N[0]) / length,
                            shapes=((batch_size, length),), num_batches=steps)
    order_SxB = epoch_order(lengths_N, batch_size, seed, epoch, chunk_batches)
    length_S = layout.bucket(lengths_N[order_SxB].max(axis=1))
    slots = int(length_S.sum()) * batch_size
    return PaddingStats(pad_fraction=1.0 - int(lengths_N[order_SxB].sum()) / slots,
                        shapes=tuple((batch_size, int(n)) for n in np.unique(length_S)),
                        num_batches=len(length_S))
