"""Reading a checkpoint's weight files: safetensors (bf16 through JAX), or a PyTorch pickle
read with `weights_only` (a pickle holding anything but tensors is refused unread)."""
from __future__ import annotations

import json
import pathlib
import pickle
from collections.abc import Sequence

import numpy as np

from jaxkd.families import CheckpointError


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """A checkpoint directory's weight files: one file, or the shards its index lists."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            with open(directory / index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            absent = [s for s in shards if not (directory / s).is_file()]
            if absent:
                raise FileNotFoundError(f"{directory / index} lists shards that are missing: {absent}")
            return [directory / s for s in shards]
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, "
                            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = list(f.keys())
        # NumPy has no bfloat16: those tensors go through JAX, which has.
        bf16 = {k for k in keys if f.get_slice(k).get_dtype() == "BF16"}
        out = {k: f.get_tensor(k) for k in keys if k not in bf16}
    if bf16:
        with safe_open(str(path), framework="flax") as f:
            out.update({k: np.asarray(f.get_tensor(k), np.float32) for k in bf16})
    return out


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{path} is a PyTorch pickle and reading it needs torch: pip install "
                          "torch==2.13.0, or convert the checkpoint to model.safetensors") from err
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is a pickle that holds more than tensors (Python objects or code) and was not "
            "loaded: jaxkd never runs code from a model directory. Convert the checkpoint to "
            "model.safetensors with a tool you trust") from None
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def read_tensor_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of one weights file: safetensors, or a PyTorch file read with weights_only."""
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)


def read_tensors(files: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
    """The tensors of every file, by checkpoint key."""
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(read_tensor_file(path))
    return tensors


def tensor_names(files: Sequence[pathlib.Path]) -> set[str]:
    """The checkpoint keys of `files`: a safetensors file's header alone, a pickle read whole."""
    names: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open  # pylint: disable=import-outside-toplevel

            with safe_open(str(path), framework="np") as f:
                names.update(f.keys())
        else:
            names.update(read_tensor_file(path))
    return names
