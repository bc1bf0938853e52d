"""Tiny distillation setup shared by test_steps.py, and the per-process body of its 2-process test.

Run as `python tests/_multiprocess_steps.py PROCESS_ID PORT OUT.npz KIND`: two processes with two
CPU devices each run `STEPS` distillation steps on one 4-device mesh; process 0 saves the losses
and the final student params. KIND is the head: sequence (a label per row), token (a label per
token) or span (start and end positions per row).
"""
from __future__ import annotations

import sys

import numpy as np

STEPS = 3
BATCH, LENGTH = 8, 12


def configs(kind: str = "sequence"):
    from jaxkd.losses import LossConfig
    from jaxkd.model import BertConfig, HeadConfig, ModelConfig
    from jaxkd.optim import OptimConfig
    student = ModelConfig(BertConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     hidden_dropout=0.0, attention_dropout=0.0),
                          HeadConfig(kind, num_labels=2 if kind == "span" else 3))
    teacher = student.replace(hidden_size=48, num_layers=2, intermediate_size=96)
    loss = LossConfig(temperature=2.0, alpha=0.5, hidden_weight=1.0, attention_kl_weight=1.0)
    # eps well above fp32 noise: Adam would blow the rounding noise of gradients that are zero
    # in exact arithmetic (the attention key bias) up to full-size steps that differ per layout.
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=1, clip_norm=1.0, eps=1e-4)
    return student, teacher, loss, optim


def make_batch(rng: np.random.Generator, rows: int = BATCH, length: int = LENGTH,
               full_mask: bool = False, kind: str = "sequence") -> dict[str, np.ndarray]:
    """Random rows with padded tokens (unless full_mask) and padding rows of weight 0.

    Token labels are -1 on padding and (unless full_mask) on a random part of the real tokens,
    as on the non-first sub-tokens of words."""
    lengths = np.full(rows, length) if full_mask else rng.integers(3, length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    weights = np.ones(rows, np.float32)
    weights[rng.choice(rows, size=rows // 4, replace=False)] = 0.0
    if kind == "token":
        labels = rng.integers(0, 3, (rows, length))
        if not full_mask:
            labels[rng.random((rows, length)) < 0.3] = -1
        labels = np.where(mask > 0, labels, -1)
    elif kind == "span":  # start <= end inside each row's real tokens
        ends = rng.integers(0, lengths)
        labels = np.stack([rng.integers(0, ends + 1), ends], axis=1)
    else:
        labels = rng.integers(0, 3, rows)
    from jaxkd.data import make_batch

    return make_batch((rng.integers(1, 100, (rows, length)) * mask), mask,
                      np.zeros((rows, length), np.int32), labels.astype(np.int32), weights)


def build(kind: str = "sequence"):
    """(student_cfg, teacher_cfg, loss_cfg, optim_cfg, state, teacher_params, batches)."""
    import jax

    from jaxkd.losses import init_projections
    from jaxkd.model import init_params
    from jaxkd.optim import make_optimizer
    from jaxkd.steps import TrainState
    student_cfg, teacher_cfg, loss_cfg, optim_cfg = configs(kind)
    params = init_params(student_cfg, jax.random.key(0))
    teacher_params = init_params(teacher_cfg, jax.random.key(1))
    proj = init_projections(loss_cfg, student_cfg.encoder, teacher_cfg.encoder, jax.random.key(2))
    state = TrainState.create(params, make_optimizer(optim_cfg, total_steps=10), proj)
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, kind=kind) for _ in range(STEPS)]
    return student_cfg, teacher_cfg, loss_cfg, optim_cfg, state, teacher_params, batches


def compile_mesh_step(step_fn, mesh, state, teacher_params):
    """The distillation step jitted for `mesh`: state and teacher replicated, rows sharded."""
    from jaxkd import sharding
    return sharding.jit_distill_step(step_fn, mesh, sharding.tree_shardings(mesh, state),
                                     sharding.tree_shardings(mesh, teacher_params))


def run_mesh_steps(step, mesh, state, teacher_params, batches):
    """A compiled step run over `batches`; each process feeds its own slice of every batch.
    Returns the final state and every step's metrics."""
    import jax

    from jaxkd import sharding
    state = sharding.shard_state(state, mesh)
    teacher_params = sharding.shard_state(teacher_params, mesh)
    n, i = jax.process_count(), jax.process_index()
    history = []
    for k, batch in enumerate(batches):
        rows = len(batch["weights"]) // n
        local = {key: v[i * rows:(i + 1) * rows] for key, v in batch.items()}
        state, metrics = step(state, teacher_params, sharding.global_batch(local, mesh),
                              jax.random.key(100 + k))
        history.append(metrics)
    return state, history


def _local(x) -> np.ndarray:
    return np.asarray(x.addressable_data(0))  # replicated: every device holds the whole value


def main(process_id: int, port: int, out: str, kind: str) -> None:
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from jaxkd import sharding, steps
    sharding.init_distributed(f"127.0.0.1:{port}", 2, process_id)
    student_cfg, teacher_cfg, loss_cfg, _, state, teacher_params, batches = build(kind)
    mesh = sharding.make_mesh()
    step = compile_mesh_step(steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg), mesh,
                             state, teacher_params)
    state, history = run_mesh_steps(step, mesh, state, teacher_params, batches)
    flat = {jax.tree_util.keystr(p): _local(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    if process_id == 0:
        np.savez(out, losses=np.array([_local(m["loss/total"]) for m in history]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
