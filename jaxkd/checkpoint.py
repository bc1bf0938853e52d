"""Orbax checkpoints of the train state plus a JSON of everything else a resume needs.

Each checkpoint holds `state` (the student's TrainState: params, projection
params, optimizer state, step) and `meta` (data-iterator position, seed, eval
metric). The newest `keep` are kept, plus the best by the eval metric. Saves are
atomic: a save killed midway leaves a tmp folder that restore ignores.
"""
from __future__ import annotations

import errno
import os
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def _metric(metrics) -> float:
    return float(metrics["eval_metric"])


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the resume rules of jaxkd."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, keep_best: bool = True):
        policies = [pp.LatestN(n=keep)]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=_metric, n=1,
                                     keep_checkpoints_without_metrics=False))
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                cleanup_tmp_directories=True, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, eval_metric: float | None = None) -> bool:
        check_free_space(self.directory, state, step)
        metrics = None if eval_metric is None else {"eval_metric": float(eval_metric)}
        if eval_metric is not None:
            meta = {**meta, "eval_metric": float(eval_metric)}
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        return bool(saved)

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
        """Restore into the structure, dtypes and shardings of `like_state`."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like_state)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def best_step(self) -> int | None:
        """The kept step with the highest eval metric (the latest among ties), else None."""
        best, best_value = None, None
        for step in sorted(self.all_steps()):
            value = self.read_meta(step).get("eval_metric")
            if value is not None and (best_value is None or value >= best_value):
                best, best_value = step, value
        return best

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


_HEADROOM = 1.1  # checkpoint files and their metadata, over the arrays' bytes


def check_free_space(directory: pathlib.Path, state: Any, step: int) -> None:
    """Raise `OSError(ENOSPC)` naming `directory` when its disk cannot hold one more checkpoint
    of `state`: checked before the save, so that a full disk stops the run with the previous
    checkpoint intact and no half-written one (orbax's background writes fail noisily)."""
    need = _HEADROOM * sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint of step {step} needs "
                      f"about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free",
                      os.fspath(directory))
