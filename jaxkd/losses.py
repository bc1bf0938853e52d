"""Distillation losses on arrays: logits (KD, CE, regression) and intermediate layers.

Every loss casts to fp32 and averages with per-example weights `weights_B` (0 marks a padding
row): mean = sum(w * l) / max(sum(w), eps), so padding rows neither count nor divide. Token and
attention losses weight each real token (or query/key pair) by its row's weight, so every real
token in the batch counts the same. Teacher tensors are fixed targets: gradients never reach them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import util

Array = jax.Array
Metrics = dict[str, Array]
LayerPairs = tuple[tuple[int, int], ...]

_EPS = 1e-9  # a batch made only of padding rows gives 0, not NaN
_MASKED = -1e30  # finite, so a row whose keys are all padding gives a uniform softmax, not NaN
_LAYER_MAPS = ("uniform",)
# The intermediate terms: each one's weight (a key of `distill`) and its name in words.
TERMS = {"relation_weight": "MiniLM-v2 relations", "cosine_weight": "cosine", "hidden_weight": "hidden MSE",
         "attention_score_weight": "attention scores", "attention_kl_weight": "attention KL",
         "value_relation_weight": "value relation", "embedding_weight": "embedding MSE"}
RELATIONS = ("queries", "keys", "values")  # MiniLM-v2: query-query, key-key, value-value


def describe_terms(cfg) -> list[str]:
    """The intermediate terms `cfg` (a LossConfig or the `distill` section) uses, in words."""
    return [f"{words} {getattr(cfg, key):g}" for key, words in TERMS.items() if getattr(cfg, key)]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which distillation terms to use and how much each weighs (in YAML, keys of `distill`)."""

    temperature: float = 2.0  # softens both distributions in kd_loss; T^2 restores the gradient scale
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the hard-label term
    hidden_weight: float = 0.0  # TinyBERT hidden-state MSE (learned projection when widths differ)
    embedding_weight: float = 0.0  # embedding-output MSE (its own projection)
    attention_score_weight: float = 0.0  # TinyBERT attention-score MSE per head
    attention_kl_weight: float = 0.0  # MiniLM attention-distribution KL
    value_relation_weight: float = 0.0  # MiniLM value-relation KL
    # "uniform" or explicit (student_layer, teacher_layer) pairs of 0-based transformer layers.
    layer_map: str | LayerPairs = "uniform"
    # Heads the value relation and the MiniLM-v2 relations are split into; 0 = the teacher's
    # head count.
    relation_heads: int = 0
    # MiniLM-v2 self-attention relations: query-query, key-key and value-value relations of the
    # teacher's layer `relation_layer` (0-based; -1 the last) transferred to the student's last
    # layer, KL per relation head and query, summed over the three relations.
    relation_weight: float = 0.0
    relation_layer: int = -1
    # DistilBERT: 1 - cosine of the student's and teacher's last hidden states per real token
    # (a learned projection when widths differ).
    cosine_weight: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"distill.temperature must be a positive number, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1] (weight of the distillation term), "
                             f"got {self.alpha}")
        for name in TERMS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"distill.{name} must be a number >= 0, got {value}")
        if not isinstance(self.relation_layer, int) or isinstance(self.relation_layer, bool):
            raise ValueError(f"distill.relation_layer must be an integer (a teacher layer, 0-based; "
                             f"-1 the last), got {self.relation_layer!r}")
        if not isinstance(self.relation_heads, int) or self.relation_heads < 0:
            raise ValueError(f"distill.relation_heads must be an integer >= 0 (0 = teacher heads), "
                             f"got {self.relation_heads!r}")
        # YAML gives lists; tuples keep the config hashable, so it can be a static jit argument.
        object.__setattr__(self, "layer_map", _normalise_layer_map(self.layer_map))

    @property
    def needs_hidden(self) -> bool:
        return self.hidden_weight > 0 or self.embedding_weight > 0 or self.cosine_weight > 0

    @property
    def needs_attention_scores(self) -> bool:
        return self.attention_score_weight > 0

    @property
    def needs_attention_probs(self) -> bool:
        return self.attention_kl_weight > 0

    @property
    def needs_values(self) -> bool:
        return self.value_relation_weight > 0 or self.relation_weight > 0

    @property
    def needs_queries_keys(self) -> bool:
        return self.relation_weight > 0

    @property
    def any_intermediate(self) -> bool:
        return any(getattr(self, name) > 0 for name in TERMS)

    def labels_only(self):
        """This config with every teacher term off (alpha 0, intermediate weights 0): the
        hard-label loss alone, as a labels-only baseline trains."""
        return dataclasses.replace(self, alpha=0.0, **{name: 0.0 for name in TERMS})


