"""Token classification: reading CoNLL files and token/tag rows, sub-word alignment, windows, the
teacher cache's flat rows, predictions per word, and entity metrics against seqeval."""
import json
import logging

import numpy as np
import pytest

from jaxkd import cache as cache_lib
from jaxkd import data, tasks
from jaxkd.data import DataConfig, DataError
from jaxkd.tasks import task_config, token

CONLL = tasks.resolve(task_config(name="conll2003", type="token_classification"))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from jaxkd.hf import load_tokenizer
    return load_tokenizer(minilm_dir)


# ----------------------------------------------------------------------------- config


def test_preset_and_type_resolve():
    assert CONLL.type == "token_classification" and CONLL.head().kind == "token"
    assert CONLL.label_names[0] == "O" and CONLL.num_labels == 9 and CONLL.metrics[0] == "f1"
    # The preset names its type: task.type may be left out.
    assert tasks.resolve(task_config(name="conll2003")).type == "token_classification"
    assert tasks.resolve(task_config()).type == "sequence_classification"


@pytest.mark.parametrize("kwargs, message", [
    ({"type": "token_clasification"}, "did you mean 'token_classification'"),
    ({"name": "conll2003", "type": "sequence_classification"}, "set task.type: token_classification"),
    ({"name": "conll2003", "text": "sentence"}, "task.text is not used by token_classification"),
    ({"name": "sst2", "tokens": "words"}, "task.tokens is not used by sequence_classification"),
    ({"name": "conll2003", "tag_scheme": "bio"}, "task.tag_scheme 'bio' is unknown"),
])
def test_bad_task_sections_are_named(kwargs, message):
    with pytest.raises(DataError, match=message):
        task_config(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": ["O", "PER", "LOC"]}, "tag 'PER' is neither 'O' nor a prefixed entity tag"),
    ({"labels": ["O", "S-PER", "B-PER", "I-PER", "E-PER"]}, "tag 'S-PER' uses prefix S-, which the iob2"),
])
def test_tags_the_scheme_cannot_score_are_refused_when_the_task_resolves(kwargs, message):
    with pytest.raises(DataError, match=f"task.labels cannot be scored as entities: {message}"):
        token.resolve(task_config("custom", type="token_classification", **kwargs))
    assert token.resolve(task_config("custom", type="token_classification", tag_scheme="bioes",
                                     labels=["O", "S-PER", "B-PER", "I-PER", "E-PER"]))


# ----------------------------------------------------------------------------- reading


