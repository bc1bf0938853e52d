"""An ONNX graph that computes what `jaxkd.model.Model` computes, written from its config and params.

The encoder (embeddings, layers) is built here, op for op as `jaxkd.model` computes it in fp32;
each head kind adds its own part through `HeadSpec.onnx` (written by the task kind that owns
it, with the `Graph` helpers below), so nothing here names a head kind. Inputs are named as
transformers names them (`input_ids`, `attention_mask`, and `token_type_ids` where the encoder
has token types), int64, with dynamic `batch_size` and `sequence_length` axes; the one output
is named by `HeadSpec.onnx_output` (`logits`, or `sentence_embedding`).

Why a graph written from the params rather than a converter: jax2onnx (the converter from JAX
functions) requires orbax-checkpoint < 0.11.37, which conflicts with the orbax-checkpoint this
package uses, and the Hugging Face route (torch.onnx, optimum) needs PyTorch and a PyTorch
version of every head. The encoder is a dozen ONNX ops; tests/test_deploy.py holds it to
jaxkd's outputs within 1e-4 for every family and head kind.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd.model import BertConfig, ModelConfig

OPSET = 17  # LayerNormalization is in the default domain from opset 17
INPUT_AXES = ("batch_size", "sequence_length")  # as optimum names them


class UnsupportedError(ValueError):
    """The model holds something this graph cannot express; the message names it."""


class Graph:
    """Nodes and initializers of one ONNX graph, with the ops the encoder and heads are built of.

    Every method returns the name of the value it adds; names are unique (`hint` + a counter).
    """

    def __init__(self):
        from onnx import helper

        self._helper = helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, values, hint: str = "ints") -> str:
        return self.const(np.asarray(values, np.int64), hint, np.int64)

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self._helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    # ------------------------------------------------------------------ layers

    def dense(self, x: str, params: Mapping, hint: str = "dense") -> str:
        """x @ kernel + bias (a Flax Dense's params)."""
        y = self.op("MatMul", x, self.const(params["kernel"], f"{hint}_kernel"), hint=hint)
        return self.op("Add", y, self.const(params["bias"], f"{hint}_bias"), hint=hint)

    def layer_norm(self, x: str, params: Mapping, eps: float, hint: str = "ln") -> str:
        return self.op("LayerNormalization", x, self.const(params["scale"], f"{hint}_scale"),
                       self.const(params["bias"], f"{hint}_bias"), axis=-1, epsilon=float(eps),
                       hint=hint)

    def activation(self, x: str, name: str) -> str:
        """The activations of `jaxkd.model` (ACTIVATIONS and tanh) in basic ops, the forms ONNX
        Runtime's graph optimiser fuses (Gelu from Erf, FastGelu from Tanh)."""
        check_activation(name)
        if name == "tanh":
            return self.op("Tanh", x)
        if name == "relu":
            return self.op("Relu", x)
        half, one = self.const(0.5, "half"), self.const(1.0, "one")
        if name == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
            erf = self.op("Erf", self.op("Div", x, self.const(math.sqrt(2.0), "sqrt2")))
            return self.op("Mul", self.op("Mul", x, half), self.op("Add", erf, one), hint="gelu")
        if name in ("gelu_new", "gelu_tanh", "gelu_pytorch_tanh"):
            # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = self.op("Mul", self.op("Mul", x, x), x)
            inner = self.op("Add", x, self.op("Mul", cube, self.const(0.044715, "c")))
            t = self.op("Tanh", self.op("Mul", inner, self.const(math.sqrt(2.0 / math.pi), "k")))
            return self.op("Mul", self.op("Mul", x, half), self.op("Add", t, one), hint="gelu")
        raise AssertionError(name)

    def l2_normalize(self, x: str, eps: float) -> str:
        """Rows of unit L2 length over the last axis: x / max(|x|, eps)."""
        norm = self.op("ReduceL2", x, axes=[-1], keepdims=1)  # opset 17: axes an attribute
        return self.op("Div", x, self.op("Max", norm, self.const(eps, "eps")))


ACTIVATIONS = ("gelu", "gelu_new", "gelu_tanh", "gelu_pytorch_tanh", "relu", "tanh")


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"activation {name!r} has no ONNX form here; the supported ones are "
                               f"{', '.join(ACTIVATIONS)}")


def _float(params: Any) -> Any:
    """The params as float32 NumPy arrays (a bf16 checkpoint is exported in fp32)."""
    if isinstance(params, Mapping):
        return {k: _float(v) for k, v in params.items()}
    return np.asarray(params, np.float32)


def _embeddings(g: Graph, cfg: BertConfig, p: Mapping, ids: str, mask: str, types: str | None) -> str:
    x = g.op("Gather", g.const(p["word_embeddings"]["embedding"], "word_embeddings"), ids)
    positions_table = g.const(p["position_embeddings"]["embedding"], "position_embeddings")
    if cfg.pad_offset_positions:  # jaxkd.model.position_ids
        real = g.op("And", g.op("Not", g.op("Equal", ids, g.ints(cfg.pad_token_id, "pad"))),
                    g.op("Greater", mask, g.ints(0, "zero")))
        real = g.op("Cast", real, to=7)  # int64
        counted = g.op("CumSum", real, g.ints(1, "axis"))
        positions = g.op("Add", g.op("Mul", counted, real), g.ints(cfg.pad_token_id, "pad"))
    else:
        length = g.op("Gather", g.op("Shape", ids), g.ints(1, "dim"), axis=0)
        positions = g.op("Range", g.ints(0, "start"), length, g.ints(1, "delta"))
    x = g.op("Add", x, g.op("Gather", positions_table, positions))
    if cfg.type_vocab_size:
        x = g.op("Add", x, g.op("Gather", g.const(p["token_type_embeddings"]["embedding"],
                                                  "token_type_embeddings"), types))
    x = g.layer_norm(x, p["LayerNorm"], cfg.layer_norm_eps, "embeddings_ln")
    if cfg.embedding_width != cfg.hidden_size:
        x = g.dense(x, p["embeddings_project"], "embeddings_project")
    return x


