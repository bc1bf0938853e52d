"""Extractive QA: the official SQuAD v1.1 metric on hand-worked cases, reading SQuAD JSON and
rows, windows with a stride, answer positions, span decoding, and the span loss."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import tasks
from jaxkd.data import DataConfig, DataError
from jaxkd.tasks import qa, task_config

SQUAD = tasks.resolve(task_config(name="squad", type="question_answering"))


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from jaxkd.hf import load_tokenizer
    return load_tokenizer(minilm_dir)


def _squad_file(path, paragraphs):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": question,
                                      "answers": [{"text": a, "answer_start": context.index(a)}
                                                  for a in answers]}
                                     for qid, question, answers in qas]}
        for context, qas in paragraphs]}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- the official metric


@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("The Cat!", ["cat"], 1.0, 1.0),                      # case, article, punctuation
    ("the big cat", ["a big dog"], 0.0, 0.5),             # [big, cat] vs [big, dog]: P = R = 1/2
    ("Denver Broncos", ["Broncos", "Denver Broncos"], 1.0, 1.0),  # the best gold answer counts
    ("in 1858 in Lourdes", ["1858"], 0.0, 2 * (1 / 4) * 1 / (1 / 4 + 1)),  # P = 1/4, R = 1: F1 = 0.4
    ("", ["something"], 0.0, 0.0),
    ("an  apple  pie", ["apple pie."], 1.0, 1.0),         # whitespace collapsed
    ("north north", ["north"], 0.0, 2 * 0.5 * 1 / 1.5),   # overlap counts each gold token once
])
def test_official_metric_by_hand(prediction, golds, em, f1):
    scores = qa.squad_scores([prediction], [golds])
    assert scores["exact_match"] == pytest.approx(em)
    assert scores["f1"] == pytest.approx(f1)


def test_scores_are_means_over_questions():
    scores = qa.squad_scores(["cat", "dog"], [["cat"], ["bird"]])
    assert scores == {"f1": 0.5, "exact_match": 0.5}


# ----------------------------------------------------------------------------- reading


def test_squad_json_and_hub_rows_read_the_same(tmp_path):
    path = _squad_file(tmp_path / "s.json", [("Paris is the capital of France.",
                                              [("q1", "What is the capital?", ["Paris"])])])
    examples = SQUAD.load(DataConfig(), path)
    assert examples.ids == ["q1"] and examples.answers == [[("Paris", 0)]]
    row = {"id": "q1", "question": "What is the capital?", "context": "Paris is the capital of France.",
           "answers": {"text": ["Paris"], "answer_start": [0]}}
    rows = tmp_path / "s.jsonl"
    rows.write_text(json.dumps(row) + "\n", encoding="utf-8")
    again = SQUAD.load(DataConfig(), str(rows))
    assert again.ids == examples.ids and again.answers == examples.answers
    assert again.contexts == examples.contexts and again.questions == examples.questions


def test_parquet_in_the_hub_layout_reads_like_jsonl(tmp_path):
    # The Hub's squad parquet files store answers as a struct of lists with int32 starts.
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"id": "q1", "question": "Who?", "context": "Ann met Bob.",
             "answers": {"text": ["Bob", "Bob."], "answer_start": [8, 8]}},
            {"id": "q2", "question": "Who met?", "context": "Ann met Bob.",
             "answers": {"text": ["Ann"], "answer_start": [0]}}]
    answers = pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("context", pa.string()),
                        ("answers", answers)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "s.parquet")
    from_parquet = SQUAD.load(DataConfig(), str(tmp_path / "s.parquet"))
    from_jsonl = SQUAD.load(DataConfig(), _write_rows(tmp_path / "s.jsonl", rows))
    assert from_parquet.answers == from_jsonl.answers == [[("Bob", 8), ("Bob.", 8)], [("Ann", 0)]]
    assert from_parquet.ids == ["q1", "q2"] and from_parquet.contexts == from_jsonl.contexts


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("row, message", [
    ({"id": "q7", "question": "Who?", "context": "Ann met Bob.",
      "answers": {"text": ["Bob"], "answer_start": [2]}}, r"question q7: answer_start 2 does not point at 'Bob'"),
    ({"id": "q8", "question": "Who?", "context": "  ", "answers": {"text": [], "answer_start": []}},
     r"question q8: the context is empty"),
    ({"id": "q9", "question": "Who?", "context": "Ann met Bob.",
      "answers": {"text": [], "answer_start": []}}, r"question q9: a question to learn from needs an answer"),
])
def test_bad_questions_are_named_by_id(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        SQUAD.load(DataConfig(), _write_rows(tmp_path / "bad.jsonl", [row]))


_GOOD = {"id": "q1", "question": "Who?", "context": "Ann met Bob."}


@pytest.mark.parametrize("answers, message", [
    ({"text": ["Bob"]}, r"question q1: answers must be"),                       # no answer_start
    ({"text": ["Bob", "Ann"], "answer_start": [8]}, r"question q1: answers needs lists .* same length"),
    ({"text": [None], "answer_start": [8]}, r"question q1: an answer's text must be a non-empty string"),
    ({"text": ["Bob"], "answer_start": [-4]}, r"question q1: answer_start must be a character index >= 0"),
    ({"text": ["Ann"], "answer_start": [False]}, r"question q1: answer_start must be .* got False"),
    ([{"text": "Bob"}], r"question q1: answers must be"),
])
def test_malformed_answers_are_named_by_id(tmp_path, answers, message):
    # Each of these once crashed without a question id or (a negative start, which slices from
    # the end of the context) was taken as valid.
    with pytest.raises(DataError, match=message):
        SQUAD.load(DataConfig(), _write_rows(tmp_path / "bad.jsonl", [{**_GOOD, "answers": answers}]))


def test_answers_as_a_list_of_dicts_read_like_the_hub_layout(tmp_path):
    hub = {**_GOOD, "answers": {"text": ["Bob", "Bob."], "answer_start": [8, 8]}}
    listed = {**_GOOD, "answers": [{"text": "Bob", "answer_start": 8}, {"text": "Bob.", "answer_start": 8}]}
    a = SQUAD.load(DataConfig(), _write_rows(tmp_path / "a.jsonl", [hub]))
    b = SQUAD.load(DataConfig(), _write_rows(tmp_path / "b.jsonl", [listed]))
    assert a.answers == b.answers == [[("Bob", 8), ("Bob.", 8)]]


def test_squad_json_answer_without_text_is_named(tmp_path):
    path = _squad_file(tmp_path / "s.json", [("Ann met Bob.", [("q5", "Who?", ["Bob"])])])
    data = json.loads(pathlib.Path(path).read_text())
    del data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["text"]
    pathlib.Path(path).write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"s\.json .*question q5: answers must be"):
        SQUAD.load(DataConfig(), path)


def test_skip_invalid_counts_bad_questions(tmp_path):
    good = {"id": "ok", "question": "Who?", "context": "Ann met Bob.",
            "answers": {"text": ["Bob"], "answer_start": [8]}}
    bad = {**good, "id": "bad", "answers": {"text": ["Bob"], "answer_start": [0]}}
    examples = SQUAD.load(DataConfig(skip_invalid=True), _write_rows(tmp_path / "r.jsonl", [good, bad]))
    assert examples.ids == ["ok"] and examples.skipped == {"answer mismatch": 1}


@pytest.mark.slow
def test_real_squad_files(data_dir):
    train = SQUAD.load(DataConfig(), str(data_dir / "squad" / "train-subset-v1.1.json"))
    dev = SQUAD.load(DataConfig(), str(data_dir / "squad" / "dev-half-v1.1.json"))
    def questions(path):  # counted from the JSON itself, as the official files nest them
        return sum(len(p["qas"]) for article in json.loads(path.read_text())["data"]
                   for p in article["paragraphs"])
    assert len(train) == questions(data_dir / "squad" / "train-subset-v1.1.json")
    assert len(dev) == questions(data_dir / "squad" / "dev-half-v1.1.json")
    assert np.mean([len(a) for a in dev.answers]) > 3


# ----------------------------------------------------------------------------- windows and decoding


def _long_context_task(tmp_path, stride=16, max_len=48):
    words = [f"word{i}" for i in range(60)]
    context = " ".join(words[:40]) + " The answer is Zanzibar today. " + " ".join(words[40:])
    path = _squad_file(tmp_path / "long.json", [(context, [("q", "Where is it?", ["Zanzibar"])])])
    task = tasks.resolve(task_config(name="squad", type="question_answering"),
                         DataConfig(doc_stride=stride))
    return task, task.load(DataConfig(), path), max_len


def test_a_question_too_long_for_the_window_is_named_before_tokenizing(tmp_path, tokenizer):
    # max_seq_len 48, stride 16, [CLS] q [SEP] c [SEP]: a question may have 48 - 3 - 16 - 1 = 28
    # tokens. Past that the tokenizer's own overflow fails with no question id.
    context = " ".join(f"word{i}" for i in range(80)) + " Zanzibar."
    fits = " ".join(["where"] * 28)
    path = _squad_file(tmp_path / "q.json", [(context, [("fits", fits, ["Zanzibar"]),
                                                        ("long", fits + "?", ["Zanzibar"])])])
    assert len(tokenizer(fits + "?", add_special_tokens=False)["input_ids"]) == 29
    task = tasks.resolve(task_config(name="squad", type="question_answering"), DataConfig(doc_stride=16))
    examples = task.load(DataConfig(), path)
    with pytest.raises(DataError, match=r"1 question\(s\) .* question long, has 29 tokens.* at most 28"):
        task.encode(examples, tokenizer, 48)
    first = examples.subset(np.array([0]), "first")
    assert len(task.encode(first, tokenizer, 48)) > 1  # 28 tokens: windows, no error


def test_doc_stride_defaults_to_a_quarter_of_the_window():
    assert DataConfig(max_seq_len=384).window_stride == 96
    assert DataConfig(max_seq_len=384, doc_stride=128).window_stride == 128
    # The default fits any window length, so a QA config may leave it out.
    task = tasks.resolve(task_config(name="squad", type="question_answering"), DataConfig(max_seq_len=64))
    assert task.doc_stride == 16


def test_windows_overlap_by_the_stride_and_label_the_answer(tmp_path, tokenizer):
    task, examples, max_len = _long_context_task(tmp_path)
    enc = task.encode(examples, tokenizer, max_len)
    assert len(enc) > 2 and enc.lengths.max() <= max_len
    char = enc.extras["context_offsets"]
    context = examples.contexts[0]
    spans = []
    for row in range(len(enc)):
        a, b = enc.offsets[row], enc.offsets[row + 1]
        in_context = [tuple(x) for x in char[a:b] if x[0] >= 0]
        spans.append(in_context)
        start, end = enc.labels[row]
        if start == 0:
            assert end == 0
            continue
        # The labelled tokens cover exactly the answer's characters.
        assert context[char[a + start, 0]:char[a + end, 1]] == "Zanzibar"
    assert any(enc.labels[row][0] > 0 for row in range(len(enc)))
    assert any(enc.labels[row][0] == 0 for row in range(len(enc)))  # windows without the answer
    for left, right in zip(spans, spans[1:]):
        assert left[-16:] == right[:16]  # neighbouring windows share doc_stride context tokens


def test_decoding_finds_the_best_valid_span_over_windows(tmp_path, tokenizer):
    task, examples, max_len = _long_context_task(tmp_path)
    enc = task.encode(examples, tokenizer, max_len)
    outputs = np.zeros((int(enc.offsets[-1]), 2), np.float32)
    row = next(r for r in range(len(enc)) if enc.labels[r][0] > 0)
    a = enc.offsets[row]
    start, end = enc.labels[row]
    outputs[a + start, 0] = 5.0
    outputs[a + end, 1] = 5.0
    # A better-scoring "span" that starts in the question must be passed over.
    outputs[a + 1, 0], outputs[a + 1, 1] = 9.0, 9.0
    texts, scores = task.answers_of(outputs, enc, examples)
    assert texts == ["Zanzibar"] and scores[0] == pytest.approx(10.0)
    assert task.scores(outputs, enc, examples) == {"f1": 1.0, "exact_match": 1.0}
    # Longer than max_answer_len tokens: not an answer, whatever its score.
    short = tasks.resolve(task_config(name="squad", max_answer_len=1), DataConfig(doc_stride=16))
    far = np.zeros_like(outputs)
    far[a + start, 0], far[a + end, 1] = 5.0, 5.0
    far[a + start, 1] = 0.1
    if end > start:
        assert short.answers_of(far, enc, examples)[0] != ["Zanzibar"]


def test_span_objective_matches_numpy():
    rng = np.random.default_rng(0)
    B, L = 3, 6
    logits = rng.normal(size=(B, L, 2)).astype(np.float32)
    mask = np.ones((B, L), np.int32)
    mask[1, 4:] = 0
    batch = {"attention_mask": mask, "labels": np.array([[1, 2], [0, 0], [3, 5]], np.int32),
             "weights": np.array([1.0, 0.5, 1.0], np.float32),
             "hard_weights": np.ones(3, np.float32)}  # every row labelled
    objective = tasks.objective(SQUAD.head())
    loss = float(objective.hard_loss(jnp.asarray(logits), batch))

    def ce(scores, m, y):
        scores = np.where(m > 0, scores, -np.inf)
        return -(scores[y] - np.log(np.exp(scores[m > 0]).sum()))

    per_row = [(ce(logits[b, :, 0], mask[b], batch["labels"][b, 0])
                + ce(logits[b, :, 1], mask[b], batch["labels"][b, 1])) / 2 for b in range(B)]
    w = batch["weights"]
    assert loss == pytest.approx(float((w * per_row).sum() / w.sum()), rel=1e-5)
