"""Losses against plain NumPy references written here, on random inputs with padding."""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxkd import losses
from jaxkd.losses import LossConfig

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- NumPy references


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_wmean(values, weights):
    weights = np.broadcast_to(weights, values.shape)
    return float((weights * values).sum() / max(weights.sum(), 1e-9))


def np_kl_rows(t_logp, s_logp):
    return (np.exp(t_logp) * (t_logp - s_logp)).sum(-1)


def np_kd(s, t, w, temp):
    return np_wmean(np_kl_rows(np_log_softmax(t / temp), np_log_softmax(s / temp)), w) * temp**2


def np_ce(logits, labels, w):
    logp = np_log_softmax(logits)
    per = np.array([-logp[b, y] if 0 <= y < logits.shape[1] else 0.0 for b, y in enumerate(labels)])
    return np_wmean(per, w)


def np_hidden_mse(s, t, mask, w, kernel=None, bias=None):
    if kernel is not None:
        s = s @ kernel + bias
    total, count = 0.0, 0.0
    for b in range(s.shape[0]):
        for pos in range(s.shape[1]):
            tw = w[b] * mask[b, pos]
            total += tw * np.mean((s[b, pos] - t[b, pos]) ** 2)
            count += tw
    return total / count


def np_pairs(mask, w):
    """Loop over (row weight, b, query, valid key list) for real queries of weighted rows."""
    for b in range(mask.shape[0]):
        keys = np.flatnonzero(mask[b])
        for q in keys:
            yield w[b], b, q, keys


def np_score_mse(s, t, mask, w):
    total, count = 0.0, 0.0
    for wb, b, q, keys in np_pairs(mask, w):
        sq = (s[b, :, q, keys] - t[b, :, q, keys]) ** 2
        total += wb * sq.sum()
        count += wb * sq.size
    return total / count


def np_attention_kl(s_probs, t_probs, mask, w):
    total, count = 0.0, 0.0
    for wb, b, q, keys in np_pairs(mask, w):
        for n in range(s_probs.shape[1]):
            p, r = t_probs[b, n, q, keys], s_probs[b, n, q, keys]
            total += wb * np.sum(p * np.log(p / r))
            count += wb
    return total / count


def np_value_relation(s_vals, t_vals, mask, w, heads):
    def relation(v, b, q, keys):
        n, length, d = v.shape[1:]
        x = v[b].transpose(1, 0, 2).reshape(length, n * d)  # concatenate heads
        x = x.reshape(length, heads, n * d // heads)
        return np.stack([np_log_softmax(x[keys, r] @ x[q, r] / np.sqrt(x.shape[-1]))
                         for r in range(heads)])

    total, count = 0.0, 0.0
    for wb, b, q, keys in np_pairs(mask, w):
        t_logp, s_logp = relation(t_vals, b, q, keys), relation(s_vals, b, q, keys)
        total += wb * np_kl_rows(t_logp, s_logp).sum()
        count += wb * heads
    return total / count


# ----------------------------------------------------------------------------- inputs

B, L, C = 4, 6, 3
# Row 2 is a padding row (weight 0); rows 0 and 3 have padded tokens.
WEIGHTS = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
MASK = np.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.int32)


def rand(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def rand_probs(seed, heads, mask):
    """Softmax over real keys with exact zeros on padded keys, as the model gives."""
    scores = rand(seed, B, heads, L, L, scale=2.0)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    return np.exp(np_log_softmax(scores)).astype(np.float32)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- logit losses


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.5])
def test_kd_loss_matches_numpy(temp):
    s, t = rand(0, B, C, scale=3), rand(1, B, C, scale=3)
    close(losses.kd_loss(s, t, WEIGHTS, temp), np_kd(s, t, WEIGHTS, temp))


def test_kd_loss_ignores_padding_row_contents():
    s, t = rand(0, B, C), rand(1, B, C)
    s2 = s.copy()
    s2[2] = 1e30  # a padding row may hold anything
    close(losses.kd_loss(s2, t, WEIGHTS, 2.0), np_kd(s, t, WEIGHTS, 2.0))


def test_kd_loss_bf16_inputs_computed_in_fp32():
    s, t = rand(0, B, C), rand(1, B, C)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    out = losses.kd_loss(s16, t16, WEIGHTS, 2.0)
    assert out.dtype == jnp.float32
    ref = np_kd(np.asarray(s16, np.float32), np.asarray(t16, np.float32), WEIGHTS, 2.0)
    close(out, ref)


