"""Augmented transfer rows for token classification: only words tagged O change, word for word,
so each variant keeps its sentence's word positions and tags; the word-level KD term reads the
variants' first sub-tokens, the hard term skips them; the teacher cache holds the teacher's
per-token outputs on them."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd import data, hf, transfer
from jaxkd.config import ConfigError
from jaxkd.model import apply_model, word_embeddings
from jaxkd.tasks import objective, task_config, token
# Fixtures of conftest.py: small_tokenizer and embeddings (of helpers.TRANSFER_VOCAB), and the
# tiny random teacher and generated CoNLL files of the token pipeline tests.
from helpers import NEIGHBOURS as K, expected_neighbours, ner_config, run_in_process, write_conll

TASK = token.resolve(task_config("conll2003", type="token_classification"))
# Words of the small vocabulary; "actor" and "cast" stand for entities here.
SENTENCES = [(["the", "actor", "was", "very", "good", "."], ["O", "B-PER", "O", "O", "O", "O"]),
             (["a", "dull", "plot", ",", "not", "fun", "!"], ["O"] * 7),
             (["the", "cast", "actor", "is", "unbelievable"], ["O", "B-ORG", "I-ORG", "O", "O"]),
             (["great", "story"], ["B-MISC", "I-MISC"])]


def _examples() -> token.Examples:
    tags = [TASK.label_names.index(t) for _, sentence_tags in SENTENCES for t in sentence_tags]
    return token.Examples("test", [list(w) for w, _ in SENTENCES], np.asarray(tags, np.int32),
                          True, {})


def _augmented(tokenizer, embeddings_VxE, tmp_path, **settings):
    cfg = transfer.AugmentConfig(**{"factor": 8, "neighbours": K, "mask_prob": 0.3,
                                    "replace_prob": 0.4, "ngram_prob": 0.0, **settings})

    def variants(texts, pairs, sep=None, keep=None):
        return transfer.augmented_set(tmp_path, texts, pairs, cfg, tokenizer, lambda: embeddings_VxE,
                                      sep, keep)
    return TASK.augmented(_examples(), variants, "test (augmented)")


def test_only_words_tagged_o_change_and_every_word_keeps_its_place(small_tokenizer, embeddings,
                                                                   tmp_path):
    out = _augmented(small_tokenizer, embeddings, tmp_path, seed=3)
    assert len(out) == 8 * len(SENTENCES) and out.has_labels
    offsets = out.word_offsets
    changed = {"mask": 0, "replace": 0}
    for i, words in enumerate(out.words):
        original, tags = SENTENCES[i // 8]
        assert len(words) == len(original)  # word for word: no n-grams, no splits
        assert [TASK.label_names[t] for t in out.tags[offsets[i]:offsets[i + 1]]] == tags
        for word, before, tag in zip(words, original, tags):
            if tag != "O":
                assert word == before  # entity words stay as they are
            elif word == small_tokenizer.mask_token:
                changed["mask"] += 1
            elif word != before:
                assert word in expected_neighbours(before, embeddings)
                changed["replace"] += 1
    assert changed["mask"] > 0 and changed["replace"] > 0
    again = _augmented(small_tokenizer, embeddings, tmp_path / "again", seed=3)
    other = _augmented(small_tokenizer, embeddings, tmp_path / "other", seed=4)
    assert again.words == out.words and other.words != out.words


def test_masked_word_encodes_as_one_mask_token_on_its_word(small_tokenizer, embeddings, tmp_path):
    """The KD term reads the first sub-token of every word: a masked word is the mask token,
    labelled with the word's tag; entity words keep their tags at their first sub-tokens."""
    small_tokenizer = hf.load_tokenizer(small_tokenizer.name_or_path, words=True)
    out = _augmented(small_tokenizer, embeddings, tmp_path, seed=3, mask_prob=1.0, replace_prob=0.0)
    enc = TASK.encode(out, small_tokenizer, 32)
    row = enc.input_ids[enc.offsets[0]:enc.offsets[1]]
    labels = enc.labels[enc.offsets[0]:enc.offsets[1]]
    mask_id, actor = small_tokenizer.mask_token_id, small_tokenizer.convert_tokens_to_ids("actor")
    assert row.tolist() == [small_tokenizer.cls_token_id, mask_id, actor] + [mask_id] * 4 \
        + [small_tokenizer.sep_token_id]
    assert labels.tolist() == [-1, 0, TASK.label_names.index("B-PER"), 0, 0, 0, 0, -1]


