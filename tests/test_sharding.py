"""Mesh, shardings, placement, global batches, compiled steps and distributed start (the
prediction path over a mesh: test_inference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from jaxkd import sharding, steps
from jaxkd.model import init_params
from jaxkd.optim import make_optimizer


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def test_make_mesh_is_one_auto_axis_over_all_devices(mesh):
    assert mesh.axis_names == ("data",) and mesh.size == 4
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert sharding.make_mesh(jax.devices()[:1], axis="batch").shape == {"batch": 1}
    with pytest.raises(ValueError, match="at least one device"):
        sharding.make_mesh([])


def test_fsdp_shards_largest_divisible_dimension(mesh):
    tree = {"wide": jax.ShapeDtypeStruct((64, 100), jnp.float32),
            "square": jax.ShapeDtypeStruct((4, 4), jnp.float32),
            "odd": jax.ShapeDtypeStruct((7, 9), jnp.float32),
            "tiny": jax.ShapeDtypeStruct((8,), jnp.float32)}
    specs = {k: s.spec for k, s in sharding.fsdp_param_shardings(mesh, tree, min_size=16).items()}
    assert specs == {"wide": P(None, "data"), "square": P("data"), "odd": P(), "tiny": P()}
    default = sharding.fsdp_param_shardings(mesh, tree)
    assert all(s.spec == P() for s in default.values())  # all below the default size


def test_shard_state_copies_so_donation_keeps_callers_arrays(mesh):
    tree = {"w": jnp.arange(8.0), "b": jnp.ones(())}
    shardings = sharding.tree_shardings(mesh, tree)
    placed = sharding.shard_state(tree, mesh)
    double = sharding.compile_step(lambda t: jax.tree.map(lambda x: 2 * x, t), (shardings,), shardings)
    out = double(placed)
    assert placed["w"].is_deleted() and not tree["w"].is_deleted()
    np.testing.assert_array_equal(out["w"], 2 * np.arange(8.0))
    assert out["w"].sharding == sharding.replicated(mesh)


def test_global_batch_splits_rows_and_names_bad_keys(mesh):
    batch = helpers.random_batch(np.random.default_rng(0))
    out = sharding.global_batch(batch, mesh)
    for key, value in batch.items():
        assert out[key].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(out[key], value)
    assert {s.data.shape[0] for s in out["input_ids"].addressable_shards} == {helpers.BATCH // 4}
    with pytest.raises(ValueError, match="labels"):
        sharding.global_batch({**batch, "labels": batch["labels"][:7]}, mesh)


@pytest.mark.slow
def test_fsdp_finetune_equals_replicated(mesh):
    student_cfg, _, _, optim_cfg = helpers.distill_configs()
    state = steps.TrainState.create(init_params(student_cfg, jax.random.key(0)),
                                    make_optimizer(optim_cfg, total_steps=10))
    step_fn = steps.make_finetune_step(student_cfg)
    rng = np.random.default_rng(1)
    batches = [sharding.global_batch(helpers.random_batch(rng), mesh) for _ in range(3)]
    results = []
    for fsdp in (False, True):
        shardings = sharding.tree_shardings(mesh, state, fsdp=fsdp, min_size=1024)
        step = sharding.jit_finetune_step(step_fn, mesh, shardings)
        placed = sharding.shard_state(state, mesh, fsdp=fsdp, min_size=1024)
        for k, batch in enumerate(batches):
            placed, _ = step(placed, batch, jax.random.key(k))
        results.append(placed)
    replicated, fsdp = results
    embedding = fsdp.params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert embedding.sharding.spec == P("data")  # [100, 32]: the vocab dimension is split
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 replicated.params, fsdp.params)


def test_init_distributed_single_process_and_bad_arguments(monkeypatch):
    for name in sharding._CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    sharding.init_distributed()  # nothing given, no cluster: stays one process
    sharding.init_distributed("127.0.0.1:1234", 1, 0)
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="num_processes"):
        sharding.init_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id"):
        sharding.init_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        sharding.init_distributed("127.0.0.1", 2, 0)
