"""Task kinds, one module each: what to read, how to encode and label it, which head, losses,
predictions and metrics. The pipeline asks the task and never branches on the kind itself.

A new kind is one module with TYPE, KEYS, PRESETS, TRANSFER, check, resolve and objective (see
`jaxkd.tasks.base`), added to `KINDS`, plus its head in `jaxkd.model.HEADS`.
"""
from __future__ import annotations

from jaxkd.data import DataConfig, DataError, nearest
from jaxkd.model import HeadConfig
from jaxkd.tasks import qa, sequence, token
from jaxkd.tasks.base import Objective, Task, TaskConfig

KINDS = {module.TYPE: module for module in (sequence, token, qa)}
DEFAULT_TYPE = sequence.TYPE
_BY_HEAD = {"sequence": sequence, "token": token, "span": qa}
_ALL_KEYS = {key for module in KINDS.values() for key in module.KEYS}
_DEFAULTS = TaskConfig.__dataclass_fields__


def _kind_of(cfg: TaskConfig):
    if cfg.type is not None:
        return KINDS[cfg.type]
    for module in KINDS.values():
        if cfg.name in module.PRESETS:
            return module
    return KINDS[DEFAULT_TYPE]


def check_config(cfg: TaskConfig) -> None:
    """The `task` section fits its type: a known type and preset, and no key of another type."""
    if cfg.type is not None and cfg.type not in KINDS:
        raise DataError(f"unknown task.type {cfg.type!r}{nearest(cfg.type, KINDS)}; "
                        f"known: {', '.join(KINDS)}")
    kind = _kind_of(cfg)
    if cfg.name != "custom" and cfg.name not in kind.PRESETS:
        others = [t for t, m in KINDS.items() if cfg.name in m.PRESETS]
        hint = f" (it is a {others[0]} preset: set task.type: {others[0]})" if others else \
            nearest(cfg.name, kind.PRESETS)
        raise DataError(f"unknown task.name {cfg.name!r} for {kind.TYPE}{hint}; known: "
                        f"{', '.join(kind.PRESETS)} or 'custom'")
    for key in sorted(_ALL_KEYS - set(kind.KEYS)):
        if getattr(cfg, key) != _DEFAULTS[key].default:
            owners = [t for t, m in KINDS.items() if key in m.KEYS]
            raise DataError(f"task.{key} is not used by {kind.TYPE} tasks (it belongs to "
                            f"{' and '.join(owners)}); remove it or set task.type")
    kind.check(cfg)


def check_transfer(cfg: TaskConfig, key: str, augment=None) -> None:
    """Transfer data (`key`: data.unlabeled or distill.augment, with its settings `augment`)
    fits the task's kind."""
    kind = _kind_of(cfg)
    reason = kind.TRANSFER[key]
    if reason is not None:
        raise DataError(f"{key} is not available for {kind.TYPE} tasks: {reason}. Remove {key}.")
    if augment is not None and hasattr(kind, "check_augment"):
        kind.check_augment(augment)


def resolve(cfg: TaskConfig, data_cfg: DataConfig | None = None) -> Task:
    """The task of a `task` section; custom tasks without labels read them from data.train."""
    return _kind_of(cfg).resolve(cfg, data_cfg)


def objective(head: HeadConfig) -> Objective:
    """How a head's logits are trained and scored in a step."""
    return _BY_HEAD[head.kind].objective(head)


__all__ = ["KINDS", "Objective", "Task", "TaskConfig", "check_config", "check_transfer", "objective",
           "resolve"]
