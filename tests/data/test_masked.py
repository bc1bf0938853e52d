"""Masked-LM batches of packed rows: a true permutation per epoch, exact resume, each process
reading its own rows with the masks of the whole batch, held-out rows once with fixed masks."""
import numpy as np
import pytest

from jaxkd.data import DataError
from jaxkd.data.masked import MaskedBatches, MaskedEvalBatches, Vocabulary, permute
from jaxkd.data.masking import MaskingConfig, mask_batch

L, V = 16, 50
VOCAB = Vocabulary(mask_id=4, special_ids=(0, 1, 2, 3, 4), size=V)
CFG = MaskingConfig()


class Rows:
    """Row r: [CLS], tokens from r, [SEP] (every row distinct)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def rows(self, indices):
        indices = np.asarray(indices)
        body = 5 + (indices[:, None] * 7 + np.arange(L - 2)) % (V - 5)
        return np.concatenate([np.full((len(indices), 1), 2), body, np.full((len(indices), 1), 3)],
                              axis=1).astype(np.int32)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4097])
def test_permute_is_a_permutation_keyed_by_seed_and_epoch(n):
    perm = permute(np.arange(n), n, (3, 0))
    assert sorted(perm.tolist()) == list(range(n))
    if n > 64:
        assert not np.array_equal(perm, np.arange(n))
        assert not np.array_equal(perm, permute(np.arange(n), n, (3, 1)))
        np.testing.assert_array_equal(perm[10:20], permute(np.arange(10, 20), n, (3, 0)))


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_resume_continues_exactly_and_epochs_differ():
    rows = Rows(37)  # 4 steps of 8 an epoch; 5 rows dropped each epoch
    it = MaskedBatches(rows, 8, cfg=CFG, vocab=VOCAB, seed=1)
    first = _take(it, 3)
    position = it.position
    rest = _take(it, 6)
    again = MaskedBatches(rows, 8, cfg=CFG, vocab=VOCAB, seed=1, position=position)
    for a, b in zip(rest, _take(again, 6)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    epoch0 = np.concatenate([b["labels"] for b in first + rest[:1]])
    epoch1 = np.concatenate([b["labels"] for b in rest[1:5]])
    assert not np.array_equal(epoch0, epoch1)
    with pytest.raises(DataError, match="batch_size=8, now 4"):
        MaskedBatches(rows, 4, cfg=CFG, vocab=VOCAB, seed=1, position=position)


def test_each_process_reads_its_share_with_the_whole_batch_masks():
    rows = Rows(40)
    whole = _take(MaskedBatches(rows, 8, cfg=CFG, vocab=VOCAB, seed=2), 3)
    parts = [_take(MaskedBatches(rows, 8, cfg=CFG, vocab=VOCAB, seed=2, process_index=i,
                                 process_count=2), 3) for i in range(2)]
    for k in range(3):
        for key in ("input_ids", "positions", "labels", "weights"):
            np.testing.assert_array_equal(
                whole[k][key], np.concatenate([parts[0][k][key], parts[1][k][key]]))


def test_batches_hold_masked_rows_with_their_targets():
    batch = next(MaskedBatches(Rows(16), 4, cfg=CFG, vocab=VOCAB, seed=0))
    assert batch["input_ids"].shape == (4, L) and batch["positions"].shape == (4, 3)
    assert batch["attention_mask"].all() and not batch["token_type_ids"].any()
    original = Rows(16).rows(np.arange(16))
    for b in range(4):
        # Which corpus row this is: the one whose unmasked tokens it shares.
        keep = np.ones(L, bool)
        keep[batch["positions"][b][batch["labels"][b] >= 0]] = False
        match = [r for r in range(16) if np.array_equal(original[r][keep], batch["input_ids"][b][keep])]
        assert len(match) == 1
        real = batch["labels"][b] >= 0
        np.testing.assert_array_equal(original[match[0]][batch["positions"][b][real]],
                                      batch["labels"][b][real])


def test_eval_masks_belong_to_the_row_not_to_the_batch_size():
    rows = Rows(37)

    def by_row(batch_size, **kw):
        out = []
        for b in MaskedEvalBatches(rows, batch_size, cfg=CFG, vocab=VOCAB, seed=5, **kw):
            out += [(ids, lab) for ids, lab, w in zip(b["input_ids"], b["labels"], b["weights"]) if w]
        return out
    reference = by_row(32)  # the block size: batch k's row j is keyed (seed, k, j)
    assert len(reference) == 37
    for batch_size in (4, 5, 64):
        for (ids, lab), (ref_ids, ref_lab) in zip(by_row(batch_size), reference, strict=True):
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(lab, ref_lab)
    first = next(iter(MaskedEvalBatches(rows, 32, cfg=CFG, vocab=VOCAB, seed=5)))
    masked, _, labels = mask_batch(rows.rows(np.arange(32)), cfg=CFG, seed=5, step=0,
                                   rows_B=np.arange(32), mask_id=VOCAB.mask_id,
                                   special_ids=VOCAB.special_ids, vocab_size=VOCAB.size)
    np.testing.assert_array_equal(first["input_ids"], masked)
    np.testing.assert_array_equal(first["labels"], labels)


def test_eval_batches_cover_every_row_once_with_fixed_masks():
    rows = Rows(11)
    batches = list(MaskedEvalBatches(rows, 4, cfg=CFG, vocab=VOCAB, seed=5))
    assert len(batches) == 3
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 11 and weights[11:].sum() == 0
    again = list(MaskedEvalBatches(rows, 4, cfg=CFG, vocab=VOCAB, seed=5))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    halves = [list(MaskedEvalBatches(rows, 4, cfg=CFG, vocab=VOCAB, seed=5, process_index=i,
                                     process_count=2)) for i in range(2)]
    for k in range(3):
        np.testing.assert_array_equal(batches[k]["labels"],
                                      np.concatenate([halves[0][k]["labels"], halves[1][k]["labels"]]))


def test_general_tasks_score_held_out_text_at_the_default_masks_whatever_they_train_with():
    from jaxkd.data import DataConfig
    from jaxkd.tasks import general

    task = general.resolve(general.GeneralConfig(name="text", mask_probability=0.4,
                                                 mlm_smoothing=0.7))
    assert task.masking != MaskingConfig()
    rows = Rows(9)
    got = task.eval_batches(general.MaskedCorpus(rows, VOCAB), DataConfig(batch_size=4))
    want = MaskedEvalBatches(rows, 4, cfg=MaskingConfig(), vocab=VOCAB, seed=general.EVAL_MASK_SEED)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
