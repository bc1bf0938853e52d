"""KD against the labels-only baseline and the teacher's readiness (jaxkd.compare), on
hand-made scores and curves."""
import math

import pytest

from jaxkd import compare


def test_kd_gain_is_student_minus_baseline_per_split_and_metric():
    student = {"eval": {"accuracy": 0.81, "f1": 0.70}, "test": {"accuracy": 0.80, "f1": 0.69}}
    baseline = {"eval": {"accuracy": 0.79, "f1": 0.72}, "test": {"accuracy": 0.80, "f1": 0.60}}
    gain = compare.kd_gain(student, baseline)
    assert gain["eval"] == pytest.approx({"accuracy": 0.02, "f1": -0.02})
    assert gain["test"] == pytest.approx({"accuracy": 0.0, "f1": 0.09})


def test_verdict_reads_the_eval_split_only():
    baseline = {"eval": {"f1": 0.50}, "test": {"f1": 0.10}}
    better = compare.kd_verdict({"eval": {"f1": 0.52}, "test": {"f1": 0.0}}, baseline, "f1")
    assert better.startswith("KD beats the labels-only baseline on the eval split") and "+0.0200" in better
    worse = compare.kd_verdict({"eval": {"f1": 0.49}, "test": {"f1": 0.9}}, baseline, "f1")
    assert worse.startswith("KD does not beat") and "-0.0100" in worse and "distill.search" in worse
    tie = compare.kd_verdict({"eval": {"f1": 0.50}}, baseline, "f1")
    assert tie.startswith("KD does not beat")
    searched = compare.kd_verdict({"eval": {"f1": 0.49}}, baseline, "f1", searched=True)
    assert "distill.search" not in searched and "fine-tuned longer" in searched
    assert "No eval split" in compare.kd_verdict({"test": {"f1": 1.0}}, {"test": {"f1": 0.0}}, "f1")


@pytest.mark.parametrize("curve, rising", [
    ([(100, 0.80), (200, 0.85)], True),
    ([(100, 0.80), (200, 0.85), (300, 0.84)], False),   # fell at the end
    ([(100, 0.86), (200, 0.80), (300, 0.85)], False),   # rose, but the best came earlier
    ([(100, 0.85), (200, 0.85)], False),                # flat
    ([(100, 0.85)], False),                             # one point says nothing
    ([], False),
    ([(100, 0.80), (200, math.nan), (300, 0.82)], True),  # NaN points skipped
])
def test_still_rising(curve, rising):
    assert compare.still_rising(curve) is rising


def test_teacher_readiness_names_the_rising_curve_and_a_teacher_no_better_than_the_baseline():
    notes = compare.teacher_readiness([(100, 0.80), (200, 0.85)], "accuracy", 0.85, 0.86)
    assert len(notes) == 2
    assert "still rising" in notes[0] and "0.8000 at step 100" in notes[0] and "0.8500 at step 200" in notes[0]
    assert "not above" in notes[1] and "(0.8500)" in notes[1] and "(0.8600)" in notes[1]
    assert compare.teacher_readiness([(100, 0.85), (200, 0.84)], "accuracy", 0.90, 0.86) == []
    # A point without a value (a NaN Pearson) is left out of both the test and the sentence.
    nan = compare.teacher_readiness([(100, 0.80), (200, 0.85), (300, float("nan")), (400, None)],
                                    "pearson")
    assert nan == [nan[0]] and "0.8000 at step 100, 0.8500 at step 200" in nan[0]
    assert compare.teacher_readiness([], "accuracy", 0.90, None) == []


def test_report_sections_with_and_without_a_baseline_and_search():
    stages = {"teacher": {"done": True}, "distill": {"seconds": 130.0, "search": {
        "candidates": [{"temperature": 1.0, "alpha": 0.5, "eval": {"accuracy": 0.7}, "seconds": 20.0},
                       {"temperature": 4.0, "alpha": 0.5, "eval": {"accuracy": 0.8}, "seconds": 10.0}],
        "chosen": 1, "setting": {"temperature": 4.0, "alpha": 0.5}, "steps_per_candidate": 10,
        "seconds": 30.0, "full_run_seconds": 100.0}}}
    out = compare.report_sections(metric="accuracy", student={"eval": {"accuracy": 0.8}, "test": {"accuracy": 0.7}},
                                  teacher={"eval": {"accuracy": 0.9}},
                                  baseline={"eval": {"accuracy": 0.75}, "test": {"accuracy": 0.72}},
                                  teacher_curve=[(1, 0.9), (2, 0.8)], stages=stages)
    assert out["baseline"]["metrics"] == {"accuracy": 0.72}  # the report split: test
    assert out["kd_gain"]["test"]["accuracy"] == pytest.approx(-0.02)
    assert out["kd_verdict"].startswith("KD beats") and out["teacher_readiness"] == []
    assert out["search"]["full_run_seconds"] == 100.0 and out["search"]["cost_ratio"] == pytest.approx(0.3)
    # a record from before the full run was timed on its own: no ratio rather than a guess
    old = {"distill": {"seconds": 130.0, "search": {k: v for k, v in stages["distill"]["search"].items()
                                                    if k != "full_run_seconds"}}}
    earlier = compare.report_sections(metric="accuracy", student={"eval": {"accuracy": 0.8}},
                                      teacher={}, baseline=None, teacher_curve=[], stages=old)
    assert earlier["search"]["full_run_seconds"] is None and earlier["search"]["cost_ratio"] is None
    bare = compare.report_sections(metric="accuracy", student={"eval": {"accuracy": 0.8}}, teacher={},
                                   baseline=None, teacher_curve=[], stages={"distill": {"seconds": 5}})
    assert bare == {}
