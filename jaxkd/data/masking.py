"""Dynamic masking for masked-LM training: which tokens of a batch become prediction targets,
and what the model sees in their place. Host-side NumPy, no JAX.

A batch is drawn afresh at every step (RoBERTa's dynamic masking), yet deterministically: row
r of the global batch at step s draws from its own generator `default_rng((seed, s, r))`, so
its masks depend on (seed, step, row) only, never on how the rows are split over processes,
nor on whether the run was resumed. Per row:
  1. maskable tokens: those not in `special_ids` ([CLS], [SEP], [PAD], ...; [MASK] counts too);
  2. n = max(1, round(probability * maskable)) targets (0 in a row with nothing maskable), at
     most `max_predictions(L, probability)` = P, so every batch has one shape;
  3. chosen uniformly, or weighted by count(token) ** -smoothing (DistilBERT's mlm_smoothing),
     or as whole words (BERT's whole-word masking, see `mask_batch`);
  4. each target becomes [MASK] (mask_fraction), a random non-special token (random_fraction),
     or keeps its token (the rest).

Owns `MaskingConfig`, `max_predictions`, `mask_batch` and `token_counts` (the counts that
smoothing weighs by).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from jaxkd.data.config import DataError


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """How many tokens of a row are predicted, which, and what replaces them."""

    probability: float = 0.15  # share of a row's maskable tokens that become targets, in (0, 1]
    mask_fraction: float = 0.8  # share of targets replaced by [MASK]
    random_fraction: float = 0.1  # share replaced by a random non-special token; the rest keep theirs
    # Choose whole words (a token whose id is not a word start continues the word before it),
    # as BERT's create_pretraining_data does; needs a word-start table
    whole_word: bool = False
    # DistilBERT's mlm_smoothing (0.7 there): targets drawn with probability proportional to
    # count(token) ** -smoothing, so frequent tokens are predicted less; needs token counts.
    # None: uniform.
    smoothing: float | None = None

    def __post_init__(self):
        if not 0.0 < self.probability <= 1.0:
            raise DataError(f"MaskingConfig.probability must be in (0, 1] (the share of a row's "
                            f"tokens that are predicted), got {self.probability}")
        for key in ("mask_fraction", "random_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise DataError(f"MaskingConfig.{key} must be in [0, 1] (a share of the targets), "
                                f"got {value}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise DataError(f"MaskingConfig.mask_fraction + random_fraction must be at most 1 (the "
                            f"rest of the targets keep their token), got {self.mask_fraction} + "
                            f"{self.random_fraction}")
        if not isinstance(self.whole_word, bool):
            raise DataError(f"MaskingConfig.whole_word must be true or false, got {self.whole_word!r}")
        if self.smoothing is not None:
            if not (math.isfinite(self.smoothing) and self.smoothing >= 0.0):
                raise DataError(f"MaskingConfig.smoothing must be a number >= 0 (0.7 in DistilBERT) "
                                f"or null, got {self.smoothing}")
            if self.whole_word:
                raise DataError("MaskingConfig.smoothing weighs single tokens and whole_word picks "
                                "whole words: set smoothing to null, or whole_word to false")


def max_predictions(seq_len: int, probability: float) -> int:
    """P: the target slots of a row of `seq_len` tokens, ceil(probability * seq_len), at least 1.

    No row has more targets than P (round(probability * m) <= P for m <= seq_len maskable
    tokens), so `mask_batch`'s outputs have one shape per batch length. Float noise right above
    an integer (0.15 * 20 = 3.0000000000000004) is not rounded up.
    """
    return max(1, math.ceil(probability * seq_len - 1e-9))


def token_counts(token_arrays: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """How often each id occurs in `token_arrays` (any shapes): int64 [vocab_size].

    Counted array by array (`np.bincount`), so a corpus is never held whole; an id outside
    [0, vocab_size) raises DataError.
    """
    counts_V = np.zeros(vocab_size, np.int64)
    for arr in token_arrays:
        ids = np.ravel(np.asarray(arr))
        if ids.size == 0:
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DataError(f"token id {int(ids.min() if ids.min() < 0 else ids.max())} is outside "
                            f"the vocabulary [0, {vocab_size}): pass the tokenizer's vocab_size")
        counts_V += np.bincount(ids, minlength=vocab_size)
    return counts_V


def mask_batch(ids_BxL: np.ndarray, *, cfg: MaskingConfig, seed: int, step, rows_B: np.ndarray,
               mask_id: int, special_ids: Iterable[int], vocab_size: int,
               word_starts_V: np.ndarray | None = None, token_counts_V: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks B rows of token ids: (masked_BxL, positions_BxP, labels_BxP), all int32.

    ids_BxL        token ids in [0, vocab_size); L is the global batch's length (one for all
                   processes)
    rows_B         each row's position in the global batch (0 .. B_global - 1): row r draws
                   from `default_rng((seed, step, r))` alone
    step           an int, or one per row [B] (held-out masks key each row on its own)
    mask_id        the [MASK] id; never a target, never drawn as a random token
    special_ids    ids that are never targets nor random tokens ([CLS], [SEP], [PAD], ...)
    word_starts_V  bool [vocab_size], True where an id begins a word; needed by cfg.whole_word
    token_counts_V int [vocab_size] (`token_counts`), needed by cfg.smoothing; a count of 0
                   weighs as 1
    masked_BxL     ids_BxL with the targets replaced (see the module docstring, step 4)
    positions_BxP  the targets' positions, ascending, then 0 in unused slots;
                   P = max_predictions(L, cfg.probability)
    labels_BxP     the original ids at the targets, -1 in unused slots

    Targets: n per row (module docstring), distinct, taken by the n largest Efraimidis-Spirakis
    keys u ** (1 / w), w = 1 (uniform) or max(count, 1) ** -smoothing (computed as log(u) / w,
    which orders alike and does not underflow for frequent tokens). With cfg.whole_word, a
    word is a start token and the continuation tokens after it; a special token ends a word, and
    a continuation right after one begins a new word. Words are taken in random order, each only
    if it still fits in n, until n tokens are targets: every chosen word is masked whole, and a
    row may end with fewer than n targets (create_pretraining_data's rule).
    """
    ids_BxL = np.asarray(ids_BxL)
    rows_B = np.asarray(rows_B)
    if ids_BxL.ndim != 2 or rows_B.shape != ids_BxL.shape[:1]:
        raise DataError(f"mask_batch needs ids [B, L] and one global row index per row, got ids "
                        f"{ids_BxL.shape} and rows {rows_B.shape}")
    if cfg.whole_word:
        _check_table("whole_word", "word_starts_V", word_starts_V, vocab_size)
    if cfg.smoothing is not None:
        _check_table("smoothing", "token_counts_V", token_counts_V, vocab_size)
    B, L = ids_BxL.shape
    P = max_predictions(L, cfg.probability)
    specials = np.unique(np.append(np.fromiter(special_ids, np.int64), mask_id))
    maskable_BxL = ~np.isin(ids_BxL, specials)

    # One draw per row: L selection keys, P actions, P random tokens.
    steps_B = np.broadcast_to(np.asarray(step, np.int64), rows_B.shape)
    u_BxD = np.array([np.random.default_rng((seed, int(s), int(r))).random(L + 2 * P)
                      for s, r in zip(steps_B, rows_B)],
                     np.float64).reshape(B, L + 2 * P)  # B may be 0 on a process
    u_BxL, action_BxP, token_BxP = u_BxD[:, :L], u_BxD[:, L:L + P], u_BxD[:, L + P:]
    n_B = np.where(maskable_BxL.any(1), np.maximum(1, np.rint(cfg.probability * maskable_BxL.sum(1))),
                   0).astype(np.int64)

    if cfg.whole_word:
        targets_BxL = _whole_words(ids_BxL, maskable_BxL, u_BxL, n_B, np.asarray(word_starts_V, bool))
    else:
        weights_BxL = (1.0 if cfg.smoothing is None
                       else np.maximum(np.asarray(token_counts_V)[ids_BxL], 1) ** -float(cfg.smoothing))
        targets_BxL = _top_n(np.where(maskable_BxL, np.log1p(-u_BxL) / weights_BxL, -np.inf), n_B)

    count_B = targets_BxL.sum(1)
    used_BxP = np.arange(P) < count_B[:, None]
    positions_BxP = np.where(used_BxP, np.argsort(~targets_BxL, axis=1, kind="stable")[:, :P], 0)
    labels_BxP = np.where(used_BxP, np.take_along_axis(ids_BxL, positions_BxP, 1), -1)

    random_BxP = _random_tokens(token_BxP, specials, vocab_size)
    random_or_kept_BxP = np.where(action_BxP < cfg.mask_fraction + cfg.random_fraction, random_BxP,
                                  labels_BxP)
    new_BxP = np.where(action_BxP < cfg.mask_fraction, mask_id, random_or_kept_BxP)
    masked_BxL = ids_BxL.astype(np.int32, copy=True)
    row_BxP = np.broadcast_to(np.arange(B)[:, None], (B, P))
    masked_BxL[row_BxP[used_BxP], positions_BxP[used_BxP]] = new_BxP[used_BxP]
    return masked_BxL, positions_BxP.astype(np.int32), labels_BxP.astype(np.int32)


