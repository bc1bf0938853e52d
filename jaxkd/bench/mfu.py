"""`bench mfu`: the distillation step's achieved FLOP/s, beside the device's measured matmul
rates (one large GEMM, and one layer's matmuls alone at the step's shapes) and its peak where
the table (`PEAK_TFLOPS`) or `--peak-tflops` gives one.
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.bench.common import MINILM, RANDOM_BASE, StepSetup, memory_line, seconds
from jaxkd.bench.step import Prepared, prepare_step, time_step
from jaxkd.layers import einsum
from jaxkd.model import DTYPES, BertConfig, ModelConfig


# Dense bf16 peak TFLOP/s per chip, matched against jax's device_kind (lower case) in order.
PEAK_TFLOPS = (("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
               ("a100", 312.0), ("v6 lite", 918.0),
               ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0),
               ("v5", 459.0), ("v4", 275.0))


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one logits-only forward pass, as the model runs it.

    Per layer per token: 2 * (4 H^2 + 2 H I) (Q, K, V, output and the two FFN projections)
    plus 2 * 2 * L * H (scores q.k and the weighted sum of values). The last layer runs for
    the [CLS] query alone: K and V for every token, the rest for one. Plus the pooler and
    classifier on [CLS]: 2 H^2 + 2 H C. Embedding lookups, softmax and layer norms are not
    counted.
    """
    enc = cfg.encoder
    H, I, C = enc.hidden_size, enc.intermediate_size, cfg.head.num_labels
    per_token_layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq * H
    if not cfg.head.reads_cls_only:  # every token through every layer, a classifier per token
        return float(batch) * (enc.num_layers * seq * per_token_layer + seq * 2 * H * C)
    last_layer = seq * 2 * 2 * H * H + 2 * (2 * H * H + 2 * H * I) + 2 * 2 * seq * H
    return float(batch) * ((enc.num_layers - 1) * seq * per_token_layer + last_layer
                           + 2 * H * H + 2 * H * C)


