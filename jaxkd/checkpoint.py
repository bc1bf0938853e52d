"""Orbax checkpoints of the train state plus a JSON of everything else a resume needs.

Each checkpoint holds `state` (the student's TrainState: params, projection
params, optimizer state, step) and `meta` (data-iterator position, seed, eval
metric). The newest `keep` are kept, plus the best by the eval metric. Saves are
atomic: a save killed midway leaves a tmp folder that restore ignores.

Orbax's commit is not proof that a checkpoint is whole: its files can be truncated or deleted
afterwards, and a changed byte in an array file restores without an error as a wrong value.
So once a save has finished (at the next save, `wait` or `close`), process 0 records every file
of the step with its size and CRC-32 in `<step>/jaxkd-files.json`, written last and atomically.
`restore_first_usable` proves a checkpoint complete before it is used: both items there,
`state/_METADATA` and the `meta` JSON readable, every recorded file present with its size and
checksum (a step saved before its record was written is checked without one), the arrays of the
current state's shapes and dtypes (else `CheckpointError`: another model), and the restore
itself succeeding. One that fails is moved to `<dir>/unusable/<step>` (kept, never deleted) with
one warning line, and the next candidate is tried. This runs once per stage, not per step.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxkd import sharding, util
from jaxkd.families.base import CheckpointError as _ModelCheckpointError

log = logging.getLogger("jaxkd")

RECORD = "jaxkd-files.json"  # in each step's folder: its files, sizes and CRC-32s
UNUSABLE = "unusable"  # beside the steps: checkpoints that failed verification, moved here


class CheckpointError(_ModelCheckpointError):
    """A training checkpoint that cannot be used: it holds another model, or none is usable."""


def _metric(metrics) -> float:
    return float(metrics["eval_metric"])


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the resume rules of jaxkd."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, keep_best: bool = True,
                 stage: str | None = None):
        """`stage`: the pipeline stage these checkpoints are of, for messages (the checkpoint
        folder's name when not given)."""
        policies = [pp.LatestN(n=keep)]
        best = {}
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=_metric, n=1,
                                     keep_checkpoints_without_metrics=False))
            # best_fn makes orbax write each step's metrics to disk: without them a reopened
            # manager knows no metric of the older steps, and LatestN drops the best one.
            best = {"best_fn": _metric, "best_mode": "max"}
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                cleanup_tmp_directories=True, create=True, **best),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self.stage = stage or self.directory.name
        self._unrecorded: list[int] = []  # saved steps whose file record is not written yet
        self._proven: set[int] = set()  # steps this instance has verified (once is enough)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, meta: dict, eval_metric: float | None = None) -> bool:
        # Orbax waits for the previous save here anyway; record it once it is finished.
        self.wait()
        check_free_space(self.directory, state, step)
        metrics = None if eval_metric is None else {"eval_metric": float(eval_metric)}
        if eval_metric is not None:
            meta = {**meta, "eval_metric": float(eval_metric)}
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        if saved:
            self._unrecorded.append(step)
        return bool(saved)

    def delete(self, step: int) -> None:
        """Remove the checkpoint of `step` (to save it again)."""
        self.wait()
        self._manager.delete(step)
        self._proven.discard(step)

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
            try:
                value = self.read_meta(step).get("eval_metric")
            except Exception:  # pylint: disable=broad-except
                continue  # an unreadable meta: not a candidate (verification names the fault)
            if value is not None and (best_value is None or value >= best_value):
                best, best_value = step, value
        return best

    # ------------------------------------------------------------ verification

    def problem(self, step: int) -> str | None:
        """Why the checkpoint of `step` is incomplete or corrupt (read from its files, without
        restoring it), or None when nothing is found wrong."""
        return step_problem(self.step_dir(step))

    def check_shapes(self, step: int, like_state: Any) -> None:
        """Raise `CheckpointError` when the arrays saved at `step` are not those of
        `like_state` (other paths, shapes or dtypes): a checkpoint of another model."""
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise ValueError("no array metadata in item 'state'")
        saved = _leaves(metadata.tree)
        now = _leaves(like_state)
        def example_first(path):  # a params matrix of another shape is the clearest example
            old, new = saved.get(path), now.get(path)
            matrix = old is not None and new is not None and len(old[0]) >= 2
            return not path.startswith("params/"), not matrix, path

        differ = []
        for path in sorted(set(saved) | set(now), key=example_first):
            old, new = saved.get(path), now.get(path)
            if old is None:
                differ.append(f"{path}: not in the checkpoint, {_show(new)} now")
            elif new is None:
                differ.append(f"{path}: {_show(old)} in the checkpoint, not in this model")
            elif old != new:
                differ.append(f"{path}: {_show(old)} in the checkpoint, {_show(new)} now")
        if differ:
            model = {"distill": "student", "teacher": "teacher"}.get(self.stage, "model")
            more = f"; {len(differ)} of {len(set(saved) | set(now))} arrays differ" \
                if len(differ) > 1 else ""
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} holds a {model} of a different shape (e.g. "
                f"{differ[0]}{more}); use a new workdir or --restart {self.stage}")

    def restore_first_usable(self, steps: list[int], like_state: Any
                             ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the first of `steps` whose checkpoint is proven complete
        (`problem`, `check_shapes`, then the restore itself); each one that fails is set aside
        (`set_aside`). None when none is usable."""
        for step in steps:
            if step not in self.all_steps():
                continue
            why = None if step in self._proven else self.problem(step)
            if why is None:
                try:
                    self.check_shapes(step, like_state)
                    state, meta = self.restore(step, like_state)
                except CheckpointError:
                    raise
                except Exception as err:  # pylint: disable=broad-except
                    why = f"unreadable ({util.first_line(err)})"
            why = _agree(why)
            if why is None:
                self._proven.add(step)
                return step, state, meta
            self.set_aside(step, why)
        return None

    def set_aside(self, step: int, why: str) -> pathlib.Path:
        """Move the checkpoint of `step` to `<dir>/unusable/<step>` (kept for inspection; a
        resumed run saves that step again), with one warning line naming it and why."""
        source = self.step_dir(step)
        target = self.directory / UNUSABLE / str(step)
        n = 1
        while target.exists():
            target, n = self.directory / UNUSABLE / f"{step}-{n}", n + 1
        if jax.process_index() == 0 and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        self._proven.discard(step)
        _barrier(f"jaxkd_set_aside_{self.stage}_{step}")
        self._manager.reload()
        log.warning("%s: %s; skipped it and moved it to %s (kept, not deleted)", source, why, target)
        return target

    def wait(self) -> None:
        """Wait for the save in flight, then write the file records of finished saves."""
        self._manager.wait_until_finished()
        pending, self._unrecorded = self._unrecorded, []
        if jax.process_index() == 0:
            kept = set(self.all_steps())  # a finished save may have removed older steps
            for step in pending:
                if step in kept:
                    write_record(self.step_dir(step))

    def close(self) -> None:
        self.wait()
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


# ---------------------------------------------------------------- file records and checks


def _crc32(path: pathlib.Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(RECORD.split(".")[0] + "."))


def write_record(step_dir: pathlib.Path) -> None:
    """Record every file of a finished checkpoint with its size and CRC-32 (`RECORD`, last)."""
    files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "crc32": _crc32(p)}
             for p in _step_files(step_dir)}
    text = json.dumps({"version": 1, "files": files}, indent=1)
    util.write_atomic(step_dir / RECORD, lambda tmp: tmp.write_text(text))


def _json_problem(path: pathlib.Path, name: str) -> str | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{name} missing"
    except (OSError, ValueError) as err:
        return f"{name} is not valid JSON ({util.first_line(err)})"
    return None if isinstance(value, dict) else f"{name} is not a JSON object"


def step_problem(step_dir: pathlib.Path) -> str | None:
    """Why the checkpoint in `step_dir` is incomplete or corrupt, or None."""
    if not step_dir.is_dir():
        return "its folder is gone"
    for item in ("state", "meta"):
        if not (step_dir / item).is_dir():
            return f"item '{item}' missing"
    for name in ("state/_METADATA", "meta/metadata"):
        why = _json_problem(step_dir / name, name)
        if why is not None:
            return why
    record = step_dir / RECORD
    if not record.is_file():
        return None  # saved by an older jaxkd, or stopped before its record: orbax's checks only
    try:
        files = json.loads(record.read_text())["files"]
        sizes = {name: (int(f["bytes"]), f["crc32"]) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{RECORD} unreadable ({util.first_line(err)})"
    for name, (size, crc) in sorted(sizes.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{name} missing"
        now = path.stat().st_size
        if now != size:
            return f"{name} truncated ({now} of {size} bytes)" if now < size else \
                f"{name} has {now} bytes, {size} were written"
        if _crc32(path) != crc:
            return f"{name} differs from what was written (CRC-32)"
    return None


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """path ("params/encoder/.../kernel") -> (shape, dtype name) of each array of `tree`."""
    return {"/".join(_key(k) for k in path): (tuple(x.shape), np.dtype(x.dtype).name)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _show(leaf: tuple[tuple[int, ...], str]) -> str:
    shape, dtype = leaf
    return f"{shape} {dtype}" if dtype != "float32" else str(shape)


def _agree(why: str | None) -> str | None:
    """One verdict for every process: a checkpoint unusable on one is unusable on all."""
    if not sharding.all_processes(why is None) and why is None:
        return "unusable on another process (its log says why)"
    return why


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        multihost_utils.sync_global_devices(name)
