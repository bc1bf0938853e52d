"""What a family adapter is, and the pieces families share.

An adapter translates between a Hugging Face config.json and jaxkd's `ModelConfig` (both ways),
names every Flax parameter's Hugging Face tensor, canonicalises checkpoint keys (a bare base
model's or a task model's), and loads the family's tokenizer. How a family computes differently
from BERT lives in fields of `BertConfig` and `HeadConfig`; the adapter only sets them.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxkd.model import HEADS, BertConfig, HeadConfig, ModelConfig, head_spec

# Flax path -> (Hugging Face tensor name, transpose?); PyTorch Linear.weight is [out, in].
Names = dict[tuple[str, ...], tuple[str, bool]]

# HF activation name -> BertConfig.hidden_act, and back. Only functions the model computes exactly.
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_tanh": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_new",
             "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}


class CheckpointError(ValueError):
    """A checkpoint that does not fit its family's layout or the requested config."""


def get(d: Mapping, key: str, default: Any) -> Any:
    """`d[key]`, or `default` where the key is absent or null (configs write null for unset)."""
    value = d.get(key)
    return default if value is None else value


def require(d: Mapping, keys: tuple[str, ...], family: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"config.json lacks {missing}; a {family} config needs {list(keys)}")


def activation_from_hf(name: str, key: str = "hidden_act") -> str:
    if name not in ACT_FROM_HF:
        raise CheckpointError(f"config.json {key} {name!r} is not supported; use one of "
                              f"{sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def dense(path: tuple[str, ...], hf: str) -> Names:
    return {(*path, "kernel"): (f"{hf}.weight", True), (*path, "bias"): (f"{hf}.bias", False)}


def layer_norm(path: tuple[str, ...], hf: str) -> Names:
    return {(*path, "scale"): (f"{hf}.weight", False), (*path, "bias"): (f"{hf}.bias", False)}


def module(path: tuple[str, ...], hf: str) -> Names:
    """A dense layer, a layer norm when the Flax module is one (its name says LayerNorm), or a
    lone bias vector (a Flax param named `bias`, e.g. a masked-LM head's output bias)."""
    if path[-1] == "bias":
        return {path: (hf, False)}
    return layer_norm(path, hf) if path[-1].endswith("LayerNorm") else dense(path, hf)


def layer_names(num_layers: int, hf_layer: str, table: Mapping[tuple[str, ...], str]) -> Names:
    """Every transformer layer's names: `hf_layer` formats the layer index (`bert.encoder.layer.{}`),
    `table` maps a module inside jaxkd's `Layer` to its name inside the family's layer."""
    names: Names = {}
    for i in range(num_layers):
        for path, hf in table.items():
            names.update(module(("encoder", f"layer_{i}", *path), f"{hf_layer.format(i)}.{hf}"))
    return names


def embedding_names(cfg: BertConfig, hf_embeddings: str) -> Names:
    tables = ("word_embeddings", "position_embeddings") + (
        ("token_type_embeddings",) if cfg.type_vocab_size else ())
    names: Names = {("encoder", "embeddings", t, "embedding"): (f"{hf_embeddings}.{t}.weight", False)
                    for t in tables}
    names.update(layer_norm(("encoder", "embeddings", "LayerNorm"), f"{hf_embeddings}.LayerNorm"))
    return names


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model family (one or more `model_type`s sharing a layout)."""

    model_type: str  # config.json's model_type
    class_prefix: str  # transformers classes are f"{class_prefix}ForSequenceClassification", ...

    name: ClassVar[str]  # for messages: "BERT", "RoBERTa"
    base: ClassVar[str]  # the base model's attribute in the *For* classes: "bert", "roberta"
    pooler_activation: ClassVar[str]  # the sequence head's activation after its dense layer
    # Checkpoint modules that may be left unread (pretraining heads, an unused pooler).
    other_modules: ClassVar[tuple[str, ...]]

    # ------------------------------------------------------------------ per family

    def encoder_from_hf(self, d: Mapping) -> BertConfig:
        """The encoder's config from a config.json dict of this family."""
        raise NotImplementedError

    def encoder_to_hf(self, config: ModelConfig) -> dict:
        """config.json keys of the encoder and its head dropout (not labels or architectures)."""
        raise NotImplementedError

    def unsupported(self, cfg: BertConfig) -> list[str]:
        """Why `cfg` cannot be written as this family (empty when it can)."""
        raise NotImplementedError

    def encoder_names(self, cfg: BertConfig) -> Names:
        raise NotImplementedError

    def head_dropout(self, d: Mapping, kind: str) -> float | None:
        """The head's dropout from config.json (None: the encoder's hidden dropout)."""
        key = head_spec(kind).dropout_key(self.base)
        return None if key is None else d.get(key)

    def load_tokenizer(self, directory: pathlib.Path, words: bool = False):
        """The checkpoint's tokenizer; `words`: it will be given pre-split words."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))

    # ------------------------------------------------------------------ shared

    def architecture(self, kind: str) -> str:
        return f"{self.class_prefix}{head_spec(kind).hf_suffix}"

    def check(self, cfg: BertConfig) -> None:
        reasons = self.unsupported(cfg)
        if reasons:
            raise CheckpointError(f"this encoder cannot be written as a {self.name} "
                                  f"(model_type {self.model_type!r}): " + "; ".join(reasons))

    def head_from_hf(self, d: Mapping, kind: str, num_labels: int) -> HeadConfig:
        return HeadConfig(kind=kind, num_labels=num_labels, dropout=self.head_dropout(d, kind),
                          pooler_activation=self.pooler_activation)

    def param_names(self, config: ModelConfig) -> Names:
        """Flax path -> (name in the head's transformers class, transpose?)."""
        names = self.encoder_names(config.encoder)
        for flax_module, hf in config.head.spec.modules(self.base):
            names.update(module(("head", flax_module), hf))
        return names

    def canonical_name(self, key: str) -> str:
        """A checkpoint key as the task classes spell it: old LayerNorm names (gamma, beta)
        renamed, a bare base model's keys under the base prefix."""
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        if key.startswith((f"{self.base}.", *self.task_heads, *self.other_modules)):
            return key
        return f"{self.base}.{key}"

    @property
    def task_heads(self) -> tuple[str, ...]:
        """Checkpoint modules of task heads (from every head kind's names in this family):
        dropped when the checkpoint's head is of another kind."""
        prefixes = {hf.split(".")[0] + "." for spec in HEADS.values()
                    for _, hf in spec.modules(self.base) if not hf.startswith(f"{self.base}.")}
        return tuple(sorted(prefixes))

    @property
    def ignorable(self) -> tuple[str, ...]:
        """Checkpoint modules whose keys are never an error to leave unread."""
        return self.task_heads + self.other_modules
