"""Task kinds, one module each: what to read, how to encode and label it, which head, losses,
predictions, metrics, and how an exported model of the kind is read back. The pipeline asks the
task and never branches on the kind itself.

A new kind is one module of this package with TYPE, CONFIG (its `task` section, a `TaskConfig`
subclass), PRESETS, HEAD (its `jaxkd.model.HeadSpec`, registered), TRANSFER, check, resolve,
objective, exported_config, optionally check_run and directory_head, and a `Task` subclass (see
`jaxkd.tasks.base`), added to `KINDS` (the recipe: docs/tasks.md, "A new task kind").
"""
from __future__ import annotations

import dataclasses
import pathlib

from jaxkd.data import DataConfig, DataError, nearest
from jaxkd.model import HeadConfig
# Importing a kind registers its head: in this order, the order of KINDS (and of model.HEADS).
from jaxkd.tasks import sequence, token, qa, embedding, general  # isort: skip
from jaxkd.tasks.base import Objective, Task, TaskConfig

KINDS = {module.TYPE: module for module in (sequence, token, qa, embedding, general)}
DEFAULT_TYPE = sequence.TYPE
_BY_HEAD = {module.HEAD.kind: module for module in KINDS.values()}


def kind(type_: str | None, name: str = "custom"):
    """The module of a task type; without a type, the kind whose preset `name` is, else the
    default kind. A `DataError` for an unknown type."""
    if type_ is not None:
        if type_ not in KINDS:
            raise DataError(f"unknown task.type {type_!r}{nearest(type_, KINDS)}; "
                            f"known: {', '.join(KINDS)}")
        return KINDS[type_]
    for module in KINDS.values():
        if name in module.PRESETS:
            return module
    return KINDS[DEFAULT_TYPE]


def kind_of_head(head_kind: str):
    """The module of the kind whose models have heads of `head_kind`."""
    return _BY_HEAD[head_kind]


def config_class(type_: str | None, name: str = "custom") -> type[TaskConfig]:
    return kind(type_, name).CONFIG


def keys(config_cls: type[TaskConfig]) -> tuple[str, ...]:
    """The `task.*` keys of a kind's section."""
    return tuple(f.name for f in dataclasses.fields(config_cls))


def unknown_key_message(config_cls: type[TaskConfig], key: str) -> str:
    own = keys(config_cls)
    this = next(t for t, m in KINDS.items() if m.CONFIG is config_cls)
    owners = [t for t, m in KINDS.items() if key in keys(m.CONFIG)]
    if owners:
        return (f"task.{key} is not used by {this} tasks (it belongs to {' and '.join(owners)}); "
                f"remove it or set task.type (keys of {this}: {', '.join(own)})")
    return f"unknown config key 'task.{key}'{nearest(key, own)}; keys of {this}: {', '.join(own)}"


def task_config(name: str = TaskConfig.name, **keys_) -> TaskConfig:
    """The `task` section of a kind from keyword arguments (the kind chosen as in a config
    file: `type`, else the preset `name`); a `DataError` for a key of another kind."""
    cls = config_class(keys_.get("type"), name)
    own = set(keys(cls))
    for key in keys_:
        if key not in own:
            raise DataError(unknown_key_message(cls, key))
    return cls(name=name, **keys_)


def check_config(cfg: TaskConfig) -> None:
    """The `task` section fits its type: a known type and preset of it, then the kind's checks."""
    module = kind(cfg.type, cfg.name)
    if not isinstance(cfg, module.CONFIG):
        raise DataError(f"a {type(cfg).__name__} is not the task section of {module.TYPE} tasks; "
                        f"build it with jaxkd.tasks.task_config")
    if cfg.name != "custom" and cfg.name not in module.PRESETS:
        others = [t for t, m in KINDS.items() if cfg.name in m.PRESETS]
        hint = f" (it is a {others[0]} preset: set task.type: {others[0]})" if others else \
            nearest(cfg.name, module.PRESETS)
        raise DataError(f"unknown task.name {cfg.name!r} for {module.TYPE}{hint}; known: "
                        f"{', '.join(module.PRESETS)} or 'custom'")
    module.check(cfg)


def check_transfer(cfg: TaskConfig, key: str, augment=None) -> None:
    """Transfer data (`key`: data.unlabeled or distill.augment, with its settings `augment`)
    fits the task's kind."""
    module = kind(cfg.type, cfg.name)
    reason = module.TRANSFER[key]
    if reason is not None:
        raise DataError(f"{key} is not available for {module.TYPE} tasks: {reason}. Remove {key}.")
    if augment is not None and hasattr(module, "check_augment"):
        module.check_augment(augment)


def check_run(cfg: TaskConfig, distill, teacher) -> None:
    """What the task's kind needs of the `distill` and `teacher` sections (a kind's optional
    `check_run`), checked when the config is read."""
    module = kind(cfg.type, cfg.name)
    if hasattr(module, "check_run"):
        module.check_run(cfg, distill, teacher)


def source_files(cfg: TaskConfig, source: str) -> list[pathlib.Path]:
    """The local files (or directories) a data source names for the task's kind (a kind's
    optional `source_files`: a general corpus joins several with commas); by default the one
    path, if it exists. [] for a Hub dataset or split."""
    module = kind(cfg.type, cfg.name)
    if hasattr(module, "source_files"):
        return module.source_files(source)
    return [pathlib.Path(source)] if pathlib.Path(source).exists() else []


def directory_head(directory, hf_config: dict):
    """The head of a model directory that a kind recognises by its own files (a kind's optional
    `directory_head`, e.g. a sentence-transformers directory), else None: the head is then
    the checkpoint's architecture's."""
    for module in KINDS.values():
        find = getattr(module, "directory_head", None)
        head = None if find is None else find(directory, hf_config)
        if head is not None:
            return head
    return None


def resolve(cfg: TaskConfig, data_cfg: DataConfig | None = None) -> Task:
    """The task of a `task` section; custom tasks without labels read them from data.train."""
    return kind(cfg.type, cfg.name).resolve(cfg, data_cfg)


def objective(head: HeadConfig) -> Objective:
    """How a head's logits are trained and scored in a step."""
    return kind_of_head(head.kind).objective(head)


__all__ = ["KINDS", "Objective", "Task", "TaskConfig", "check_config", "check_run", "check_transfer",
           "config_class", "directory_head", "kind", "kind_of_head", "keys", "objective", "resolve",
           "task_config"]
