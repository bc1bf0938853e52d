"""BERT (`model_type: bert`), and the config keys and layer names RoBERTa and ELECTRA share with it."""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

from jaxkd.families.base import (ACT_TO_HF, CheckpointError, Family, Names, activation_from_hf,
                                 embedding_names, get, layer_names, require)
from jaxkd.model import BertConfig, ModelConfig

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
# jaxkd's Layer modules -> their names inside BertLayer (RobertaLayer and ElectraLayer alike).
LAYER = {("attention", "query"): "attention.self.query", ("attention", "key"): "attention.self.key",
         ("attention", "value"): "attention.self.value",
         ("attention_output",): "attention.output.dense",
         ("attention_LayerNorm",): "attention.output.LayerNorm",
         ("intermediate",): "intermediate.dense", ("output",): "output.dense",
         ("output_LayerNorm",): "output.LayerNorm"}


def encoder_from_hf(d: Mapping, family: str, **fields: Any) -> BertConfig:
    """A BertConfig from BERT-style config keys; `fields` are the family's own (and defaults it
    differs in, e.g. pad_token_id)."""
    require(d, REQUIRED, family)
    if get(d, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"config.json position_embedding_type {d['position_embedding_type']!r} "
                              "is not supported; only 'absolute'")
    default = BertConfig()
    values = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=get(d, "max_position_embeddings", default.max_position_embeddings),
        type_vocab_size=get(d, "type_vocab_size", default.type_vocab_size),
        hidden_act=activation_from_hf(get(d, "hidden_act", "gelu")),
        layer_norm_eps=get(d, "layer_norm_eps", default.layer_norm_eps),
        hidden_dropout=get(d, "hidden_dropout_prob", default.hidden_dropout),
        attention_dropout=get(d, "attention_probs_dropout_prob", default.attention_dropout),
        pad_token_id=get(d, "pad_token_id", default.pad_token_id),
        initializer_range=get(d, "initializer_range", default.initializer_range),
    )
    values.update(fields)
    return BertConfig(**values)


def encoder_to_hf(config: ModelConfig, model_type: str) -> dict:
    cfg = config.encoder
    return {
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": ACT_TO_HF[cfg.hidden_act],
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "classifier_dropout": config.head.dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
    }


def unsupported(cfg: BertConfig, *, pad_offset_positions: bool, embedding_size: bool) -> list[str]:
    """What a BERT-style layout cannot hold: the other position scheme, a narrower embedding
    (where the family has no projection), or no token-type table."""
    reasons = []
    if cfg.pad_offset_positions != pad_offset_positions:
        reasons.append("its position ids are " + ("counted from the pad id (RoBERTa's)"
                                                  if cfg.pad_offset_positions else "0..L-1 (BERT's)"))
    if cfg.embedding_size not in (None, cfg.hidden_size) and not embedding_size:
        reasons.append(f"its embeddings are {cfg.embedding_size} wide, not hidden_size "
                       f"{cfg.hidden_size} (only ELECTRA projects them)")
    if not cfg.type_vocab_size:
        reasons.append("it has no token-type table (type_vocab_size 0)")
    return reasons


def bert_layout_names(cfg: BertConfig, base: str) -> Names:
    names = embedding_names(cfg, f"{base}.embeddings")
    names.update(layer_names(cfg.num_layers, f"{base}.encoder.layer.{{}}", LAYER))
    return names


@dataclasses.dataclass(frozen=True)
class BertFamily(Family):
    name = "BERT"
    base = "bert"
    pooler_activation = "tanh"
    other_modules = ("cls.", "bert.pooler.")

    def encoder_from_hf(self, d: Mapping) -> BertConfig:
        return encoder_from_hf(d, self.name, model_type=self.model_type)

    def encoder_to_hf(self, config: ModelConfig) -> dict:
        return encoder_to_hf(config, self.model_type)

    def unsupported(self, cfg: BertConfig) -> list[str]:
        return unsupported(cfg, pad_offset_positions=False, embedding_size=False)

    def encoder_names(self, cfg: BertConfig) -> Names:
        return bert_layout_names(cfg, self.base)

    def load_tokenizer(self, directory: pathlib.Path, words: bool = False):
        # BertTokenizer reads a bare vocab.txt, which AutoTokenizer does not (transformers 5).
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(str(directory))


BERT = BertFamily("bert", "Bert")
