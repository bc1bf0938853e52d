"""jaxkd: knowledge distillation for BERT-family encoders in JAX/Flax.

The public API, for use inside your own JAX code:
  models     BertConfig (the encoder), HeadConfig, ModelConfig, Model, ModelOutput, apply_model,
             init_params (Bert / BertOutput are the older names of Model / ModelOutput)
  tasks      TaskConfig (the `task` section, typed per kind), task_config, resolve_task
             (the kinds: jaxkd.tasks.KINDS)
  weights    load_hf, save_hf, student_from_teacher, student_from_shape, student_from_pretrained
  losses     LossConfig, kd_loss, ce_loss, mse_loss, logit_loss, intermediate_loss, total_loss, layer_map
  steps      TrainState, make_distill_step, make_finetune_step, make_logits_fn
  optimizer  OptimConfig, make_optimizer, make_schedule
  sharding   make_mesh, shard_state, global_batch, jit_distill_step, jit_finetune_step

Each name is imported from its module on first use (so `import jaxkd.data.corpus`, as the
tokenizer's worker processes do, does not import JAX); subpackages and modules too
(`jaxkd.data`, `jaxkd.sharding`).
"""
import importlib

# public name -> (module, name there)
_EXPORTS = {
    **{n: ("jaxkd.hf", n) for n in ("load_hf", "load_tokenizer", "save_hf")},
    **{n: ("jaxkd.losses", n) for n in ("LossConfig", "ce_loss", "intermediate_loss", "kd_loss",
                                        "layer_map", "logit_loss", "mse_loss", "total_loss")},
    **{n: ("jaxkd.model", n) for n in ("Bert", "BertConfig", "BertOutput", "HeadConfig", "Model",
                                       "ModelConfig", "ModelOutput", "apply_model", "init_params",
                                       "param_count")},
    **{n: ("jaxkd.optim", n) for n in ("OptimConfig", "make_optimizer", "make_schedule")},
    **{n: ("jaxkd.sharding", n) for n in ("global_batch", "jit_distill_step", "jit_finetune_step",
                                          "make_mesh", "shard_state")},
    **{n: ("jaxkd.steps", n) for n in ("TrainState", "make_distill_step", "make_finetune_step",
                                       "make_logits_fn")},
    **{n: ("jaxkd.student", n) for n in ("student_from_pretrained", "student_from_shape",
                                         "student_from_teacher")},
    "TaskConfig": ("jaxkd.tasks", "TaskConfig"),
    "task_config": ("jaxkd.tasks", "task_config"),
    "resolve_task": ("jaxkd.tasks", "resolve"),
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
