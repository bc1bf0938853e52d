"""The optimizer from config: clipped AdamW with warmup, decay and gradient accumulation.

`total_steps` always counts optimizer updates, not micro-batches: with accumulation over k
micro-batches the schedule advances once per k calls.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import optax

from jaxkd import util

SCHEDULES = ("linear", "cosine", "constant")
# Leaves named like this are never decayed: biases and LayerNorm scale/shift (old names gamma/beta).
_NO_DECAY_LEAVES = ("bias", "scale", "gamma", "beta")
# A path component naming a layer norm: "LayerNorm", "attention_LayerNorm", "layer_norm", "ln", "ln_f".
_LAYER_NORM = re.compile(r"(layer_?norm|^ln(_|\d|$))", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (YAML section `optim`)."""

    learning_rate: float = 5e-5  # peak, reached at the end of warmup
    warmup_ratio: float = 0.1  # fraction of total steps spent warming up from 0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    schedule: str = "linear"  # after warmup: linear | cosine (both to 0) | constant
    weight_decay: float = 0.01  # decoupled (AdamW); never on biases or layer norms
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient norm; None turns clipping off
    # Micro-batches averaged into one update (optax.MultiSteps), each with equal weight: exact
    # for row-weighted losses, approximate for token-averaged ones (docs/configuration.md).
    accumulate_steps: int = 1

    def __post_init__(self):
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and (
                not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"optim.warmup_steps must be an integer >= 0 or null, "
                             f"got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            hint = util.did_you_mean(self.schedule, SCHEDULES, hint="; did you mean {!r}?")
            raise ValueError(f"optim.schedule {self.schedule!r} is unknown: use one of "
                             f"{', '.join(SCHEDULES)}{hint}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm must be > 0 or null (no clipping), got {self.clip_norm}")
        if not isinstance(self.accumulate_steps, int) or self.accumulate_steps < 1:
            raise ValueError(f"optim.accumulate_steps must be an integer >= 1, "
                             f"got {self.accumulate_steps!r}")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """cfg.warmup_steps if set, else warmup_ratio of total_steps (rounded down)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(cfg.warmup_ratio * total_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update: linear warmup from 0, then linear/cosine to 0 or constant."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    warmup = warmup_steps(cfg, total_steps)
    if warmup > total_steps:
        raise ValueError(f"optim.warmup_steps ({warmup}) exceeds the {total_steps} total steps")
    lr, decay_steps = cfg.learning_rate, total_steps - warmup
    if cfg.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, max(decay_steps, 1))
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(decay_steps, 1))
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies.

    No decay for a leaf named bias/scale/gamma/beta or any leaf under a layer-norm module (a path
    component containing "LayerNorm"/"layer_norm", or "ln", "ln_*", "ln<digit>"); all else decays.
    """
    def decays(path, _):
        names = [_key_name(k) for k in path]
        if names and names[-1] in _NO_DECAY_LEAVES:
            return False
        return not any(_LAYER_NORM.search(n) for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   learning_rate: float | None = None) -> optax.GradientTransformation:
    """Clip by global norm -> AdamW(schedule, masked decay), accumulated over accumulate_steps.

    `learning_rate` overrides cfg.learning_rate (e.g. a per-stage rate).
    """
    if learning_rate is not None:
        cfg = dataclasses.replace(cfg, learning_rate=learning_rate)
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = adamw if cfg.clip_norm is None else optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm), adamw)
    if cfg.accumulate_steps > 1:
        # MultiSteps averages the micro-batch gradients and runs `tx` once per k, so the
        # schedule inside counts real updates only.
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return tx
