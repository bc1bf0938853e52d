"""The pipeline for token classification on a tiny random teacher and generated CoNLL files:
stages, export to BertForTokenClassification scored outside jaxkd, the teacher cache, kill -9
resume."""
import json
import pathlib

import pytest

# tiny_teacher and ner_data: conftest.py's random checkpoint and generated CoNLL files.
from helpers import (assert_kill_resume_matches, assert_trees_close, ner_config, run_in_process,
                     student_params)


def _read_conll(path):
    sentences, words, tags = [], [], []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    return sentences


@pytest.mark.slow
def test_ner_pipeline_end_to_end_and_scored_outside_jaxkd(tmp_path, tiny_teacher, ner_data):
    torch = pytest.importorskip("torch")
    seqeval = pytest.importorskip("seqeval.metrics")
    from transformers import AutoModelForTokenClassification, BertTokenizer

    cfg = ner_config(tmp_path / "run", tiny_teacher, ner_data)
    report = run_in_process(cfg)
    workdir = tmp_path / "run"
    stages = json.loads((workdir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("teacher", "distill", "export", "report"))
    assert report["task_type"] == "token_classification"
    metrics = report["student"]["metrics"]
    assert {"f1", "precision", "recall", "accuracy"} <= set(metrics)
    assert report["teacher"]["metrics"]["f1"] > 0.3  # the generated entities are easy to learn
    assert 0.0 <= report["agreement"]["test"] <= 1.0

    # The exported student, run by transformers; each word's tag read at its first sub-token.
    model, info = AutoModelForTokenClassification.from_pretrained(workdir / "student",
                                                                  output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.id2label[1] == "B-PER"
    tok = BertTokenizer.from_pretrained(workdir / "student")
    gold, pred = [], []
    for words, tags in _read_conll(ner_data / "test.txt"):
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.eval()(**enc).logits[0].argmax(-1).tolist()
        first, seen = {}, set()
        for position, word in enumerate(enc.word_ids(0)):
            if word is not None and word not in seen:
                seen.add(word)
                first[word] = ids[position]
        pred.append([model.config.id2label[first[w]] for w in range(len(words))])
        gold.append(tags)
    assert seqeval.f1_score(gold, pred) == pytest.approx(metrics["f1"], abs=0.01)

    again = run_in_process(cfg)
    assert again["student"]["metrics"] == report["student"]["metrics"]


@pytest.mark.slow
def test_ner_teacher_cache_gives_the_same_student(tmp_path, tiny_teacher, ner_data):
    common = {"distill.eval_every": None, "distill.steps": 10, "data.eval": None,
              "teacher.finetune.steps": 4}
    run_in_process(ner_config(tmp_path / "cached", tiny_teacher, ner_data,
                              **common, **{"distill.teacher_cache": True}))
    run_in_process(ner_config(tmp_path / "live", tiny_teacher, ner_data,
                              **common, **{"distill.teacher_cache": False}))
    assert list((tmp_path / "cached" / "cache").glob("teacher_logits-*.npy"))
    assert not list((tmp_path / "live" / "cache").glob("teacher_logits-*.npy"))
    assert_trees_close(student_params(tmp_path / "cached"), student_params(tmp_path / "live"), 1e-5)


@pytest.mark.slow
def test_ner_killed_run_resumes_to_the_same_result(tmp_path, tiny_teacher, ner_data):
    over = {"distill.steps": 48, "distill.eval_every": 24, "checkpoint.every_steps": 8,
            "log.every_steps": 2, "teacher.finetune.steps": 4, "distributed.cpu_devices": 4}
    assert_kill_resume_matches(
        lambda workdir, **o: ner_config(workdir, tiny_teacher, ner_data, **o), tmp_path, over, 20)
