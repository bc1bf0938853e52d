"""Building blocks of the model: the mixed-precision einsum every matmul goes through, the dense
layer built on it, and a cheaper dropout. `jaxkd.model` builds the encoder from them.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """`jnp.einsum(spec, a, b)` computed with `dtype` operands, accumulated and returned in fp32.

    fp32 is the plain einsum. For a 16-bit `dtype` both operands are cast (inside, so fp32
    params are cast once where they are used) and the products accumulate in fp32
    (`preferred_element_type`): more accurate than a 16-bit result, and on CPU faster too (XLA
    runs bf16 x bf16 -> fp32 GEMMs at about twice its fp32 rate, bf16 -> bf16 below it;
    docs/performance.md). The backward pass is written out so that its GEMMs take the same form:
    JAX's own transpose would multiply the fp32 cotangent by a 16-bit operand, or round the
    weight gradient to 16 bits. Gradients come back in each operand's own dtype.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a, b)
    return _mixed_einsum(spec, jnp.dtype(dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec, dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, dtype, a, b):
    a16, b16 = a.astype(dtype), b.astype(dtype)
    out = jnp.einsum(spec, a16, b16, preferred_element_type=jnp.float32)
    # Zero-size arrays carry the operands' dtypes to the backward pass.
    return out, (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _mixed_einsum_bwd(spec, dtype, residuals, g):
    a16, b16, a_dtype, b_dtype = residuals
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g16 = g.astype(dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g16, b16, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a16, g16, preferred_element_type=jnp.float32)
    return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Bernoulli(1 - rate) draws from 16 random bits each, two per 32-bit word.

    `jax.random.bernoulli` spends a whole 32-bit word per element; on CPU the generator is most
    of dropout's cost (docs/performance.md), and this halves it. The rate is exact to 2**-16.
    """
    n = math.prod(shape)
    words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:n]
    return (halves >= _drop_threshold(rate)).reshape(shape)


def _drop_threshold(rate: float) -> int:
    return round(rate * 65536)


class Dropout(nn.Module):
    """Inverted dropout like `nn.Dropout` (same name, so the same rng streams), cheaper bits."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        # Scale by the exact keep probability of the 16-bit threshold: E[output] = x.
        scale = 65536 / (65536 - _drop_threshold(self.rate))
        return jnp.where(keep, x * scale, 0).astype(x.dtype)


def _dense_spec(ndim: int) -> str:
    lead = "abcdefgh"[: ndim - 1]
    return f"{lead}k,kn->{lead}n"


class Dense(nn.Module):
    """`nn.Dense` (same parameter names and init) whose matmul is `einsum` at `dtype`.

    The output is fp32 whatever `dtype` is: the consumer casts it if it multiplies it next.
    """

    features: int
    config: Any  # a jaxkd.model.BertConfig: initializer_range, params_dtype, compute_dtype
    dtype: Any = None  # matmul operand dtype; None: the encoder's compute dtype

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                            (x.shape[-1], self.features), cfg.params_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), cfg.params_dtype)
        dtype = cfg.compute_dtype if self.dtype is None else self.dtype
        return einsum(_dense_spec(x.ndim), x, kernel, dtype) + bias.astype(jnp.float32)
