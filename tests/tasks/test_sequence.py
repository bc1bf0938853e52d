"""Tests for jaxkd.tasks.sequence: presets, custom tasks, row validation, tokenisation of pairs."""
import logging

import numpy as np
import pytest

from jaxkd import data
from jaxkd.tasks import sequence, task_config


# ----------------------------------------------------------------------------- tasks


def test_presets_resolve_columns_labels_and_metrics():
    mrpc = sequence.resolve(task_config("mrpc"))
    assert (mrpc.text, mrpc.text_pair, mrpc.label) == ("sentence1", "sentence2", "label")
    assert mrpc.metrics == ("accuracy", "f1") and mrpc.num_labels == 2
    stsb = sequence.resolve(task_config("stsb"))
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearman")
    assert sequence.resolve(task_config("cola")).metrics == ("matthews",)
    mnli = sequence.resolve(task_config("mnli"))
    assert mnli.num_labels == 3
    assert sequence.resolve(task_config("mrpc", metric="f1")).metrics == ("f1", "accuracy")


def test_custom_task_infers_sorted_labels_and_regression():
    cfg = task_config("custom", text="t", labels=None)
    assert sequence.resolve(cfg, None, ["b", "a", "c", "a"]).label_names == ("a", "b", "c")
    assert sequence.resolve(cfg, None, ["10", "2", 1]).label_names == ("1", "2", "10")
    reg = sequence.resolve(task_config("custom", text="t", metric="spearman"))
    assert reg.is_regression and reg.metrics == ("spearman",)
    with pytest.raises(data.DataError, match="task.labels"):
        sequence.resolve(cfg)
    with pytest.raises(data.DataError, match=r"at least 2 labels; task.labels give \['spam'\]"):
        sequence.resolve(task_config("custom", text="t", labels=["spam"]))
    with pytest.raises(data.DataError, match="at least 2 labels; the training labels"):
        sequence.resolve(cfg, None, ["spam", "spam"])


def test_integer_label_names_are_matched_by_name_alone():
    """Labels 1 and 2 are named "1" and "2": a 0 is no label (it was read as id 0, "1")."""
    from jaxkd.tasks.base import label_id

    assert label_id("1", ("1", "2")) == 0 and label_id("2", ("1", "2")) == 1
    assert label_id("0", ("1", "2")) is None and label_id("1", ("0", "2")) is None
    assert label_id("1", ("negative", "positive")) == 1  # an id, where the names are words


def test_a_models_labels_are_matched_one_way_for_a_teacher_and_for_evaluate():
    """Training (teacher_columns) and jaxkd evaluate (label_order) read a model's outputs by the
    same rule: names without regard to case, transformers' placeholders by position."""
    sst2 = sequence.resolve(task_config("sst2"))

    def teacher(names):
        return sst2.teacher_columns({"id2label": dict(enumerate(names))}, False, "teacher")

    for names, columns in ((["NEGATIVE", "POSITIVE"], None), (["Positive", "negative"], [1, 0]),
                           (["LABEL_0", "LABEL_1"], None)):
        got = [teacher(names), sst2.label_order(names, False, "model")]
        assert [None if g is None else g.tolist() for g in got] == [columns, columns], names
    for names in (["bad", "good"], ["positive", "POSITIVE"]):
        with pytest.raises(data.DataError, match=r"teacher: its labels \(id2label\) are .* "
                                                 r"teacher.labels_by_position"):
            teacher(names)
        with pytest.raises(data.DataError, match=r"the model's labels .* --by-position"):
            sst2.label_order(names, False, "model")
    with pytest.raises(data.DataError, match=r"are \['LABEL_0', 'LABEL_1', 'LABEL_2'\]"):
        sst2.label_order(["LABEL_0", "LABEL_1", "LABEL_2"], False, "model")
    with pytest.raises(data.DataError, match=r"id2label must name ids 0..1, got ids \[0, 2\]"):
        sst2.teacher_columns({"id2label": {"0": "negative", "2": "positive"}}, False, "teacher")
    # A regression teacher names its one output as it likes: there are no labels to order.
    stsb = sequence.resolve(task_config("stsb"))
    assert stsb.teacher_columns({"id2label": {"0": "similarity"}}, False, "teacher") is None
    # Nor does a sentiment classifier teaching general distillation through its encoder.
    from jaxkd.tasks import general
    text = general.resolve(task_config("text", type="general"))
    assert text.teacher_columns({"id2label": {"0": "negative", "1": "positive"}}, False, "t") is None


def test_unknown_task_suggests_nearest_preset():
    with pytest.raises(data.DataError, match=r"unknown task.name 'sst-2'.*did you mean 'sst2'"):
        task_config("sst-2")


