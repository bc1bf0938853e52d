"""int8 dynamic quantisation of an ONNX model with ONNX Runtime (`onnxruntime.quantization`).

Weights become int8 ahead of time; activations are quantised per batch at run time. What is
quantised was chosen by measurement (docs/deployment.md): the matmuls against weights only
(`MatMulConstBOnly`: the attention's activation x activation products stay fp32, as do the
embedding lookups, layer norms and softmax), with one scale per weight matrix or one per output
channel (`per_channel`).

Weights use 7 of their 8 bits (`reduce_range`) by default. ONNX Runtime's int8 matmul on x86
CPUs without VNNI (AVX2, AVX-512 without VNNI) adds pairs of uint8 x int8 products in 16 bits,
which saturate when full-range weights meet large activations; the file runs on whatever CPU
serves it, so it is written to be right there too. Measured on an AVX2 CPU without VNNI
(docs/deployment.md): the MiniLM-L6 embedder keeps 99.9% of its STS-B dev Spearman with 7-bit
weights, 99.7% with full-range ones; on CPUs with VNNI the 7-bit weights cost one bit of
weight precision.
"""
from __future__ import annotations

import os
import pathlib

# The ops quantised: matmuls with a constant (weight) operand.
OP_TYPES = ("MatMul",)


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike, *,
                  per_channel: bool = True, op_types: tuple[str, ...] = OP_TYPES,
                  reduce_range: bool = True) -> pathlib.Path:
    """Write the int8 model of the fp32 ONNX file `source` to `target`; returns `target`.
    `op_types`: the ops quantised (`("MatMul", "Gather")` also stores the embedding tables in
    int8, for `bench deploy --gather`); `reduce_range`: 7-bit weights (see above; false, full
    range, for `bench deploy --full-range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = pathlib.Path(target)
    quantize_dynamic(pathlib.Path(source), target, weight_type=QuantType.QInt8,
                     per_channel=per_channel, reduce_range=reduce_range,
                     op_types_to_quantize=list(op_types),
                     extra_options={"MatMulConstBOnly": True})
    return target

