"""DistilBERT (`model_type: distilbert`): no token types, no pooler, layers named q_lin ... lin2
under `distilbert.transformer.`, config keys dim / n_layers / n_heads / hidden_dim / activation,
and a sequence head pre_classifier + ReLU + classifier. LayerNorm epsilon is fixed at 1e-12."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxkd.families.base import (ACT_TO_HF, CheckpointError, Family, Names, activation_from_hf,
                                 embedding_names, get, layer_names, require)
from jaxkd.model import BertConfig, ModelConfig

REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")
LAYER_NORM_EPS = 1e-12  # DistilBERT's layer norms take no epsilon from the config
LAYER = {("attention", "query"): "attention.q_lin", ("attention", "key"): "attention.k_lin",
         ("attention", "value"): "attention.v_lin", ("attention_output",): "attention.out_lin",
         ("attention_LayerNorm",): "sa_layer_norm", ("intermediate",): "ffn.lin1",
         ("output",): "ffn.lin2", ("output_LayerNorm",): "output_layer_norm"}


@dataclasses.dataclass(frozen=True)
class DistilBertFamily(Family):
    name = "DistilBERT"
    base = "distilbert"
    pooler_activation = "relu"
    other_modules = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")

    def encoder_from_hf(self, d: Mapping) -> BertConfig:
        require(d, REQUIRED, self.name)
        if d.get("sinusoidal_pos_embds"):
            raise CheckpointError("config.json has sinusoidal_pos_embds: true; jaxkd learns position "
                                  "embeddings and cannot keep fixed sinusoidal ones (a DistilBERT "
                                  "with sinusoidal_pos_embds: false loads)")
        default = BertConfig()
        return BertConfig(
            vocab_size=d["vocab_size"], hidden_size=d["dim"], num_layers=d["n_layers"],
            num_heads=d["n_heads"], intermediate_size=d["hidden_dim"],
            max_position_embeddings=get(d, "max_position_embeddings", default.max_position_embeddings),
            type_vocab_size=0,
            hidden_act=activation_from_hf(get(d, "activation", "gelu"), "activation"),
            layer_norm_eps=LAYER_NORM_EPS,
            hidden_dropout=get(d, "dropout", default.hidden_dropout),
            attention_dropout=get(d, "attention_dropout", default.attention_dropout),
            pad_token_id=get(d, "pad_token_id", default.pad_token_id),
            initializer_range=get(d, "initializer_range", default.initializer_range),
            model_type=self.model_type)

    def encoder_to_hf(self, config: ModelConfig) -> dict:
        cfg, head = config.encoder, config.head
        return {
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "dim": cfg.hidden_size,
            "n_layers": cfg.num_layers,
            "n_heads": cfg.num_heads,
            "hidden_dim": cfg.intermediate_size,
            "activation": ACT_TO_HF[cfg.hidden_act],
            "dropout": cfg.hidden_dropout,
            "attention_dropout": cfg.attention_dropout,
            # Sequence heads have their own dropout; token heads use `dropout`, as in jaxkd.
            "seq_classif_dropout": cfg.hidden_dropout if head.dropout is None else head.dropout,
            "qa_dropout": cfg.hidden_dropout,
            "max_position_embeddings": cfg.max_position_embeddings,
            "sinusoidal_pos_embds": False,
            "initializer_range": cfg.initializer_range,
            "pad_token_id": cfg.pad_token_id,
        }

    def unsupported(self, cfg: BertConfig) -> list[str]:
        reasons = []
        if cfg.type_vocab_size:
            reasons.append(f"it has {cfg.type_vocab_size} token types (DistilBERT has none)")
        if cfg.pad_offset_positions:
            reasons.append("its position ids are counted from the pad id (RoBERTa's)")
        if cfg.embedding_size not in (None, cfg.hidden_size):
            reasons.append(f"its embeddings are {cfg.embedding_size} wide, not hidden_size "
                           f"{cfg.hidden_size}")
        if cfg.layer_norm_eps != LAYER_NORM_EPS:
            reasons.append(f"its layer_norm_eps is {cfg.layer_norm_eps:g} (DistilBERT's is fixed at "
                           f"{LAYER_NORM_EPS:g})")
        return reasons

    def encoder_names(self, cfg: BertConfig) -> Names:
        names = embedding_names(cfg, f"{self.base}.embeddings")
        names.update(layer_names(cfg.num_layers, f"{self.base}.transformer.layer.{{}}", LAYER))
        return names


DISTILBERT = DistilBertFamily("distilbert", "DistilBert")
