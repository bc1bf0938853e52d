"""The per-process body of test_steps.py's 2-process test (its setup is in helpers.py).

Run as `python tests/_multiprocess_steps.py PROCESS_ID PORT OUT.npz KIND`: two processes with two
CPU devices each run `helpers.STEPS` distillation steps on one 4-device mesh; process 0 saves the
losses and the final student params. KIND is the head: sequence (a label per row), token (a label
per token), span (start and end positions per row), or general (masked-LM rows,
helpers.general_world).
"""
from __future__ import annotations

import sys

import numpy as np

import helpers  # this script's directory is on sys.path; helpers creates no array at import


def _local(x) -> np.ndarray:
    return np.asarray(x.addressable_data(0))  # replicated: every device holds the whole value


def main(process_id: int, port: int, out: str, kind: str) -> None:
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from jaxkd import sharding, steps
    sharding.init_distributed(f"127.0.0.1:{port}", 2, process_id)
    if kind == "general":
        student_cfg, teacher_cfg, loss_cfg, objective, state, teacher_params, batches = \
            helpers.general_world()
    else:
        student_cfg, teacher_cfg, loss_cfg, _, state, teacher_params, batches = helpers.build_world(kind)
        objective = None
    mesh = sharding.make_mesh()
    step = helpers.compile_mesh_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, teacher="live", objective=objective),
        mesh, state, teacher_params)
    state, history = helpers.run_mesh_steps(step, mesh, state, teacher_params, batches)
    flat = {jax.tree_util.keystr(p): _local(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    if process_id == 0:
        np.savez(out, losses=np.array([_local(m["loss/total"]) for m in history]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
