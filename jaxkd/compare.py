"""Whether distillation earned its keep: the KD student against its labels-only baseline
(`distill.baseline`), and whether the teacher was ready to teach.

Pure functions of scores (dicts of metric -> value per split) and eval curves; the pipeline
calls them in its report stage and after the teacher stage, and their sentences go to the log,
report.json and report.md as they are.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Scores = Mapping[str, float]


def kd_gain(student: Mapping[str, Scores], baseline: Mapping[str, Scores]) -> dict[str, dict[str, float]]:
    """Student minus baseline, per split both were scored on and per metric."""
    return {split: {name: student[split][name] - baseline[split][name]
                    for name in student[split] if name in baseline[split]}
            for split in student if split in baseline}


def kd_verdict(student: Mapping[str, Scores], baseline: Mapping[str, Scores], metric: str,
               searched: bool = False) -> str:
    """One sentence on the eval split (where model selection happens): whether KD beat the
    labels-only baseline, by how much, and what to try when it did not (`searched`: the KD
    settings were already chosen by `distill.search`)."""
    if "eval" not in student or "eval" not in baseline:
        return ("No eval split: KD and the labels-only baseline are not compared (set data.eval "
                "or data.eval_fraction).")
    s, b = student["eval"][metric], baseline["eval"][metric]
    if s > b:
        return f"KD beats the labels-only baseline on the eval split: {metric} {s:.4f} against {b:.4f} ({s - b:+.4f})."
    tries = "a teacher fine-tuned longer, or the baseline itself" if searched else \
        "distill.search over temperature and alpha, a teacher fine-tuned longer, or the baseline itself"
    return (f"KD does not beat the labels-only baseline on the eval split: {metric} {s:.4f} "
            f"against {b:.4f} ({s - b:+.4f}). Here the student gains nothing from this teacher at "
            f"these settings: try {tries}.")


def still_rising(curve: Sequence[tuple[int, float]]) -> bool:
    """Whether an eval curve ([(step, value)], higher is better) was still improving at its
    end: its last point is its best and above the one before."""
    values = [v for _, v in _finite(curve)]
    return len(values) >= 2 and values[-1] > values[-2] and values[-1] >= max(values)


def _finite(curve: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in curve if v is not None and math.isfinite(v)]


def teacher_readiness(curve: Sequence[tuple[int, float]], metric: str,
                      teacher_eval: float | None = None,
                      baseline_eval: float | None = None) -> list[str]:
    """Sentences (none when all is well) on a fine-tuned teacher: its eval `metric` curve still
    rising at the end of fine-tuning, and its eval score not above the labels-only student's."""
    notes = []
    if still_rising(curve):
        (s0, v0), (s1, v1) = _finite(curve)[-2:]
        notes.append(f"The teacher's eval {metric} was still rising when fine-tuning ended "
                     f"({v0:.4f} at step {s0}, {v1:.4f} at step {s1}): fine-tune it longer "
                     f"(teacher.finetune.steps or epochs).")
    if teacher_eval is not None and baseline_eval is not None and teacher_eval <= baseline_eval:
        notes.append(f"The teacher's eval {metric} ({teacher_eval:.4f}) is not above what a "
                     f"labels-only student of the student's size reaches ({baseline_eval:.4f}): "
                     f"it has little to teach; fine-tune it longer or use a stronger teacher.")
    return notes


def search_cost(distill_stage: Mapping) -> dict | None:
    """The search's record with its cost beside the run it chose: seconds of all candidates,
    seconds of the chosen setting's full training and their ratio. Each is timed by the process
    that ran it: after an interruption, the interrupted piece counts from its resumption."""
    search = distill_stage.get("search")
    if not search:
        return None
    full = search.get("full_run_seconds")  # absent from records older than its timing
    return {**search, "full_run_seconds": full,
            "cost_ratio": search["seconds"] / full if full else None}


def report_sections(*, metric: str, student: Mapping[str, Scores], teacher: Mapping[str, Scores],
                    baseline: Mapping[str, Scores] | None, teacher_curve: Sequence[tuple[int, float]],
                    stages: Mapping) -> dict:
    """The report's keys on whether KD earned its keep: `baseline` (its scores per split and on
    the report split), `kd_gain`, `kd_verdict`, `teacher_readiness` and `search` (where each
    applies)."""
    out: dict = {}
    if baseline is not None:
        report_split = "test" if "test" in baseline else "eval"
        out["baseline"] = {"splits": dict(baseline), "metrics": dict(baseline.get(report_split, {}))}
        out["kd_gain"] = kd_gain(student, baseline)
        out["kd_verdict"] = kd_verdict(student, baseline, metric,
                                       searched=bool(stages.get("distill", {}).get("search")))
    notes = teacher_readiness(teacher_curve, metric, teacher.get("eval", {}).get(metric),
                              None if baseline is None else baseline.get("eval", {}).get(metric))
    if notes or "teacher" in stages:
        out["teacher_readiness"] = notes
    search = search_cost(stages.get("distill", {}))
    if search is not None:
        out["search"] = search
    return out
