"""The README's embedding example, run with a tiny random teacher: the public API composes."""
import functools

import jax
import numpy as np
import pytest

import jaxkd
from jaxkd import sharding


@pytest.mark.slow
def test_readme_embedding_example(tmp_path):
    teacher_cfg = jaxkd.ModelConfig(
        jaxkd.BertConfig(vocab_size=100, hidden_size=32, num_layers=4, num_heads=4,
                         intermediate_size=64, max_position_embeddings=32),
        jaxkd.HeadConfig(kind="sequence", num_labels=2))
    teacher_params = jaxkd.init_params(teacher_cfg, jax.random.key(0))
    jaxkd.save_hf(teacher_cfg, teacher_params, tmp_path / "teacher")
    teacher_cfg, teacher_params = jaxkd.load_hf(tmp_path / "teacher")
    student_cfg, student_params = jaxkd.student_from_teacher(teacher_cfg, teacher_params, layers=[0, 2])

    loss_cfg = jaxkd.LossConfig(temperature=2.0, alpha=0.5)
    optim_cfg = jaxkd.OptimConfig(learning_rate=1e-3)
    tx = jaxkd.make_optimizer(optim_cfg, total_steps=4)
    state = jaxkd.TrainState.create(student_params, tx)

    mesh = jaxkd.make_mesh()
    state_sh = sharding.tree_shardings(mesh, state)
    teacher_sh = sharding.tree_shardings(mesh, teacher_params)
    state, teacher_params = sharding.place(state, state_sh), sharding.place(teacher_params, teacher_sh)
    step = jaxkd.jit_distill_step(
        jaxkd.make_distill_step(student_cfg, teacher_cfg, loss_cfg, jaxkd.make_schedule(optim_cfg, 4)),
        mesh, state_sh, teacher_sh)

    rng = np.random.default_rng(0)
    batch = jaxkd.data.make_batch(rng.integers(5, 100, (8, 16)), np.ones((8, 16)), np.zeros((8, 16)),
                                  rng.integers(0, 2, 8).astype(np.int32), np.ones(8))
    losses = []
    key = jax.random.key(0)
    for i in range(4):
        state, metrics = step(state, teacher_params, jaxkd.global_batch(batch, mesh), jax.random.fold_in(key, i))
        losses.append(float(metrics["loss/total"]))
    assert int(state.step) == 4
    assert losses[-1] < losses[0]  # four steps on one batch fit it
    out = jaxkd.save_hf(student_cfg, jax.device_get(state.params), tmp_path / "student")
    _, reloaded = jaxkd.load_hf(out)
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_apply_model_for_every_head(tmp_path):
    """`apply_model` runs encoder and head; a token head gives logits per token."""
    encoder = jaxkd.BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, max_position_embeddings=32)
    ids = np.random.default_rng(0).integers(5, 100, (3, 10)).astype(np.int32)
    for head, shape in ((jaxkd.HeadConfig("sequence", 2), (3, 2)),
                        (jaxkd.HeadConfig("token", 9), (3, 10, 9))):
        cfg = jaxkd.ModelConfig(encoder, head)
        params = jaxkd.init_params(cfg, jax.random.key(0))
        # Jitted: eager, the forward dispatches hundreds of small ops.
        assert jax.jit(functools.partial(jaxkd.apply_model, cfg))(params, ids).logits.shape == shape
        jaxkd.save_hf(cfg, params, tmp_path / head.kind)
        loaded_cfg, _ = jaxkd.load_hf(tmp_path / head.kind)
        assert loaded_cfg == cfg
    assert jaxkd.Bert is jaxkd.Model and jaxkd.BertOutput is jaxkd.ModelOutput
