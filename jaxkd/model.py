"""The encoder shared by teacher and student, and the task heads that read it.

One linen `Model` = `Encoder` (embeddings + layers, a `BertConfig`) + a head chosen by
`HeadConfig.kind`; teacher and student are the same module with two `ModelConfig`s.
Parameter names follow Hugging Face's BERT module names; import and export (`jaxkd.hf`, with the
family adapters of `jaxkd.families`) are a table lookup: params = {"encoder": {"embeddings",
"layer_<i>"...}, "head": {...}}. Other families (RoBERTa, XLM-R, DistilBERT, ELECTRA) are this
encoder with the `BertConfig` fields that say how they differ.
Intermediate outputs (hidden states, attention scores and probabilities, values) are collected
only when asked for, so a plain forward pass traces exactly the logits path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkd.heads import HEADS, HeadSpec, default_head_kind, head_spec, register_head  # noqa: F401
from jaxkd.layers import Dense, Dropout, einsum

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
POOLER_ACTIVATIONS = {"tanh": jnp.tanh, **ACTIVATIONS}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and numerics of a BERT encoder (embeddings and layers); the task head is apart."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type table; token_type_ids are ignored (DistilBERT)
    hidden_act: str = "gelu"  # gelu (exact) | gelu_tanh | relu
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # How a family's encoder differs from BERT's (jaxkd.families reads and writes these):
    # model_type names the Hugging Face layout that import and export use.
    model_type: str = "bert"  # bert | roberta | xlm-roberta | distilbert | electra
    # Embeddings this wide, projected to hidden_size by `embeddings_project` (ELECTRA); None: hidden_size.
    embedding_size: int | None = None
    # RoBERTa / XLM-R position ids: tokens count up from pad_token_id + 1, padding sits at pad_token_id.
    pad_offset_positions: bool = False
    # Matmul operand dtype: under bfloat16 every encoder matmul takes bf16 operands and
    # accumulates in fp32 (`einsum`); the residual stream, softmax, layer norm, the heads and the
    # logits stay fp32. bf16 logits agree with fp32 to about 0.02 max abs on MiniLM-sized models;
    # tests/test_model.py allows 0.05.
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"BertConfig.type_vocab_size must be an integer >= 0 (0: no token types), "
                             f"got {self.type_vocab_size!r}")
        if self.embedding_size is not None and (
                not isinstance(self.embedding_size, int) or self.embedding_size < 1):
            raise ValueError(f"BertConfig.embedding_size must be a positive integer or None, "
                             f"got {self.embedding_size!r}")
        if self.max_length < 1:
            raise ValueError(f"BertConfig.max_position_embeddings ({self.max_position_embeddings}) leaves "
                             f"no positions after the padding offset (pad_token_id {self.pad_token_id})")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); pick num_heads among "
                f"{[h for h in range(1, min(self.hidden_size, 64) + 1) if self.hidden_size % h == 0]}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {sorted(ACTIVATIONS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"BertConfig.{name} {getattr(self, name)!r} is not supported; "
                                 f"use one of {sorted(DTYPES)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def max_length(self) -> int:
        """The longest input the position table holds (RoBERTa's first pad_token_id + 1 rows are
        never a token's position)."""
        offset = self.pad_token_id + 1 if self.pad_offset_positions else 0
        return self.max_position_embeddings - offset

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)