def test_with_transfer_joins_per_token_labels_and_weighs_transfer_rows_zero():
    labelled = data.Encoded(np.arange(5, dtype=np.int32), np.zeros(5, np.int8), np.array([0, 2, 5]),
                            np.array([-1, 3, -1, 1, 2], np.int32), True, labels_per_token=True,
                            extras={"word_index": np.arange(5)})
    extra = data.Encoded(np.arange(3, dtype=np.int32), np.zeros(3, np.int8), np.array([0, 3]),
                         np.array([-1, 0, 4], np.int32), True, labels_per_token=True)
    joined = data.with_transfer(labelled, [extra])
    assert joined.labels_per_token and len(joined) == 3 and joined.extras == {}
    assert joined.labels.tolist() == [-1, 3, -1, 1, 2, -1, 0, 4]
    assert joined.hard_weights.tolist() == [1.0, 1.0, 0.0]
    batch = data.batch_rows(joined, np.array([0, 2]), np.array([True, True]), 4)
    head = objective(TASK.head())
    kd = np.asarray(head.weights(batch))
    hard = np.asarray(head.hard_weights({k: jnp.asarray(v) for k, v in batch.items()}))
    # KD on every labelled token of both rows; the hard term on the labelled row's alone.
    np.testing.assert_array_equal(kd, [[0, 1, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(hard, [[0, 1, 0, 0], [0, 0, 0, 0]])
    per_row = data.Encoded(np.arange(3, dtype=np.int32), np.zeros(3, np.int8), np.array([0, 3]),
                           np.array([1], np.int32), True)
    with pytest.raises(data.DataError, match="per row or per token"):
        data.with_transfer(labelled, [per_row])


@pytest.mark.parametrize("mapping, message", [
    ({"distill": {"augment": {"factor": 2}}}, r"ngram_prob must be 0 for token_classification"),
    ({"data": {"unlabeled": "more.txt"}}, "data.unlabeled is not available for token_classification"),
])
def test_token_transfer_settings_it_cannot_honour_are_refused(mapping, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict({"task": {"name": "conll2003"}, **mapping})
    config_lib.from_dict({"task": {"name": "conll2003"},
                          "distill": {"augment": {"factor": 2, "ngram_prob": 0.0}}})


@pytest.mark.slow
def test_ner_pipeline_with_augmented_rows(tmp_path, tiny_teacher, ner_data):
    workdir = tmp_path / "run"
    cfg = ner_config(workdir, tiny_teacher, ner_data, **{
        "data.unlabeled_ratio": 0.5, "teacher.finetune.steps": 8,
        "distill.augment": {"factor": 2, "mask_prob": 0.3, "replace_prob": 0.3, "ngram_prob": 0.0,
                            "seed": 5},
        "distill.steps": 8, "distill.eval_every": 8})
    report = run_in_process(cfg)
    train = TASK.load(data.DataConfig(), str(ner_data / "train.txt"))
    assert report["transfer"]["augment"]["rows"] == 2 * len(train)
    assert json.loads((workdir / "stages.json").read_text())["distill"]["rows"] >= 3 * len(train)
    # The cached teacher outputs of the augmented rows are the teacher's, token for token.
    teacher_cfg, teacher_params = hf.load_hf(workdir / "teacher")
    tokenizer = hf.load_tokenizer(workdir / "teacher", words=True)
    augment = config_lib.from_dict(cfg).distill.augment

    def variants(texts, pairs, sep=None, keep=None):
        return transfer.augmented_set(workdir / "cache", texts, pairs, augment, tokenizer,
                                      lambda: word_embeddings(teacher_params), sep, keep)
    labelled = TASK.encode(train, tokenizer, 32)
    augmented = TASK.augmented(train, variants, "augmented")
    assert augmented.words != [w for w in train.words for _ in range(2)]  # some words changed
    encoded = TASK.encode(augmented, tokenizer, 32)
    table = np.load(next((workdir / "cache").glob("teacher_logits-*.npy")))
    assert table.shape[0] == labelled.offsets[-1] + encoded.offsets[-1]
    for row in (0, 1, len(encoded) - 1):
        a, b = encoded.offsets[row], encoded.offsets[row + 1]
        ids = encoded.input_ids[a:b][None]
        logits = apply_model(teacher_cfg, teacher_params, ids, np.ones_like(ids),
                             np.zeros_like(ids)).logits[0]
        np.testing.assert_allclose(table[labelled.offsets[-1] + a:labelled.offsets[-1] + b],
                                   np.asarray(logits), atol=1e-4)


def test_data_augment_cannot_vary_is_refused_before_any_work(tmp_path, tiny_teacher):
    """A tag set without O leaves augmentation nothing to vary; the check on the training words
    runs in plan.prepare, before the teacher is fine-tuned: nothing is written."""
    sentences = [(["the", "actor"], ["B-PER", "I-PER"]), (["a", "plot"], ["B-LOC", "B-PER"])]
    files = {name: write_conll(tmp_path / f"{name}.txt", sentences) for name in ("train", "test")}
    workdir = tmp_path / "run"
    cfg = ner_config(workdir, tiny_teacher, tmp_path,
                     task={"name": "custom", "type": "token_classification"}, **{
                         "data.eval": None, "data.test": str(files["test"]),
                         "distill.augment": {"factor": 2, "ngram_prob": 0.0}})
    with pytest.raises(data.DataError, match="have no 'O'"):
        run_in_process(cfg)
    assert not workdir.exists()


def test_word_holding_the_word_separator_is_refused():
    # CoNLL files split on whitespace, which takes \x1f; pre-split words of JSONL or the Hub may
    # hold it, and it would move word boundaries in the variants.
    examples = _examples()
    examples.words[2][1] = "act\x1for"
    with pytest.raises(data.DataError, match="sentence 3 holds a word with the control character"):
        TASK.check_augmentable(examples)
    TASK.check_augmentable(_examples())
