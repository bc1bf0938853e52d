"""ELECTRA discriminators (`model_type: electra`): BERT's layers under `electra.`, embeddings
`embedding_size` wide projected to hidden_size by `embeddings_project` (when they differ), no
pooler, and a classification head dense + GELU + out_proj on [CLS]."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxkd.families import bert
from jaxkd.families.base import Family, Names, dense, get, require
from jaxkd.model import BertConfig, ModelConfig

# ElectraConfig's default, for config.json files that leave it out.
DEFAULT_EMBEDDING_SIZE = 128


@dataclasses.dataclass(frozen=True)
class ElectraFamily(Family):
    name = "ELECTRA"
    base = "electra"
    pooler_activation = "gelu"  # ElectraClassificationHead: exact GELU where BERT has tanh
    other_modules = ("discriminator_predictions.", "generator_predictions.", "generator_lm_head.")

    def encoder_from_hf(self, d: Mapping) -> BertConfig:
        require(d, bert.REQUIRED, self.name)
        width = get(d, "embedding_size", DEFAULT_EMBEDDING_SIZE)
        return bert.encoder_from_hf(d, self.name, model_type=self.model_type,
                                    embedding_size=None if width == d["hidden_size"] else width)

    def encoder_to_hf(self, config: ModelConfig) -> dict:
        return {**bert.encoder_to_hf(config, self.model_type),
                "embedding_size": config.encoder.embedding_width}

    def unsupported(self, cfg: BertConfig) -> list[str]:
        return bert.unsupported(cfg, pad_offset_positions=False, embedding_size=True)

    def encoder_names(self, cfg: BertConfig) -> Names:
        names = bert.bert_layout_names(cfg, self.base)
        if cfg.embedding_width != cfg.hidden_size:
            names.update(dense(("encoder", "embeddings", "embeddings_project"),
                               f"{self.base}.embeddings_project"))
        return names


ELECTRA = ElectraFamily("electra", "Electra")
