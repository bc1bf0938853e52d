"""Encoder families (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA) against PyTorch transformers: import
and export of every family and head, each family's difference from BERT, bare base models,
students in the teacher's family, and the pipeline with RoBERTa, ELECTRA and DistilBERT-export
teachers. The tiny models of each family are in helpers.py; pair_data in conftest.py here."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import (FAMILIES, FAMILY_HEADS, assert_same_logits, auto_model, family_batch,  # noqa: E402
                     family_hf_config, family_teacher_dir, jaxkd_logits, run_in_process, tiny_config,
                     torch_logits, torch_model)
from jaxkd import config as config_lib  # noqa: E402
from jaxkd import hf  # noqa: E402
from jaxkd import plan as plan_lib  # noqa: E402
from jaxkd.model import Model  # noqa: E402
from jaxkd.student import student_from_shape, student_from_teacher  # noqa: E402

# The regression head (sequence, 1 label) is the classification head's wiring with one output:
# its cases are slow (still run in CI); the other heads stay fast.
HEADS = [pytest.param(kind, n, marks=pytest.mark.slow) if (kind, n) == ("sequence", 1) else (kind, n)
         for kind, n in FAMILY_HEADS]


@pytest.mark.parametrize("kind, num_labels", HEADS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_import_and_export_match_transformers(tmp_path, model_type, kind, num_labels):
    model = torch_model(model_type, kind, num_labels)
    model.save_pretrained(tmp_path / "hf")
    ids, mask, types = family_batch(model_type)
    reference = torch_logits(model, ids, mask, types)
    assert np.abs(reference).max() > 0.1  # large enough that a wrong wiring cannot hide

    cfg, params, report = hf.load_hf(tmp_path / "hf", return_report=True)
    assert cfg.encoder.model_type == model_type and cfg.head.kind == kind
    assert report.fresh == () and report.ignored == ()
    assert_same_logits(jaxkd_logits(cfg, params, ids, mask, types), reference, kind, mask)

    out = hf.save_hf(cfg, params, tmp_path / "export")
    again, info = auto_model(kind).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(again).__name__ == type(model).__name__ == hf.architecture(cfg)
    assert_same_logits(torch_logits(again.eval(), ids, mask, types), reference, kind, mask, atol=1e-5)
    assert hf.load_hf(out)[0].encoder == cfg.encoder


@pytest.mark.parametrize("model_type, change", [
    ("roberta", {"pad_offset_positions": False}),  # BERT's 0..L-1 positions
    ("electra", {"pooler_activation": "tanh"}),  # BERT's pooler activation
    ("distilbert", {"pooler_activation": "tanh"}),
])
def test_each_family_difference_matters(tmp_path, model_type, change):
    """The parity above cannot pass by accident: undoing one family field breaks it."""
    model = torch_model(model_type, "sequence", 3)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)
    ids, mask, types = family_batch(model_type)
    reference = torch_logits(model, ids, mask, types)
    assert np.abs(jaxkd_logits(cfg.replace(**change), params, ids, mask, types) - reference).max() > 1e-2


def test_bare_base_models_load_with_fresh_heads(tmp_path):
    """Keys without the base prefix (RobertaModel, ElectraModel, DistilBertModel) are the same
    weights; the untrained RoBERTa pooler is ignored, the classification head is fresh."""
    for model_type, cls in (("roberta", transformers.RobertaModel), ("electra", transformers.ElectraModel),
                            ("distilbert", transformers.DistilBertModel)):
        torch.manual_seed(0)
        bare = cls(family_hf_config(model_type)).eval()
        bare.save_pretrained(tmp_path / model_type)
        cfg, params, report = hf.load_hf(tmp_path / model_type, num_labels=2, return_report=True)
        assert report.fresh == ("classifier", "pooler")
        assert report.ignored == (("pooler.dense.bias", "pooler.dense.weight") if model_type == "roberta"
                                  else ())
        ids, mask, _ = family_batch(model_type)
        with torch.no_grad():
            reference = bare(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        states = Model(cfg).apply({"params": params}, ids, mask, output_hidden_states=True).hidden_states
        valid = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(states[-1])[valid], reference.numpy()[valid], atol=1e-4)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "hidden_size": 8}))
    message = "model_type 'deberta-v2' is not supported; jaxkd reads and writes bert, distilbert, " \
              "electra, roberta, xlm-roberta"
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_hf(tmp_path)
    with pytest.raises(hf.CheckpointError, match="not supported"):
        hf.config_from_hf({"model_type": "gpt2"})


# ----------------------------------------------------------------------------- students


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "distilbert", "electra"])
def test_students_stay_in_the_teachers_family(tmp_path, model_type):
    """Teacher layers and a fresh shape both export as the teacher's family and load back."""
    model = torch_model(model_type, "token", 5)
    model.save_pretrained(tmp_path / "teacher")
    cfg, params = hf.load_hf(tmp_path / "teacher")
    ids, mask, types = family_batch(model_type)
    students = {"layers": student_from_teacher(cfg, params, [1]),
                "shape": student_from_shape(cfg, jax.random.key(0), 1, 16, 2, 24)}
    for name, (student_cfg, student_params) in students.items():
        assert student_cfg.encoder.model_type == model_type
        out = hf.save_hf(student_cfg, student_params, tmp_path / name)
        again, info = auto_model("token").from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert type(again).__name__ == type(model).__name__
        assert_same_logits(torch_logits(again.eval(), ids, mask, types),
                           jaxkd_logits(student_cfg, student_params, ids, mask, types), "token", mask)


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.parametrize("model_type, export_as, architecture", [
    ("roberta", None, "RobertaForSequenceClassification"),
    ("electra", None, "ElectraForSequenceClassification"),
    ("bert", "distilbert", "DistilBertForSequenceClassification"),
])
def test_pipeline_with_a_family_teacher_exports_what_transformers_loads(
        tmp_path, pair_data, model_type, export_as, architecture):
    teacher = family_teacher_dir(tmp_path / "teacher", model_type, pair_data)
    cfg = tiny_config(tmp_path / "run", teacher, pair_data, **{
        "task.name": "mrpc", "student.layers": [1], "student.export_as": export_as,
        "teacher.finetune.steps": 2, "distill.steps": 4, "distill.eval_every": 4})
    plan = plan_lib.prepare(config_lib.from_dict(cfg), write_cache=False)
    described = plan_lib.describe(config_lib.from_dict(cfg), plan)
    assert f"student: {architecture}, 1 layers" in described
    assert ("no token types (the teacher's type 0 folded into positions)" in described) == bool(export_as)
    report = run_in_process(cfg)
    workdir = tmp_path / "run"
    stages = json.loads((workdir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("teacher", "distill", "export", "report"))

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        workdir / "student", output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == architecture
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "student")
    rows = [line.split("\t") for line in (pair_data / "eval.tsv").read_text().splitlines()[1:]]
    enc = tokenizer([a for a, _, _ in rows], [b for _, b, _ in rows], padding=True, truncation=True,
                    max_length=32, return_tensors="pt")
    if "token_type_ids" not in model.forward.__code__.co_varnames:  # DistilBERT reads none
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        predicted = model.eval()(**enc).logits.argmax(-1).numpy()
    labels = np.array([int(label) for _, _, label in rows])
    assert np.mean(predicted == labels) == pytest.approx(report["student"]["splits"]["eval"]["accuracy"])
