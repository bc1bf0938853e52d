"""The one prediction path: a model's outputs for every row of an encoded split.

Used by evaluation, the teacher cache, the report, `jaxkd.bench` and prediction. Outputs are
[N, C] for sequence heads, or flat [T, C] for token heads (row i's tokens at
`encoded.offsets[i]:encoded.offsets[i + 1]`), so nothing is padded to the longest row.
"""
from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxkd import data as data_lib
from jaxkd import sharding, steps
from jaxkd.data import Encoded
from jaxkd.model import ModelConfig


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array on the host, whole."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=8)
def jit_logits_fn(model_cfg: ModelConfig, mesh: Mesh) -> Callable:
    """Jitted (params, batch) -> logits with the batch sharded over the mesh (one per model)."""
    return jax.jit(steps.make_logits_fn(model_cfg), in_shardings=(None, sharding.batch_sharding(mesh)))


def predict(logits_fn: Callable, params: Any, encoded: Encoded, *, batch_size: int, mesh: Mesh | None,
            bucket_multiple: int, max_seq_len: int, per_token: bool,
            progress: Callable | None = None, check_stop: Callable[[], None] | None = None,
            in_flight: int = 8) -> np.ndarray:
    """Outputs of `logits_fn(params, batch)` (jitted, batch sharded over `mesh`) for every row.

    `progress(iterable)` may wrap the batches (a progress bar). Up to `in_flight` batches are
    dispatched before the oldest result is read back: the host prepares the next batches while
    the device computes, and the outputs waiting on the device stay bounded. `mesh` None: the
    batches stay on the host (a `logits_fn` that runs there, as an ONNX Runtime session). `check_stop()` is
    called every `in_flight` batches (on every process alike) and may raise to stop.
    """
    batches = data_lib.EvalBatches(encoded, batch_size, bucket_multiple=bucket_multiple,
                                   max_seq_len=max_seq_len, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    out = np.zeros((0, 0), np.float32)
    pending: collections.deque = collections.deque()

    def read_oldest():
        nonlocal out
        logits, index = pending.popleft()
        logits, index = to_host(logits), to_host(index)
        if out.size == 0:
            out = np.zeros((encoded.output_rows(per_token), logits.shape[-1]), np.float32)
        real = index >= 0
        if per_token:
            gather = data_lib.TokenGather(encoded.offsets, np.maximum(index, 0), logits.shape[1])
            keep = gather.mask_bxL & real[:, None]
            out[gather.flat_bxL[keep]] = logits[keep]
        else:
            out[index[real]] = logits[real]

    for i, local in enumerate(progress(batches) if progress else batches):
        batch = local if mesh is None else sharding.global_batch(local, mesh)
        pending.append((logits_fn(params, batch), batch["index"]))
        if len(pending) > in_flight:
            read_oldest()
        if check_stop is not None and (i + 1) % in_flight == 0:
            check_stop()
    while pending:
        read_oldest()
    return out
