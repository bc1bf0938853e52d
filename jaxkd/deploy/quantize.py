"""int8 dynamic quantisation of an ONNX model with ONNX Runtime (`onnxruntime.quantization`).

Weights become int8 ahead of time; activations are quantised per batch at run time. What is
quantised was chosen by measurement (docs/deployment.md): the matmuls against weights only
(`MatMulConstBOnly`: the attention's activation x activation products stay fp32, as do the
embedding lookups, layer norms and softmax), with one scale per weight matrix or one per output
channel (`per_channel`).
"""
from __future__ import annotations

import os
import pathlib

# The ops quantised: matmuls with a constant (weight) operand.
OP_TYPES = ("MatMul",)


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike, *,
                  per_channel: bool = True, op_types: tuple[str, ...] = OP_TYPES) -> pathlib.Path:
    """Write the int8 model of the fp32 ONNX file `source` to `target`; returns `target`.
    `op_types`: the ops quantised (`("MatMul", "Gather")` also stores the embedding tables in
    int8, for `bench deploy --gather`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = pathlib.Path(target)
    quantize_dynamic(pathlib.Path(source), target, weight_type=QuantType.QInt8,
                     per_channel=per_channel, op_types_to_quantize=list(op_types),
                     extra_options={"MatMulConstBOnly": True})
    return target

