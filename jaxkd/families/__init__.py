"""Encoder families: one adapter per Hugging Face model family, chosen by config.json's
`model_type` (a registry like levanter's). `jaxkd.hf` reads and writes checkpoint files and asks
the adapter for names and configs; `jaxkd.model` computes every family with one encoder whose
`BertConfig` fields say how a family differs from BERT.

  bert          BertFor*
  roberta       RobertaFor*: positions from the pad id, one token type, classification head
  xlm-roberta   XLMRobertaFor*: RoBERTa's layout
  distilbert    DistilBertFor*: no token types, pre_classifier + ReLU head
  electra       ElectraFor* (discriminators): projected embeddings, dense + GELU head
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxkd.families.base import CheckpointError, Family
from jaxkd.families.bert import BERT
from jaxkd.families.distilbert import DISTILBERT
from jaxkd.families.electra import ELECTRA
from jaxkd.families.roberta import ROBERTA, XLM_ROBERTA
from jaxkd.model import BertConfig, ModelConfig

FAMILIES: dict[str, Family] = {f.model_type: f for f in (BERT, ROBERTA, XLM_ROBERTA, DISTILBERT, ELECTRA)}
DEFAULT = BERT.model_type  # config.json files without model_type are BERT's


def get(model_type: str) -> Family:
    """The adapter of a model_type, or a CheckpointError listing the supported ones."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; jaxkd reads and writes "
                              f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def of_hf(hf_config: Mapping[str, Any]) -> Family:
    """The adapter of a config.json dict."""
    return get(hf_config.get("model_type") or DEFAULT)


def of(config: ModelConfig | BertConfig) -> Family:
    """The adapter of a jaxkd config (its encoder's model_type)."""
    encoder = config.encoder if isinstance(config, ModelConfig) else config
    return get(encoder.model_type)


__all__ = ["CheckpointError", "DEFAULT", "FAMILIES", "Family", "get", "of", "of_hf"]
