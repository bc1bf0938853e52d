"""The DistilBERT family: what it cannot express (sinusoidal positions, two token types) and the
DistilBERT-architecture student of a BERT teacher, against PyTorch transformers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import (FAMILY_HEADS, FAMILY_HIDDEN, FAMILY_VOCAB, assert_same_logits, auto_model,  # noqa: E402
                     family_batch, family_hf_config, jaxkd_logits, torch_logits, torch_model)
from jaxkd import hf  # noqa: E402
from jaxkd import plan as plan_lib  # noqa: E402
from jaxkd.config import ConfigError, StudentConfig  # noqa: E402
from jaxkd.student import distilbert_from_teacher, student_from_teacher  # noqa: E402

# The regression head (sequence, 1 label) is the classification head's wiring with one output:
# its cases are slow (still run in CI); the other heads stay fast.
HEADS = [pytest.param(kind, n, marks=pytest.mark.slow) if (kind, n) == ("sequence", 1) else (kind, n)
         for kind, n in FAMILY_HEADS]


def test_distilbert_refuses_sinusoidal_positions_and_inexpressible_encoders():
    d = transformers.DistilBertConfig(vocab_size=FAMILY_VOCAB, dim=FAMILY_HIDDEN, n_layers=2, n_heads=4,
                                      sinusoidal_pos_embds=True).to_dict()
    with pytest.raises(hf.CheckpointError, match="sinusoidal_pos_embds: true"):
        hf.config_from_hf(d)
    bert = hf.model_config_from_hf(family_hf_config("bert").to_dict())
    with pytest.raises(hf.CheckpointError, match="cannot be written as a DistilBERT.*2 token types"):
        hf.config_to_hf(bert.replace(model_type="distilbert"))
    with pytest.raises(hf.CheckpointError, match="cannot be written as a RoBERTa.*0..L-1"):
        hf.config_to_hf(bert.replace(model_type="roberta"))


@pytest.mark.parametrize("kind, num_labels", HEADS)
def test_distilbert_student_of_a_bert_teacher(tmp_path, kind, num_labels):
    teacher = torch_model("bert", kind, num_labels, num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    cfg, params = hf.load_hf(tmp_path / "teacher")
    student_cfg, student_params = distilbert_from_teacher(cfg, params)  # layers 0 and 2
    assert (student_cfg.encoder.model_type, student_cfg.encoder.num_layers) == ("distilbert", 2)
    ids, mask, types = family_batch("bert")
    mine = jaxkd_logits(student_cfg, student_params, ids, mask, types)  # token types are ignored

    out = hf.save_hf(student_cfg, student_params, tmp_path / "student")
    model, info = auto_model(kind).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == f"DistilBert{type(teacher).__name__[len('Bert'):]}"
    assert_same_logits(torch_logits(model.eval(), ids, mask, None), mine, kind, mask)

    # The fold is exact: with token types all 0 the BERT-layout student on the same layers (with
    # DistilBERT's ReLU head) computes the same; with a second segment it does not.
    bert_cfg, bert_params = student_from_teacher(cfg, params, (0, 2))
    bert_cfg = bert_cfg.replace(pooler_activation="relu")
    assert_same_logits(jaxkd_logits(bert_cfg, bert_params, ids, mask, np.zeros_like(types)), mine, kind, mask,
                       atol=1e-5)
    assert np.abs(jaxkd_logits(bert_cfg, bert_params, ids, mask, types) - mine).max() > 1e-3


def test_distilbert_student_needs_a_bert_teacher(tmp_path):
    torch_model("roberta", "sequence", 2).save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)
    with pytest.raises(ValueError, match="built from a BERT teacher; this teacher's model_type is 'roberta'"):
        distilbert_from_teacher(cfg, params)
    with pytest.raises(ConfigError, match="student.export_as: .*BERT teacher"):
        plan_lib.student_config(StudentConfig(layers=(0,), export_as="distilbert"), cfg)
