"""jaxkd.checkpoint.Checkpointer: a save/restore round trip of a small pytree and its meta, the
best and latest steps, what is kept, and a save killed midway (a leftover tmp folder) ignored;
checkpoints proven complete before use (each fault done for real on the files: the damaged one
is moved aside, the previous one used), and a checkpoint of another shape refused in one line."""
import json
import logging
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import checkpoint
from jaxkd.checkpoint import Checkpointer, CheckpointError


def _tree(scale: float = 1.0) -> dict:
    scale = float(scale)
    return {"params": {"w": scale * jnp.arange(6.0).reshape(2, 3), "b": jnp.full((3,), scale)},
            "step": jnp.asarray(int(scale), jnp.int32)}


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_save_restore_round_trip_with_meta(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    meta = {"position": {"epoch": 1, "offset": 17}, "seed": 3}
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    assert ckpt.save(5, _tree(2.0), meta, eval_metric=0.75)
    ckpt.wait()
    state, restored_meta = ckpt.restore(5, _tree(0.0))
    _assert_same(state, _tree(2.0))
    assert restored_meta == {**meta, "eval_metric": 0.75}  # the metric is recorded in the meta
    assert ckpt.read_meta(5) == restored_meta
    ckpt.close()
    # A fresh Checkpointer on the same folder (a resumed run) finds and reads it.
    again = Checkpointer(tmp_path / "ckpt", keep=2)
    assert again.latest_step() == 5 and again.all_steps() == [5]
    _assert_same(again.restore(5, _tree(0.0))[0], _tree(2.0))
    again.close()


def test_best_step_is_the_highest_eval_metric_and_is_kept(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    metrics = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6}
    for step, value in metrics.items():
        ckpt.save(step, _tree(step), {"seed": 0}, eval_metric=value)
    ckpt.wait()
    assert ckpt.latest_step() == 4
    assert ckpt.best_step() == max(metrics, key=metrics.get) == 2
    # The newest `keep` and the best are kept, the rest deleted.
    assert sorted(ckpt.all_steps()) == [2, 3, 4]
    _assert_same(ckpt.restore(2, _tree(0.0))[0], _tree(2))
    ckpt.close()


def test_the_best_step_survives_a_resume(tmp_path):
    """A reopened Checkpointer (a resumed run) still knows the older steps' metrics: the best
    one is kept while newer, worse steps are saved, and steps without a metric do not evict it."""
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, _tree(1), {}, eval_metric=0.9)
    ckpt.save(2, _tree(2), {}, eval_metric=0.5)
    ckpt.close()
    again = Checkpointer(tmp_path, keep=1)
    for step, value in ((3, 0.4), (4, None), (5, 0.3)):
        again.save(step, _tree(step), {}, eval_metric=value)
    again.wait()
    assert sorted(again.all_steps()) == [1, 5] and again.best_step() == 1
    _assert_same(again.restore(1, _tree(0.0))[0], _tree(1))
    again.close()


def test_best_step_prefers_the_latest_of_ties_and_skips_steps_without_a_metric(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5, keep_best=False)
    for step, value in ((1, 0.8), (2, None), (3, 0.8), (4, None)):
        ckpt.save(step, _tree(step), {}, eval_metric=value)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3, 4] and ckpt.latest_step() == 4
    assert ckpt.best_step() == 3
    assert "eval_metric" not in ckpt.read_meta(4)
    ckpt.close()


