"""Students: a subset of the teacher's layers, a fresh smaller shape, or another checkpoint."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import hf
from jaxkd.model import ModelConfig, init_params


def student_from_teacher(config: ModelConfig, params: Mapping[str, Any],
                         layers: Sequence[int] = (0, 2, 4)) -> tuple[ModelConfig, dict]:
    """DistilBERT-style init: embeddings, chosen layers (renumbered 0..k-1) and the whole head."""
    layers = _check_layers(layers, config.encoder.num_layers)
    teacher = params["encoder"]
    encoder = {"embeddings": teacher["embeddings"]}
    encoder.update({f"layer_{j}": teacher[f"layer_{i}"] for j, i in enumerate(layers)})
    student = {"encoder": encoder, "head": params["head"]}
    # Copies, not views: a jitted step that donates the student would otherwise free the teacher.
    return config.replace(num_layers=len(layers)), jax.tree.map(jnp.copy, student)


def _check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(layers)
    valid = f"teacher layer indices must be strictly increasing integers in [0, {num_layers - 1}]"
    if not layers:
        raise ValueError(f"student layers are empty; {valid}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"student layers {list(layers)} are not all integers; {valid}")
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(f"student layers {out_of_range} are out of range for a "
                         f"{num_layers}-layer teacher; {valid}")
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"student layers {list(layers)} have duplicates or are unsorted; {valid}")
    return layers


def student_from_shape(teacher_config: ModelConfig, rng: jax.Array, num_layers: int, hidden_size: int,
                       num_heads: int, intermediate_size: int | None = None,
                       **overrides: Any) -> tuple[ModelConfig, dict]:
    """A freshly initialised student of a new shape.

    Vocabulary, positions, token types, activation and the head come from the teacher.
    intermediate_size defaults to 4 * hidden_size; overrides are other encoder or head
    fields (dropouts, dtype).
    """
    if isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0 \
            and hidden_size % num_heads:
        heads = [h for h in range(1, min(hidden_size, 64) + 1) if hidden_size % h == 0]
        raise ValueError(
            f"student hidden_size {hidden_size} is not divisible by num_heads {num_heads}: set "
            f"num_heads to one of {heads}, or hidden_size to a multiple of {num_heads} "
            f"(e.g. {hidden_size - hidden_size % num_heads or num_heads} or "
            f"{hidden_size - hidden_size % num_heads + num_heads})")
    config = teacher_config.replace(
        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        **overrides)
    return config, init_params(config, rng)


def student_from_pretrained(path: str | os.PathLike, teacher_config: ModelConfig,
                            num_labels: int | None = None,
                            rng: jax.Array | None = None) -> tuple[ModelConfig, dict]:
    """A student from another pretrained BERT checkpoint sharing the teacher's vocabulary.

    The head is the teacher's kind with the teacher's label count (or num_labels); a
    checkpoint head of another kind or size is replaced by a fresh one. Compute dtype
    follows the teacher.
    """
    directory = hf.resolve_dir(path)
    vocab_size = hf.config_from_hf(hf.read_hf_config(directory)).vocab_size
    if vocab_size != teacher_config.encoder.vocab_size:
        raise ValueError(
            f"student checkpoint {directory} has vocab_size {vocab_size} but the teacher has "
            f"{teacher_config.encoder.vocab_size}: student and teacher tokenizers must agree; pick "
            "a student checkpoint trained with the teacher's vocabulary")
    num_labels = teacher_config.head.num_labels if num_labels is None else num_labels
    return hf.load_hf(directory, num_labels=num_labels, rng=rng, dtype=teacher_config.encoder.dtype,
                      head=teacher_config.head.kind)
