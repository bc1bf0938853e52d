"""Pure training and evaluation steps: distillation, hard-label fine-tuning, evaluation.

Each builder binds the static parts (model configs, loss config, schedule) and returns a pure
function of arrays, ready for `jax.jit` (see `jaxkd.sharding`), `jax.pmap` or `jax.shard_map`.

Only the student and the projection params of intermediate losses are trained: they are the
`TrainState`; the teacher is an argument of the step, runs under `stop_gradient` and is never
differentiated nor updated.

Averaging across devices. Under `jax.jit` over a mesh the step sees the global batch and needs
nothing special. Under `pmap`/`shard_map` pass `axis_name`: every loss is a weighted mean over
rows, so each device scales its local mean by its share of the global weight,
sum(w_local) / psum(sum(w_local)), and the scaled losses, gradients and metrics are summed with
`psum`. Padding rows (weight 0) then neither count nor skew the average, and the step equals the
one-device step on the whole batch. Terms averaged over tokens (intermediate losses) are exact
when every device holds the same number of real tokens per unit of row weight, and otherwise a
close approximation.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd.losses import LossConfig
from jaxkd.model import Bert, BertConfig, BertOutput

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]

_EPS = 1e-9
_MODEL_KEYS = ("input_ids", "attention_mask")
_TRAIN_KEYS = _MODEL_KEYS + ("labels", "weights")


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


def _forward(model: Bert, params: Any, batch: Batch, *, loss_cfg: LossConfig | None = None,
             rng: jax.Array | None = None) -> BertOutput:
    """Model outputs; intermediates only where `loss_cfg` uses them; dropout iff `rng` is given."""
    flags = {}
    if loss_cfg is not None:
        flags = dict(output_hidden_states=loss_cfg.needs_hidden,
                     output_attentions=loss_cfg.needs_attention_scores or loss_cfg.needs_attention_probs,
                     output_values=loss_cfg.needs_values)
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch.get("token_type_ids"), deterministic=rng is None,
                       rngs=None if rng is None else {"dropout": rng}, **flags)


def _weighted_mean(values_B: jax.Array, weights_B: jax.Array) -> jax.Array:
    weights_B = weights_B.astype(jnp.float32)
    return jnp.sum(weights_B * values_B.astype(jnp.float32)) / jnp.maximum(jnp.sum(weights_B), _EPS)


def _share(weights_B: jax.Array, axis_name: str | None) -> jax.Array | float:
    """This device's fraction of the global row weight (1 without an axis)."""
    if axis_name is None:
        return 1.0
    local = jnp.sum(weights_B.astype(jnp.float32))
    return local / jnp.maximum(jax.lax.psum(local, axis_name), _EPS)


def _device_rng(rng: jax.Array, axis_name: str | None) -> jax.Array:
    # Replicas that shared one key would draw the same dropout masks for different rows.
    return rng if axis_name is None else jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def _predictions(logits_BxC: jax.Array, regression: bool) -> jax.Array:
    return logits_BxC[:, 0] if regression else jnp.argmax(logits_BxC, axis=-1)


def _label_metrics(logits_BxC: jax.Array, batch: Batch, regression: bool,
                   teacher_logits_BxC: jax.Array | None = None) -> Metrics:
    """Accuracy vs the labels and agreement with the teacher (classification only)."""
    if regression:
        return {}
    pred_B = _predictions(logits_BxC, regression)
    metrics = {"accuracy": _weighted_mean(pred_B == batch["labels"], batch["weights"])}
    if teacher_logits_BxC is not None:
        agree_B = pred_B == jnp.argmax(teacher_logits_BxC, axis=-1)
        metrics["agreement"] = _weighted_mean(agree_B, batch["weights"])
    return metrics


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


def _is_regression(cfg: BertConfig) -> bool:
    return cfg.num_labels == 1


# ----------------------------------------------------------------------------- steps


