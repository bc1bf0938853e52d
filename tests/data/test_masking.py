"""Tests for jaxkd.data.masking: determinism per (seed, step, row), target counts, replacement
shares, whole words and count smoothing, each against a plain-Python reference."""
import math
import random

import numpy as np
import pytest

from jaxkd.data import DataError
from jaxkd.data.masking import MaskingConfig, mask_batch, max_predictions, token_counts

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
V = 300
NON_SPECIAL = np.setdiff1d(np.arange(V), SPECIALS)
WORD_STARTS_V = np.random.default_rng(7).random(V) < 0.6  # ~40% of ids continue a word
COUNTS_V = np.random.default_rng(8).integers(0, 5000, V)
MODES = {"uniform": MaskingConfig(), "whole_word": MaskingConfig(whole_word=True),
         "smoothing": MaskingConfig(smoothing=0.7)}


def _packed_rows(num_rows: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """int64 [num_rows, seq_len]: [CLS] a [SEP] b [SEP] ... packed rows, some ending in [PAD]."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        row = [CLS]
        while len(row) < seq_len:
            row += [int(t) for t in rng.choice(NON_SPECIAL, rng.integers(3, 30))] + [SEP]
        row = row[:seq_len]
        pad = int(rng.integers(0, seq_len // 3)) if rng.random() < 0.3 else 0
        rows.append(row[:seq_len - pad] + [PAD] * pad)
    return np.array(rows)


def _mask(ids, cfg=MaskingConfig(), *, seed=0, step=0, rows=None):
    return mask_batch(ids, cfg=cfg, seed=seed, step=step,
                      rows_B=np.arange(len(ids)) if rows is None else rows, mask_id=MASK,
                      special_ids=SPECIALS, vocab_size=V, word_starts_V=WORD_STARTS_V,
                      token_counts_V=COUNTS_V)


def _targets(positions_BxP, labels_BxP):
    """Per row, the set of target positions."""
    return [set(p[l >= 0].tolist()) for p, l in zip(positions_BxP, labels_BxP)]


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_step_and_rows_give_the_same_masks_and_another_step_others(mode):
    ids = _packed_rows(32, 128)
    first, again = _mask(ids, MODES[mode], seed=3, step=5), _mask(ids, MODES[mode], seed=3, step=5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    for other in (_mask(ids, MODES[mode], seed=3, step=6), _mask(ids, MODES[mode], seed=4, step=5)):
        assert not np.array_equal(first[1], other[1])
        assert not np.array_equal(first[0], other[0])
    # Each global row draws on its own: the same ids in rows 0 and 1 are masked differently.
    twins = _mask(np.repeat(ids[:1], 2, 0), MODES[mode], seed=3, step=5)
    assert not np.array_equal(twins[1][0], twins[1][1])


@pytest.mark.parametrize("mode", MODES)
def test_rows_split_over_two_processes_mask_as_the_whole_batch(mode):
    ids = _packed_rows(32, 96)
    whole = _mask(ids, MODES[mode], seed=1, step=9)
    halves = [_mask(ids[part], MODES[mode], seed=1, step=9, rows=np.arange(32)[part])
              for part in (slice(0, 16), slice(16, 32))]
    for i, arr in enumerate(whole):
        np.testing.assert_array_equal(arr, np.concatenate([h[i] for h in halves]))
    empty = _mask(ids[:0], MODES[mode], seed=1, step=9, rows=np.arange(0))  # a process with no rows
    assert [a.shape for a in empty] == [(0, 96), (0, 15), (0, 15)]
    # A row's masks do not depend on its place in the local batch, only on its global index.
    shuffled = np.random.default_rng(0).permutation(32)
    for arr, moved in zip(whole, _mask(ids[shuffled], MODES[mode], seed=1, step=9, rows=shuffled)):
        np.testing.assert_array_equal(arr[shuffled], moved)


@pytest.mark.parametrize("mode", MODES)
def test_targets_labels_and_positions_agree_with_the_original_ids(mode):
    ids = _packed_rows(32, 128, seed=1)
    ids[3, 1:] = PAD  # a row with nothing to mask
    masked, positions, labels = _mask(ids, MODES[mode], step=2)
    P = max_predictions(128, 0.15)
    assert masked.shape == ids.shape and positions.shape == labels.shape == (32, P) == (32, 20)
    assert masked.dtype == positions.dtype == labels.dtype == np.int32
    for b in range(32):
        maskable = ~np.isin(ids[b], SPECIALS)
        n = max(1, round(0.15 * maskable.sum())) if maskable.any() else 0
        used = labels[b] >= 0
        count = int(used.sum())
        assert used.tolist() == [True] * count + [False] * (P - count)  # used slots first
        if mode == "whole_word":
            assert 0 < count <= n or n == 0
        else:
            assert count == n
        pos = positions[b, used]
        assert (np.diff(pos) > 0).all() and (positions[b, ~used] == 0).all()
        assert maskable[pos].all()  # never a special token
        np.testing.assert_array_equal(labels[b, used], ids[b, pos])
        untouched = np.ones(128, bool)
        untouched[pos] = False
        np.testing.assert_array_equal(masked[b, untouched], ids[b, untouched])
        assert not (masked[b, untouched] == MASK).any()
    assert labels[3].max() == -1 and np.array_equal(masked[3], ids[3])


def test_max_predictions_is_the_ceiling_without_float_noise():
    assert max_predictions(128, 0.15) == 20  # 19.2
    assert max_predictions(20, 0.15) == 3  # 0.15 * 20 = 3.0000000000000004
    assert max_predictions(512, 0.15) == 77
    assert max_predictions(4, 0.1) == 1


def test_mask_random_and_kept_shares_within_five_binomial_sigmas():
    ids = _packed_rows(32, 128, seed=2)
    actions = []
    randoms = []
    for step in range(150):
        masked, positions, labels = _mask(ids, step=step)
        rows = np.broadcast_to(np.arange(32)[:, None], positions.shape)
        used = labels >= 0
        new, old = masked[rows[used], positions[used]], labels[used]
        actions.append(np.where(new == MASK, 0, np.where(new == old, 2, 1)))
        randoms.append(new[(new != MASK) & (new != old)])
    actions, randoms = np.concatenate(actions), np.concatenate(randoms)
    total = len(actions)
    # A random replacement equal to the original token reads as kept.
    same = 1 / len(NON_SPECIAL)
    expected = {0: 0.8, 1: 0.1 * (1 - same), 2: 0.1 + 0.1 * same}
    for action, p in expected.items():
        sigma = math.sqrt(total * p * (1 - p))
        assert abs((actions == action).sum() - total * p) < 5 * sigma, (action, total)
    # Random replacements: never special, uniform over the non-special ids.
    assert not np.isin(randoms, SPECIALS).any()
    per_id = np.bincount(randoms, minlength=V)[NON_SPECIAL]
    mean = len(randoms) / len(NON_SPECIAL)
    assert (np.abs(per_id - mean) < 5 * math.sqrt(mean)).all()


def _reference_words(row):
    """Word index of every token (None for specials), in plain Python: a word starts at a
    word-start id or at the first non-special token after a special one."""
    words, current, previous_special = [], -1, True
    for token in row.tolist():
        if token in SPECIALS:
            words.append(None)
            previous_special = True
            continue
        if previous_special or WORD_STARTS_V[token]:
            current += 1
        words.append(current)
        previous_special = False
    return words


def test_whole_word_masks_whole_words_and_stops_only_when_no_word_fits():
    ids = _packed_rows(32, 128, seed=3)
    ids[0, 1:6] = NON_SPECIAL[~WORD_STARTS_V[NON_SPECIAL]][0]  # a continuation right after [CLS]
    multi_piece = 0
    for step in range(20):
        _, positions, labels = _mask(ids, MODES["whole_word"], step=step)
        for b, targets in enumerate(_targets(positions, labels)):
            words = _reference_words(ids[b])
            members = {}
            for pos, word in enumerate(words):
                if word is not None:
                    members.setdefault(word, set()).add(pos)
            chosen = {words[pos] for pos in targets}
            assert None not in chosen
            assert targets == set().union(*(members[w] for w in chosen))  # whole words only
            n = max(1, round(0.15 * sum(w is not None for w in words)))
            assert len(targets) <= n
            # Greedy in some order: every word left out would no longer fit.
            assert all(len(targets) + len(members[w]) > n for w in members if w not in chosen)
            multi_piece += sum(len(members[w]) > 1 for w in chosen)
    assert multi_piece > 100  # the check saw words of several pieces


def _reference_group_counts(weights, n, trials, seed=0):
    """Mean and variance, over trials, of how many of `n` targets fall in each group: tokens
    drawn one at a time without replacement, each with probability proportional to its weight
    (random.choices). `weights` is a list of (group, weight) per token."""
    rnd = random.Random(seed)
    groups = sorted({group for group, _ in weights})
    per_trial = []
    for _ in range(trials):
        left = list(weights)
        hits = dict.fromkeys(groups, 0)
        for _ in range(n):
            i = rnd.choices(range(len(left)), weights=[w for _, w in left])[0]
            hits[left.pop(i)[0]] += 1
        per_trial.append([hits[g] for g in groups])
    return np.mean(per_trial, 0), np.var(per_trial, 0)


def test_smoothing_selects_tokens_in_proportion_to_count_to_the_minus_0_7():
    frequent, rare, unseen = NON_SPECIAL[:10], NON_SPECIAL[10:20], NON_SPECIAL[20:30]
    counts = np.ones(V, np.int64)
    counts[frequent], counts[rare], counts[unseen] = 1000, 10, 0  # 0 weighs as 1
    row = np.array([CLS] + list(frequent) * 2 + list(rare) * 2 + list(unseen) * 2 + [SEP])
    ids = np.tile(row, (32, 1))  # 60 maskable tokens: 9 targets a row
    group_V = np.full(V, -1)
    group_V[frequent], group_V[rare], group_V[unseen] = 0, 1, 2
    steps = 60
    per_row = []
    for step in range(steps):
        _, positions, labels = mask_batch(ids, cfg=MaskingConfig(smoothing=0.7), seed=0, step=step,
                                          rows_B=np.arange(32), mask_id=MASK, special_ids=SPECIALS,
                                          vocab_size=V, token_counts_V=counts)
        per_row += [np.bincount(group_V[lab[lab >= 0]], minlength=3) for lab in labels]
    per_row = np.array(per_row)
    assert (per_row.sum(1) == 9).all()
    weights = [(int(group_V[t]), max(int(counts[t]), 1) ** -0.7) for t in row[1:-1]]
    trials = 4000
    mean, var = _reference_group_counts(weights, 9, trials)
    assert mean[0] < 0.2 < 1 < mean[1] < 2 < 6 < mean[2]  # the groups differ a lot
    # Rows are independent draws: the mean count's error is var / rows, the reference's var / trials.
    sigma = np.sqrt(var * (1 / len(per_row) + 1 / trials))
    np.testing.assert_array_less(np.abs(per_row.mean(0) - mean), 5 * sigma + 1e-3)


def test_smoothing_zero_masks_exactly_as_uniform():
    ids = _packed_rows(32, 64, seed=4)
    cfg = MaskingConfig(smoothing=0.0)
    a = _mask(ids, cfg, step=1)
    b = _mask(ids, MaskingConfig(), step=1)
    for x, y in zip(a, b):  # weight 1 for every token: the same keys, the same targets
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kwargs, message", [
    ({"probability": 0.0}, "probability must be in (0, 1]"),
    ({"probability": 1.5}, "probability must be in (0, 1]"),
    ({"mask_fraction": -0.1}, "mask_fraction must be in [0, 1]"),
    ({"random_fraction": 1.2}, "random_fraction must be in [0, 1]"),
    ({"mask_fraction": 0.8, "random_fraction": 0.3}, "must be at most 1"),
    ({"smoothing": -0.7}, "smoothing must be a number >= 0"),
    ({"smoothing": float("nan")}, "smoothing must be a number >= 0"),
    ({"whole_word": "yes"}, "whole_word must be true or false"),
    ({"whole_word": True, "smoothing": 0.7}, "set smoothing to null, or whole_word to false"),
])
def test_invalid_settings_raise_data_error_saying_what_to_fix(kwargs, message):
    with pytest.raises(DataError) as err:
        MaskingConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("cfg, table", [(MaskingConfig(whole_word=True), "word_starts_V"),
                                        (MaskingConfig(smoothing=0.7), "token_counts_V")])
def test_missing_or_misshapen_tables_raise(cfg, table):
    ids = _packed_rows(2, 16)
    common = dict(cfg=cfg, seed=0, step=0, rows_B=np.arange(2), mask_id=MASK, special_ids=SPECIALS,
                  vocab_size=V)
    with pytest.raises(DataError, match=f"needs {table}"):
        mask_batch(ids, **common)
    with pytest.raises(DataError, match=f"needs {table}"):
        mask_batch(ids, **common, **{table: np.ones(V - 1)})
    with pytest.raises(DataError, match="one global row index per row"):
        mask_batch(ids, **{**common, "rows_B": np.arange(3)}, word_starts_V=WORD_STARTS_V,
                   token_counts_V=COUNTS_V)


def test_token_counts_accumulate_chunk_by_chunk():
    chunks = [np.array([1, 2, 2]), np.array([[5, 1], [0, 299]]), np.array([], np.int64)]
    counts = token_counts(iter(chunks), V)
    assert counts.dtype == np.int64 and counts.shape == (V,)
    np.testing.assert_array_equal(counts, np.bincount([1, 2, 2, 5, 1, 0, 299], minlength=V))
    with pytest.raises(DataError, match="outside the vocabulary"):
        token_counts([np.array([3, V])], V)
