"""Teacher-logit cache: the teacher's logits for the training set, computed once, kept on disk.

The file name is a hash of everything the logits depend on (teacher weights and
config, the tokenised training data, the compute dtype), so a changed teacher,
data set or tokenisation never reads a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np


def fingerprint(*parts: Any) -> str:
    """A short hash over arrays, pytrees of arrays and JSON-able values."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        for leaf in jax.tree.leaves(part):
            if isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "dtype"):
                arr = np.ascontiguousarray(np.asarray(leaf))
                h.update(f"{arr.dtype}{arr.shape}".encode())
                h.update(arr.tobytes())
            else:
                h.update(json.dumps(leaf, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_path(cache_dir: str | pathlib.Path, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"teacher_logits-{key}.npy"


def load_or_compute(cache_dir: str | pathlib.Path, key: str, num_examples: int,
                    compute: Callable[[], np.ndarray], write: bool = True) -> tuple[np.ndarray, bool]:
    """Return (logits_NxC, hit). On a miss, compute and store atomically (when `write`)."""
    path = cache_path(cache_dir, key)
    if path.is_file():
        logits = np.load(path)
        if logits.shape[0] == num_examples:
            return logits, True
    logits = np.asarray(compute(), np.float32)
    if logits.shape[0] != num_examples:
        raise ValueError(f"teacher cache: computed {logits.shape[0]} rows for {num_examples} examples")
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, logits)
        os.replace(tmp, path)
    return logits, False


def attach(batch: dict, logits_NxC: np.ndarray) -> dict:
    """The batch with the cached teacher logits of its examples (zeros on padding rows)."""
    index_B = np.asarray(batch["index"])
    rows = logits_NxC[np.maximum(index_B, 0)]
    rows = np.where((index_B >= 0)[:, None], rows, 0.0).astype(np.float32)
    return {**batch, "teacher_logits": rows}
