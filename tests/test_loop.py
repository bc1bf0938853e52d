"""jaxkd.loop.run_steps on a toy step: metric windows against NumPy, the dropout keys, the
host-side check one step late, and stopping as train_loop needs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import loop, sharding


def toy_step(state, batch, rng):
    """state: a running sum. Metrics: the batch mean as the loss, a draw from the step's key."""
    mean = jnp.mean(batch["x"])
    return state + mean, {"loss/total": mean, "draw": jax.random.uniform(rng),
                          "learning_rate": 0.1 * state}


def toy_batches(values):
    """Batches of 4 rows, each row the step's value (inf or nan ones too)."""
    return iter([{"x": np.full(4, v, np.float32)} for v in values])


def test_run_steps_windows_match_numpy():
    values = np.arange(1.0, 8.0, dtype=np.float32)  # 7 steps, windows read after steps 3 and 7
    rng = jax.random.key(5)
    mesh = sharding.make_mesh()
    read = {}

    def after_step(done, state, metrics):
        if done in (3, 7):
            assert metrics.sync(done) == pytest.approx(values[done - 1])
            read[done] = (metrics.read_window(), float(state))

    state, metrics = loop.run_steps(toy_step, jnp.float32(0), toy_batches(values), rng=rng, mesh=mesh,
                                    stop=7, after_step=after_step)
    draws = np.array([float(jax.random.uniform(jax.random.fold_in(rng, i))) for i in range(7)])
    for done, first in ((3, 0), (7, 3)):
        (means, averaged), state_then = read[done]
        assert averaged == done - first
        np.testing.assert_allclose(means["loss/total"], values[first:done].mean(), rtol=1e-6)
        np.testing.assert_allclose(means["draw"], draws[first:done].mean(), rtol=1e-6)
        # The learning rate is the newest step's, not a mean: 0.1 x the sum before that step.
        np.testing.assert_allclose(means["learning_rate"], 0.1 * values[:done - 1].sum(), rtol=1e-6)
        np.testing.assert_allclose(state_then, values[:done].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(state), values.sum(), rtol=1e-6)
    assert metrics.pending is None and metrics.window_steps == 0


def test_run_steps_checks_every_step_once_one_step_late():
    checked, dispatched = [], []

    def check(host_metrics, step):
        checked.append((step, float(host_metrics["loss/total"]), len(dispatched)))
        return float(host_metrics["loss/total"])

    def after_step(done, state, metrics):
        dispatched.append(done)

    loop.run_steps(toy_step, jnp.float32(0), toy_batches([1.0, 2.0, 3.0, 4.0, 5.0]),
                   rng=jax.random.key(0), mesh=sharding.make_mesh(), start=1, stop=5, check=check,
                   after_step=after_step)
    # Steps 2..5 (resumed at 1): each checked once with its own metrics, while the next one
    # runs, and the last before run_steps returns.
    assert [(s, v) for s, v, _ in checked] == [(2, 1.0), (3, 2.0), (4, 3.0), (5, 4.0)]
    assert [n for _, _, n in checked] == [1, 2, 3, 4]
    assert dispatched == [2, 3, 4, 5]