def test_ce_loss_matches_numpy_and_tolerates_padding_labels():
    logits = rand(2, B, C, scale=2)
    labels = np.array([0, 2, -1, 1])  # -1 on the padding row
    close(losses.ce_loss(logits, labels, WEIGHTS), np_ce(logits, labels, WEIGHTS))


def test_mse_loss_squeezes_regression_logits():
    pred, target = rand(3, B, 1), rand(4, B)
    ref = np_wmean((pred[:, 0] - target) ** 2, WEIGHTS)
    close(losses.mse_loss(pred, target, WEIGHTS), ref)


def test_all_padding_batch_gives_zero_not_nan():
    out = losses.kd_loss(rand(0, B, C), rand(1, B, C), np.zeros(B, np.float32), 2.0)
    assert float(out) == 0.0


def test_logit_loss_mixes_terms():
    s, t = rand(0, B, C), rand(1, B, C)
    labels = np.array([0, 1, 2, 1])
    cfg = LossConfig(temperature=3.0, alpha=0.3)
    loss, metrics = losses.logit_loss(cfg, s, t, labels, WEIGHTS)
    kd, ce = np_kd(s, t, WEIGHTS, 3.0), np_ce(s, labels, WEIGHTS)
    close(loss, 0.3 * kd + 0.7 * ce)
    close(metrics["loss/kd"], kd)
    close(metrics["loss/ce"], ce)


def test_logit_loss_alpha_extremes_are_exact():
    s, t = rand(0, B, C), rand(1, B, C)
    labels = np.array([0, 1, 2, 1])
    hard, m0 = losses.logit_loss(LossConfig(alpha=0.0), s, None, labels, WEIGHTS)
    assert float(hard) == float(losses.ce_loss(s, labels, WEIGHTS))
    assert set(m0) == {"loss/ce"}
    t_inf = t.copy()
    t_inf[:, 0] = -np.inf  # a teacher that rules a class out; no 0 * inf may leak into the loss
    soft, m1 = losses.logit_loss(LossConfig(alpha=1.0), s, t_inf, None, WEIGHTS)
    assert float(soft) == float(losses.kd_loss(s, t_inf, WEIGHTS, 2.0))
    assert np.isfinite(float(soft)) and set(m1) == {"loss/kd"}


def test_logit_loss_regression():
    s, t, y = rand(0, B, 1), rand(1, B, 1), rand(2, B)
    cfg = LossConfig(alpha=0.25)
    loss, metrics = losses.logit_loss(cfg, s, t, y, WEIGHTS, regression=True)
    to_teacher = np_wmean((s[:, 0] - t[:, 0]) ** 2, WEIGHTS)
    to_label = np_wmean((s[:, 0] - y) ** 2, WEIGHTS)
    close(loss, 0.25 * to_teacher + 0.75 * to_label)
    close(metrics["loss/mse"], to_label)


def test_logit_loss_missing_inputs_raise():
    s = rand(0, B, C)
    with pytest.raises(ValueError, match="needs teacher logits"):
        losses.logit_loss(LossConfig(alpha=0.5), s, None, np.zeros(B, int), WEIGHTS)
    with pytest.raises(ValueError, match="needs labels"):
        losses.logit_loss(LossConfig(alpha=0.5), s, s, None, WEIGHTS)