def test_conll_file_reading(tmp_path):
    path = _write(tmp_path / "a.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                  "German JJ B-NP B-MISC\n\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    examples = CONLL.load(DataConfig(), path)
    assert examples.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    names = [CONLL.label_names[i] for i in examples.tags]
    assert names == ["B-ORG", "O", "B-MISC", "B-PER", "I-PER"]
    # The same sentences from JSONL rows, tags as names or as ids into task.labels.
    rows = [{"tokens": ["EU", "rejects", "German"], "ner_tags": ["B-ORG", "O", "B-MISC"]},
            {"tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2]}]
    jsonl = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    again = CONLL.load(DataConfig(), jsonl)
    assert again.words == examples.words and again.tags.tolist() == examples.tags.tolist()


@pytest.mark.parametrize("name, content, message", [
    ("t.txt", "EU B-ORG\nrejects\n", r"t.txt line 2: token 'rejects' has no tag column"),
    ("t.txt", "EU B-ORG\n\nrejects B-FOO\n", r"t.txt line 3: tag 'B-FOO' of token 0 \('rejects'\) is not one of"),
    ("t.conll", "\n\n", r"t.conll: the file holds no sentences"),
    ("t.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n', r"t.jsonl line 1: 2 tokens but 1 tags"),
    ("t.jsonl", '{"words": ["a"], "ner_tags": ["O"]}\n', r"no column 'tokens' \(task.tokens\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        CONLL.load(DataConfig(), _write(tmp_path / name, content))


def test_words_without_tags_read_as_unlabeled_where_labels_are_not_required(tmp_path):
    path = _write(tmp_path / "w.txt", "EU\nrejects\n\nPeter\n")
    examples = CONLL.load(DataConfig(), path, require_labels=False)
    assert examples.words == [["EU", "rejects"], ["Peter"]] and not examples.has_labels
    assert examples.tags.tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match="w.txt line 1: token 'EU' has no tag column"):
        CONLL.load(DataConfig(), path)


def test_skip_invalid_skips_and_counts_sentences(tmp_path, caplog):
    path = _write(tmp_path / "t.txt", "EU B-ORG\n\nbad\n\nx B-FOO\n\nfine O\nok O\n")
    with caplog.at_level(logging.WARNING, logger="jaxkd.tasks.base"):
        examples = CONLL.load(DataConfig(skip_invalid=True), path)
    assert examples.words == [["EU"], ["fine", "ok"]]
    assert examples.skipped == {"missing tag": 1, "bad tag": 1}
    assert "skipped 2 invalid rows" in caplog.text


def test_custom_task_infers_tags_with_o_first(tmp_path):
    path = _write(tmp_path / "t.jsonl", '{"tokens": ["a", "b"], "tags": ["I-X", "O"]}\n'
                  '{"tokens": ["c"], "tags": ["B-Y"]}\n')
    task = tasks.resolve(task_config(name="custom", type="token_classification"), DataConfig(train=path))
    assert task.label_names == ("O", "B-Y", "I-X")


@pytest.mark.slow
def test_real_conll2003_counts(data_dir):
    """The shared copy of the official split: 14,041 / 3,250 / 3,453 sentences."""
    for name, sentences, tokens in (("train", 14041, 203621), ("dev", 3250, 51362),
                                    ("test", 3453, 46435)):
        examples = CONLL.load(DataConfig(), str(data_dir / "conll2003" / f"{name}.txt"))
        assert len(examples) == sentences and len(examples.tags) == tokens


# ----------------------------------------------------------------------------- encoding


def _reference_alignment(tokenizer, words, tags, label_all):
    """Sub-tokens of each word, one word at a time (no windows): the label layout expected."""
    ids, labels = [], []
    for word, tag in zip(words, tags):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        ids += pieces
        labels += [tag] + [tag if label_all else -1] * (len(pieces) - 1)
    return ids, labels


@pytest.mark.parametrize("label_all", [False, True])
def test_labels_on_first_sub_tokens_match_a_word_by_word_reference(tmp_path, tokenizer, label_all):
    task = tasks.resolve(task_config(name="conll2003", label_all_subtokens=label_all))
    path = _write(tmp_path / "t.txt", "Schwarzenegger B-PER\nvisited O\nKaiserslautern B-LOC\n.\tO\n\n"
                  "EU B-ORG\n")
    examples = task.load(DataConfig(), path)
    enc = task.encode(examples, tokenizer, 64)
    assert enc.labels_per_token and len(enc) == 2
    for row, (words, start) in enumerate(zip(examples.words, examples.word_offsets)):
        row_ids = enc.input_ids[enc.offsets[row]:enc.offsets[row + 1]].tolist()
        row_labels = enc.labels[enc.offsets[row]:enc.offsets[row + 1]].tolist()
        ids, labels = _reference_alignment(tokenizer, words, examples.tags[start:start + len(words)],
                                           label_all)
        assert row_ids == [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
        assert row_labels == [-1, *labels, -1]


def test_long_sentences_are_split_into_windows_and_every_word_is_predicted(tmp_path, tokenizer):
    words = [f"w{i}ord" for i in range(70)]  # several sub-tokens each
    tags = ["B-PER" if i % 7 == 0 else "O" for i in range(70)]
    path = _write(tmp_path / "t.txt", "\n".join(f"{w} {t}" for w, t in zip(words, tags))
                  + "\n\nshort O\n")
    examples = CONLL.load(DataConfig(), path)
    enc = CONLL.encode(examples, tokenizer, 32)
    assert enc.lengths.max() <= 32 and len(enc) > 3
    assert enc.extras["row_sentence"].tolist() == sorted(enc.extras["row_sentence"].tolist())
    index = enc.extras["word_index"]
    # Every word's first sub-token appears exactly once, in order, labelled with the word's tag.
    assert index[index >= 0].tolist() == list(range(71))
    np.testing.assert_array_equal(enc.labels[index >= 0], examples.tags)
    # Outputs that put each word's tag id on its first sub-token give back exactly the gold tags.
    outputs = np.full((int(enc.offsets[-1]), 9), -5.0, np.float32)
    outputs[np.flatnonzero(index >= 0), examples.tags] = 5.0
    np.testing.assert_array_equal(CONLL.word_predictions(outputs, enc, examples), examples.tags)
    scores = CONLL.scores(outputs, enc, examples)
    assert scores["f1"] == scores["precision"] == scores["recall"] == scores["accuracy"] == 1.0


def test_batches_carry_token_labels_and_cache_rows_follow_them(tmp_path, tokenizer):
    path = _write(tmp_path / "t.txt", "\n\n".join(f"a{i} B-LOC\nb O\nccc{i} O" for i in range(10)) + "\n")
    examples = CONLL.load(DataConfig(), path)
    enc = CONLL.encode(examples, tokenizer, 16)
    batch = next(iter(data.EvalBatches(enc, 4, bucket_multiple=8, max_seq_len=16)))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert np.all(batch["labels"][batch["attention_mask"] == 0] == -1)
    # A flat [T, C] cache: row r's logits sit at its tokens, zeros past its end.
    table = np.arange(int(enc.offsets[-1]) * 2, dtype=np.float32).reshape(-1, 2)
    attached = cache_lib.TeacherLogits(table, enc, per_token=True).attach(batch)["teacher_logits"]
    for b, row in enumerate(batch["index"]):
        n = int(enc.lengths[row])
        np.testing.assert_array_equal(attached[b, :n], table[enc.offsets[row]:enc.offsets[row] + n])
        assert not attached[b, n:].any()


# ----------------------------------------------------------------------------- metrics


def test_scores_match_seqeval(tmp_path, tokenizer):
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    lines = []
    for s in range(40):
        lines += [f"t{s}x{i} {CONLL.label_names[rng.integers(0, 9)]}" for i in range(rng.integers(1, 12))]
        lines.append("")
    examples = CONLL.load(DataConfig(), _write(tmp_path / "t.txt", "\n".join(lines)))
    enc = CONLL.encode(examples, tokenizer, 64)
    outputs = rng.normal(size=(int(enc.offsets[-1]), 9)).astype(np.float32)
    pred_ids = CONLL.word_predictions(outputs, enc, examples)
    offsets = examples.word_offsets
    gold = [[CONLL.label_names[i] for i in examples.tags[a:b]] for a, b in zip(offsets[:-1], offsets[1:])]
    pred = [[CONLL.label_names[i] for i in pred_ids[a:b]] for a, b in zip(offsets[:-1], offsets[1:])]
    scores = CONLL.scores(outputs, enc, examples)
    assert scores["f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)
    assert scores["precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
    assert scores["recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
    assert scores["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred), abs=1e-12)
    per_type = seqeval.classification_report(gold, pred, output_dict=True, zero_division=0)
    for kind in ("PER", "ORG", "LOC", "MISC"):
        assert scores[f"f1/{kind}"] == pytest.approx(per_type[kind]["f1-score"], abs=1e-12)
    # The argmax at first sub-tokens, done here by hand.
    first = enc.extras["word_index"] >= 0
    np.testing.assert_array_equal(pred_ids, outputs[first].argmax(-1))
    assert CONLL.agreement(outputs, outputs, enc, examples) == 1.0
    predicted = CONLL.predictions(outputs, enc, examples)
    assert [p["tags"] for p in predicted] == pred
