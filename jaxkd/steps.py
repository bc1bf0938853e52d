"""Pure training and evaluation steps: distillation, hard-label fine-tuning, evaluation.

Each builder binds the static parts (model configs, loss config, schedule) and returns a pure
function of arrays, ready for `jax.jit` (see `jaxkd.sharding`), `jax.pmap` or `jax.shard_map`.

Only the student and the projection params of intermediate losses are trained: they are the
`TrainState`; the teacher is an argument of the step, runs under `stop_gradient` and is never
differentiated nor updated.

What the outputs are trained on comes from the task: its `Objective` (`Task.objective`, by
default `jaxkd.tasks.objective(config.head)`) gives the distillation loss (KD and hard-label
terms per row or per labelled token, or a kind's own terms, plus the intermediate terms) and the
step metrics.

Where the teacher's logits come from is decided when the step is built, not per batch:
`teacher="live"` runs the teacher in the step (needed by intermediate losses), `"cached"` reads
`batch["teacher_logits"]` (the teacher cache), `"none"` trains on labels only (alpha = 0).

Averaging across devices. Under `jax.jit` over a mesh the step sees the global batch and needs
nothing special. Under `pmap`/`shard_map` pass `axis_name`: every loss is a weighted mean over
rows (or labelled tokens), so each device scales its local mean by its share of the global
weight, sum(w_local) / psum(sum(w_local)), and the scaled losses, gradients and metrics are summed
with `psum`. Padding rows (weight 0) then neither count nor skew the average, and the step equals
the one-device step on the whole batch. The hard-label term, a mean over the labelled rows alone
(transfer rows have `hard_weights` 0), and the metrics read on them take the device's share of
the hard-label weight instead, so they are exact too however the transfer rows fall. Terms
averaged over other units (intermediate losses over real tokens) are exact when every device
holds the same number of them per unit of loss weight, and otherwise a close approximation. The
trainer's steps run under `jax.jit` over the global batch, where every term is exact.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxkd import tasks
from jaxkd.losses import LossConfig
from jaxkd.model import Model, ModelConfig, ModelOutput

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]

_EPS = 1e-9
_MODEL_KEYS = ("input_ids", "attention_mask")
_TRAIN_KEYS = _MODEL_KEYS + ("labels", "weights", "hard_weights")
TEACHER_SOURCES = ("live", "cached", "none")


class TrainState(flax.struct.PyTreeNode):
    """What a training step updates: the student, the loss projections and their optimizer state.

    `step` counts optimizer updates: under `optax.MultiSteps` it advances only when the
    accumulated gradient is applied (the micro-steps are counted by optax's own state).
    """

    step: jax.Array
    params: Any
    proj_params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation,
               proj_params: Any = None) -> "TrainState":
        proj_params = {} if proj_params is None else proj_params
        return cls(step=jnp.zeros((), jnp.int32), params=params, proj_params=proj_params,
                   opt_state=tx.init(_trainable(params, proj_params)), tx=tx)

    def apply_gradients(self, grads: Any) -> "TrainState":
        """One optimizer update; `grads` has the layout of `trainable()`."""
        trainable = _trainable(self.params, self.proj_params)
        updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        return self.replace(step=_updates_done(self.step, opt_state), params=new["params"],
                            proj_params=new["proj_params"], opt_state=opt_state)


def _trainable(params: Any, proj_params: Any) -> dict[str, Any]:
    # One tree for the optimizer: a path-based weight-decay mask still sees the usual leaf names.
    return {"params": params, "proj_params": proj_params}


def _updates_done(step: jax.Array, opt_state: Any) -> jax.Array:
    """MultiSteps' count of applied updates if there is one, else one more than before."""
    applied = optax.tree.get(opt_state, "gradient_step")
    return (step + 1 if applied is None else applied).astype(jnp.int32)


# ----------------------------------------------------------------------------- helpers


def _check_batch(batch: Batch, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{where}: the batch lacks {missing}; it has {sorted(batch)}")


def _forward(model: Model, params: Any, batch: Batch, *, loss_cfg: LossConfig | None = None,
             rng: jax.Array | None = None) -> ModelOutput:
    """Model outputs; intermediates only where `loss_cfg` uses them; dropout iff `rng` is given."""
    flags = {}
    if loss_cfg is not None:
        flags = dict(output_hidden_states=loss_cfg.needs_hidden,
                     output_attentions=loss_cfg.needs_attention_scores or loss_cfg.needs_attention_probs,
                     output_values=loss_cfg.needs_values,
                     output_queries_keys=loss_cfg.needs_queries_keys)
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch.get("token_type_ids"), deterministic=rng is None,
                       rngs=None if rng is None else {"dropout": rng},
                       positions=batch.get("positions"), **flags)


def _share(loss_weights: jax.Array, axis_name: str | None) -> jax.Array | float:
    """This device's fraction of the global loss weight (1 without an axis)."""
    if axis_name is None:
        return 1.0
    local = jnp.sum(loss_weights.astype(jnp.float32))
    return local / jnp.maximum(jax.lax.psum(local, axis_name), _EPS)


def _device_rng(rng: jax.Array, axis_name: str | None) -> jax.Array:
    # Replicas that shared one key would draw the same dropout masks for different rows.
    return rng if axis_name is None else jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def _finish(state: TrainState, grads: Any, metrics: Metrics, share: jax.Array | float,
            schedule: Schedule | None, axis_name: str | None) -> tuple[TrainState, Metrics]:
    """Combine across devices, update, and add grad_norm / learning_rate (all fp32 scalars)."""
    metrics = {k: jnp.asarray(v, jnp.float32) * share for k, v in metrics.items()}
    if axis_name is not None:
        grads, metrics = jax.lax.psum((grads, metrics), axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return state.apply_gradients(grads), metrics


def default_teacher_source(loss_cfg: LossConfig) -> str:
    """Live when intermediate terms need the teacher's layers, none for labels only, else live."""
    if loss_cfg.any_intermediate:
        return "live"
    return "none" if loss_cfg.alpha == 0 else "live"


# ----------------------------------------------------------------------------- steps


def make_distill_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig, loss_cfg: LossConfig,
                      schedule: Schedule | None = None, axis_name: str | None = None,
                      teacher: str | None = None, objective: tasks.Objective | None = None):
    """distill_step(state, teacher_params, batch, rng) -> (state, metrics).

    `teacher`: where the teacher's logits come from (see the module docstring); None picks
    `default_teacher_source(loss_cfg)`. With "cached", batches carry `teacher_logits` and
    `teacher_params` is not read (pass None). `objective`: how the head's outputs are trained
    (`Task.objective`); None: `tasks.objective(student_cfg.head)`.
    """
    s_head, t_head = student_cfg.head, teacher_cfg.head
    if (s_head.kind, s_head.num_labels) != (t_head.kind, t_head.num_labels):
        raise ValueError(f"student head ({s_head.kind}, {s_head.num_labels} labels) and teacher head "
                         f"({t_head.kind}, {t_head.num_labels} labels) differ; both must be the same "
                         f"kind of head over the same label set")
    teacher = default_teacher_source(loss_cfg) if teacher is None else teacher
    if teacher not in TEACHER_SOURCES:
        raise ValueError(f"teacher={teacher!r}: use one of {TEACHER_SOURCES}")
    if teacher != "live" and loss_cfg.any_intermediate:
        raise ValueError(f"intermediate loss terms read the teacher's layers: teacher must be "
                         f"'live', not {teacher!r}")
    if teacher == "none" and loss_cfg.alpha > 0:
        raise ValueError(f"distill.alpha = {loss_cfg.alpha} needs the teacher's logits: teacher "
                         f"must be 'live' or 'cached', not 'none'")
    objective = tasks.objective(student_cfg.head) if objective is None else objective
    hard_name = objective.hard_loss_name
    hard_metrics = (hard_name,) + objective.hard_metric_names  # means over the labelled rows
    student, teacher_model = Model(student_cfg), Model(teacher_cfg)
    required = _TRAIN_KEYS + (("teacher_logits",) if teacher == "cached" else ())

    def teacher_output(teacher_params: Any, batch: Batch) -> ModelOutput | None:
        if teacher == "cached":
            return ModelOutput(logits=batch["teacher_logits"].astype(jnp.float32))
        if teacher == "none":
            return None
        return jax.lax.stop_gradient(_forward(teacher_model, teacher_params, batch, loss_cfg=loss_cfg))

    def distill_step(state: TrainState, teacher_params: Any, batch: Batch,
                     rng: jax.Array) -> tuple[TrainState, Metrics]:
        _check_batch(batch, required, "distill_step")
        t_out = teacher_output(teacher_params, batch)
        label_weights = objective.weights(batch)
        hard_weights = objective.hard_weights(batch)  # 0 on transfer rows: KD only
        share = _share(label_weights, axis_name)
        hard_share = _share(hard_weights, axis_name)
        rng = _device_rng(rng, axis_name)

        def device_part(total: jax.Array, terms: Metrics) -> jax.Array:
            """This device's part of the global loss: each term times its own share."""
            if axis_name is None:
                return total
            if hard_name not in terms:
                return total * share
            return total * share + (1.0 - loss_cfg.alpha) * terms[hard_name] * (hard_share - share)

        def loss_fn(trainable):
            s_out = _forward(student, trainable["params"], batch, loss_cfg=loss_cfg, rng=rng)
            loss, metrics = objective.distill_loss(loss_cfg, s_out, t_out, trainable["proj_params"],
                                                   batch, student_cfg.encoder, teacher_cfg.encoder)
            return device_part(loss, metrics), (metrics, s_out.logits)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (metrics, logits)), grads = grad_fn(_trainable(state.params, state.proj_params))
        t_logits = None if t_out is None else t_out.logits
        metrics.update(objective.metrics(logits, batch, t_logits))
        if axis_name is not None:  # each metric as its own share of the global mean
            metrics = {k: v * (hard_share if k in hard_metrics else share) for k, v in metrics.items()}
            metrics["loss/total"] = total
        return _finish(state, grads, metrics, 1.0, schedule, axis_name)

    return distill_step


