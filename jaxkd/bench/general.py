"""`bench step --general`: one general-distillation step at fixed shapes (DistilBERT's
objectives on masked rows: KD on the masked-LM distributions, the student's masked-LM
cross-entropy, the last hidden states' cosine), timed as `bench step` times logit KD, and
alternated with its PyTorch reference (`jaxkd.bench.torch_general`) with `--vs-torch`.
"""
from __future__ import annotations

import pathlib

import numpy as np

from jaxkd import hf, sharding, steps, tasks
from jaxkd.bench.common import StepSetup, adamw, spread_layers, step_keys
from jaxkd.bench.step import Prepared
from jaxkd.bench.torch_general import COSINE_WEIGHT, KD_WEIGHT, MLM_WEIGHT, random_masked
from jaxkd.data import make_batch
from jaxkd.losses import LossConfig
from jaxkd.student import student_from_teacher

TORCH_SCRIPT = pathlib.Path(__file__).with_name("torch_general.py")


def general_task():
    """The general task with DistilBERT's weights of its masked-LM terms."""
    return tasks.resolve(tasks.task_config(name="text", mlm_weight=MLM_WEIGHT, kd_weight=KD_WEIGHT))


def masked_batch(teacher_dir, vocab_size: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    """The reference's batch (`torch_general.random_masked`): input_ids, positions, labels."""
    tok = hf.load_tokenizer(teacher_dir)
    ids, positions, labels = random_masked(vocab_size, batch, seq, tok.mask_token_id,
                                           tok.cls_token_id, tok.sep_token_id)
    return {"input_ids": ids, "positions": positions, "labels": labels}


def prepare_general(setup: StepSetup, arrays: dict[str, np.ndarray] | None = None) -> Prepared:
    """The compiled general step of `setup`'s teacher and a student of its spread layers, on
    `arrays` (input_ids, positions, labels; default: the reference's random masked batch)."""
    task = general_task()
    directory = hf.resolve_dir(setup.teacher)
    teacher_cfg, teacher_params = hf.load_hf(directory, head=task.head(), dtype=setup.dtype)
    layers = spread_layers(teacher_cfg.encoder.num_layers, setup.student_layers)
    student_cfg, params = student_from_teacher(teacher_cfg, teacher_params, layers)
    loss_cfg = LossConfig(temperature=setup.temperature, cosine_weight=COSINE_WEIGHT)
    if arrays is None:
        arrays = masked_batch(directory, teacher_cfg.encoder.vocab_size, setup.batch, setup.seq)
    ids = arrays["input_ids"]
    batch = make_batch(ids, np.ones_like(ids), np.zeros_like(ids), arrays["labels"],
                       np.ones(len(ids), np.float32), positions=arrays["positions"])
    mesh = sharding.make_mesh()
    state = steps.TrainState.create(params, adamw())
    state_shardings = sharding.tree_shardings(mesh, state)
    teacher_shardings = sharding.tree_shardings(mesh, teacher_params)
    step = sharding.jit_distill_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, teacher="live",
                                objective=task.objective(student_cfg.head)),
        mesh, state_shardings, teacher_shardings)
    return Prepared(step=step, state=sharding.place(state, state_shardings),
                    teacher_params=sharding.place(teacher_params, teacher_shardings),
                    batch=sharding.global_batch(batch, mesh),
                    keys=step_keys(setup.rng_impl, setup.warmup + setup.steps),
                    student_cfg=student_cfg, teacher_cfg=teacher_cfg, loss_cfg=loss_cfg)

