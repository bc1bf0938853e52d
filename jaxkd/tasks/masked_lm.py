"""The masked-LM head of general distillation (`jaxkd.tasks.general`): transform, layer norm and
a decoder tied to the word embeddings, as BERT, RoBERTa / XLM-R, DistilBERT and ELECTRA's
generator compute it, with their checkpoint names.

The head reads the positions to predict (`positions` [B, P], from the batch) before anything
vocabulary-wide: logits are [B, P, V], never [B, L, V] over a whole training batch. Without
positions (a forward pass outside training, the parity tests) it scores every position.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import model as model_lib
from jaxkd.layers import einsum
from jaxkd.model import BertConfig, HeadConfig

KIND = "masked_lm"


class MaskedLMHead(nn.Module):
    """dense (hidden -> embedding width), the encoder's activation, layer norm, then logits
    against the word-embedding table plus a bias. RoBERTa's `lm_head` applies exact GELU, which
    is the `hidden_act` of every RoBERTa and XLM-R checkpoint."""

    encoder: BertConfig
    head: HeadConfig

    @nn.compact
    def __call__(self, x_BxLxH, deterministic: bool, table_VxE, positions_BxP=None):
        del deterministic  # transformers' masked-LM heads have no dropout
        cfg = self.encoder
        if positions_BxP is not None:
            x_BxLxH = jnp.take_along_axis(x_BxLxH, positions_BxP[..., None].astype(jnp.int32), axis=1)
        x = model_lib.dense(cfg, cfg.embedding_width, "transform", dtype=jnp.float32)(x_BxLxH)
        x = model_lib.ACTIVATIONS[cfg.hidden_act](x)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=cfg.params_dtype, name="transform_LayerNorm")(x)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.params_dtype)
        return einsum("bpe,ve->bpv", x, table_VxE, cfg.compute_dtype) + bias


HEAD = model_lib.register_head(model_lib.HeadSpec(
    kind=KIND, module=MaskedLMHead, hf_suffix="ForMaskedLM",
    hf_modules={
        "bert": (("transform", "cls.predictions.transform.dense"),
                 ("transform_LayerNorm", "cls.predictions.transform.LayerNorm"),
                 ("bias", "cls.predictions.bias")),
        "roberta": (("transform", "lm_head.dense"), ("transform_LayerNorm", "lm_head.layer_norm"),
                    ("bias", "lm_head.bias")),
        "distilbert": (("transform", "vocab_transform"),
                       ("transform_LayerNorm", "vocab_layer_norm"),
                       ("bias", "vocab_projector.bias")),
        "electra": (("transform", "generator_predictions.dense"),
                    ("transform_LayerNorm", "generator_predictions.LayerNorm"),
                    ("bias", "generator_lm_head.bias")),
    },
    tied_decoder={"bert": "cls.predictions.decoder.weight", "roberta": "lm_head.decoder.weight",
                  "distilbert": "vocab_projector.weight", "electra": "generator_lm_head.weight"},
    num_labels=1, ties_word_embeddings=True, reads_positions=True))