def make_finetune_step(cfg: ModelConfig, schedule: Schedule | None = None,
                       axis_name: str | None = None):
    """finetune_step(state, batch, rng) -> (state, metrics): the head's hard-label loss only."""
    model, objective = Model(cfg), tasks.objective(cfg.head)

    def finetune_step(state: TrainState, batch: Batch,
                      rng: jax.Array) -> tuple[TrainState, Metrics]:
        _check_batch(batch, _TRAIN_KEYS, "finetune_step")
        share = _share(objective.weights(batch), axis_name)
        rng = _device_rng(rng, axis_name)

        def loss_fn(trainable):
            logits = _forward(model, trainable["params"], batch, rng=rng).logits
            loss = objective.hard_loss(logits, batch)
            return loss * share, (loss, logits)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, logits)), grads = grad_fn(_trainable(state.params, state.proj_params))
        metrics = {objective.hard_loss_name: loss, "loss/total": loss, **objective.metrics(logits, batch)}
        return _finish(state, grads, metrics, share, schedule, axis_name)

    return finetune_step


def make_logits_fn(cfg: ModelConfig):
    """(params, batch) -> fp32 logits ([B, C] or [B, L, C]), deterministic: evaluation,
    prediction and the teacher cache all use it (see `jaxkd.inference`)."""
    model = Model(cfg)

    def logits(params: Any, batch: Batch) -> jax.Array:
        _check_batch(batch, _MODEL_KEYS, "logits")
        return _forward(model, params, batch).logits.astype(jnp.float32)

    return logits