def test_kd_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in axis 1"):
        losses.kd_loss(rand(0, B, 2), rand(1, B, 3), WEIGHTS, 1.0)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha must be in \\[0, 1\\]"),
    ({"alpha": -0.1}, "alpha must be in \\[0, 1\\]"),
    ({"temperature": 0.0}, "temperature must be a positive"),
    ({"temperature": float("nan")}, "temperature must be a positive"),
    ({"hidden_weight": -1.0}, "distill.hidden_weight must be a number >= 0"),
    ({"value_relation_weight": -0.5}, "distill.value_relation_weight"),
    ({"layer_map": "unifrom"}, "did you mean 'uniform'"),
    ({"layer_map": [[0, 1], [2]]}, "pair 1 must be two integers"),
    ({"relation_heads": -2}, "relation_heads"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_config_needs_and_hashable_layer_map():
    cfg = LossConfig(layer_map=[[0, 1], [1, 3]], hidden_weight=1.0, value_relation_weight=0.5)
    assert cfg.layer_map == ((0, 1), (1, 3))
    hash(cfg)  # static jit argument
    assert cfg.needs_hidden and cfg.needs_values and cfg.any_intermediate
    assert not (cfg.needs_attention_scores or cfg.needs_attention_probs)
    assert not LossConfig().any_intermediate
    assert LossConfig(embedding_weight=1.0).needs_hidden
    assert LossConfig(attention_kl_weight=1.0).needs_attention_probs


# ----------------------------------------------------------------------------- layer map


def test_layer_map_uniform():
    assert losses.layer_map("uniform", 3, 6) == ((0, 1), (1, 3), (2, 5))
    assert losses.layer_map("uniform", 4, 12) == ((0, 2), (1, 5), (2, 8), (3, 11))
    assert losses.layer_map("uniform", 6, 6) == tuple((i, i) for i in range(6))


def test_layer_map_explicit_and_errors():
    assert losses.layer_map([[0, 0], [1, 5]], 2, 6) == ((0, 0), (1, 5))
    with pytest.raises(ValueError, match=r"pair 1 \(1, 6\): teacher layer 6 .* layers 0\.\.5"):
        losses.layer_map(((0, 0), (1, 6)), 2, 6)
    with pytest.raises(ValueError, match=r"pair 0 \(3, 0\): student layer 3 .* layers 0\.\.1"):
        losses.layer_map(((3, 0),), 2, 6)
    with pytest.raises(ValueError, match="at most as many layers"):
        losses.layer_map("uniform", 4, 2)


# ----------------------------------------------------------------------------- intermediate losses


def test_hidden_mse_same_width():
    s, t = rand(5, B, L, 8), rand(6, B, L, 8)
    close(losses.hidden_mse(s, t, MASK, WEIGHTS), np_hidden_mse(s, t, MASK, WEIGHTS))


def test_hidden_mse_projection_dict_and_tuple():
    s, t = rand(5, B, L, 4), rand(6, B, L, 8)
    kernel, bias = rand(7, 4, 8), rand(8, 8)
    ref = np_hidden_mse(s, t, MASK, WEIGHTS, kernel, bias)
    close(losses.hidden_mse(s, t, MASK, WEIGHTS, {"kernel": kernel, "bias": bias}), ref)
    close(losses.hidden_mse(s, t, MASK, WEIGHTS, (kernel, bias)), ref)
    with pytest.raises(ValueError, match="need a projection"):
        losses.hidden_mse(s, t, MASK, WEIGHTS)


def test_attention_score_mse_ignores_padded_pairs():
    s, t = rand(9, B, 2, L, L), rand(10, B, 2, L, L)
    ref = np_score_mse(s, t, MASK, WEIGHTS)
    s[0, :, :, 5] = 1e6  # a padded key of row 0: must not count
    close(losses.attention_score_mse(s, t, MASK, WEIGHTS), ref)
    with pytest.raises(ValueError, match="same number of heads"):
        losses.attention_score_mse(rand(9, B, 2, L, L), rand(9, B, 3, L, L), MASK, WEIGHTS)


def test_attention_kl_matches_numpy():
    s, t = rand_probs(11, 3, MASK), rand_probs(12, 3, MASK)
    close(losses.attention_kl(s, t, MASK, WEIGHTS), np_attention_kl(s, t, MASK, WEIGHTS))
    with pytest.raises(ValueError, match="same number of heads"):
        losses.attention_kl(s[:, :2], t, MASK, WEIGHTS)


def test_attention_kl_of_identical_is_zero():
    t = rand_probs(12, 3, MASK)
    np.testing.assert_allclose(float(losses.attention_kl(t, t, MASK, WEIGHTS)), 0.0, atol=1e-6)


def test_value_relation_kl_per_head():
    s, t = rand(13, B, 2, L, 4), rand(14, B, 2, L, 4)
    close(losses.value_relation_kl(s, t, MASK, WEIGHTS), np_value_relation(s, t, MASK, WEIGHTS, 2))


def test_value_relation_kl_resplits_different_heads_and_widths():
    s, t = rand(13, B, 2, L, 3), rand(14, B, 4, L, 4)  # student width 6, teacher 16
    close(losses.value_relation_kl(s, t, MASK, WEIGHTS, relation_heads=2),
          np_value_relation(s, t, MASK, WEIGHTS, 2))
    with pytest.raises(ValueError, match="not divisible by 4 relation heads"):
        losses.value_relation_kl(s, t, MASK, WEIGHTS)  # 4 teacher heads do not divide width 6


# ----------------------------------------------------------------------------- full intermediate loss


@dataclasses.dataclass(frozen=True)
class TinyBert:
    num_layers: int
    hidden_size: int
    num_heads: int


class Out(NamedTuple):
    logits: np.ndarray
    hidden_states: tuple
    attention_scores: tuple
    attention_probs: tuple
    values: tuple


def fake_output(seed, cfg):
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    seeds = iter(range(seed, seed + 100))
    return Out(
        logits=rand(next(seeds), B, C),
        hidden_states=tuple(rand(next(seeds), B, L, cfg.hidden_size)
                            for _ in range(cfg.num_layers + 1)),
        attention_scores=tuple(rand(next(seeds), B, heads, L, L) for _ in range(cfg.num_layers)),
        attention_probs=tuple(rand_probs(next(seeds), heads, MASK) for _ in range(cfg.num_layers)),
        values=tuple(rand(next(seeds), B, heads, L, d) for _ in range(cfg.num_layers)),
    )


STUDENT, TEACHER = TinyBert(2, 4, 2), TinyBert(4, 8, 2)
FULL = LossConfig(alpha=0.4, hidden_weight=1.0, embedding_weight=0.5, attention_score_weight=0.3,
                  attention_kl_weight=2.0, value_relation_weight=0.7)


def test_init_projections_only_where_needed():
    rng = jax.random.key(0)
    proj = losses.init_projections(FULL, STUDENT, TEACHER, rng)
    assert set(proj) == {"hidden", "embedding"}
    assert proj["hidden"]["kernel"].shape == (4, 8) and proj["hidden"]["bias"].shape == (8,)
    assert losses.init_projections(LossConfig(hidden_weight=1.0), STUDENT, TEACHER, rng).keys() == {"hidden"}
    assert losses.init_projections(FULL, TEACHER, TEACHER, rng) == {}
    assert losses.init_projections(LossConfig(attention_kl_weight=1.0), STUDENT, TEACHER, rng) == {}


def test_intermediate_and_total_loss_match_numpy():
    s_out, t_out = fake_output(100, STUDENT), fake_output(200, TEACHER)
    proj = losses.init_projections(FULL, STUDENT, TEACHER, jax.random.key(1))
    hk, hb = (np.asarray(proj["hidden"][k]) for k in ("kernel", "bias"))
    ek, eb = (np.asarray(proj["embedding"][k]) for k in ("kernel", "bias"))
    pairs = ((0, 1), (1, 3))
    expected = {
        "loss/embedding": np_hidden_mse(s_out.hidden_states[0], t_out.hidden_states[0], MASK,
                                        WEIGHTS, ek, eb),
        "loss/hidden": sum(np_hidden_mse(s_out.hidden_states[i + 1], t_out.hidden_states[j + 1],
                                         MASK, WEIGHTS, hk, hb) for i, j in pairs),
        "loss/attention_score": sum(np_score_mse(s_out.attention_scores[i],
                                                 t_out.attention_scores[j], MASK, WEIGHTS)
                                    for i, j in pairs),
        "loss/attention_kl": sum(np_attention_kl(s_out.attention_probs[i],
                                                 t_out.attention_probs[j], MASK, WEIGHTS)
                                 for i, j in pairs),
        "loss/value_relation": sum(np_value_relation(s_out.values[i], t_out.values[j], MASK,
                                                     WEIGHTS, 2) for i, j in pairs),
    }
    weights = {"loss/embedding": 0.5, "loss/hidden": 1.0, "loss/attention_score": 0.3,
               "loss/attention_kl": 2.0, "loss/value_relation": 0.7}
    labels = np.array([0, 1, 2, 1])

    fn = functools.partial(losses.total_loss, FULL, student_cfg=STUDENT, teacher_cfg=TEACHER)
    args = (s_out, t_out, proj, labels, MASK, WEIGHTS)
    loss, metrics = fn(*args)
    for name, value in expected.items():
        close(metrics[name], value)
    logit = 0.4 * np_kd(s_out.logits, t_out.logits, WEIGHTS, 2.0) + 0.6 * np_ce(
        s_out.logits, labels, WEIGHTS)
    total = logit + sum(weights[k] * v for k, v in expected.items())
    close(loss, total)
    close(metrics["loss/total"], total)

    jit_loss, jit_metrics = jax.jit(fn)(*args)
    np.testing.assert_allclose(float(jit_loss), float(loss), rtol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(float(jit_metrics[name]), float(metrics[name]), rtol=1e-6)


def test_intermediate_loss_gradients_reach_student_and_projection_only():
    s_out, t_out = fake_output(100, STUDENT), fake_output(200, TEACHER)
    proj = losses.init_projections(FULL, STUDENT, TEACHER, jax.random.key(1))

    def loss_fn(s, t, p):
        return losses.intermediate_loss(FULL, s, t, p, MASK, WEIGHTS, STUDENT, TEACHER)[0]

    gs, gt, gp = jax.grad(loss_fn, argnums=(0, 1, 2))(s_out, t_out, proj)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((gs, gp)))
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(gt))
    assert float(jnp.abs(gp["hidden"]["kernel"]).sum()) > 0
    # The padding row contributes nothing.
    assert float(jnp.abs(gs.hidden_states[1][2]).sum()) == 0.0


