"""Held-out evaluation by losses, for tasks scored on held-out text rather than on per-row
predictions (`Task.heldout`, general distillation): masked-LM accuracy and perplexity of a
model at fixed masks, and the held-out value of every distillation term.

Masked-LM accuracy and perplexity are means over the split's masked targets, summed on the device
batch by batch (`Task.eval_batches`: every row once, each row's masks fixed by its index) and
divided at the end: they do not depend on the batch size or the process count. The distillation
terms are each batch's value weighted by its targets; the intermediate terms among them are
means over a batch's rows, so they are exact where every row has as many targets, and otherwise
move with the batch grouping by far less than their spread: packed rows of one length hold
round(15% of their maskable tokens) targets, which differs by one only between rows holding
several document ends.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses, sharding, steps
from jaxkd.model import Model, ModelConfig
from jaxkd.tasks.general import METRICS

# The selection score (minus the held-out total, so the highest is best, as for task metrics),
# then each model's own figures from its masked-LM head.
SCORE, ACCURACY, PERPLEXITY = METRICS
MODEL_METRICS = (ACCURACY, PERPLEXITY)


def make_mlm_eval(cfg: ModelConfig) -> Callable:
    """(params, batch) -> sums {nll, correct, targets} of the model's masked-LM head over the
    batch's targets (labels >= 0 of weighted rows)."""
    model = Model(cfg)

    def mlm_sums(params, batch):
        logits = steps._forward(model, params, batch).logits  # pylint: disable=protected-access
        weights = batch["weights"][:, None] * (batch["labels"] >= 0)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(batch["labels"], 0)[..., None], -1)[..., 0]
        right = jnp.argmax(logits, axis=-1) == batch["labels"]
        return {"nll": -jnp.sum(weights * picked), "correct": jnp.sum(weights * right),
                "targets": jnp.sum(weights)}

    return mlm_sums


@functools.lru_cache(maxsize=None)
def jitted_mlm_eval(cfg: ModelConfig) -> Callable:
    """`make_mlm_eval(cfg)` jitted once per model config, so evaluations reuse one program."""
    return jax.jit(make_mlm_eval(cfg))


def make_terms_eval(student_cfg: ModelConfig, teacher_cfg: ModelConfig, loss_cfg: losses.LossConfig,
                    objective) -> Callable:
    """(params, proj_params, teacher_params, batch) -> each distillation term of the batch times
    the batch's weight (its weighted targets), and that weight: deterministic, no update."""
    student, teacher = Model(student_cfg), Model(teacher_cfg)

    def term_sums(params, proj_params, teacher_params, batch):
        s_out = steps._forward(student, params, batch, loss_cfg=loss_cfg)  # pylint: disable=protected-access
        t_out = steps._forward(teacher, teacher_params, batch, loss_cfg=loss_cfg)  # pylint: disable=protected-access
        _, terms = objective.distill_loss(loss_cfg, s_out, t_out, proj_params, batch,
                                          student_cfg.encoder, teacher_cfg.encoder)
        weight = jnp.sum(objective.weights(batch))
        return {**{k: v * weight for k, v in terms.items()}, "weight": weight}

    return term_sums


def scores(batches: Iterable, mesh, mlm: tuple | None = None,
           terms: tuple | None = None) -> dict[str, float]:
    """A model's held-out figures over `batches`, in one pass (each batch masked and placed
    once): with `mlm` = (jitted `make_mlm_eval`, params) masked-LM accuracy and perplexity (exp
    of the mean target NLL); with `terms` = (jitted `make_terms_eval`, params, proj_params,
    teacher_params) each distillation term's mean (`loss/...`) and `SCORE`, minus the total."""
    calls = {name: (call[0], call[1:]) for name, call in (("mlm", mlm), ("terms", terms))
             if call is not None}
    sums: dict[str, dict[str, Any]] = {name: {} for name in calls}
    for local in batches:
        batch = sharding.global_batch(local, mesh)
        for name, (fn, args) in calls.items():
            part = fn(*args, batch)
            sums[name] = part if not sums[name] else jax.tree.map(jnp.add, sums[name], part)
    sums = {name: {k: float(v) for k, v in jax.device_get(total).items()}
            for name, total in sums.items()}
    out: dict[str, float] = {}
    if "terms" in sums:
        weight = max(sums["terms"].pop("weight"), 1e-9)
        means = {k: v / weight for k, v in sums["terms"].items()}
        out.update({SCORE: -means["loss/total"], **means})
    if "mlm" in sums:
        targets = max(sums["mlm"]["targets"], 1e-9)
        out.update({ACCURACY: sums["mlm"]["correct"] / targets,
                    PERPLEXITY: float(math.exp(min(sums["mlm"]["nll"] / targets, 700.0)))})
    return out