def _layer(g: Graph, cfg: BertConfig, p: Mapping, x: str, bias: str, i: int) -> str:
    N, D = cfg.num_heads, cfg.head_dim
    split = g.ints([0, 0, N, D], "split_heads")

    def heads(name: str, perm: list[int]) -> str:
        y = g.dense(x, p["attention"][name], f"layer{i}_{name}")
        return g.op("Transpose", g.op("Reshape", y, split), perm=perm)

    q = heads("query", [0, 2, 1, 3])  # [B, N, L, D]
    k = heads("key", [0, 2, 3, 1])  # [B, N, D, L]
    v = heads("value", [0, 2, 1, 3])
    scores = g.op("Div", g.op("MatMul", q, k), g.const(math.sqrt(D), "sqrt_d"))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    ctx = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", ctx, g.ints([0, 0, cfg.hidden_size], "merge_heads"))
    y = g.dense(ctx, p["attention_output"], f"layer{i}_attention_output")
    x = g.layer_norm(g.op("Add", x, y), p["attention_LayerNorm"], cfg.layer_norm_eps, f"layer{i}_ln1")
    h = g.activation(g.dense(x, p["intermediate"], f"layer{i}_intermediate"), cfg.hidden_act)
    y = g.dense(h, p["output"], f"layer{i}_output")
    return g.layer_norm(g.op("Add", x, y), p["output_LayerNorm"], cfg.layer_norm_eps, f"layer{i}_ln2")


def output_axes(config: ModelConfig, params: Mapping) -> list:
    """The output's axes: `batch_size` first, `sequence_length` next for per-token outputs, then
    the width (from the model's output shape, evaluated abstractly)."""
    import jax

    from jaxkd.model import apply_model

    ids = jax.ShapeDtypeStruct((1, 3), np.int32)
    shape = jax.eval_shape(lambda p, x: apply_model(config, p, x).logits, params, ids).shape
    return list(INPUT_AXES[: len(shape) - 1]) + [int(shape[-1])]


def input_names(config: ModelConfig) -> tuple[str, ...]:
    """The graph's inputs, as transformers names them."""
    base = ("input_ids", "attention_mask")
    return base + (("token_type_ids",) if config.encoder.type_vocab_size else ())


def check(config: ModelConfig) -> None:
    """Raise UnsupportedError naming what of `config` this graph cannot express (a head kind
    without an ONNX part, an activation without an ONNX form); needs no onnx package."""
    spec = config.head.spec
    if spec.onnx is None:
        raise UnsupportedError(f"head kind {spec.kind!r} has no ONNX graph: its task kind defines "
                               f"no HeadSpec.onnx, so models with this head cannot be exported to ONNX")
    for act in (config.encoder.hidden_act, config.head.pooler_activation):
        check_activation(act)


def build(config: ModelConfig, params: Mapping, *, producer: str = "jaxkd"):
    """The ONNX model (an `onnx.ModelProto`, checked) of `config` with `params`, in fp32.

    Raises UnsupportedError naming what cannot be expressed (a head kind without an ONNX part,
    an activation without an ONNX form) before anything is written.
    """
    import onnx
    from onnx import TensorProto, helper

    check(config)
    spec = config.head.spec
    cfg = config.encoder
    g = Graph()
    params = _float(params)
    names = input_names(config)
    ids, mask = names[0], names[1]
    types = names[2] if len(names) > 2 else None
    bias = g.op("Where", g.op("Greater", mask, g.ints(0, "zero")), g.const(0.0, "zero_bias"),
                g.const(np.finfo(np.float32).min, "mask_bias"))
    bias = g.op("Unsqueeze", bias, g.ints([1, 2], "axes"))  # [B, 1, 1, L]
    x = _embeddings(g, cfg, params["encoder"]["embeddings"], ids, mask, types)
    for i in range(cfg.num_layers):
        x = _layer(g, cfg, params["encoder"][f"layer_{i}"], x, bias, i)
    mask_f = g.op("Cast", mask, to=TensorProto.FLOAT)
    out = spec.onnx(g, cfg, config.head, params.get("head", {}), x, mask_f)
    g.nodes.append(helper.make_node("Identity", [out], [spec.onnx_output]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, list(INPUT_AXES)) for n in names]
    outputs = [helper.make_tensor_value_info(spec.onnx_output, TensorProto.FLOAT,
                                             output_axes(config, params))]
    graph = helper.make_graph(g.nodes, f"jaxkd_{cfg.model_type}_{spec.kind}", inputs, outputs,
                              g.initializers)
    model = helper.make_model(graph, producer_name=producer,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model
