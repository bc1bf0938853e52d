"""Students: a subset of the teacher's layers, a fresh smaller shape, or another checkpoint, each
in the teacher's family; or, from a BERT teacher, a DistilBERT-architecture student."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import families, hf
from jaxkd.model import ModelConfig, init_params

# Families a student may be exported as, other than its teacher's.
EXPORT_AS = ("distilbert",)


def student_from_teacher(config: ModelConfig, params: Mapping[str, Any],
                         layers: Sequence[int] = (0, 2, 4)) -> tuple[ModelConfig, dict]:
    """DistilBERT-style init: embeddings, chosen layers (renumbered 0..k-1) and the whole head."""
    layers = _check_layers(layers, config.encoder.num_layers)
    teacher = params["encoder"]
    encoder = {"embeddings": teacher["embeddings"]}
    encoder.update({f"layer_{j}": teacher[f"layer_{i}"] for j, i in enumerate(layers)})
    student = {"encoder": encoder, **({"head": params["head"]} if "head" in params else {})}
    # Copies, not views: a jitted step that donates the student would otherwise free the teacher.
    return config.replace(num_layers=len(layers)), jax.tree.map(jnp.copy, student)


def distilbert_config(config: ModelConfig) -> ModelConfig:
    """A BERT config as a DistilBERT: no token-type table, the sequence head's ReLU.

    Raises ValueError for a teacher of another family, or one DistilBERT cannot hold (its layer
    norms' epsilon is fixed at 1e-12).
    """
    if config.encoder.model_type != "bert":
        raise ValueError(f"a DistilBERT-architecture student is built from a BERT teacher; this "
                         f"teacher's model_type is {config.encoder.model_type!r}")
    student = config.replace(model_type="distilbert", type_vocab_size=0, pooler_activation="relu")
    families.get("distilbert").check(student.encoder)
    return student


def distilbert_from_teacher(config: ModelConfig, params: Mapping[str, Any],
                            layers: Sequence[int] | None = None) -> tuple[ModelConfig, dict]:
    """DistilBERT's initialisation of a BERT teacher, as a DistilBERT-architecture student that
    `DistilBertFor*` loads: the embeddings, teacher layers `layers` (None: every other one, 0, 2,
    4, ..., as DistilBERT was built) and the head.

    DistilBERT has no token types, so the student trains without them: the teacher's token-type-0
    embedding is folded into every position embedding, which is exact for inputs whose token types
    are all 0 (single sentences); sentence pairs lose the segment signal, as in DistilBERT. The
    sequence head keeps the teacher's pooler and classifier weights but applies DistilBERT's ReLU
    where BERT's pooler has tanh: a warm start, not the same function.
    """
    student_cfg = distilbert_config(config)  # another family fails here, before any copy
    layers = range(0, config.encoder.num_layers, 2) if layers is None else layers
    cfg, student = student_from_teacher(config, params, layers)
    embeddings = dict(student["encoder"]["embeddings"])
    type0_H = embeddings.pop("token_type_embeddings")["embedding"][0]
    positions_PxH = embeddings["position_embeddings"]["embedding"]
    embeddings["position_embeddings"] = {"embedding": positions_PxH + type0_H[None, :]}
    student["encoder"] = {**student["encoder"], "embeddings": embeddings}
    return student_cfg.replace(num_layers=cfg.encoder.num_layers), student


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
    """A student from another pretrained checkpoint sharing the teacher's vocabulary, in its own
    family (a DistilBERT checkpoint for a BERT teacher, say).

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
