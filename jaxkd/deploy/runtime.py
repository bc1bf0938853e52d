"""Running an ONNX model with ONNX Runtime on the CPU, as `jaxkd.inference.predict` runs a
jitted model: `logits_fn(session)` has the (params, batch) -> outputs form it takes."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from jaxkd import util
from jaxkd.data import Batch


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of the model file, `threads` intra-op threads (default: every
    core this process may use), one inter-op thread, every graph optimisation on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or util.usable_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(pathlib.Path(path)), options, providers=["CPUExecutionProvider"])


def feeds(sess, input_ids: np.ndarray, attention_mask: np.ndarray,
          token_type_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The session's inputs (int64) from a batch's arrays; token types only where it takes them."""
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask,
              "token_type_ids": np.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
    return {i.name: np.asarray(arrays[i.name], np.int64) for i in sess.get_inputs()}


def run(sess, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
    """The model's one output (float32) for a batch."""
    (out,) = sess.run(None, feeds(sess, input_ids, attention_mask, token_type_ids))
    return np.asarray(out, np.float32)


def logits_fn(sess):
    """(params, batch) -> outputs, `params` unused: the session holds the weights."""

    def logits(params, batch: Batch) -> np.ndarray:
        del params
        return run(sess, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    return logits
