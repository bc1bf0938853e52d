"""The Flax encoder on tiny random configs: shapes, options, numerics, PyTorch parity.

Forwards are jitted (helpers.forward): eager, each dispatches hundreds of small ops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward, tiny_model_config
from jaxkd.hf import save_hf
from jaxkd.model import Bert, apply_model, init_params

TINY = tiny_model_config("sequence", 3, vocab_size=50, num_heads=4, max_position_embeddings=24)


def _noisy(params, seed=1, scale=0.2):
    """Random values on every leaf, so zero biases and unit scales cannot hide a mapping bug."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _batch(B=3, L=7, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, L)).astype(np.int32)
    lengths = np.array([L, L - 2, 3][:B])
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    types = (np.arange(L)[None] >= (lengths[:, None] // 2)).astype(np.int32) * mask
    return ids * mask, mask, types


@pytest.fixture(scope="module")
def params():
    return _noisy(init_params(TINY, jax.random.key(0)))


def test_shapes_and_intermediates_only_when_asked(params):
    ids, mask, types = _batch()
    plain = forward(TINY, params, ids, mask, types)
    assert plain.logits.shape == (3, 3) and plain.logits.dtype == jnp.float32
    assert plain.hidden_states is plain.attention_scores is plain.attention_probs is plain.values is None
    full = forward(TINY, params, ids, mask, types, output_hidden_states=True,
                   output_attentions=True, output_values=True)
    assert len(full.hidden_states) == TINY.encoder.num_layers + 1
    assert all(h.shape == (3, 7, 16) for h in full.hidden_states)
    assert all(a.shape == (3, 4, 7, 7) for a in full.attention_scores + full.attention_probs)
    assert all(v.shape == (3, 4, 7, 4) for v in full.values)
    np.testing.assert_allclose(full.logits, plain.logits, atol=1e-6)
    # Padded keys get no attention weight; each query row sums to one.
    probs = np.asarray(full.attention_probs[0])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[2, :, :, 3:] < 1e-6)
    assert full.queries is full.keys is None
    qk = forward(TINY, params, ids, mask, types, output_queries_keys=True)
    for q, k, scores in zip(qk.queries, qk.keys, full.attention_scores):
        # The query and key heads are those the attention scores are made of.
        np.testing.assert_allclose(np.einsum("bnqd,bnkd->bnqk", q, k) / np.sqrt(q.shape[-1]),
                                   scores, rtol=1e-5, atol=1e-5)
    layer = params["encoder"]["layer_1"]["attention"]["query"]
    x = np.asarray(full.hidden_states[1])
    q_ref = (x @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])).reshape(3, 7, 4, 4)
    np.testing.assert_allclose(qk.queries[1], q_ref.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


def test_cls_only_last_layer_has_the_full_gradient(params):
    """The logits-only path runs the last layer for [CLS] alone: same loss, same gradient."""
    ids, mask, types = _batch()
    labels = np.array([0, 2, 1])

    def loss(p, full):
        logits = Bert(TINY).apply({"params": p}, ids, mask, types, output_hidden_states=full).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l_cls, g_cls = value_and_grad(params, False)
    l_full, g_full = value_and_grad(params, True)
    np.testing.assert_allclose(l_cls, l_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cls), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The last layer's query/FFN weights do get a gradient (through [CLS]).
    assert np.abs(g_cls["encoder"][f"layer_{TINY.encoder.num_layers - 1}"]["intermediate"]["kernel"]).sum() > 0


def test_padding_invariance(params):
    ids, mask, types = _batch()
    pad = ((0, 0), (0, 5))
    short = forward(TINY, params, ids, mask, types).logits
    long = forward(TINY, params, np.pad(ids, pad), np.pad(mask, pad), np.pad(types, pad)).logits
    np.testing.assert_allclose(long, short, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits(params):
    """bf16 logits stay within 0.05 of fp32 (the tolerance documented on BertConfig.dtype)."""
    ids, mask, types = _batch()
    cfg16 = TINY.replace(dtype="bfloat16")
    params16 = init_params(cfg16, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
    out16 = forward(cfg16, params, ids, mask, types, output_hidden_states=True)
    out32 = forward(TINY, params, ids, mask, types)
    assert out16.logits.dtype == jnp.float32
    assert out16.hidden_states[-1].dtype == jnp.float32  # the residual stream is LayerNorm output
    diff = float(jnp.max(jnp.abs(out16.logits - out32.logits)))
    assert 0 < diff < 0.05


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("abk,kn->abn", (2, 5, 8), (8, 6)),  # a dense layer: activations x kernel
    ("bnqd,bnkd->bnqk", (2, 3, 5, 4), (2, 3, 7, 4)),  # attention scores
    ("bnqk,bnkd->bnqd", (2, 3, 5, 7), (2, 3, 7, 4)),  # attention-weighted values
])
def test_bf16_einsum_forward_and_backward_match_numpy(spec, shape_a, shape_b):
    """bf16 operands, fp32 accumulation: the products (and the gradients' products, from a bf16
    cotangent) of the bf16-rounded values, in float64; gradients in each operand's dtype."""
    from jaxkd.layers import einsum

    rng = np.random.default_rng(0)
    a = rng.normal(size=shape_a).astype(np.float32)
    b = rng.normal(size=shape_b).astype(np.float32)
    out_shape = jnp.einsum(spec, a, b).shape
    g = rng.normal(size=out_shape).astype(np.float32)
    r = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # noqa: E731
    out, vjp = jax.vjp(lambda x, y: einsum(spec, x, y, jnp.bfloat16), a, b)
    da, db = vjp(jnp.asarray(g))
    ins, res = spec.split("->")
    sa, sb = ins.split(",")
    assert out.dtype == da.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(out, np.einsum(spec, r(a), r(b)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, np.einsum(f"{res},{sb}->{sa}", r(g), r(b)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, np.einsum(f"{sa},{res}->{sb}", r(a), r(g)), rtol=1e-5, atol=1e-5)
    # Not the fp32 products: the operands really are rounded.
    assert np.abs(np.asarray(out) - np.einsum(spec, a, b)).max() > 1e-4
    # A bf16 operand gets a bf16 gradient.
    _, vjp16 = jax.vjp(lambda x, y: einsum(spec, x, y, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16), b)
    assert vjp16(jnp.asarray(g))[0].dtype == jnp.bfloat16


def test_dropout_only_when_not_deterministic(params):
    ids, mask, types = _batch()
    a = forward(TINY, params, ids, mask, types, deterministic=True).logits
    b = forward(TINY, params, ids, mask, types, deterministic=True).logits
    np.testing.assert_array_equal(a, b)
    c = forward(TINY, params, ids, mask, types, {"dropout": jax.random.key(1)},
                deterministic=False).logits
    d = forward(TINY, params, ids, mask, types, {"dropout": jax.random.key(2)},
                deterministic=False).logits
    assert not np.allclose(c, a, atol=1e-4) and not np.allclose(c, d, atol=1e-4)
    no_drop = TINY.replace(hidden_dropout=0.0, attention_dropout=0.0)
    e = forward(no_drop, params, ids, mask, types, {"dropout": jax.random.key(1)},
                deterministic=False).logits
    np.testing.assert_allclose(e, a, atol=1e-6)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_matches_pytorch_bert_for_sequence_classification(params, tmp_path, act):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = TINY.replace(hidden_act=act)
    save_hf(cfg, params, tmp_path)
    model, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)
    ours = forward(cfg, params, ids, mask, types, output_hidden_states=True)
    np.testing.assert_allclose(ours.logits, out.logits.numpy(), atol=1e-5)
    # The logits-only forward (last layer for [CLS] alone) against the same reference.
    plain = forward(cfg, params, ids, mask, types)
    np.testing.assert_allclose(plain.logits, out.logits.numpy(), atol=1e-5)
    valid = mask.astype(bool)
    for h_ours, h_torch in zip(ours.hidden_states, out.hidden_states):
        np.testing.assert_allclose(np.asarray(h_ours)[valid], h_torch.numpy()[valid], atol=1e-5)


TOKEN = TINY.replace(kind="token", num_labels=5)


@pytest.fixture(scope="module")
def token_params():
    return _noisy(init_params(TOKEN, jax.random.key(4)), seed=5)


def test_heads_share_the_encoder_and_differ_only_in_their_own_params(params, token_params):
    assert set(params) == set(token_params) == {"encoder", "head"}
    assert sorted(params["head"]) == ["classifier", "pooler"]
    assert sorted(token_params["head"]) == ["classifier"]
    assert jax.tree.structure(params["encoder"]) == jax.tree.structure(token_params["encoder"])
    ids, mask, types = _batch()
    out = jax.jit(functools.partial(apply_model, TOKEN))(token_params, ids, mask, types)
    assert out.logits.shape == (3, 7, 5) and out.logits.dtype == jnp.float32
    # A token head reads every position: the hidden states of the full forward give its logits.
    full = forward(TOKEN, token_params, ids, mask, types, output_hidden_states=True)
    np.testing.assert_allclose(full.logits, out.logits, atol=1e-6)


def test_token_head_matches_pytorch_bert_for_token_classification(token_params, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_hf(TOKEN, token_params, tmp_path, id2label=[f"T{i}" for i in range(5)])
    model, info = transformers.AutoModelForTokenClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert type(model).__name__ == "BertForTokenClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.id2label == {i: f"T{i}" for i in range(5)}
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask),
                           token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.jit(functools.partial(apply_model, TOKEN))(token_params, ids, mask, types).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5)
