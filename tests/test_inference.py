"""jaxkd.inference.predict, the one prediction path, against a plain `apply_model` forward of
each row alone: per example (sequence heads) and per token (token heads, flat rows), over a
4-device mesh with bucketed batches and padding rows."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxkd import data as data_lib
from jaxkd import inference, sharding, steps
from jaxkd.model import apply_model, init_params


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def _rows(seed: int = 2, n: int = 13):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, 100, k).tolist() for k in rng.integers(2, 20, n)]
    return rows, data_lib.Encoded.from_lists(rows, [[0] * len(r) for r in rows], np.zeros(n, np.int32))


@functools.lru_cache
def _jit_apply(cfg):
    return jax.jit(lambda params, ids: apply_model(cfg, params, ids, jnp.ones_like(ids),
                                                   jnp.zeros_like(ids)).logits)


def _plain_forward(cfg, params, row) -> np.ndarray:
    """The logits of one row alone: no padding, no mesh, no batching (jitted on one device, as
    an eager forward dispatches thousands of small ops; test_steps checks jit against eager)."""
    ids = jax.device_put(np.asarray([row], np.int32), jax.devices()[0])
    return np.asarray(_jit_apply(cfg)(params, ids))[0]


@pytest.mark.slow  # the reference compiles once per row length (13); the test below has 3
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_prediction_path_equals_one_device_forward(mesh, kind):
    """inference.predict over a 4-device mesh, bucketed batches with padding rows: every row's
    outputs (flat per token for token heads) equal a plain forward of that row alone."""
    cfg = helpers.distill_configs(kind)[0]
    params = init_params(cfg, jax.random.key(0))
    rows, encoded = _rows()
    fn = jax.jit(steps.make_logits_fn(cfg), in_shardings=(None, sharding.batch_sharding(mesh)))
    out = inference.predict(fn, params, encoded, batch_size=8, mesh=mesh, bucket_multiple=8,
                            max_seq_len=24, per_token=kind == "token")
    assert out.shape == ((int(encoded.offsets[-1]), 3) if kind == "token" else (13, 3))
    for i, row in enumerate(rows):
        ref = _plain_forward(cfg, params, row)
        got = out[encoded.offsets[i]:encoded.offsets[i + 1]] if kind == "token" else out[i]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_rows_of_three_lengths_equal_their_plain_forward(mesh, kind):
    """As above on rows of three lengths (one per bucket: the reference compiles three times),
    in batches of 4 with a padding row: row i's output (per token: rows
    encoded.offsets[i]:offsets[i + 1]) equals its plain forward; `progress` sees every batch."""
    cfg = helpers.distill_configs(kind)[0]
    params = init_params(cfg, jax.random.key(3))
    per_token = kind == "token"
    rows = [[5 + i + j for j in range(n)] for i, n in enumerate([3, 9, 3, 17, 9, 3, 17])]
    encoded = data_lib.Encoded.from_lists(rows, [[0] * len(r) for r in rows],
                                          np.zeros(len(rows), np.int32))
    seen = []
    out = inference.predict(inference.jit_logits_fn(cfg, mesh), params, encoded, batch_size=4,
                            mesh=mesh, bucket_multiple=8, max_seq_len=24, per_token=per_token,
                            progress=lambda batches: (seen.append(b) or b for b in batches))
    assert out.shape == ((sum(map(len, rows)) if per_token else len(rows)), 3)
    assert out.dtype == np.float32
    assert len(seen) == 2  # 7 rows in batches of 4
    for i, row in enumerate(rows):
        got = out[encoded.offsets[i]:encoded.offsets[i + 1]] if per_token else out[i]
        np.testing.assert_allclose(got, _plain_forward(cfg, params, row), rtol=1e-5, atol=1e-5)


def test_one_device_mesh_gives_the_four_device_outputs(mesh):
    cfg = helpers.distill_configs("sequence")[0]
    params = init_params(cfg, jax.random.key(0))
    _, encoded = _rows(seed=4, n=11)
    outs = []
    for m in (mesh, sharding.make_mesh(jax.devices()[:1])):
        outs.append(inference.predict(inference.jit_logits_fn(cfg, m), params, encoded, batch_size=8,
                                      mesh=m, bucket_multiple=8, max_seq_len=24, per_token=False))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert inference.jit_logits_fn(cfg, mesh) is inference.jit_logits_fn(cfg, mesh)  # one per model


def test_to_host_returns_numpy():
    x = jnp.arange(6.0).reshape(2, 3)
    host = inference.to_host(x)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.arange(6.0).reshape(2, 3))


def test_a_stop_request_ends_prediction_between_batches_with_bounded_work_in_flight(mesh):
    """check_stop is asked every `in_flight` batches and may raise; the outputs of a prediction
    that is not stopped do not depend on how many batches are in flight."""
    cfg = helpers.distill_configs("sequence")[0]
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 100, 6).tolist() for _ in range(40)]
    encoded = data_lib.Encoded.from_lists(rows, [[0] * 6 for _ in rows], np.zeros(40, np.int32))
    fn = jax.jit(steps.make_logits_fn(cfg), in_shardings=(None, sharding.batch_sharding(mesh)))
    common = dict(batch_size=4, mesh=mesh, bucket_multiple=8, max_seq_len=8, per_token=False)
    asked = []

    def stop():
        asked.append(True)
        if len(asked) == 2:
            raise KeyboardInterrupt("stop")
    with pytest.raises(KeyboardInterrupt):
        inference.predict(fn, params, encoded, check_stop=stop, in_flight=2, **common)
    assert len(asked) == 2  # asked after batches 2 and 4 of 10, then stopped
    np.testing.assert_array_equal(inference.predict(fn, params, encoded, in_flight=1, **common),
                                  inference.predict(fn, params, encoded, in_flight=16, **common))
