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
"""
from jaxkd.hf import load_hf, load_tokenizer, save_hf
from jaxkd.losses import (LossConfig, ce_loss, intermediate_loss, kd_loss, layer_map, logit_loss,
                          mse_loss, total_loss)
from jaxkd.model import (Bert, BertConfig, BertOutput, HeadConfig, Model, ModelConfig, ModelOutput,
                         apply_model, init_params, param_count)
from jaxkd.optim import OptimConfig, make_optimizer, make_schedule
from jaxkd.sharding import (global_batch, jit_distill_step, jit_finetune_step, make_mesh,
                            shard_state)
from jaxkd.steps import TrainState, make_distill_step, make_finetune_step, make_logits_fn
from jaxkd.student import student_from_pretrained, student_from_shape, student_from_teacher
from jaxkd.tasks import TaskConfig, task_config
from jaxkd.tasks import resolve as resolve_task

__version__ = "0.1.0"
