"""Optimizer and schedule against NumPy references written here."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.optim import OptimConfig, decay_mask, make_optimizer, make_schedule


def np_schedule(step, lr, warmup, total, kind):
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    if kind == "linear":
        return lr * (1.0 - frac)
    if kind == "cosine":
        return lr * 0.5 * (1.0 + np.cos(np.pi * frac))
    return lr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_kw, warmup", [({"warmup_ratio": 0.2}, 10), ({"warmup_steps": 7}, 7),
                                               ({"warmup_ratio": 0.0}, 0)])
def test_schedule_matches_numpy(kind, warmup_kw, warmup):
    cfg = OptimConfig(learning_rate=3e-4, schedule=kind, **warmup_kw)
    sched = make_schedule(cfg, 50)
    for step in [0, 1, 5, warmup, warmup + 1, 30, 49, 50, 60]:
        ref = np_schedule(step, 3e-4, warmup, 50, kind)
        np.testing.assert_allclose(float(sched(step)), ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"warmup_ratio": -0.1}, r"warmup_ratio must be in \[0, 1\)"),
    ({"schedule": "cosin"}, "did you mean 'cosine'"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"clip_norm": 0.0}, "clip_norm must be > 0"),
    ({"accumulate_steps": 0}, "accumulate_steps must be an integer >= 1"),
    ({"b2": 1.0}, r"b2 must be in \[0, 1\)"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_schedule_rejects_bad_totals():
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        make_schedule(OptimConfig(), 0)
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) exceeds the 10 total steps"):
        make_schedule(OptimConfig(warmup_steps=20), 10)


PARAMS = {
    "layer_0": {"attention": {"query": {"kernel": np.ones((3, 2), np.float32),
                                        "bias": np.ones(2, np.float32)}},
                "attention_LayerNorm": {"scale": np.ones(2, np.float32),
                                        "bias": np.ones(2, np.float32)}},
    "embeddings": {"word_embeddings": {"embedding": np.ones((5, 2), np.float32)}},
    "ln_f": {"weight": np.ones(2, np.float32)},
}


def test_decay_mask_rule():
    mask = decay_mask(PARAMS)
    assert mask["layer_0"]["attention"]["query"] == {"kernel": True, "bias": False}
    assert mask["layer_0"]["attention_LayerNorm"] == {"scale": False, "bias": False}
    assert mask["embeddings"]["word_embeddings"]["embedding"] is True
    assert mask["ln_f"]["weight"] is False


def test_weight_decay_skips_bias_and_layer_norm():
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx = make_optimizer(cfg, total_steps=10)
    params = jax.tree.map(jnp.asarray, PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # Zero gradients: only decoupled decay moves a parameter, by lr * wd * p.
    np.testing.assert_allclose(new["layer_0"]["attention"]["query"]["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_allclose(new["embeddings"]["word_embeddings"]["embedding"], 1 - 0.05)
    np.testing.assert_array_equal(new["layer_0"]["attention"]["query"]["bias"], 1.0)
    np.testing.assert_array_equal(new["layer_0"]["attention_LayerNorm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["layer_0"]["attention_LayerNorm"]["bias"], 1.0)
    np.testing.assert_array_equal(new["ln_f"]["weight"], 1.0)


def np_adamw_steps(p, grads, lrs, wd, clip, b1=0.9, b2=0.999, eps=1e-8):
    """Plain AdamW (decoupled decay) on one array, with global-norm clipping when clip is set."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        norm = np.sqrt(np.sum(g * g))
        if clip is not None and norm > clip:
            g = g * clip / norm
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
    return p


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_with_clipping_and_schedule_matches_numpy(clip):
    cfg = OptimConfig(learning_rate=0.01, warmup_steps=2, schedule="linear", weight_decay=0.1,
                      clip_norm=clip)
    rng = np.random.default_rng(0)
    # Gradient norms differ wildly between steps, so clipping changes Adam's result.
    grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (100.0, 0.01, 3.0, 0.2)]
    p0 = rng.normal(size=(3, 4)).astype(np.float32)
    tx = make_optimizer(cfg, total_steps=6)
    params = {"kernel": jnp.asarray(p0)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"kernel": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    lrs = [np_schedule(s, 0.01, 2, 6, "linear") for s in range(len(grads))]
    ref = np_adamw_steps(p0.astype(np.float64), [g.astype(np.float64) for g in grads], lrs, 0.1,
                         clip)
    np.testing.assert_allclose(params["kernel"], ref, rtol=1e-5, atol=1e-7)
    unclipped = np_adamw_steps(p0.astype(np.float64), [g.astype(np.float64) for g in grads], lrs,
                               0.1, None)
    if clip is not None:
        assert not np.allclose(ref, unclipped, rtol=1e-3)


def linear_loss(params, x_BxD, y_B):
    pred_B = x_BxD @ params["kernel"] + params["bias"]
    return jnp.mean((pred_B - y_B) ** 2)


def test_accumulation_equals_one_step_on_union():
    k, micro, steps = 4, 3, 3
    rng = np.random.default_rng(1)
    params0 = {"kernel": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
               "bias": jnp.asarray(0.3, jnp.float32)}
    batches = [(rng.normal(size=(k * micro, 5)).astype(np.float32),
                rng.normal(size=(k * micro,)).astype(np.float32)) for _ in range(steps)]
    base = dict(learning_rate=0.05, warmup_steps=1, schedule="cosine", weight_decay=0.1,
                clip_norm=0.5)
    grad_fn = jax.jit(jax.grad(linear_loss))

    full_tx = make_optimizer(OptimConfig(**base), total_steps=steps)
    full, full_state = params0, full_tx.init(params0)
    full_update = jax.jit(full_tx.update)
    for x, y in batches:
        updates, full_state = full_update(grad_fn(full, x, y), full_state, full)
        full = optax.apply_updates(full, updates)

    acc_tx = make_optimizer(OptimConfig(**base, accumulate_steps=k), total_steps=steps)
    acc, acc_state = params0, acc_tx.init(params0)
    acc_update = jax.jit(acc_tx.update)
    for x, y in batches:
        for i in range(k):
            part = slice(i * micro, (i + 1) * micro)
            updates, acc_state = acc_update(grad_fn(acc, x[part], y[part]), acc_state, acc)
            acc = optax.apply_updates(acc, updates)
            if i < k - 1:  # no update until the k-th micro-batch
                assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))

    for name in params0:
        np.testing.assert_allclose(acc[name], full[name], rtol=1e-6, atol=1e-7)
    assert not np.allclose(acc["kernel"], params0["kernel"])


def test_learning_rate_override():
    tx = make_optimizer(OptimConfig(learning_rate=1.0, warmup_steps=0, schedule="constant",
                                    weight_decay=0.0, clip_norm=None), 10, learning_rate=0.01)
    params = {"w": jnp.zeros(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    # Adam's first step moves each coordinate by about lr.
    np.testing.assert_allclose(updates["w"], -0.01, rtol=1e-5)