def test_a_save_killed_midway_is_ignored(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(3, _tree(3), {"seed": 1}, eval_metric=0.5)
    ckpt.close()
    # What a save killed before its final rename leaves: the step's folder under a tmp name,
    # here a full copy of a finished one, so only the name tells it apart.
    shutil.copytree(directory / "3", directory / "7.orbax-checkpoint-tmp-1234567890")
    resumed = Checkpointer(directory, keep=3)
    assert resumed.latest_step() == 3 and resumed.all_steps() == [3]
    assert resumed.best_step() == 3
    state, meta = resumed.restore(resumed.latest_step(), _tree(0.0))
    _assert_same(state, _tree(3))
    assert meta == {"seed": 1, "eval_metric": 0.5}
    # The next save at that step goes through.
    assert resumed.save(7, _tree(7), {"seed": 1})
    resumed.wait()
    assert resumed.latest_step() == 7
    _assert_same(resumed.restore(7, _tree(0.0))[0], _tree(7))
    resumed.close()


# ---------------------------------------------------------------- proven complete


def _big(scale: float = 1.0) -> dict:
    """A tree whose kernel is too large for OCDBT to inline (> 1 KiB): a file of its own."""
    scale = float(scale)
    return {"params": {"kernel": scale * jnp.arange(2000.0).reshape(20, 100),
                       "bias": jnp.full((7,), scale)}, "step": jnp.asarray(int(scale), jnp.int32)}


def _files(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def _largest_array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _saved(directory, steps=(4, 8), keep=3):
    ckpt = Checkpointer(directory, keep=keep)
    for step in steps:
        ckpt.save(step, _big(step), {"batches": step, "seed": 1}, eval_metric=0.1 * step)
    ckpt.close()
    return _files(directory)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


FAULTS = {
    "truncated array file": (lambda d: _truncate(_largest_array_file(d)), r"state/\S+ truncated \(\d+ of \d+ bytes\)"),
    "a changed byte": (lambda d: _flip(_largest_array_file(d)), r"state/\S+ differs from what was written \(CRC-32\)"),
    "deleted array file": (lambda d: _largest_array_file(d).unlink(), r"state/\S+ missing"),
    "no _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), r"state/_METADATA missing"),
    "no meta item": (lambda d: shutil.rmtree(d / "meta"), r"item 'meta' missing"),
    "meta not JSON": (lambda d: (d / "meta" / "metadata").write_text('{"batches": 8,'),
                      r"meta/metadata is not valid JSON \(Expecting .*\)"),
    "no state item": (lambda d: shutil.rmtree(d / "state"), r"item 'state' missing"),
}


def test_each_finished_save_records_its_files_sizes_and_checksums(tmp_path):
    _saved(tmp_path / "ckpt")
    for step in (4, 8):
        step_dir = tmp_path / "ckpt" / str(step)
        record = json.loads((step_dir / checkpoint.RECORD).read_text())["files"]
        on_disk = {str(p.relative_to(step_dir)): p.stat().st_size for p in step_dir.rglob("*")
                   if p.is_file() and p.name != checkpoint.RECORD}
        assert {name: f["bytes"] for name, f in record.items()} == on_disk
        assert "state/_METADATA" in record and "meta/metadata" in record
        assert checkpoint.step_problem(step_dir) is None


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, fault,
                                                                             caplog):
    directory = tmp_path / "ckpt"
    before = _saved(directory)
    damage, reason = FAULTS[fault]
    damage(directory / "8")
    damaged = _files(directory / "8")
    ckpt = Checkpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING, logger="jaxkd"):
        step, state, meta = ckpt.restore_first_usable([8, 4], _big(0.0))
    assert step == 4 and meta["batches"] == 4
    _assert_same(state, _big(4))
    # One warning line: the step's folder, why, and where it went (kept, not deleted).
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert re.search(rf"^{re.escape(str(directory / '8'))}: {reason}; skipped it and moved it to "
                     rf"{re.escape(str(directory / 'unusable' / '8'))} \(kept, not deleted\)$",
                     lines[0]), lines[0]
    # Nothing already written is lost: step 4 as it was, step 8's remains under unusable/.
    assert _files(directory / "unusable" / "8") == damaged
    assert {k: v for k, v in _files(directory).items() if k.startswith("4/")} == \
        {k: v for k, v in before.items() if k.startswith("4/")}
    # The manager no longer sees step 8, so the resumed run can save it again.
    assert ckpt.all_steps() == [4] and ckpt.latest_step() == 4
    assert ckpt.save(8, _big(8), {"batches": 8})
    ckpt.wait()
    _assert_same(ckpt.restore_first_usable([8], _big(0.0))[1], _big(8))
    ckpt.close()


def test_a_checkpoint_without_its_record_is_checked_by_restoring_it(tmp_path):
    """A save whose process died before the record was written: orbax's commit is there, the
    record is not; its items are still checked, and a restore that fails is caught."""
    directory = tmp_path / "ckpt"
    _saved(directory)
    (directory / "8" / checkpoint.RECORD).unlink()
    ckpt = Checkpointer(directory, keep=3)
    assert ckpt.problem(8) is None
    assert ckpt.restore_first_usable([8, 4], _big(0.0))[0] == 8
    (directory / "8" / "state" / "manifest.ocdbt").unlink()
    assert ckpt.problem(8) is None  # nothing a file check sees
    step, _, _ = ckpt.restore_first_usable([8, 4], _big(0.0))
    assert step == 4 and (directory / "unusable" / "8").is_dir()
    ckpt.close()


