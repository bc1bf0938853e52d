"""jaxkd.checkpoint.Checkpointer: a save/restore round trip of a small pytree and its meta, the
best and latest steps, what is kept, and a save killed midway (a leftover tmp folder) ignored."""
import shutil

import jax.numpy as jnp
import numpy as np

from jaxkd.checkpoint import Checkpointer


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
