"""The pipeline for extractive QA on a tiny random teacher and a generated SQuAD file: stages, the
exported BertForQuestionAnswering decoded and scored outside jaxkd, kill -9 resume."""
import json

import numpy as np
import pytest

# tiny_teacher: conftest.py's random checkpoint.
from helpers import (ROOT, assert_kill_resume_matches, run_in_process, tiny_run_sections,
                     with_overrides, write_squad)

@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("squad")
    write_squad(out / "train.json", rng, 40)
    write_squad(out / "dev.json", rng, 8)
    return out


def qa_config(workdir, teacher, data, **over) -> dict:
    cfg = {
        "workdir": str(workdir), "seed": 2,
        "task": {"name": "squad", "type": "question_answering"},
        "data": {"train": str(data / "train.json"), "eval_fraction": 0.1,
                 "test": str(data / "dev.json"), "batch_size": 8, "max_seq_len": 48,
                 "doc_stride": 16},
        "teacher": {"model": str(teacher), "finetune": {"steps": 60, "learning_rate": 3e-3}},
        "student": {"layers": [0, 2]},
        **tiny_run_sections(),
    }
    return with_overrides(cfg, over)


def load_check_qa_export():
    """scripts/check_qa_export.py as a module: the official SQuAD v1.1 definitions and a
    transformers span decoder written out independently of jaxkd.tasks.qa."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "check_qa_export", ROOT / "scripts" / "check_qa_export.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


def _decode_with_transformers(workdir, squad_path):
    """Answers and F1s of the exported student as scripts/check_qa_export.py finds them outside
    jaxkd: transformers' model and overflowing-token windows with the run's settings (its
    config.yaml), n-best span search, and the official SQuAD v1.1 definitions written out again
    there (independent of jaxkd.tasks.qa)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    check = load_check_qa_export()
    max_len, stride, n_best, max_answer, _ = check.run_settings(workdir)
    model = AutoModelForQuestionAnswering.from_pretrained(workdir / "student").eval()
    tok = AutoTokenizer.from_pretrained(workdir / "student")
    data = json.loads(squad_path.read_text(encoding="utf-8"))["data"]
    answers, f1s = [], []
    for paragraph in (p for article in data for p in article["paragraphs"]):
        for qa in paragraph["qas"]:
            answers.append(check.best_answer(model, tok, qa["question"], paragraph["context"],
                                             max_len, stride, n_best, max_answer))
            f1s.append(max(check.f1(answers[-1], a["text"]) for a in qa["answers"]))
    return answers, f1s


@pytest.mark.slow
def test_qa_pipeline_end_to_end_and_scored_outside_jaxkd(tmp_path, tiny_teacher, qa_data):
    cfg = qa_config(tmp_path / "run", tiny_teacher, qa_data)
    report = run_in_process(cfg)
    workdir = tmp_path / "run"
    stages = json.loads((workdir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("teacher", "distill", "export", "report"))
    assert report["task_type"] == "question_answering"
    assert set(report["student"]["metrics"]) == {"f1", "exact_match"}
    assert report["teacher"]["metrics"]["f1"] > 0.05  # above chance: the answers are not all empty
    assert report["examples"] and {"question", "gold", "teacher", "student"} == set(report["examples"][0])
    assert "## Examples (test)" in (workdir / "report.md").read_text()
    answers, f1s = _decode_with_transformers(workdir, qa_data / "dev.json")
    assert np.mean(f1s) == pytest.approx(report["student"]["metrics"]["f1"], abs=0.02)
    # Answer by answer too, so equal F1s cannot hide different answers: report.md's examples are
    # the student's answers to the first test questions.
    assert [e["student"] for e in report["examples"]] == answers[:len(report["examples"])]


@pytest.mark.slow
def test_qa_killed_run_resumes_to_the_same_result(tmp_path, tiny_teacher, qa_data):
    over = {"distill.steps": 40, "distill.eval_every": 20, "checkpoint.every_steps": 8,
            "log.every_steps": 2, "teacher.finetune.steps": 4, "distributed.cpu_devices": 4}
    assert_kill_resume_matches(
        lambda workdir, **o: qa_config(workdir, tiny_teacher, qa_data, **o), tmp_path, over, 16)