def test_metric_that_does_not_fit_the_task_is_refused():
    with pytest.raises(data.DataError, match="'accuracy' does not fit the regression task 'stsb'"):
        sequence.resolve(task_config("stsb", metric="accuracy"))
    with pytest.raises(data.DataError, match="needs 2 labels"):
        sequence.resolve(task_config("mnli", metric="f1"))


# ----------------------------------------------------------------------------- row validation


# Rows the task refuses; tests/data/test_read.py has the files the readers refuse.
@pytest.mark.parametrize("name, content, message", [
    ("h.tsv", "sentence\tlabel\n", r"h.tsv: the split is empty"),
    ("t.tsv", "sentence\tlabel\ngood\t1\nmeh\t7\n",
     r"t.tsv line 3: label '7' in column 'label' is not one of \['negative', 'positive'\]"),
    ("t.tsv", "sentence\tlabel\ngood\t1\n  \t0\n", r"t.tsv line 3: empty text in column 'sentence'"),
    ("t.jsonl", '{"sentence": "ok", "label": 1}\n\n{"sentence": null, "label": 0}\n',
     r"t.jsonl line 3: null text in column 'sentence'"),
])
def test_bad_split_names_file_and_line(tmp_path, name, content, message, sst2_task, write_file):
    with pytest.raises(data.DataError, match=message):
        sst2_task.load(data.DataConfig(), write_file(tmp_path / name, content))


def test_skip_invalid_counts_and_reports(tmp_path, caplog, sst2_task, write_file):
    path = write_file(tmp_path / "t.tsv", "sentence\tlabel\ngood\t1\n\t0\nx\t9\ny\t\nz\t0\tq\nfine\t0\n")
    with caplog.at_level(logging.WARNING, logger="jaxkd.tasks.base"):
        examples = sst2_task.load(data.DataConfig(skip_invalid=True), path)
    assert examples.texts == ["good", "fine"] and examples.labels.tolist() == [1, 0]
    assert examples.skipped == {"empty text": 1, "bad label": 1, "missing label": 1, "wrong field count": 1}
    assert "skipped 4 invalid rows" in caplog.text
    with pytest.raises(data.DataError, match="no valid rows left"):
        sst2_task.load(data.DataConfig(skip_invalid=True), write_file(tmp_path / "b.tsv", "sentence\tlabel\n\t1\n"))


def test_unlabeled_split_gets_placeholder_labels(tmp_path, sst2_task, write_file):
    path = write_file(tmp_path / "test.tsv", "sentence\nhello\n")
    examples = sst2_task.load(data.DataConfig(), path, require_labels=False)
    assert not examples.has_labels and examples.labels.tolist() == [-1]
    stsb = sequence.resolve(task_config("stsb", text="s", text_pair="p"))
    path = write_file(tmp_path / "s.tsv", "s\tp\nhello\tthere\n")
    assert np.isnan(stsb.load(data.DataConfig(), path, require_labels=False).labels).all()
    with pytest.raises(data.DataError, match="no column 'label'"):
        sst2_task.load(data.DataConfig(), write_file(tmp_path / "t2.tsv", "sentence\nhello\n"))


# ----------------------------------------------------------------------------- tokenisation


@pytest.mark.slow
def test_mrpc_pairs_match_tokenizer_with_truncation(data_dir, sst2_task, bert_tokenizer):
    tok = bert_tokenizer
    task = sequence.resolve(task_config("mrpc", text="#1 String", text_pair="#2 String", label="Quality"))
    examples = task.load(data.DataConfig(), str(data_dir / "mrpc" / "msr_paraphrase_test.txt"))
    encoded = sst2_task.encode(examples, tok, 32, None)
    for i in range(0, len(examples), 25):
        want = tok(examples.texts[i], examples.pairs[i], truncation="longest_first", max_length=32)
        start, stop = encoded.offsets[i], encoded.offsets[i + 1]
        assert encoded.input_ids[start:stop].tolist() == want["input_ids"]
        assert encoded.token_type_ids[start:stop].tolist() == want["token_type_ids"]
    assert encoded.lengths.max() == 32 and set(np.unique(encoded.token_type_ids)) == {0, 1}


def test_the_loss_in_words_names_the_intermediate_terms():
    from jaxkd.losses import LossConfig
    from jaxkd.tasks import general

    sst2 = sequence.resolve(task_config("sst2"))
    assert sst2.describe_loss(LossConfig()) == "T=2, alpha=0.5"
    assert sst2.describe_loss(LossConfig(hidden_weight=1.0, attention_kl_weight=0.5)) == \
        "T=2, alpha=0.5, hidden MSE 1, attention KL 0.5"
    text = general.resolve(task_config("text", type="general"))
    assert text.describe_loss(LossConfig(relation_weight=1.0, hidden_weight=1.0)) == \
        "MiniLM-v2 relations 1, hidden MSE 1"  # the preset trains no masked-LM head
