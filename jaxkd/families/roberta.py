"""RoBERTa (`model_type: roberta`) and XLM-RoBERTa (`xlm-roberta`): BERT's layers under `roberta.`,
position ids counted from the pad id, one token type, and a classification head (dense + tanh +
out_proj on <s>) in place of the pooler."""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

from jaxkd.families import bert
from jaxkd.families.base import Family, Names, get
from jaxkd.model import BertConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class RobertaFamily(Family):
    name = "RoBERTa"
    base = "roberta"
    pooler_activation = "tanh"
    # The pooler of a bare RobertaModel was never trained (no next-sentence task) and no head reads it.
    other_modules = ("lm_head.", "roberta.pooler.")

    def encoder_from_hf(self, d: Mapping) -> BertConfig:
        return bert.encoder_from_hf(d, self.name, model_type=self.model_type, pad_offset_positions=True,
                                    pad_token_id=get(d, "pad_token_id", 1))

    def encoder_to_hf(self, config: ModelConfig) -> dict:
        return bert.encoder_to_hf(config, self.model_type)

    def unsupported(self, cfg: BertConfig) -> list[str]:
        return bert.unsupported(cfg, pad_offset_positions=True, embedding_size=False)

    def encoder_names(self, cfg: BertConfig) -> Names:
        return bert.bert_layout_names(cfg, self.base)

    def load_tokenizer(self, directory: pathlib.Path, words: bool = False):
        from transformers import AutoTokenizer

        # Byte-level BPE marks a word start by the space before it: pre-split words need one
        # added, or every word is encoded as if it began the text.
        extra = {"add_prefix_space": True} if words and self.model_type == "roberta" else {}
        return AutoTokenizer.from_pretrained(str(directory), **extra)


ROBERTA = RobertaFamily("roberta", "Roberta")
XLM_ROBERTA = RobertaFamily("xlm-roberta", "XLMRoberta")