@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The task head on top of the encoder; `kind` is a key of `HEADS`."""

    kind: str
    num_labels: int = 2
    dropout: float | None = None  # None: the encoder's hidden_dropout, as in transformers
    pooler_activation: str = "tanh"  # heads with a pooler: after its dense layer
    # Heads that pool the token states into one vector per row (sentence embeddings): the
    # pooling modes, concatenated in order; a learned dense map to `projection` outputs after
    # them (0: none); unit L2 length at the end.
    pooling: tuple[str, ...] = ("mean",)
    projection: int = 0
    normalize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "pooling", (self.pooling,) if isinstance(self.pooling, str)
                           else tuple(self.pooling))
        if not isinstance(self.projection, int) or self.projection < 0:
            raise ValueError(f"HeadConfig.projection must be an integer >= 0 (0: none), got "
                             f"{self.projection!r}")
        spec = head_spec(self.kind)
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"HeadConfig.num_labels must be a positive integer, got {self.num_labels!r}")
        if spec.num_labels is not None and self.num_labels != spec.num_labels:
            raise ValueError(f"a {self.kind} head has {spec.num_labels} outputs: num_labels must be "
                             f"{spec.num_labels}, got {self.num_labels}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HeadConfig.dropout must be in [0, 1) or None, got {self.dropout}")
        if self.pooler_activation not in POOLER_ACTIVATIONS:
            raise ValueError(f"HeadConfig.pooler_activation {self.pooler_activation!r} is not supported; "
                             f"use one of {sorted(POOLER_ACTIVATIONS)}")

    @property
    def spec(self) -> HeadSpec:
        return HEADS[self.kind]

    @property
    def reads_cls_only(self) -> bool:
        """Whether the head reads the [CLS] position alone (then the last layer may skip the rest)."""
        return self.spec.reads_cls_only

    @property
    def regression(self) -> bool:
        """The one place regression is decided: a head kind that allows it, with one output."""
        return self.spec.single_output_regression and self.num_labels == 1


_ENCODER_FIELDS = frozenset(f.name for f in dataclasses.fields(BertConfig))
_HEAD_FIELDS = frozenset(f.name for f in dataclasses.fields(HeadConfig))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An encoder and its head: what teacher and student each are."""

    encoder: BertConfig
    head: HeadConfig

    def replace(self, **changes) -> "ModelConfig":
        """Change encoder or head fields by name (the two sets of names do not overlap)."""
        unknown = sorted(set(changes) - _ENCODER_FIELDS - _HEAD_FIELDS)
        if unknown:
            raise TypeError(f"ModelConfig.replace: unknown fields {unknown}")
        enc = {k: v for k, v in changes.items() if k in _ENCODER_FIELDS}
        head = {k: v for k, v in changes.items() if k in _HEAD_FIELDS}
        return ModelConfig(self.encoder.replace(**enc) if enc else self.encoder,
                           dataclasses.replace(self.head, **head) if head else self.head)


@struct.dataclass
class EncoderOutput:
    """The last layer's states, plus per-layer intermediates when they were asked for (else None).

    last_hidden_state: [B, Q, H]; Q = L, or 1 when only the [CLS] query ran in the last layer.
    hidden_states: num_layers + 1 arrays [B, L, H]; index 0 is the embedding output.
    attention_scores: per layer [B, N, L, L], q.k/sqrt(d) before the padding mask and softmax.
    attention_probs: per layer [B, N, L, L], after the mask and softmax.
    values: per layer [B, N, L, D], the value heads.
    queries, keys: per layer [B, N, L, D], the query and key heads (MiniLM-v2 relations).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple | None = None
    attention_scores: tuple | None = None
    attention_probs: tuple | None = None
    values: tuple | None = None
    queries: tuple | None = None
    keys: tuple | None = None


@struct.dataclass
class ModelOutput:
    """The head's fp32 logits ([B, C], [B, L, C], or [B, L, 2] for spans) and the encoder's
    intermediates (see above)."""

    logits: jax.Array
    hidden_states: tuple | None = None
    attention_scores: tuple | None = None
    attention_probs: tuple | None = None
    values: tuple | None = None
    queries: tuple | None = None
    keys: tuple | None = None

    @property
    def start_logits(self) -> jax.Array:
        """Span heads: [B, L] scores of each token as the answer's first."""
        return self.logits[..., 0]

    @property
    def end_logits(self) -> jax.Array:
        """Span heads: [B, L] scores of each token as the answer's last."""
        return self.logits[..., 1]


def dense(cfg: BertConfig, features: int, name: str, dtype=None) -> Dense:
    return Dense(features, cfg, dtype, name=name)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    # fp32 output keeps the residual stream in fp32 under bf16 compute.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                        param_dtype=cfg.params_dtype, name=name)


def position_ids(cfg: BertConfig, ids_BxL, attention_mask_BxL):
    """Each token's row of the position table: 0..L-1 ([1, L]), or with `pad_offset_positions`
    ([B, L]) transformers' `create_position_ids_from_input_ids`: real tokens count up from
    pad_token_id + 1 and padding sits at pad_token_id. Padding is a pad id or a masked position
    (jaxkd's batches pad with id 0), so padded rows never index past the table."""
    if not cfg.pad_offset_positions:
        return jnp.arange(ids_BxL.shape[1])[None, :]
    real_BxL = ((ids_BxL != cfg.pad_token_id) & (attention_mask_BxL > 0)).astype(jnp.int32)
    return jnp.cumsum(real_BxL, axis=1) * real_BxL + cfg.pad_token_id


class Embeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm, dropout; `embeddings_project` to
    hidden_size when the embeddings are another width (ELECTRA)."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids_BxL, token_types_BxL, positions_BxL, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num, name):
            return nn.Embed(num, cfg.embedding_width, embedding_init=init, dtype=jnp.float32,
                            param_dtype=cfg.params_dtype, name=name)

        x_BxLxE = (embed(cfg.vocab_size, "word_embeddings")(ids_BxL)
                   + embed(cfg.max_position_embeddings, "position_embeddings")(positions_BxL))
        if cfg.type_vocab_size:
            x_BxLxE = x_BxLxE + embed(cfg.type_vocab_size, "token_type_embeddings")(token_types_BxL)
        x_BxLxE = _layer_norm(cfg, "LayerNorm")(x_BxLxE)
        x_BxLxE = Dropout(cfg.hidden_dropout)(x_BxLxE, deterministic=deterministic)
        if cfg.embedding_width == cfg.hidden_size:
            return x_BxLxE
        # fp32 like the LayerNorm outputs: this is the residual stream's start.
        return dense(cfg, cfg.hidden_size, "embeddings_project", dtype=jnp.float32)(x_BxLxE)


class Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, xq_BxQxH, x_BxLxH, bias_Bx1x1xL, deterministic: bool):
        """Queries from `xq` (the first Q positions of `x`, or all of it); keys and values from `x`."""
        cfg = self.config
        N, D, cd = cfg.num_heads, cfg.head_dim, cfg.compute_dtype

        def heads(name, x_BxTxH):
            # The projections' fp32 results are only multiplied next: cast them once, here.
            y = dense(cfg, cfg.hidden_size, name)(x_BxTxH).astype(cd)
            return y.reshape(*x_BxTxH.shape[:2], N, D).transpose(0, 2, 1, 3)

        # One cast of the (fp32) residual stream serves all three projections.
        xq_c = xq_BxQxH.astype(cd)
        x_c = xq_c if xq_BxQxH is x_BxLxH else x_BxLxH.astype(cd)
        q_BxNxQxD = heads("query", xq_c)
        k_BxNxLxD, v_BxNxLxD = heads("key", x_c), heads("value", x_c)
        scores_BxNxQxL = einsum("bnqd,bnkd->bnqk", q_BxNxQxD, k_BxNxLxD, cd) / math.sqrt(D)
        probs_BxNxQxL = jax.nn.softmax(scores_BxNxQxL + bias_Bx1x1xL, axis=-1)
        dropped = Dropout(cfg.attention_dropout)(probs_BxNxQxL, deterministic=deterministic)
        ctx_BxNxQxD = einsum("bnqk,bnkd->bnqd", dropped.astype(cd), v_BxNxLxD, cd).astype(cd)
        B, Q, H = xq_BxQxH.shape
        ctx_BxQxH = ctx_BxNxQxD.transpose(0, 2, 1, 3).reshape(B, Q, H)
        return ctx_BxQxH, (scores_BxNxQxL, probs_BxNxQxL, q_BxNxQxD, k_BxNxLxD, v_BxNxLxD)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BxLxH, bias_Bx1x1xL, deterministic: bool, queries: int | None = None):
        """`queries`: outputs for the first Q positions only (see `Bert`)."""
        cfg = self.config
        drop = Dropout(cfg.hidden_dropout)
        xq_BxQxH = x_BxLxH if queries is None else x_BxLxH[:, :queries]
        ctx_BxQxH, extras = Attention(cfg, name="attention")(xq_BxQxH, x_BxLxH, bias_Bx1x1xL,
                                                             deterministic)
        y = drop(dense(cfg, cfg.hidden_size, "attention_output")(ctx_BxQxH), deterministic=deterministic)
        xq_BxQxH = _layer_norm(cfg, "attention_LayerNorm")(xq_BxQxH + y)
        h_BxQxF = ACTIVATIONS[cfg.hidden_act](dense(cfg, cfg.intermediate_size, "intermediate")(xq_BxQxH))
        h_BxQxF = h_BxQxF.astype(cfg.compute_dtype)  # the activation in fp32, its product in bf16
        y = drop(dense(cfg, cfg.hidden_size, "output")(h_BxQxF), deterministic=deterministic)
        return _layer_norm(cfg, "output_LayerNorm")(xq_BxQxH + y), extras