def _normalise_layer_map(spec: Any) -> str | LayerPairs:
    if isinstance(spec, str):
        if spec not in _LAYER_MAPS:
            hint = util.did_you_mean(spec, _LAYER_MAPS, hint="; did you mean {!r}?")
            raise ValueError(f"distill.layer_map {spec!r} is unknown: use 'uniform' or a list of "
                             f"[student_layer, teacher_layer] pairs{hint}")
        return spec
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"distill.layer_map must be 'uniform' or a non-empty list of "
                         f"[student_layer, teacher_layer] pairs, got {spec!r}")
    pairs = []
    for k, pair in enumerate(spec):
        if (isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise ValueError(f"distill.layer_map pair {k} must be two integers "
                             f"[student_layer, teacher_layer], got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def layer_map(cfg_layer_map: str | Sequence[Sequence[int]], student_layers: int,
              teacher_layers: int) -> LayerPairs:
    """(student_layer, teacher_layer) pairs; "uniform" maps student i of m to (i+1)*n//m - 1 of n."""
    spec = _normalise_layer_map(cfg_layer_map)
    if spec == "uniform":
        if student_layers > teacher_layers:
            raise ValueError(f"distill.layer_map 'uniform' needs a student with at most as many layers "
                             f"as the teacher ({student_layers} > {teacher_layers}); give explicit pairs")
        return tuple((i, (i + 1) * teacher_layers // student_layers - 1)
                     for i in range(student_layers))
    for k, (s, t) in enumerate(spec):
        for role, layer, count in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not 0 <= layer < count:
                raise ValueError(f"distill.layer_map pair {k} ({s}, {t}): {role} layer {layer} is out of "
                                 f"range; the {role} has layers 0..{count - 1}")
    return spec


# ----------------------------------------------------------------------------- helpers


def _weighted_mean(values: Array, weights: Array) -> Array:
    """sum(w * v) / max(sum(w), eps), w broadcast to v; v is ignored where w is 0 (even if inf)."""
    weights = jnp.broadcast_to(weights.astype(jnp.float32), values.shape)
    values = jnp.where(weights > 0, values, 0.0)
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), _EPS)


def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _target(x: Array) -> Array:
    return jax.lax.stop_gradient(_f32(x))


def _check_shapes(what: str, student: Array, teacher: Array, axes: Sequence[int]) -> None:
    for axis in axes:
        if student.shape[axis] != teacher.shape[axis]:
            raise ValueError(f"{what}: student shape {tuple(student.shape)} and teacher shape "
                             f"{tuple(teacher.shape)} differ in axis {axis}")


def _kl(t_logp: Array, s_logp: Array, key_mask: Array | None = None) -> Array:
    """KL(teacher || student) over the last axis from log-probabilities; 0 * log 0 counts as 0."""
    keep = t_logp > -jnp.inf
    if key_mask is not None:
        keep = keep & (key_mask > 0)
    terms = jnp.where(keep, jnp.exp(t_logp) * (t_logp - s_logp), 0.0)
    return jnp.sum(terms, axis=-1)


def _token_weights(mask_BxL: Array, weights_B: Array) -> Array:
    return _f32(weights_B)[:, None] * _f32(mask_BxL)