def step_flops(teacher_cfg: ModelConfig, student_cfg: ModelConfig, batch: int, seq: int) -> float:
    """Teacher forward + student forward and backward (backward = 2 x forward)."""
    return forward_flops(teacher_cfg, batch, seq) + 3 * forward_flops(student_cfg, batch, seq)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of one chip, or None when the device is not in the table."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def xla_flops(p: Prepared) -> float | None:
    """XLA's own FLOP count of the step (HLO cost analysis), as a cross-check."""
    lowered = p.step.lower(p.state, p.teacher_params, p.batch, p.keys[0])
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def gemm_rate(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of one n x n x n matmul, the best of `repeats`: what this device achieves at all.

    float32: fp32 operands and result. bfloat16: bf16 operands accumulated into an fp32 result
    (`preferred_element_type`), the form the model's matmuls take under bf16 compute.
    """
    operand = DTYPES[dtype]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(operand)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(operand)
    gemm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    best = min(seconds(lambda _: gemm(a, b), repeats, warmup=1))
    return 2.0 * n ** 3 / best


def layer_matmuls(dtype: str, cfg: BertConfig, batch: int, seq: int):
    """One encoder layer's matmuls alone, forward and backward, at the step's shapes:
    Q, K, V, output and the two FFN projections on batch x seq tokens, scores and the weighted sum
    of values per head, chained with nothing between them (no bias, softmax, norm, activation or
    dropout), and their gradients with respect to the input and every weight: (jitted function,
    its arguments, its FLOPs). Its rate says what the student's matmul shapes reach on this
    device with nothing else in the way, beside `gemm_rate`'s one large square GEMM (the
    teacher's forward-only matmuls share these shapes but not the forward/backward mix).
    """
    operand = DTYPES[dtype]
    H, I, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    d = H // heads

    # The model's own einsum: operands cast to `operand` inside, fp32 accumulation, and its
    # written-out backward, so the gradient GEMMs take the same form as the step's.
    def mm(x, w):
        return einsum("abk,kn->abn", x, w, operand)

    def layer(x, wq, wk, wv, wo, w1, w2, cotangent):
        # The model's attention layout: heads first ([B, N, L, D]), operands cast where it casts.
        q, k, v = (mm(x, w).astype(operand).reshape(batch, seq, heads, d).transpose(0, 2, 1, 3)
                   for w in (wq, wk, wv))
        scores = einsum("bnqd,bnkd->bnqk", q, k, operand)
        mixed = einsum("bnqk,bnkd->bnqd", scores.astype(operand), v, operand).astype(operand)
        out = mm(mixed.transpose(0, 2, 1, 3).reshape(batch, seq, H), wo)
        # A dense cotangent: with a plain sum XLA turns the last backward matmuls into reductions.
        return jnp.sum(mm(mm(out, w1), w2) * cotangent)

    keys = jax.random.split(jax.random.key(0), 8)
    shapes = [(batch, seq, H), (H, H), (H, H), (H, H), (H, H), (H, I), (I, H), (batch, seq, H)]
    # fp32 inputs and weights, as the step's activations and params.
    args = [jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[-2] if 0 < i < 7 else 1)
            for i, (key, shape) in enumerate(zip(keys, shapes))]
    # The value too: without it XLA drops the last forward matmul, which only the value needs.
    grads = jax.jit(jax.value_and_grad(layer, argnums=tuple(range(7))))
    forward = batch * seq * (2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq * H)
    return grads, args, 3.0 * forward  # backward: two matmuls per forward matmul


def layer_matmul_rate(dtype: str, cfg: BertConfig, batch: int, seq: int, repeats: int = 5) -> float:
    """FLOP/s of `layer_matmuls`, the best of `repeats`."""
    grads, args, flops = layer_matmuls(dtype, cfg, batch, seq)
    return flops / min(seconds(lambda _: grads(*args), repeats, warmup=1))


def run_mfu(setup: StepSetup, peak_override: float | None, gemm_size: int | None) -> float:
    """Prints the step's FLOP rate beside the device's measured matmul rates; returns (and
    prints last) the step's fraction of the measured rate for its dtype."""
    p = prepare_step(setup)
    median = statistics.median(time_step(p, setup))
    flops = step_flops(p.teacher_cfg, p.student_cfg, setup.batch, setup.seq)
    achieved = flops / median
    device = jax.devices()[0]
    xla = xla_flops(p)
    print(f"{device.device_kind} x{jax.device_count()} teacher={setup.teacher} "
          f"({p.teacher_cfg.encoder.num_layers}x{p.teacher_cfg.encoder.hidden_size}) student_layers={setup.student_layers} "
          f"batch={setup.batch} seq={setup.seq} dtype={setup.dtype}: median step {median:.4f} s")
    print(f"model FLOPs/step {flops / 1e12:.4f} T (XLA cost analysis: "
          f"{'n/a' if xla is None else f'{xla / 1e12:.4f} T'}); achieved {achieved / 1e12:.3f} TFLOP/s")
    n = gemm_size or (2048 if jax.default_backend() == "cpu" else 8192)
    # The step runs data-parallel over every device; a single GEMM measures one of them.
    rates = {dtype: gemm_rate(dtype, n) * jax.device_count() for dtype in ("float32", "bfloat16")}
    fraction = achieved / rates[setup.dtype]
    print(f"measured matmul rate ({n}^3 GEMM, best of 5, x{jax.device_count()} devices): "
          f"fp32 {rates['float32'] / 1e12:.3f} TFLOP/s, bf16 x bf16 -> fp32 {rates['bfloat16'] / 1e12:.3f} "
          f"TFLOP/s; the step reaches {100 * fraction:.1f}% of the {setup.dtype} rate")
    # The same device on the step's own (smaller, thinner) matmuls: what a step made of nothing
    # but its matmuls would reach. Each device runs batch / devices rows.
    layer_rate = layer_matmul_rate(setup.dtype, p.student_cfg.encoder,
                                   max(1, setup.batch // jax.device_count()), setup.seq) * jax.device_count()
    print(f"one layer's matmuls alone at the step's shapes (forward and backward, best of 5): "
          f"{layer_rate / 1e12:.3f} TFLOP/s in {setup.dtype}, {100 * layer_rate / rates[setup.dtype]:.1f}% of "
          f"the GEMM rate; the step reaches {100 * achieved / layer_rate:.1f}% of it")
    print(memory_line())
    per_chip = peak_override if peak_override is not None else peak_tflops(device.device_kind)
    if per_chip is None:
        print(f"peak unknown for {device.device_kind!r}: pass --peak-tflops for MFU against a peak")
    else:
        mfu = achieved / (per_chip * 1e12 * jax.device_count())
        print(f"peak {per_chip:g} TFLOP/s per chip (dense bf16) x {jax.device_count()}: MFU {100 * mfu:.1f}%")
    print(f"{fraction:.6g}")
    return fraction


def setup_from_args(a: argparse.Namespace) -> StepSetup:
    """CPU defaults mirror `step`; accelerators default to BERT-base -> 6 layers, 256 x 128, bf16."""
    cpu = jax.default_backend() == "cpu"
    pick = lambda value, on_cpu, on_accel: value if value is not None else (on_cpu if cpu else on_accel)  # noqa: E731
    return StepSetup(teacher=pick(a.teacher, MINILM, RANDOM_BASE),
                     student_layers=pick(a.student_layers, 3, 6), batch=pick(a.batch, 32, 256),
                     seq=pick(a.seq, 128, 128), steps=a.steps, warmup=a.warmup,
                     temperature=a.temperature, alpha=a.alpha,
                     dtype=pick(a.dtype, "float32", "bfloat16"), rng_impl=a.rng_impl)