class Encoder(nn.Module):
    """Embeddings and transformer layers (BertModel without its pooler)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 output_attentions: bool = False, output_values: bool = False,
                 output_queries_keys: bool = False,
                 last_layer_queries: int | None = None) -> EncoderOutput:
        """`last_layer_queries`: run the last layer for the first Q positions only (see `Model`)."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        bias_Bx1x1xL = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                                 jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x_BxLxH = Embeddings(cfg, name="embeddings")(
            input_ids, token_type_ids, position_ids(cfg, input_ids, attention_mask), deterministic)
        hidden, scores, probs, qs, ks, values = [x_BxLxH], [], [], [], [], []
        for i in range(cfg.num_layers):
            queries = last_layer_queries if i == cfg.num_layers - 1 else None
            x_BxLxH, (s, p, q, k, v) = Layer(cfg, name=f"layer_{i}")(
                x_BxLxH, bias_Bx1x1xL, deterministic, queries)
            hidden.append(x_BxLxH)
            for out, x in ((scores, s), (probs, p), (qs, q), (ks, k), (values, v)):
                out.append(x)
        return EncoderOutput(
            last_hidden_state=x_BxLxH,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attention_scores=tuple(scores) if output_attentions else None,
            attention_probs=tuple(probs) if output_attentions else None,
            values=tuple(values) if output_values else None,
            queries=tuple(qs) if output_queries_keys else None,
            keys=tuple(ks) if output_queries_keys else None,
        )


def head_dropout(cfg: BertConfig, head: HeadConfig) -> float:
    return cfg.hidden_dropout if head.dropout is None else head.dropout


class Model(nn.Module):
    """Encoder + task head; `config.head.kind` picks the head (its `HeadSpec.module`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 output_attentions: bool = False, output_values: bool = False,
                 output_queries_keys: bool = False, positions=None) -> ModelOutput:
        """`positions` [B, P]: what a head that reads positions scores (None: every position);
        other heads ignore it."""
        cfg = self.config
        # A head that reads only [CLS] lets the last layer run for the [CLS] query alone, unless
        # the caller wants that layer's intermediates (exact, and it skips most of a layer's work
        # forward and backward; docs/performance.md).
        wants_intermediates = (output_hidden_states or output_attentions or output_values
                               or output_queries_keys)
        cls_only = cfg.head.reads_cls_only and not wants_intermediates
        enc = Encoder(cfg.encoder, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            output_values=output_values, output_queries_keys=output_queries_keys,
            last_layer_queries=1 if cls_only else None)
        spec = cfg.head.spec
        head = spec.module(cfg.encoder, cfg.head, name="head")
        if spec.ties_word_embeddings:
            table = self.variables["params"]["encoder"]["embeddings"]["word_embeddings"]["embedding"]
            logits = head(enc.last_hidden_state, deterministic, table,
                          positions if spec.reads_positions else None)
        elif spec.reads_mask:
            mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
            logits = head(enc.last_hidden_state, deterministic, mask)
        else:
            logits = head(enc.last_hidden_state, deterministic)
        return ModelOutput(logits=logits.astype(jnp.float32), hidden_states=enc.hidden_states,
                           attention_scores=enc.attention_scores,
                           attention_probs=enc.attention_probs, values=enc.values,
                           queries=enc.queries, keys=enc.keys)


def init_params(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh parameters initialised as BERT does: normal(0.02), zero biases, unit LN scales."""
    dummy = jnp.zeros((1, 2), jnp.int32)
    return jax.jit(lambda r: Model(config).init(r, dummy)["params"])(rng)


def apply_model(config: ModelConfig, params: Any, input_ids, attention_mask=None,
                token_type_ids=None) -> ModelOutput:
    """Encoder and head, deterministic (no dropout): `.logits` is [B, C] or [B, L, C] (token heads)."""
    return Model(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)


def word_embeddings(params: Any) -> np.ndarray:
    """The word-embedding matrix [vocab_size, embedding_width] of a model's params."""
    return np.asarray(params["encoder"]["embeddings"]["word_embeddings"]["embedding"], np.float32)


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def param_mib(params) -> float:
    """The params' bytes as stored (fp32 here), in MiB."""
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) / 2**20


# Names of the sentence-classification era, kept for code written against them.
Bert = Model
BertOutput = ModelOutput