def test_intermediate_loss_missing_output_and_projection():
    s_out, t_out = fake_output(100, STUDENT), fake_output(200, TEACHER)
    cfg = LossConfig(value_relation_weight=1.0)
    with pytest.raises(ValueError, match="student model output has no values"):
        losses.intermediate_loss(cfg, s_out._replace(values=None), t_out, {}, MASK, WEIGHTS,
                                 STUDENT, TEACHER)
    with pytest.raises(KeyError, match="init_projections"):
        losses.intermediate_loss(LossConfig(hidden_weight=1.0), s_out, t_out, {}, MASK, WEIGHTS,
                                 STUDENT, TEACHER)
    with pytest.raises(ValueError, match="3 hidden_states, expected 5"):
        losses.intermediate_loss(LossConfig(hidden_weight=1.0), s_out,
                                 t_out._replace(hidden_states=t_out.hidden_states[:3]),
                                 {"hidden": (np.zeros((4, 8)), np.zeros(8))}, MASK, WEIGHTS,
                                 STUDENT, TEACHER)


@pytest.mark.slow  # compiles a backward pass through two small encoders
def test_total_loss_on_model_outputs():
    model = pytest.importorskip("jaxkd.model")
    small = dict(vocab_size=50, intermediate_size=16, max_position_embeddings=L)
    s_cfg = tiny_model_config("sequence", C, num_layers=2, hidden_size=8, num_heads=2, **small)
    t_cfg = tiny_model_config("sequence", C, num_layers=4, hidden_size=16, num_heads=2, **small)
    s_params = model.init_params(s_cfg, jax.random.key(0))
    t_params = model.init_params(t_cfg, jax.random.key(1))
    proj = losses.init_projections(FULL, s_cfg.encoder, t_cfg.encoder, jax.random.key(2))
    ids = np.random.default_rng(0).integers(1, 50, size=(B, L)) * MASK
    flags = dict(output_hidden_states=True, output_attentions=True, output_values=True)
    t_out = model.Bert(t_cfg).apply({"params": t_params}, ids, MASK, **flags)

    @jax.jit
    def step(s_params, proj):
        def loss_fn(s_params, proj):
            s_out = model.Bert(s_cfg).apply({"params": s_params}, ids, MASK, **flags)
            return losses.total_loss(FULL, s_out, t_out, proj, np.array([0, 1, 2, 1]), MASK,
                                     WEIGHTS, s_cfg.encoder, t_cfg.encoder)
        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(s_params, proj)

    (loss, metrics), grads = step(s_params, proj)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(metrics) == {"loss/kd", "loss/ce", "loss/embedding", "loss/hidden",
                            "loss/attention_score", "loss/attention_kl", "loss/value_relation",
                            "loss/total"}
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_token_logit_losses_average_over_labelled_tokens():
    """[B, L, C] logits with labels -1 on unlabelled tokens: a NumPy per-token reference."""
    rng = np.random.default_rng(7)
    s, t = rand(10, B, L, C), rand(11, B, L, C)
    labels = rng.integers(0, C, (B, L))
    labels[rng.random((B, L)) < 0.4] = -1
    w_tok = WEIGHTS[:, None] * (labels >= 0)
    T = 2.5
    loss, metrics = losses.logit_loss(LossConfig(alpha=0.3, temperature=T), s, t, labels, w_tok)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t_logp, s_logp = log_softmax(t / T), log_softmax(s / T)
    kd = (np.exp(t_logp) * (t_logp - s_logp)).sum(-1) * T**2
    ce = -np.take_along_axis(log_softmax(s), np.maximum(labels, 0)[..., None], -1)[..., 0]
    mean = lambda v: (w_tok * v).sum() / w_tok.sum()  # noqa: E731
    close(metrics["loss/kd"], mean(kd))
    close(metrics["loss/ce"], mean(ce))
    close(loss, 0.3 * mean(kd) + 0.7 * mean(ce))