def test_run_steps_resumed_draws_the_same_keys():
    rng, mesh = jax.random.key(1), sharding.make_mesh()
    seen = {}

    def after_step(done, state, metrics):
        seen.setdefault(done, []).append(float(metrics.last["draw"]))

    loop.run_steps(toy_step, jnp.float32(0), toy_batches([1.0] * 6), rng=rng, mesh=mesh, stop=6,
                   after_step=after_step)
    loop.run_steps(toy_step, jnp.float32(0), toy_batches([1.0] * 3), rng=rng, mesh=mesh, start=3,
                   stop=6, after_step=after_step)
    assert all(len(v) == 2 and v[0] == v[1] for k, v in seen.items() if k > 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_steps(bad):
    values = [1.0, 2.0, bad, 4.0, 5.0, 6.0]
    batches = toy_batches(values)
    with pytest.raises(loop.NonFiniteLoss, match="at step 3"):
        loop.run_steps(toy_step, jnp.float32(0), batches, rng=jax.random.key(0),
                       mesh=sharding.make_mesh(), stop=6)
    # Found while step 4 ran, so steps 5 and 6 never started.
    assert len(list(batches)) == 2
    # As the last step, it is found before run_steps returns.
    with pytest.raises(loop.NonFiniteLoss, match="at step 2"):
        loop.run_steps(toy_step, jnp.float32(0), toy_batches([1.0, bad]), rng=jax.random.key(0),
                       mesh=sharding.make_mesh(), stop=2)


def test_after_step_stops_the_loop_and_flush_checks_the_step_in_flight():
    """How train_loop stops at a SIGTERM: flush the pending check, then raise."""
    checked = []

    def check(host_metrics, step):
        checked.append(step)
        return float(host_metrics["loss/total"])

    def after_step(done, state, metrics):
        if done == 2:
            metrics.flush()
            raise loop.Preempted("stop")

    batches = toy_batches([1.0] * 10)
    with pytest.raises(loop.Preempted):
        loop.run_steps(toy_step, jnp.float32(0), batches, rng=jax.random.key(0),
                       mesh=sharding.make_mesh(), stop=10, check=check, after_step=after_step)
    assert checked == [1, 2]


def test_total_steps_and_eval_points():
    assert loop.total_steps(7, 3.0, 10) == 7
    assert loop.total_steps(None, 1.5, 10) == 15
    assert loop.total_steps(None, 0.01, 10) == 1
    assert loop._eval_points(25, 10, None) == {10, 20, 25}
    assert loop._eval_points(25, 10, 12) == {12, 24, 25}


def test_sigterm_stops_the_runtimes_predictions_between_batches(tmp_path):
    """The work between steps (the teacher cache, evaluation) asks the run-time whether to stop:
    after SIGTERM's flag, a prediction ends with Preempted naming what it was doing."""
    import helpers
    from jaxkd import config as config_lib
    from jaxkd import data as data_lib
    from jaxkd.model import init_params

    cfg = config_lib.from_dict({"workdir": str(tmp_path), "data": {"batch_size": 4},
                                "log": {"tensorboard": False, "progress": False}})
    model_cfg = helpers.distill_configs("sequence")[0]
    params = init_params(model_cfg, jax.random.key(0))
    rows = [[5, 6, 7, 8]] * 80
    encoded = data_lib.Encoded.from_lists(rows, [[0] * 4] * 80, np.zeros(80, np.int32))
    with loop.Runtime(cfg, tmp_path) as rt:
        assert rt.predict(model_cfg, params, encoded, False).shape[0] == 80
        rt.preempt = True
        with pytest.raises(loop.Preempted, match="teacher cache: SIGTERM received"):
            rt.predict(model_cfg, params, encoded, False, desc="teacher cache")


def test_changed_settings_name_the_config_keys_with_old_and_new_values():
    def position(seed, batch, rows):
        return {"epoch": 0, "step": 3, "seed": seed, "num_examples": rows, "batch_size": batch}

    meta = {"seed": 4, "data": position(4, 8, 160)}
    assert loop.changed_settings(meta, position(4, 8, 160), seed=4, seed_offset=1) == []
    # The distill stage's seed is the config's + 1: the message gives the config's values.
    assert loop.changed_settings(meta, position(6, 16, 150), seed=6, seed_offset=1) == [
        "seed: 3 -> 5", "data.batch_size: 8 -> 16", "labelled training rows (data.train): 160 -> 150"]

    def mixed(labelled, transfer, transfer_rows):
        return {"labelled": position(0, labelled, 160), "transfer": position(0, transfer, transfer_rows)}

    meta = {"seed": 0, "data": mixed(6, 2, 500)}
    assert loop.changed_settings(meta, mixed(6, 2, 500), seed=0) == []
    assert loop.changed_settings(meta, mixed(4, 4, 400), seed=0) == [
        "data.unlabeled_ratio: 2 -> 4 transfer rows per batch",
        "transfer training rows (data.unlabeled or distill.augment): 500 -> 400"]
    assert loop.changed_settings(meta, position(0, 8, 160), seed=0) == [  # transfer rows gone
        "data.unlabeled_ratio: 2 -> 0 transfer rows per batch",
        "transfer training rows (data.unlabeled or distill.augment): 500 -> 0"]