def _check_table(option: str, name: str, table: np.ndarray | None, vocab_size: int) -> None:
    """Raises DataError unless `table` has one entry per id of the vocabulary."""
    if table is None or np.shape(table) != (vocab_size,):
        raise DataError(f"masking with {option} needs {name}, one entry per id of the vocabulary "
                        f"({vocab_size}), got {None if table is None else np.shape(table)}")


def _top_n(keys_BxL: np.ndarray, n_B: np.ndarray) -> np.ndarray:
    """bool [B, L]: True at the n_B[b] largest keys of row b (all finite where n_B counts)."""
    order_BxL = np.argsort(-keys_BxL, axis=1, kind="stable")
    chosen_BxL = np.zeros(keys_BxL.shape, bool)
    np.put_along_axis(chosen_BxL, order_BxL, np.arange(keys_BxL.shape[1]) < n_B[:, None], 1)
    return chosen_BxL


def _whole_words(ids_BxL: np.ndarray, maskable_BxL: np.ndarray, u_BxL: np.ndarray, n_B: np.ndarray,
                 word_starts_V: np.ndarray) -> np.ndarray:
    """bool [B, L]: whole words, taken in the order of the keys `u_BxL` at their first tokens,
    each if it still fits in n_B (see `mask_batch`)."""
    B, L = ids_BxL.shape
    after_special_BxL = np.ones_like(maskable_BxL)
    after_special_BxL[:, 1:] = ~maskable_BxL[:, :-1]
    start_BxL = maskable_BxL & (word_starts_V[ids_BxL] | after_special_BxL)
    word_BxL = np.cumsum(start_BxL, axis=1) - 1  # the word of a maskable token: 0, 1, ... per row
    flat_BxL = np.arange(B)[:, None] * L + word_BxL
    length_BxL = np.bincount(flat_BxL[maskable_BxL], minlength=B * L).reshape(B, L)  # per word
    order_BxL = np.argsort(np.where(start_BxL, -u_BxL, np.inf), axis=1, kind="stable")
    word_order_BxL = np.take_along_axis(word_BxL, order_BxL, 1)  # past a row's words: unused
    num_words_B = start_BxL.sum(1)
    taken_BxL = np.zeros((B, L), bool)  # per word
    total_B = np.zeros(B, np.int64)
    for k in range(int(num_words_B.max(initial=0))):
        live_B = (k < num_words_B) & (total_B < n_B)
        if not live_B.any():
            break
        word_B = word_order_BxL[:, k]
        length_B = np.take_along_axis(length_BxL, word_B[:, None], 1)[:, 0]
        fits_B = live_B & (total_B + length_B <= n_B)
        taken_BxL[np.flatnonzero(fits_B), word_B[fits_B]] = True
        total_B += np.where(fits_B, length_B, 0)
    return maskable_BxL & np.take_along_axis(taken_BxL, np.maximum(word_BxL, 0), 1)


def _random_tokens(u_BxP: np.ndarray, specials: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [B, P]: ids uniform over [0, vocab_size) less the sorted `specials`, one per u."""
    specials = specials[(specials >= 0) & (specials < vocab_size)]
    ids_BxP = np.floor(u_BxP * (vocab_size - len(specials))).astype(np.int64)
    for special in specials:  # ascending: the k-th non-special id is k plus the specials up to it
        ids_BxP += ids_BxP >= special
    return ids_BxP