# ----------------------------------------------------------------------------- MiniLM-v2, cosine


def test_relation_kl_hand_checked():
    """One head, two tokens, width 1: the teacher's relation is uniform in both rows; the
    student's first row is softmax([1, 0]) and its second uniform, so only query 0 counts."""
    s = np.array([[[[1.0], [0.0]]]], np.float32)
    t = np.zeros((1, 1, 2, 1), np.float32)
    mask, w = np.ones((1, 2), np.int32), np.ones(1, np.float32)
    p0 = np.e / (1 + np.e)
    query0 = 0.5 * np.log(0.5 / p0) + 0.5 * np.log(0.5 / (1 - p0))
    close(losses.relation_kl(s, t, mask, w), query0 / 2)


def fake_relation_output(seed, cfg):
    out = fake_output(seed, cfg)
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    layers = range(cfg.num_layers)
    return out, {"queries": tuple(rand(seed + 500 + i, B, heads, L, d) for i in layers),
                 "keys": tuple(rand(seed + 600 + i, B, heads, L, d) for i in layers)}


def test_minilm_v2_relations_match_numpy_across_widths_and_layers():
    student, teacher = TinyBert(2, 6, 3), TinyBert(4, 8, 2)  # widths 6 and 8, 3 and 2 heads
    (s_out, s_qk), (t_out, t_qk) = fake_relation_output(100, student), fake_relation_output(200, teacher)

    class Full(NamedTuple):
        out: Out
        queries: tuple
        keys: tuple

        def __getattr__(self, name):
            return getattr(self.out, name)

    s_full, t_full = Full(s_out, **s_qk), Full(t_out, **t_qk)
    for layer, t_layer in ((-1, 3), (1, 1)):
        cfg = LossConfig(alpha=1.0, relation_weight=2.0, relation_layer=layer, relation_heads=2)
        loss, metrics = losses.intermediate_loss(cfg, s_full, t_full, {}, MASK, WEIGHTS, student,
                                                 teacher)
        expected = sum(np_value_relation(getattr(s_full, f)[-1], getattr(t_full, f)[t_layer], MASK,
                                         WEIGHTS, 2) for f in ("queries", "keys", "values"))
        close(metrics["loss/relation"], expected)
        close(loss, 2.0 * expected)
    with pytest.raises(ValueError, match="relation_layer 4 is out of range"):
        losses.intermediate_loss(LossConfig(relation_weight=1.0, relation_layer=4), s_full, t_full,
                                 {}, MASK, WEIGHTS, student, teacher)
    assert LossConfig(relation_weight=1.0).needs_queries_keys
    assert LossConfig(relation_weight=1.0).needs_values


def np_cosine(s, t, mask, w, kernel=None, bias=None):
    if kernel is not None:
        s = s @ kernel + bias
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    return np_wmean(1.0 - cos, w[:, None] * mask)


def test_hidden_cosine_matches_numpy_with_projection():
    s_out, t_out = fake_output(100, STUDENT), fake_output(200, TEACHER)
    cfg = LossConfig(cosine_weight=1.5)
    proj = losses.init_projections(cfg, STUDENT, TEACHER, jax.random.key(3))
    assert set(proj) == {"cosine"}
    k, b = (np.asarray(proj["cosine"][n]) for n in ("kernel", "bias"))
    loss, metrics = losses.intermediate_loss(cfg, s_out, t_out, proj, MASK, WEIGHTS, STUDENT, TEACHER)
    expected = np_cosine(s_out.hidden_states[-1], t_out.hidden_states[-1], MASK, WEIGHTS, k, b)
    close(metrics["loss/cosine"], expected)
    close(loss, 1.5 * expected)
    same = fake_output(300, TEACHER)
    close(losses.hidden_cosine(same.hidden_states[-1], same.hidden_states[-1], MASK, WEIGHTS), 0.0)