def test_when_every_checkpoint_is_damaged_none_is_usable_and_all_are_kept(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    _saved(directory)
    _truncate(_largest_array_file(directory / "8"))
    shutil.rmtree(directory / "4" / "meta")
    ckpt = Checkpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING, logger="jaxkd"):
        assert ckpt.restore_first_usable([8, 4], _big(0.0)) is None
    assert sorted(p.name for p in (directory / "unusable").iterdir()) == ["4", "8"]
    assert sum("skipped it and moved it" in r.getMessage() for r in caplog.records) == 2
    assert ckpt.all_steps() == []
    ckpt.close()


def test_restore_best_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    from jaxkd import loop

    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, keep=2)
    for step, value in ((4, 0.9), (8, 0.5), (12, 0.6)):  # the best (4) is kept beside 8 and 12
        ckpt.save(step, _big(step), {"batches": step}, eval_metric=value)
    ckpt.wait()
    assert ckpt.best_step() == 4
    state, step = loop.restore_best(ckpt, _big(0.0), use_best=True)
    assert step == 4
    _assert_same(state, _big(4))
    ckpt.close()
    shutil.rmtree(directory / "4" / "meta")
    _truncate(_largest_array_file(directory / "12"))
    ckpt = Checkpointer(directory, keep=2)  # the rerun's
    with caplog.at_level(logging.WARNING, logger="jaxkd"):
        state, step = loop.restore_best(ckpt, _big(0.0), use_best=True)
    assert step == 8  # the best is unreadable: the newest complete one, not the newest
    _assert_same(state, _big(8))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(directory / "12") + ": state/" in w and "truncated" in w for w in warnings)
    assert "using the checkpoint of step 8 instead of step 12" in warnings[-1]
    # None usable: one line naming the folder and what to do.
    ckpt.close()
    _truncate(_largest_array_file(directory / "8"))
    ckpt = Checkpointer(directory, keep=2)
    with pytest.raises(CheckpointError) as err:
        loop.restore_best(ckpt, _big(0.0), use_best=True)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"no usable checkpoint left in {directory} (each was moved to "
                       f"{directory / 'unusable'}); delete {directory} and rerun to train the "
                       "ckpt stage again")
    ckpt.close()


def test_a_checkpoint_of_another_shape_is_one_clear_error(tmp_path):
    directory = tmp_path / "distill"
    ckpt = Checkpointer(directory, keep=2)
    ckpt.save(4, _big(4), {"batches": 4})
    ckpt.close()
    before = _files(directory)
    wider = {"params": {"kernel": jnp.zeros((20, 200)), "bias": jnp.zeros((7,))},
             "step": jnp.asarray(0, jnp.int32)}
    ckpt = Checkpointer(directory, keep=2)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore_first_usable([4], wider)
    message = str(err.value)
    assert message == (f"checkpoint {directory / '4'} holds a student of a different shape (e.g. "
                       "params/kernel: (20, 100) in the checkpoint, (20, 200) now); use a new "
                       "workdir or --restart distill")
    assert not re.search("partial_restore|orbax|tensorstore|strict", message, re.I)
    more = {**_big(0.0), "params": {**_big(0.0)["params"], "extra": jnp.zeros(3, jnp.bfloat16)}}
    with pytest.raises(CheckpointError, match=r"params/extra: not in the checkpoint, \(3,\) "
                                              r"bfloat16 now\); use a new workdir"):
        ckpt.restore_first_usable([4], more)
    ckpt.close()
    assert _files(directory) == before  # refused, not set aside


def test_best_step_skips_a_checkpoint_whose_meta_is_unreadable(tmp_path):
    directory = tmp_path / "ckpt"
    _saved(directory, steps=(4, 8, 12))
    shutil.rmtree(directory / "12" / "meta")
    ckpt = Checkpointer(directory, keep=3)
    assert ckpt.best_step() == 8
    ckpt.close()