def _squeeze_regression(x: Array) -> Array:
    return x[:, 0] if x.ndim == 2 and x.shape[1] == 1 else x


# ----------------------------------------------------------------------------- logit losses


def kd_loss(student_logits_BxC: Array, teacher_logits_BxC: Array, weights_B: Array,
            temperature: float) -> Array:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, per example, then the weighted mean.

    Token logits [B, L, C] work the same with token weights [B, L].
    """
    _check_shapes("kd_loss logits", student_logits_BxC, teacher_logits_BxC,
                  range(student_logits_BxC.ndim))
    s_logp_BxC = jax.nn.log_softmax(_f32(student_logits_BxC) / temperature, axis=-1)
    t_logp_BxC = jax.nn.log_softmax(_target(teacher_logits_BxC) / temperature, axis=-1)
    return _weighted_mean(_kl(t_logp_BxC, s_logp_BxC), weights_B) * temperature**2


def ce_loss(logits_BxC: Array, labels_B: Array, weights_B: Array) -> Array:
    """Cross-entropy with integer labels; a label outside [0, C) (padding) contributes 0.

    Token logits [B, L, C] take labels and weights [B, L]."""
    logp_BxC = jax.nn.log_softmax(_f32(logits_BxC), axis=-1)
    onehot_BxC = jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=jnp.float32)
    return _weighted_mean(-jnp.sum(onehot_BxC * logp_BxC, axis=-1), weights_B)


def mse_loss(pred_B: Array, target_B: Array, weights_B: Array) -> Array:
    """Squared error for regression; [B, 1] inputs are squeezed to [B]."""
    pred_B, target_B = _squeeze_regression(_f32(pred_B)), _squeeze_regression(_f32(target_B))
    if pred_B.shape != target_B.shape:
        raise ValueError(f"mse_loss: prediction shape {tuple(pred_B.shape)} and target shape "
                         f"{tuple(target_B.shape)} differ")
    # A weight-0 row may have no target (NaN: a transfer row); a NaN would reach the gradient
    # through the masked branch, so it is replaced before the difference is taken.
    target_B = jnp.where(jnp.broadcast_to(weights_B, target_B.shape) > 0, target_B, 0.0)
    return _weighted_mean((pred_B - target_B) ** 2, weights_B)


def logit_loss(cfg: LossConfig, student_logits_BxC: Array, teacher_logits_BxC: Array | None,
               labels_B: Array | None, weights_B: Array, *,
               regression: bool = False,
               hard_weights_B: Array | None = None) -> tuple[Array, Metrics]:
    """alpha * distillation + (1 - alpha) * hard-label loss; a term with weight 0 is not computed.

    Classification: `loss/kd` (kd_loss) and `loss/ce`. Regression (one output): `loss/kd` is the
    MSE to the teacher's prediction and `loss/mse` the MSE to the label. The teacher may be None
    when alpha = 0 and the labels None when alpha = 1. Token logits [B, L, C] take labels and
    weights [B, L] (weight 0 on tokens without a label). `hard_weights_B` weigh the hard-label
    term (0 on rows whose only label is the teacher's); None: `weights_B`. Each term is its own
    weighted mean: the hard term over labelled rows, the KD term over all rows.
    """
    hard_weights_B = weights_B if hard_weights_B is None else hard_weights_B
    terms: list[tuple[str, float, Array]] = []
    if cfg.alpha > 0:
        if teacher_logits_BxC is None:
            raise ValueError(f"distill.alpha = {cfg.alpha} needs teacher logits; set alpha to 0 to "
                             f"train on labels only")
        if regression:
            kd = mse_loss(student_logits_BxC, _target(teacher_logits_BxC), weights_B)
        else:
            kd = kd_loss(student_logits_BxC, teacher_logits_BxC, weights_B, cfg.temperature)
        terms.append(("loss/kd", cfg.alpha, kd))
    if cfg.alpha < 1:
        if labels_B is None:
            raise ValueError(f"distill.alpha = {cfg.alpha} < 1 needs labels; set alpha to 1 to "
                             f"distil from the teacher only")
        if regression:
            terms.append(("loss/mse", 1.0 - cfg.alpha,
                          mse_loss(student_logits_BxC, labels_B, hard_weights_B)))
        else:
            terms.append(("loss/ce", 1.0 - cfg.alpha,
                          ce_loss(student_logits_BxC, labels_B, hard_weights_B)))
    return weighted_sum(terms)


def weighted_sum(terms: Sequence[tuple[str, float, Array]]) -> tuple[Array, Metrics]:
    """sum(weight * term) over (name, weight, term), and each term unweighted by its name."""
    loss = sum(weight * value for _, weight, value in terms)
    return jnp.asarray(loss, jnp.float32), {name: value for name, _, value in terms}


# ----------------------------------------------------------------------------- intermediate losses


def _project(x_BxLxH: Array, proj: Any) -> Array:
    """Apply a linear map given as {"kernel", "bias"} or (kernel, bias)."""
    kernel, bias = (proj["kernel"], proj["bias"]) if isinstance(proj, Mapping) else proj
    return x_BxLxH @ _f32(kernel) + _f32(bias)


def _hidden_pair(what: str, s_hidden_BxLxHs: Array, t_hidden_BxLxHt: Array,
                 proj: Any) -> tuple[Array, Array]:
    """fp32 student states (mapped by `proj` to the teacher's width) and the fixed teacher states."""
    s_BxLxH = _f32(s_hidden_BxLxHs)
    if proj is not None:
        s_BxLxH = _project(s_BxLxH, proj)
    t_BxLxH = _target(t_hidden_BxLxHt)
    if s_BxLxH.shape != t_BxLxH.shape:
        raise ValueError(f"{what}: student {tuple(s_BxLxH.shape)} (after projection) and teacher "
                         f"{tuple(t_BxLxH.shape)} differ; widths that differ need a projection")
    return s_BxLxH, t_BxLxH


def hidden_mse(s_hidden_BxLxHs: Array, t_hidden_BxLxHt: Array, mask_BxL: Array, weights_B: Array,
               proj: Any = None) -> Array:
    """MSE over real tokens (mean over the width); `proj` maps the student width to the teacher's."""
    s_BxLxH, t_BxLxH = _hidden_pair("hidden_mse", s_hidden_BxLxHs, t_hidden_BxLxHt, proj)
    sq_BxL = jnp.mean((s_BxLxH - t_BxLxH) ** 2, axis=-1)
    return _weighted_mean(sq_BxL, _token_weights(mask_BxL, weights_B))


def _check_heads(what: str, s: Array, t: Array) -> None:
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"{what} needs the same number of heads in student and teacher, got "
                         f"{s.shape[1]} and {t.shape[1]}; drop this term or match num_heads")
    _check_shapes(what, s, t, range(s.ndim))


def attention_score_mse(s_scores_BxNxLxL: Array, t_scores_BxNxLxL: Array, mask_BxL: Array,
                        weights_B: Array) -> Array:
    """TinyBERT: MSE of raw attention scores per head, over pairs of real query and key tokens."""
    _check_heads("attention_score_mse", s_scores_BxNxLxL, t_scores_BxNxLxL)
    sq_BxNxLxL = (_f32(s_scores_BxNxLxL) - _target(t_scores_BxNxLxL)) ** 2
    tokens_BxL = _token_weights(mask_BxL, weights_B)
    pairs_Bx1xLxL = tokens_BxL[:, None, :, None] * _f32(mask_BxL)[:, None, None, :]
    return _weighted_mean(sq_BxNxLxL, pairs_Bx1xLxL)


def attention_kl(s_probs_BxNxLxL: Array, t_probs_BxNxLxL: Array, mask_BxL: Array,
                 weights_B: Array) -> Array:
    """MiniLM: KL(teacher || student) of attention distributions, mean over heads and real queries."""
    _check_heads("attention_kl", s_probs_BxNxLxL, t_probs_BxNxLxL)
    tiny = jnp.finfo(jnp.float32).tiny  # a student probability that underflowed to 0 stays finite
    t_probs = _target(t_probs_BxNxLxL)
    t_logp = jnp.where(t_probs > 0, jnp.log(jnp.maximum(t_probs, tiny)), -jnp.inf)
    s_logp = jnp.log(jnp.maximum(_f32(s_probs_BxNxLxL), tiny))
    kl_BxNxL = _kl(t_logp, s_logp, _f32(mask_BxL)[:, None, None, :])
    return _weighted_mean(kl_BxNxL, _token_weights(mask_BxL, weights_B)[:, None, :])


def relation_layer(layer: int, teacher_layers: int) -> int:
    """The teacher layer (0-based) of `distill.relation_layer` (-1: the last)."""
    if not -teacher_layers <= layer < teacher_layers:
        raise ValueError(f"distill.relation_layer {layer} is out of range: the teacher has layers "
                         f"0..{teacher_layers - 1} (-1: the last)")
    return layer % teacher_layers


def check_relation_heads(cfg: LossConfig, student_width: int, teacher_width: int,
                         teacher_heads: int) -> None:
    """Raise ValueError, before any work, when a relation term is on and the relation heads
    (`relation_heads`, 0: the teacher's head count) do not divide both widths."""
    if not cfg.needs_values:
        return
    heads = cfg.relation_heads or teacher_heads
    for who, width in (("student", student_width), ("teacher", teacher_width)):
        if width % heads:
            given = "distill.relation_heads" if cfg.relation_heads else "the teacher's head count"
            raise ValueError(f"the relation terms split both widths into {heads} heads ({given}), "
                             f"and the {who}'s width {width} is not divisible by {heads}: set "
                             f"distill.relation_heads to a divisor of {student_width} and "
                             f"{teacher_width}")


def _split_relation_heads(values_BxNxLxD: Array, heads: int) -> Array:
    """Concatenate the heads to [B, L, N*D] and split again into `heads` heads (MiniLM-v2)."""
    B, N, L, D = values_BxNxLxD.shape
    if (N * D) % heads:
        raise ValueError(f"relation heads: width {N * D} ({N} heads x {D}) is not divisible by "
                         f"{heads} relation heads; set distill.relation_heads to a divisor of both "
                         f"widths")
    x_BxLxH = values_BxNxLxD.transpose(0, 2, 1, 3).reshape(B, L, N * D)
    return x_BxLxH.reshape(B, L, heads, N * D // heads).transpose(0, 2, 1, 3)


def _relation_logp(values_BxNxLxD: Array, mask_BxL: Array, heads: int) -> Array:
    v_BxRxLxd = _split_relation_heads(values_BxNxLxD, heads)
    logits_BxRxLxL = jnp.einsum("brqd,brkd->brqk", v_BxRxLxd, v_BxRxLxd)
    logits_BxRxLxL = logits_BxRxLxL / math.sqrt(v_BxRxLxd.shape[-1])
    logits_BxRxLxL = jnp.where(mask_BxL[:, None, None, :] > 0, logits_BxRxLxL, _MASKED)
    return jax.nn.log_softmax(logits_BxRxLxL, axis=-1)


def value_relation_kl(s_values_BxNxLxD: Array, t_values_BxNxLxD: Array, mask_BxL: Array,
                      weights_B: Array, relation_heads: int = 0) -> Array:
    """MiniLM: KL(teacher || student) of softmax(V V^T / sqrt(d)) over real keys, per head per query.

    Both sides are re-split into `relation_heads` heads (0 = the teacher's head count), so head
    counts and head widths may differ; with equal head counts this is the per-head relation.
    Queries and keys ([B, N, L, D] each) give MiniLM-v2's query-query and key-key relations.
    """
    _check_shapes("relation_kl", s_values_BxNxLxD, t_values_BxNxLxD, (0, 2))
    heads = relation_heads or t_values_BxNxLxD.shape[1]
    s_logp = _relation_logp(_f32(s_values_BxNxLxD), mask_BxL, heads)
    t_logp = _relation_logp(_target(t_values_BxNxLxD), mask_BxL, heads)
    kl_BxRxL = _kl(t_logp, s_logp, _f32(mask_BxL)[:, None, None, :])
    return _weighted_mean(kl_BxRxL, _token_weights(mask_BxL, weights_B)[:, None, :])


relation_kl = value_relation_kl  # the same relation of any per-head states


def hidden_cosine(s_hidden_BxLxHs: Array, t_hidden_BxLxHt: Array, mask_BxL: Array,
                  weights_B: Array, proj: Any = None) -> Array:
    """DistilBERT: 1 - cos(student, teacher) per real token, then the weighted mean; `proj` maps
    the student width to the teacher's."""
    s_BxLxH, t_BxLxH = _hidden_pair("hidden_cosine", s_hidden_BxLxHs, t_hidden_BxLxHt, proj)
    norms = jnp.linalg.norm(s_BxLxH, axis=-1) * jnp.linalg.norm(t_BxLxH, axis=-1)
    cos_BxL = jnp.sum(s_BxLxH * t_BxLxH, axis=-1) / jnp.maximum(norms, 1e-8)
    return _weighted_mean(1.0 - cos_BxL, _token_weights(mask_BxL, weights_B))


def init_projections(cfg: LossConfig, student_cfg: Any, teacher_cfg: Any,
                     rng: jax.Array) -> dict[str, dict[str, Array]]:
    """Learned student -> teacher width maps: "hidden" (shared by all layer pairs), "embedding"
    and "cosine" (the last hidden states).

    Only for the terms in use and only when the hidden sizes differ; otherwise an empty dict.
    """
    hs, ht = student_cfg.hidden_size, teacher_cfg.hidden_size
    names = [name for name, weight in (("hidden", cfg.hidden_weight),
                                       ("embedding", cfg.embedding_weight),
                                       ("cosine", cfg.cosine_weight)) if weight > 0]
    if hs == ht or not names:
        return {}
    init = jax.nn.initializers.lecun_normal()
    return {name: {"kernel": init(key, (hs, ht), jnp.float32), "bias": jnp.zeros((ht,), jnp.float32)}
            for name, key in zip(names, jax.random.split(rng, len(names)))}


def _outputs(out: Any, field: str, num_layers: int, side: str, extra: int = 0) -> tuple:
    values = getattr(out, field, None)
    if values is None:
        raise ValueError(f"the {side} model output has no {field}; run the model with its "
                         f"intermediate outputs turned on for the loss terms in use")
    if len(values) != num_layers + extra:
        raise ValueError(f"the {side} model output has {len(values)} {field}, expected "
                         f"{num_layers + extra} for num_layers = {num_layers}")
    return tuple(values)


def _projection(proj_params: Mapping[str, Any], name: str, hs: int, ht: int) -> Any:
    if hs == ht:
        return None
    if name not in proj_params:
        raise KeyError(f"projection params lack {name!r}: student width {hs} differs from teacher "
                       f"width {ht}; create them with init_projections")
    return proj_params[name]


def intermediate_loss(cfg: LossConfig, s_out: Any, t_out: Any, proj_params: Mapping[str, Any],
                      attention_mask_BxL: Array, weights_B: Array, student_cfg: Any,
                      teacher_cfg: Any) -> tuple[Array, Metrics]:
    """Weighted sum of the intermediate terms in use, each summed over the layer map.

    `s_out`/`t_out` are BertOutputs (hidden_states, attention_scores, attention_probs, values);
    metrics hold each term unweighted: loss/hidden, loss/embedding, loss/attention_score,
    loss/attention_kl, loss/value_relation, loss/relation (MiniLM-v2), loss/cosine.
    """
    pairs = layer_map(cfg.layer_map, student_cfg.num_layers, teacher_cfg.num_layers)
    hs, ht = student_cfg.hidden_size, teacher_cfg.hidden_size
    ns, nt = student_cfg.num_layers, teacher_cfg.num_layers
    mask, w = attention_mask_BxL, weights_B
    terms: list[tuple[str, float, Array]] = []

    def both(field, extra=0):
        return (_outputs(s_out, field, ns, "student", extra),
                _outputs(t_out, field, nt, "teacher", extra))

    def over_layers(field, fn, extra=0):
        # hidden_states[0] is the embedding output, so transformer layer i sits at i + 1.
        s_all, t_all = both(field, extra)
        return sum(fn(s_all[i + extra], t_all[j + extra]) for i, j in pairs)

    if cfg.embedding_weight > 0:
        (s_emb, *_), (t_emb, *_) = both("hidden_states", extra=1)
        proj = _projection(proj_params, "embedding", hs, ht)
        terms.append(("loss/embedding", cfg.embedding_weight,
                      hidden_mse(s_emb, t_emb, mask, w, proj)))
    if cfg.hidden_weight > 0:
        proj = _projection(proj_params, "hidden", hs, ht)
        terms.append(("loss/hidden", cfg.hidden_weight, over_layers(
            "hidden_states", lambda s, t: hidden_mse(s, t, mask, w, proj), extra=1)))
    if cfg.attention_score_weight > 0:
        terms.append(("loss/attention_score", cfg.attention_score_weight, over_layers(
            "attention_scores", lambda s, t: attention_score_mse(s, t, mask, w))))
    if cfg.attention_kl_weight > 0:
        terms.append(("loss/attention_kl", cfg.attention_kl_weight, over_layers(
            "attention_probs", lambda s, t: attention_kl(s, t, mask, w))))
    if cfg.value_relation_weight > 0:
        terms.append(("loss/value_relation", cfg.value_relation_weight, over_layers(
            "values", lambda s, t: value_relation_kl(s, t, mask, w, cfg.relation_heads))))
    if cfg.relation_weight > 0:
        layer = relation_layer(cfg.relation_layer, nt)
        terms.append(("loss/relation", cfg.relation_weight, sum(
            relation_kl(s_all[-1], t_all[layer], mask, w, cfg.relation_heads)
            for s_all, t_all in map(both, RELATIONS))))
    if cfg.cosine_weight > 0:
        s_all, t_all = both("hidden_states", extra=1)
        proj = _projection(proj_params, "cosine", hs, ht)
        terms.append(("loss/cosine", cfg.cosine_weight,
                      hidden_cosine(s_all[-1], t_all[-1], mask, w, proj)))
    return weighted_sum(terms)


def total_loss(cfg: LossConfig, s_out: Any, t_out: Any | None, proj_params: Mapping[str, Any],
               labels_B: Array | None, attention_mask_BxL: Array, weights_B: Array,
               student_cfg: Any, teacher_cfg: Any, *, regression: bool = False,
               label_weights: Array | None = None,
               hard_label_weights: Array | None = None) -> tuple[Array, Metrics]:
    """logit_loss + intermediate_loss (when any term is in use); metrics add `loss/total`.

    `student_cfg`/`teacher_cfg` are the encoders' configs. `label_weights` weigh the logit terms
    (token weights [B, L] for token logits); None: the row weights. `hard_label_weights` weigh
    the hard-label term alone; None: `label_weights`.
    """
    t_logits = None if t_out is None else t_out.logits
    loss, metrics = logit_loss(cfg, s_out.logits, t_logits, labels_B,
                               weights_B if label_weights is None else label_weights,
                               regression=regression, hard_weights_B=hard_label_weights)
    if cfg.any_intermediate:
        if t_out is None:
            raise ValueError("intermediate loss terms are in use but no teacher output was given")
        inter, inter_metrics = intermediate_loss(cfg, s_out, t_out, proj_params, attention_mask_BxL,
                                                 weights_B, student_cfg, teacher_cfg)
        loss = loss + inter
        metrics.update(inter_metrics)
    metrics["loss/total"] = loss
    return loss, metrics