def make_distill_step(student_cfg: BertConfig, teacher_cfg: BertConfig, loss_cfg: LossConfig,
                      schedule: Schedule | None = None, axis_name: str | None = None):
    """distill_step(state, teacher_params, batch, rng) -> (state, metrics).

    The teacher runs in the step (deterministic, only the intermediates the loss uses), or not
    at all when the batch carries `teacher_logits` and no intermediate term is on.
    """
    if student_cfg.num_labels != teacher_cfg.num_labels:
        raise ValueError(f"student num_labels ({student_cfg.num_labels}) and teacher num_labels "
                         f"({teacher_cfg.num_labels}) differ; both heads must share the label set")
    regression = _is_regression(student_cfg)
    if loss_cfg.regression != regression:
        raise ValueError(f"loss.regression is {loss_cfg.regression} but the models have "
                         f"num_labels = {student_cfg.num_labels}; set loss.regression to {regression}")
    student, teacher = Bert(student_cfg), Bert(teacher_cfg)

    def teacher_output(teacher_params: Any, batch: Batch) -> BertOutput | None:
        if "teacher_logits" in batch and not loss_cfg.any_intermediate:
            return BertOutput(logits=batch["teacher_logits"].astype(jnp.float32))
        if loss_cfg.alpha == 0 and not loss_cfg.any_intermediate:
            return None  # labels only: the teacher is not needed
        return jax.lax.stop_gradient(_forward(teacher, teacher_params, batch, loss_cfg=loss_cfg))

    def distill_step(state: TrainState, teacher_params: Any, batch: Batch,
                     rng: jax.Array) -> tuple[TrainState, Metrics]:
        _check_batch(batch, _TRAIN_KEYS, "distill_step")
        t_out = teacher_output(teacher_params, batch)
        share = _share(batch["weights"], axis_name)
        rng = _device_rng(rng, axis_name)

        def loss_fn(trainable):
            s_out = _forward(student, trainable["params"], batch, loss_cfg=loss_cfg, rng=rng)
            loss, metrics = losses.total_loss(
                loss_cfg, s_out, t_out, trainable["proj_params"], batch["labels"],
                batch["attention_mask"], batch["weights"], student_cfg, teacher_cfg)
            return loss * share, (metrics, s_out.logits)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, logits)), grads = grad_fn(_trainable(state.params, state.proj_params))
        t_logits = None if t_out is None else t_out.logits
        metrics.update(_label_metrics(logits, batch, regression, t_logits))
        return _finish(state, grads, metrics, share, schedule, axis_name)

    return distill_step


def make_finetune_step(cfg: BertConfig, schedule: Schedule | None = None,
                       axis_name: str | None = None):
    """finetune_step(state, batch, rng) -> (state, metrics): hard labels only (CE, or MSE if 1 label)."""
    model, regression = Bert(cfg), _is_regression(cfg)
    name = "loss/mse" if regression else "loss/ce"

    def finetune_step(state: TrainState, batch: Batch,
                      rng: jax.Array) -> tuple[TrainState, Metrics]:
        _check_batch(batch, _TRAIN_KEYS, "finetune_step")
        share = _share(batch["weights"], axis_name)
        rng = _device_rng(rng, axis_name)

        def loss_fn(trainable):
            logits = _forward(model, trainable["params"], batch, rng=rng).logits
            if regression:
                loss = losses.mse_loss(logits, batch["labels"], batch["weights"])
            else:
                loss = losses.ce_loss(logits, batch["labels"], batch["weights"])
            return loss * share, (loss, logits)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, logits)), grads = grad_fn(_trainable(state.params, state.proj_params))
        metrics = {name: loss, "loss/total": loss, **_label_metrics(logits, batch, regression)}
        return _finish(state, grads, metrics, share, schedule, axis_name)

    return finetune_step


def _logits_fn(cfg: BertConfig, where: str):
    model = Bert(cfg)

    def logits(params: Any, batch: Batch) -> jax.Array:
        _check_batch(batch, _MODEL_KEYS, where)
        return _forward(model, params, batch).logits.astype(jnp.float32)

    return logits


def make_eval_step(cfg: BertConfig):
    """eval_step(params, batch) -> {"logits": [B, C] fp32, "predictions": [B]}, deterministic.

    Predictions are class ids, or the single output for regression (num_labels = 1).
    """
    logits_fn, regression = _logits_fn(cfg, "eval_step"), _is_regression(cfg)

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits_BxC = logits_fn(params, batch)
        return {"logits": logits_BxC, "predictions": _predictions(logits_BxC, regression)}

    return eval_step


def make_teacher_logits_fn(cfg: BertConfig):
    """(params, batch) -> fp32 logits [B, C], deterministic: fills the teacher-logit cache."""
    return _logits_fn(cfg, "teacher_logits")
