"""Deployment formats of a model: an ONNX graph of the encoder and its head (`graph`), ONNX
Runtime's int8 dynamic quantisation of it (`quantize`), running either (`runtime`), and the
table of what each format costs and keeps (`table`). Needs the `onnx` extra
(`pip install -e .[onnx]`: onnx and onnxruntime); `available()` says whether it is installed.
"""
from __future__ import annotations

import importlib.util

EXTRA_HINT = "pip install -e '.[onnx]' (onnx and onnxruntime)"


def available() -> bool:
    """Whether onnx and onnxruntime can be imported (the `onnx` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def require() -> None:
    """Raise ImportError saying what to install when the extra is missing."""
    if not available():
        raise ImportError(f"ONNX export needs onnx and onnxruntime: {EXTRA_HINT}")


def runner(path):
    """(params, batch) -> outputs of the ONNX file `path` in ONNX Runtime (`runtime.logits_fn`);
    ImportError without the extra, ValueError for a file ONNX Runtime cannot run."""
    require()
    from jaxkd.deploy import runtime

    try:
        sess = runtime.session(path)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{path} is not an ONNX model ONNX Runtime can run: {err}") from err
    return runtime.logits_fn(sess)
