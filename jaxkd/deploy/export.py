"""Writing a model's ONNX files: `model.onnx` (fp32) and `model.int8.onnx` (int8 dynamic
quantisation), beside its Hugging Face files or in a directory of their own.

A directory of its own gets the model directory's other files too (config.json, the tokenizer,
a sentence embedder's module configs), never its weights: `jaxkd.predict DIR/model.onnx` reads
its head, labels and tokenizer from there.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping

from jaxkd import util
from jaxkd.model import ModelConfig

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Weight files a copied directory leaves out: the ONNX file holds the weights.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def write(config: ModelConfig, params: Mapping, directory: str | os.PathLike, *,
          int8: bool = True, per_channel: bool = True) -> list[pathlib.Path]:
    """Write `model.onnx` (and `model.int8.onnx` with `int8`) of the model into `directory`;
    each file appears whole or not at all. Returns the paths written."""
    from jaxkd.deploy import graph, quantize

    proto = graph.build(config, params)  # refuses what it cannot express, before writing
    directory = pathlib.Path(directory)
    fp32 = directory / ONNX_FILE
    util.write_atomic(fp32, lambda tmp: tmp.write_bytes(proto.SerializeToString()))
    written = [fp32]
    if int8:
        target = directory / INT8_FILE
        util.write_atomic(target, lambda tmp: quantize.quantize_int8(fp32, tmp, per_channel=per_channel))
        written.append(target)
    return written


def copy_without_weights(source: pathlib.Path, target: pathlib.Path) -> None:
    """The files of model directory `source` but its weights, into `target`."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.endswith(_WEIGHTS):
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)


def export_directory(model_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
                     int8: bool = False) -> list[pathlib.Path]:
    """The ONNX files of a model directory jaxkd reads (any family and head kind), written into
    it or, with `output`, into `output` with the directory's other files."""
    from jaxkd import exported

    info = exported.inspect_model(model_dir)
    model = exported.load_weights(info)
    target = info.directory if output is None else pathlib.Path(output)
    if target.resolve() != info.directory.resolve():
        copy_without_weights(info.directory, target)
    return write(model.config, model.params, target, int8=int8)
