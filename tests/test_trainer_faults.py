"""A damaged work directory, rerun: each fault done for real on a copy of one finished tiny run.

A truncated, deleted or changed file in the newest distillation checkpoint, its `_METADATA` or
its `meta` item gone: the rerun moves it aside (kept), resumes from the one before, and ends
with the student of the run that was never damaged, bit for bit. Every checkpoint damaged: the
stage starts again, same student. A student of another shape: one line, nothing touched. Another
seed or batch size: one line naming the key, old and new values. The exported teacher deleted or
damaged while stages.json says the teacher stage is done: exported again from the teacher's
checkpoints, same teacher, same student.
"""
import json
import logging
import re
import shutil

import numpy as np
import pytest

from helpers import assert_trees_close, run_in_process, student_params, tiny_config
from jaxkd import hf, loop, manifest
from jaxkd import report as report_lib
from jaxkd.checkpoint import RECORD, CheckpointError

pytestmark = pytest.mark.slow  # the pipeline end to end (one finished run, then a rerun per test)

# Evaluated once, at the last step: the selected student is the newest checkpoint's, so a
# resumed run must retrain it exactly. Checkpoints every 4 steps, the newest 2 kept.
OVER = {"distill.eval_every": 24}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher, sst2_small):
    """A finished run's workdir, its student's params and every file it wrote."""
    workdir = tmp_path_factory.mktemp("faults") / "ref"
    run_in_process(tiny_config(workdir, tiny_teacher, sst2_small, **OVER))
    return workdir, student_params(workdir), _files(workdir)


def _files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _under(files: dict, prefix: str) -> dict:
    return {k: v for k, v in files.items() if k.startswith(prefix)}


