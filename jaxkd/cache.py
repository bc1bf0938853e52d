"""Teacher-logit cache: the teacher's outputs for the training set, computed once, kept on disk.

The file name is a hash of everything the logits depend on (teacher weights and config, the
encoded training data, the compute dtype, the storage dtype), so a changed teacher, data set or
tokenisation never reads a stale cache. Rows are stored as the prediction path gives them
(`jaxkd.inference`): [N, C] per example, or [T, C] per token back to back (no padding), in
float32 or, to halve the file (`distill.teacher_cache_dtype: float16`), rounded to float16;
read memory-mapped, and widened to float32 as each batch is attached.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from jaxkd import util
from jaxkd.data import Encoded, TokenGather

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short hash over arrays, pytrees of arrays and JSON-able values: a 16-byte BLAKE2b over
    each leaf in order, an array as its dtype, shape and bytes (a 0-d one as shape (1,)), any
    other leaf as its JSON."""
    return util.content_hash(
        (np.ascontiguousarray(np.asarray(leaf))  # at least 1-d, as the keys were first written
         if isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "dtype")
         else json.dumps(leaf, sort_keys=True, default=str).encode()
         for part in parts for leaf in jax.tree.leaves(part)),
        algorithm="blake2b", digest_size=16)


def cache_path(cache_dir: str | pathlib.Path, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"teacher_logits-{key}.npy"


STORAGE = ("float32", "float16")


def load_or_compute(cache_dir: str | pathlib.Path, key: str, num_rows: int,
                    compute: Callable[[], np.ndarray], write: bool = True,
                    dtype: str = "float32",
                    agree: Callable[[bool], bool] = bool) -> tuple[np.ndarray, bool]:
    """Return (logits, hit): [num_rows, C] of `dtype`, memory-mapped when read from disk.

    A file on disk is used only when it is whole: its shape, dtype and checksum match the
    record written after it (`util.write_check`); otherwise a warning names it and the logits
    are computed again. Computed logits that are not all finite, before or after rounding to
    `dtype`, are an error naming the cache, never written; on a miss they are stored atomically
    (when `write`), then their record, and returned as stored (a hit and a miss give the same
    values). `agree(flag)` turns this process's finding into the run's: on a multi-process run
    (`sharding.all_processes`) the file is used only where every process could use it, since
    computing is a collective every process must join, and a failed write (an OSError) is raised
    on every process.
    """
    if dtype not in STORAGE:
        raise ValueError(f"teacher cache dtype must be one of {STORAGE}, got {dtype!r}")
    path = cache_path(cache_dir, key)
    problem = "there is no such file"
    if path.is_file():
        try:
            logits = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            problem = f"it is unreadable ({err})"
        else:
            problem = util.check_problem(path, {"logits": logits})
            if problem is None and logits.dtype != np.dtype(dtype):
                problem = f"it holds {logits.dtype}, not {dtype}"
            if problem is None and logits.shape[0] != num_rows:
                problem = f"it holds {logits.shape[0]} rows, the split has {num_rows}"
            if problem is None and not np.isfinite(logits).all():
                problem = "it holds NaN or infinite values"
    if agree(problem is None):
        return logits, True
    if path.is_file():
        log.warning("teacher cache %s is not used: %s; computing the teacher's outputs again",
                    path, problem or "another process could not use it")
    logits = np.asarray(compute(), np.float32)
    if logits.shape[0] != num_rows:
        raise ValueError(f"teacher cache: computed {logits.shape[0]} rows for {num_rows}")
    check_finite(logits, path)
    if dtype != "float32":
        with np.errstate(over="ignore"):  # values past the range are reported just below
            logits = logits.astype(dtype)
        check_finite(logits, path, f" once rounded to {dtype}, beyond whose range they are: "
                                   f"store them as float32 (distill.teacher_cache_dtype: float32)")
    failed = None
    if write:
        try:
            util.write_atomic(path, lambda tmp: np.save(tmp, logits))
            util.write_check(path, {"logits": logits})
        except OSError as err:
            failed = err
    # Multi-process: a barrier, so that no process reads the file before it is whole, and none
    # goes on alone into the next collective when the one that wrote it failed.
    if not agree(failed is None):
        raise failed or OSError(f"teacher cache {path}: the process writing it failed; its log "
                                "says why")
    return logits, False


class NonFiniteTeacher(ValueError):
    """The teacher's outputs hold NaN or infinite values: nothing can be distilled from them."""


def check_finite(logits: np.ndarray, path: pathlib.Path, rounded: str = "") -> None:
    """Raises `NonFiniteTeacher` where `logits` hold NaN or infinite values; `rounded`: the
    values were finite before a rounding to the storage dtype, which says so and what to do."""
    bad = ~np.isfinite(logits)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=tuple(range(1, logits.ndim))))
        cause = rounded or ("; the teacher has diverged or its weights are broken: check "
                            "teacher.model, or fine-tune it with a lower "
                            "teacher.finetune.learning_rate")
        raise NonFiniteTeacher(
            f"the teacher's outputs for {path} are NaN or infinite in {len(rows)} "
            f"of {len(logits)} rows (first: row {rows[0]}){cause}. Nothing was written to the "
            "cache.")


class TeacherLogits:
    """Cached teacher outputs of one encoded split, attached to its batches."""

    def __init__(self, table: np.ndarray, encoded: Encoded, per_token: bool):
        rows = encoded.output_rows(per_token)
        if table.shape[0] != rows:
            raise ValueError(f"teacher cache holds {table.shape[0]} rows, the split has {rows}")
        self.table, self.offsets, self.per_token = table, encoded.offsets, per_token

    def attach(self, batch: dict) -> dict:
        """The batch with `teacher_logits` of its rows ([B, C] or [B, L, C]; zeros on padding)."""
        index_B = np.asarray(batch["index"])
        real_B = index_B >= 0
        rows_B = np.maximum(index_B, 0)
        if self.per_token:
            gather = TokenGather(self.offsets, rows_B, batch["input_ids"].shape[1])
            logits = gather(self.table, 0.0) * real_B[:, None, None]
        else:
            logits = self.table[rows_B] * real_B[:, None]
        return {**batch, "teacher_logits": np.asarray(logits, np.float32)}
