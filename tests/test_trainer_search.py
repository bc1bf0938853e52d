"""The labels-only baseline (distill.baseline) and the search of temperature and alpha
(distill.search) in the pipeline, on the tiny random teacher: the baseline's init, steps, seed
and batches are the KD student's; the search reads the eval split only; both resume exactly."""
import json

import jax
import numpy as np
import pytest

from helpers import assert_kill_resume_matches, assert_trees_close, run_in_process, tiny_config
from jaxkd import steps, trainer
from jaxkd.config import ConfigError

SEARCH = {"temperature": [1.0, 4.0], "alpha": [0.3, 0.9], "steps": 8}


def _record_trainings(monkeypatch) -> dict:
    """Each stage's student params at step 0 and at the end, by stage name."""
    seen: dict = {}
    create, train_student = steps.TrainState.create, trainer.train_student

    def recording_create(params, tx, **kw):
        seen.setdefault("init", []).append(jax.device_get(params))
        return create(params, tx, **kw)

    def recording_train(rt, plan, run_, distill, stage, **kw):
        before = len(seen.get("init", []))
        params, info, proj = train_student(rt, plan, run_, distill, stage, **kw)
        seen[stage] = {"init": seen["init"][before], "final": params, "info": info}
        return params, info, proj

    monkeypatch.setattr(steps.TrainState, "create", staticmethod(recording_create))
    monkeypatch.setattr(trainer, "train_student", recording_train)
    return seen


@pytest.mark.slow  # three short pipeline runs
def test_baseline_is_the_kd_students_init_trained_on_the_labels_alone(tmp_path, tiny_teacher,
                                                                      sst2_small, monkeypatch):
    over = {"teacher.finetune.steps": 0, "data.test": str(sst2_small / "eval.tsv")}
    seen = _record_trainings(monkeypatch)
    report = run_in_process(tiny_config(tmp_path / "kd", tiny_teacher, sst2_small,
                                        **over, **{"distill.baseline": True}))
    kd, baseline = seen["distill"], seen["baseline"]
    assert_trees_close(kd["init"], baseline["init"], 0)  # equal params at step 0
    assert baseline["info"]["steps"] == kd["info"]["steps"] == 24
    stages = json.loads((tmp_path / "kd" / "stages.json").read_text())
    assert stages["baseline"]["steps"] == stages["distill"]["steps"]
    # A run of the labels alone (alpha 0), same seed: the same params as the baseline stage.
    seen.clear()
    labels = run_in_process(tiny_config(tmp_path / "labels", tiny_teacher, sst2_small,
                                        **over, **{"distill.alpha": 0.0}))
    assert_trees_close(seen["distill"]["final"], baseline["final"], 0)
    assert report["baseline"]["splits"] == labels["student"]["splits"]
    gain = report["kd_gain"]["test"]["accuracy"]
    assert gain == report["student"]["splits"]["test"]["accuracy"] - labels["student"]["splits"]["test"]["accuracy"]
    assert report["kd_verdict"].startswith("KD ")
    md = (tmp_path / "kd" / "report.md").read_text()
    assert "labels-only baseline |" in md and report["kd_verdict"] in md


@pytest.mark.slow  # two short pipeline runs with a search of four candidates
def test_search_chooses_on_the_eval_split_and_never_reads_the_test_split(tmp_path, tiny_teacher,
                                                                        sst2_small, monkeypatch):
    lines = (sst2_small / "eval.tsv").read_text().splitlines()
    test = tmp_path / "test.tsv"
    test.write_text("\n".join(lines) + "\n")
    poisoned = tmp_path / "poisoned.tsv"  # the same sentences, every label flipped
    poisoned.write_text("\n".join([lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in
                                               (x.split("\t") for x in lines[1:])]) + "\n")
    scored = []
    evaluate = trainer.evaluate

    def spy(rt, task, model_cfg, params, split):
        scored.append(split.source)
        return evaluate(rt, task, model_cfg, params, split)

    monkeypatch.setattr(trainer, "evaluate", spy)
    records = []
    for name, test_file in (("clean", test), ("poisoned", poisoned)):
        cfg = tiny_config(tmp_path / name, tiny_teacher, sst2_small,
                          **{"teacher.finetune.steps": 0, "data.test": str(test_file),
                             "distill.search": SEARCH, "distill.eval_every": None})
        scored.clear()
        report = run_in_process(cfg)
        record = json.loads((tmp_path / name / "search.json").read_text())
        records.append(([{k: c[k] for k in ("temperature", "alpha", "eval")} for c in record["candidates"]],
                        record["chosen"]))
        searched = scored[:4]  # the four candidates' scores come first, before the full run's
        assert searched == [str(sst2_small / "eval.tsv")] * 4
        assert report["search"]["setting"] == {k: record["candidates"][record["chosen"]][k]
                                               for k in ("temperature", "alpha")}
        # The report describes the distillation that ran: the chosen setting, and the grid.
        assert {k: report["distill"][k] for k in ("temperature", "alpha")} == report["search"]["setting"]
        assert report["distill"]["search"]["temperature"] == [1.0, 4.0]
    assert records[0] == records[1]
    assert len(records[0][0]) == 4


def test_search_without_an_eval_split_is_refused_before_work(tmp_path, tiny_teacher, sst2_small):
    cfg = tiny_config(tmp_path / "run", tiny_teacher, sst2_small,
                      **{"data.eval": None, "data.test": str(sst2_small / "eval.tsv"),
                         "distill.search": SEARCH})
    with pytest.raises(ConfigError, match="distill.search chooses temperature and alpha on the eval split"):
        run_in_process(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # train.py killed in the middle of the search, then run again
def test_a_search_killed_in_its_second_candidate_resumes_to_the_same_result(tmp_path, tiny_teacher,
                                                                            sst2_small):
    over = {"teacher.finetune.steps": 0, "distill.search": {**SEARCH, "temperature": [1.0, 4.0, 8.0],
                                                            "alpha": [0.5]},
            "distill.baseline": True}
    resumed = assert_kill_resume_matches(
        lambda workdir, **kw: tiny_config(workdir, tiny_teacher, sst2_small, **kw), tmp_path, over,
        kill_at=4, stage="search_1")

    def candidates(workdir):
        return [{k: c[k] for k in ("temperature", "alpha", "eval")}
                for c in json.loads((workdir / "search.json").read_text())["candidates"]]
    assert candidates(tmp_path / "run") == candidates(tmp_path / "ref")
    reference = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert resumed["baseline"] == reference["baseline"]
    assert np.isfinite(resumed["kd_gain"]["eval"]["accuracy"])