def _copy(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    return workdir


def _rerun(workdir, tiny_teacher, sst2_small, caplog, **over):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxkd"):
        run_in_process(tiny_config(workdir, tiny_teacher, sst2_small, **{**OVER, **over}))
    return [r.getMessage() for r in caplog.records if r.name == "jaxkd"]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jaxkd" and r.levelno >= logging.WARNING]


def assert_same_student(workdir, finished):
    for a, b in zip(jax_leaves(student_params(workdir)), jax_leaves(finished[1]), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FAULTS = {
    "truncated array file": (lambda d: _truncate(_array_file(d)), r"state/\S+ truncated"),
    "no _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), r"state/_METADATA missing"),
    "no meta item": (lambda d: shutil.rmtree(d / "meta"), r"item 'meta' missing"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_before_it(
        finished, tmp_path, tiny_teacher, sst2_small, caplog, fault):
    workdir = _copy(finished, tmp_path)
    ckpts = workdir / "checkpoints" / "distill"
    assert sorted(p.name for p in ckpts.iterdir()) == ["20", "24"]
    damage, reason = FAULTS[fault]
    damage(ckpts / "24")
    damaged = _files(ckpts / "24")
    messages = _rerun(workdir, tiny_teacher, sst2_small, caplog)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert re.fullmatch(rf"{re.escape(str(ckpts / '24'))}: {reason}.*; skipped it and moved it to "
                        rf"{re.escape(str(ckpts / 'unusable' / '24'))} \(kept, not deleted\)",
                        warnings[0]), warnings[0]
    assert f"distill: resuming at step 20 from {ckpts}" in messages
    assert_same_student(workdir, finished)
    after = _files(workdir)
    # Nothing already written is lost: the damaged checkpoint as it was, under unusable/; the
    # one resumed from, the teacher's checkpoints and export as they were; step 24 saved anew.
    assert _under(after, "checkpoints/distill/unusable/24/") == \
        {f"checkpoints/distill/unusable/24/{k}": v for k, v in damaged.items()}
    before = finished[2]
    for prefix in ("checkpoints/distill/20/", "checkpoints/teacher/", "teacher/"):
        assert _under(after, prefix) == _under(before, prefix), prefix
    assert RECORD in {p.name for p in (ckpts / "24").iterdir()}
    stages = json.loads((workdir / "stages.json").read_text())
    assert stages["distill"]["selected_step"] == 24


def test_with_every_checkpoint_damaged_the_stage_starts_again(finished, tmp_path, tiny_teacher,
                                                               sst2_small, caplog):
    workdir = _copy(finished, tmp_path)
    ckpts = workdir / "checkpoints" / "distill"
    _truncate(_array_file(ckpts / "24"))
    (ckpts / "20" / "state" / "_METADATA").unlink()
    messages = _rerun(workdir, tiny_teacher, sst2_small, caplog)
    warnings = _warnings(caplog)
    assert [w.split(":")[0] for w in warnings[:2]] == [str(ckpts / "24"), str(ckpts / "20")]
    assert warnings[2] == (f"distill: no usable checkpoint in {ckpts} (each was moved to "
                           f"{ckpts / 'unusable'}); starting the stage from scratch")
    assert len(warnings) == 3
    assert not any("resuming" in m for m in messages)
    assert_same_student(workdir, finished)
    assert sorted(p.name for p in (ckpts / "unusable").iterdir()) == ["20", "24"]


def test_a_student_of_another_shape_is_refused_in_one_line(finished, tmp_path, tiny_teacher,
                                                           sst2_small):
    """The finished run's student copies teacher layers (32 wide); this one is 16 wide."""
    workdir = _copy(finished, tmp_path)
    before = _under(_files(workdir), "checkpoints/")
    smaller = {"student.init": "shape", "student.num_layers": 2, "student.hidden_size": 16,
               "student.num_heads": 2, "student.intermediate_size": 32}
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **{**OVER, **smaller})
    with pytest.raises(manifest.ChangedConfig, match="student.hidden_size: 312 -> 16"):
        run_in_process(cfg)  # the run manifest refuses it first, naming the keys
    # Without the manifest (a workdir of older code), the checkpoint's shapes still refuse it.
    (workdir / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        run_in_process(tiny_config(workdir, tiny_teacher, sst2_small, **{**OVER, **smaller}))
    message = str(err.value)
    ckpts = workdir / "checkpoints" / "distill"
    assert re.fullmatch(
        rf"checkpoint {re.escape(str(ckpts / '24'))} holds a student of a different shape "
        r"\(e\.g\. params/\S+: \(\d+, 32\) in the checkpoint, \(\d+, 16\) now; \d+ of \d+ "
        r"arrays differ\); use a new workdir or --restart distill", message), message
    assert not re.search("partial_restore|orbax|tensorstore", message, re.I)
    assert _under(_files(workdir), "checkpoints/") == before  # refused, nothing moved


def _delete(teacher_dir):
    shutil.rmtree(teacher_dir)


def _truncate_weights(teacher_dir):
    _truncate(teacher_dir / "model.safetensors")


def _change_a_weight(teacher_dir):
    """One byte of a tensor changed: the file still loads, only the check record tells."""
    path = teacher_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_delete, "no such directory"),
    (_truncate_weights, "incomplete metadata|file not fully covered|deserializ"),
    (_change_a_weight, "its weights: its contents differ from what was written"),
])
def test_a_missing_or_damaged_exported_teacher_is_exported_again(
        finished, tmp_path, tiny_teacher, sst2_small, caplog, damage, reason):
    workdir = _copy(finished, tmp_path)
    damage(workdir / "teacher")
    _rerun(workdir, tiny_teacher, sst2_small, caplog)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert re.fullmatch(rf"teacher: the exported teacher {re.escape(str(workdir / 'teacher'))} is "
                        rf"missing or unreadable \(.*({reason}).*\); exporting it again from its "
                        rf"checkpoints in {re.escape(str(workdir / 'checkpoints' / 'teacher'))}",
                        warnings[0]), warnings[0]
    before, after = finished[2], _files(workdir)
    # The same export, byte for byte, but for the tokenizer's saved truncation state, which is
    # whatever the tokenizer last did (the first run tokenised the data, this one read the cache).
    same = lambda files: {k: v for k, v in _under(files, "teacher/").items()  # noqa: E731
                          if k != "teacher/tokenizer.json"}
    assert same(after) == same(before)
    assert {"teacher/model.safetensors", "teacher/config.json", "teacher/params.check.json"} <= set(same(after))
    for prefix in ("checkpoints/teacher/", "checkpoints/distill/"):
        assert _under(after, prefix) == _under(before, prefix), prefix
    assert_same_student(workdir, finished)
    hf.load_hf(workdir / "teacher")


def test_a_rerun_of_a_whole_workdir_warns_of_nothing(finished, tmp_path, tiny_teacher, sst2_small,
                                                     caplog):
    workdir = _copy(finished, tmp_path)
    report = (workdir / "report.json").read_bytes()
    _rerun(workdir, tiny_teacher, sst2_small, caplog)
    assert _warnings(caplog) == []
    assert_same_student(workdir, finished)
    # The report and its measurements are kept (--restart report measures again); the student
    # is written again whole, with nothing left beside it.
    assert (workdir / "report.json").read_bytes() == report
    assert sorted(p.name for p in workdir.glob("student*")) == ["student"]


@pytest.mark.parametrize("over, change", [
    ({"seed": 4}, "seed: 3 -> 4"),
    ({"data.batch_size": 16}, "data.batch_size: 8 -> 16"),
])
def test_a_resume_with_another_seed_or_batch_size_names_the_key(finished, tmp_path, tiny_teacher,
                                                                sst2_small, over, change):
    workdir = _copy(finished, tmp_path)
    # Without its manifest (a workdir of older code): the run manifest would refuse the change
    # first (tests/test_manifest.py); the checkpoint's own record of the data position remains.
    (workdir / "manifest.json").unlink()
    before = _under(_files(workdir), "checkpoints/")
    with pytest.raises(loop.ChangedSettings) as err:
        run_in_process(tiny_config(workdir, tiny_teacher, sst2_small, **{**OVER, **over}))
    ckpts = workdir / "checkpoints" / "distill"
    assert str(err.value) == (f"distill: checkpoint {ckpts / '24'} was written with other settings "
                              f"({change}); use a new workdir, or --restart distill to run the "
                              "stage again with these")
    assert _under(_files(workdir), "checkpoints/") == before


def test_a_stop_during_an_evaluation_keeps_the_steps_and_evaluates_on_resume(
        tmp_path, tiny_teacher, sst2_small, monkeypatch):
    """SIGTERM while the step-12 evaluation runs: the state of step 12 is saved (not the 0 steps
    of the last checkpoint), the rerun evaluates it first, and the run ends as one never
    stopped: same student, same selection, each eval row once."""
    over = {"teacher.finetune.steps": 0, "distill.teacher_cache": False,
            "checkpoint.every_steps": 1000}
    reference = run_in_process(tiny_config(tmp_path / "ref", tiny_teacher, sst2_small, **over))
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **over)
    predict, calls = loop.Runtime.predict, []

    def stopped_in_first_eval(self, *args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 1:
            self.preempt = True  # what the SIGTERM handler sets
        return predict(self, *args, **kwargs)
    monkeypatch.setattr(loop.Runtime, "predict", stopped_in_first_eval)
    with pytest.raises(loop.Preempted, match="during the evaluation of step 12"):
        run_in_process(cfg)
    monkeypatch.setattr(loop.Runtime, "predict", predict)
    meta = json.loads((workdir / "checkpoints" / "distill" / "12" / "meta" / "metadata").read_text())
    assert meta["eval_pending"] and meta["batches"] == 12
    resumed = run_in_process(cfg)
    assert resumed["student"]["metrics"] == reference["student"]["metrics"]
    assert_trees_close(student_params(workdir), student_params(tmp_path / "ref"), 1e-6)
    evals = [r["step"] for r in report_lib.read_metrics(workdir)
             if r.get("stage") == "distill" and r.get("split") == "eval"]
    assert evals == [12, 24]
