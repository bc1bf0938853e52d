"""Encoder families (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA) against PyTorch transformers: import,
export, the DistilBERT-architecture student of a BERT teacher, and the pipeline with RoBERTa and
ELECTRA teachers."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxkd import config as config_lib  # noqa: E402
from jaxkd import hf, tasks  # noqa: E402
from jaxkd import plan as plan_lib  # noqa: E402
from jaxkd.config import ConfigError, StudentConfig  # noqa: E402
from jaxkd.data import DataConfig  # noqa: E402
from jaxkd.student import distilbert_from_teacher, student_from_shape, student_from_teacher  # noqa: E402
from jaxkd.model import Model, apply_model  # noqa: E402

VOCAB, HIDDEN = 100, 32
SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, hidden_act="gelu")
# Tiny random models of each family; the shapes differ from BERT's where the family's do.
HF_CONFIGS = {
    "bert": lambda: transformers.BertConfig(**SIZES, max_position_embeddings=40),
    "roberta": lambda: transformers.RobertaConfig(**SIZES, max_position_embeddings=42, type_vocab_size=1,
                                                  pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**SIZES, max_position_embeddings=42,
                                                         type_vocab_size=1, pad_token_id=1,
                                                         bos_token_id=0, eos_token_id=2),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4,
                                                        hidden_dim=37, max_position_embeddings=40),
    "electra": lambda: transformers.ElectraConfig(**SIZES, embedding_size=24, max_position_embeddings=40),
}
AUTO = {"sequence": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
        "span": transformers.AutoModelForQuestionAnswering}
HEADS = [("sequence", 3), ("sequence", 1), ("token", 5), ("span", 2)]


def torch_model(model_type: str, kind: str, num_labels: int, seed: int = 0, **config_changes):
    """A randomly initialised transformers model, with weights large enough that a mix-up shows
    (the default init of a model this small gives logits near 0 whatever the wiring)."""
    config = HF_CONFIGS[model_type]()
    config.num_labels = num_labels
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AUTO[kind].from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def batch(model_type: str, L: int = 9):
    """Right-padded ids (no pad id among the real tokens), mask, and token types where the family
    has them (two segments for BERT and ELECTRA)."""
    pad = HF_CONFIGS[model_type]().pad_token_id
    rng = np.random.default_rng(1)
    ids = rng.integers(3, VOCAB, (3, L))
    mask = np.ones((3, L), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = np.where(mask > 0, ids, pad)
    types = None
    if model_type in ("bert", "electra"):
        types = np.zeros((3, L), np.int64)
        types[:, 4:] = 1
        types *= mask
    return ids, mask, types


def torch_logits(model, ids, mask, types) -> np.ndarray:
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if types is not None:
        inputs["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], -1).numpy()
    return out.logits.numpy()


def ours(cfg, params, ids, mask, types) -> np.ndarray:
    return np.asarray(apply_model(cfg, params, ids, mask, types).logits)


def assert_same_logits(a, b, kind, mask, atol=1e-4):
    if kind == "sequence":
        np.testing.assert_allclose(a, b, atol=atol)
    else:  # per token: padding positions are whatever each implementation leaves there
        valid = mask.astype(bool)
        np.testing.assert_allclose(a[valid], b[valid], atol=atol)


@pytest.mark.parametrize("kind, num_labels", HEADS)
@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_import_and_export_match_transformers(tmp_path, model_type, kind, num_labels):
    model = torch_model(model_type, kind, num_labels)
    model.save_pretrained(tmp_path / "hf")
    ids, mask, types = batch(model_type)
    reference = torch_logits(model, ids, mask, types)
    assert np.abs(reference).max() > 0.1  # large enough that a wrong wiring cannot hide

    cfg, params, report = hf.load_hf(tmp_path / "hf", return_report=True)
    assert cfg.encoder.model_type == model_type and cfg.head.kind == kind
    assert report.fresh == () and report.ignored == ()
    assert_same_logits(ours(cfg, params, ids, mask, types), reference, kind, mask)

    out = hf.save_hf(cfg, params, tmp_path / "export")
    again, info = AUTO[kind].from_pretrained(out, output_loading_info=True)
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
    ids, mask, types = batch(model_type)
    reference = torch_logits(model, ids, mask, types)
    assert np.abs(ours(cfg.replace(**change), params, ids, mask, types) - reference).max() > 1e-2


def test_bare_base_models_load_with_fresh_heads(tmp_path):
    """Keys without the base prefix (RobertaModel, ElectraModel, DistilBertModel) are the same
    weights; the untrained RoBERTa pooler is ignored, the classification head is fresh."""
    for model_type, cls in (("roberta", transformers.RobertaModel), ("electra", transformers.ElectraModel),
                            ("distilbert", transformers.DistilBertModel)):
        torch.manual_seed(0)
        bare = cls(HF_CONFIGS[model_type]()).eval()
        bare.save_pretrained(tmp_path / model_type)
        cfg, params, report = hf.load_hf(tmp_path / model_type, num_labels=2, return_report=True)
        assert report.fresh == ("classifier", "pooler")
        assert report.ignored == (("pooler.dense.bias", "pooler.dense.weight") if model_type == "roberta"
                                  else ())
        ids, mask, _ = batch(model_type)
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


def test_distilbert_refuses_sinusoidal_positions_and_inexpressible_encoders():
    d = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4,
                                      sinusoidal_pos_embds=True).to_dict()
    with pytest.raises(hf.CheckpointError, match="sinusoidal_pos_embds: true"):
        hf.config_from_hf(d)
    bert = hf.model_config_from_hf(HF_CONFIGS["bert"]().to_dict())
    with pytest.raises(hf.CheckpointError, match="cannot be written as a DistilBERT.*2 token types"):
        hf.config_to_hf(bert.replace(model_type="distilbert"))
    with pytest.raises(hf.CheckpointError, match="cannot be written as a RoBERTa.*0..L-1"):
        hf.config_to_hf(bert.replace(model_type="roberta"))


# ----------------------------------------------------------------------------- students


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "distilbert", "electra"])
def test_students_stay_in_the_teachers_family(tmp_path, model_type):
    """Teacher layers and a fresh shape both export as the teacher's family and load back."""
    model = torch_model(model_type, "token", 5)
    model.save_pretrained(tmp_path / "teacher")
    cfg, params = hf.load_hf(tmp_path / "teacher")
    ids, mask, types = batch(model_type)
    students = {"layers": student_from_teacher(cfg, params, [1]),
                "shape": student_from_shape(cfg, jax.random.key(0), 1, 16, 2, 24)}
    for name, (student_cfg, student_params) in students.items():
        assert student_cfg.encoder.model_type == model_type
        out = hf.save_hf(student_cfg, student_params, tmp_path / name)
        again, info = AUTO["token"].from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert type(again).__name__ == type(model).__name__
        assert_same_logits(torch_logits(again.eval(), ids, mask, types),
                           ours(student_cfg, student_params, ids, mask, types), "token", mask)


@pytest.mark.parametrize("kind, num_labels", HEADS)
def test_distilbert_student_of_a_bert_teacher(tmp_path, kind, num_labels):
    teacher = torch_model("bert", kind, num_labels, num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    cfg, params = hf.load_hf(tmp_path / "teacher")
    student_cfg, student_params = distilbert_from_teacher(cfg, params)  # layers 0 and 2
    assert (student_cfg.encoder.model_type, student_cfg.encoder.num_layers) == ("distilbert", 2)
    ids, mask, types = batch("bert")
    mine = ours(student_cfg, student_params, ids, mask, types)  # token types are ignored

    out = hf.save_hf(student_cfg, student_params, tmp_path / "student")
    model, info = AUTO[kind].from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == f"DistilBert{type(teacher).__name__[len('Bert'):]}"
    assert_same_logits(torch_logits(model.eval(), ids, mask, None), mine, kind, mask)

    # The fold is exact: with token types all 0 the BERT-layout student on the same layers (with
    # DistilBERT's ReLU head) computes the same; with a second segment it does not.
    bert_cfg, bert_params = student_from_teacher(cfg, params, (0, 2))
    bert_cfg = bert_cfg.replace(pooler_activation="relu")
    assert_same_logits(ours(bert_cfg, bert_params, ids, mask, np.zeros_like(types)), mine, kind, mask,
                       atol=1e-5)
    assert np.abs(ours(bert_cfg, bert_params, ids, mask, types) - mine).max() > 1e-3


def test_distilbert_student_needs_a_bert_teacher(tmp_path):
    torch_model("roberta", "sequence", 2).save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)
    with pytest.raises(ValueError, match="built from a BERT teacher; this teacher's model_type is 'roberta'"):
        distilbert_from_teacher(cfg, params)
    with pytest.raises(ConfigError, match="student.export_as: .*BERT teacher"):
        plan_lib.student_config(StudentConfig(layers=(0,), export_as="distilbert"), cfg)


# ----------------------------------------------------------------------------- the pipeline

WORDS = "the a cat dog sat ran on in mat park big small red old new house tree river".split()


def _pairs(rng, n):
    rows = []
    for _ in range(n):
        a = " ".join(rng.choice(WORDS, rng.integers(3, 9)))
        b = " ".join(rng.choice(WORDS, rng.integers(2, 7)))
        rows.append(f"{a}\t{b}\t{int(a.split()[0] == b.split()[0])}")
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """A tiny sentence-pair task in MRPC's columns: train.tsv (64 pairs) and eval.tsv (24)."""
    out = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("eval", 24)):
        (out / f"{name}.tsv").write_text("\n".join(["sentence1\tsentence2\tlabel", *_pairs(rng, n)]) + "\n")
    return out


def _tokenizer(model_type: str, texts):
    """A small tokenizer trained here: byte-level BPE for RoBERTa, WordPiece for the others."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if model_type == "roberta":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return transformers.RobertaTokenizerFast(
            tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    cls = transformers.ElectraTokenizerFast if model_type == "electra" else transformers.BertTokenizerFast
    return cls(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
               sep_token="[SEP]", mask_token="[MASK]")


def _teacher_dir(path, model_type: str, data):
    """A 2-layer random teacher of the family (a bare sequence classifier) with its tokenizer."""
    texts = [field for line in (data / "train.tsv").read_text().splitlines()[1:]
             for field in line.split("\t")[:2]]
    tokenizer = _tokenizer(model_type, texts)
    model = torch_model(model_type, "sequence", 2, vocab_size=len(tokenizer), max_position_embeddings=66)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model_type, export_as, architecture", [
    ("roberta", None, "RobertaForSequenceClassification"),
    ("electra", None, "ElectraForSequenceClassification"),
    ("bert", "distilbert", "DistilBertForSequenceClassification"),
])
def test_pipeline_with_a_family_teacher_exports_what_transformers_loads(
        tmp_path, pair_data, model_type, export_as, architecture):
    from test_trainer import run_in_process, tiny_config

    teacher = _teacher_dir(tmp_path / "teacher", model_type, pair_data)
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


def test_roberta_token_windows_use_its_specials_and_a_space_before_each_word(tmp_path, pair_data):
    teacher = _teacher_dir(tmp_path / "teacher", "roberta", pair_data)
    tokenizer = hf.load_tokenizer(teacher, words=True)
    task = tasks.resolve(tasks.task_config(name="custom", type="token_classification", labels=["O", "X"]))
    (tmp_path / "t.conll").write_text("the O\ncat X\nsat O\n\nred X\ndog O\n")
    examples = task.load(DataConfig(), str(tmp_path / "t.conll"))
    enc = task.encode(examples, tokenizer, 16)
    plain = hf.load_tokenizer(teacher)  # sentence tasks: no space added before the first word
    first = enc.input_ids[enc.offsets[0]:enc.offsets[1]].tolist()
    assert first == tokenizer("the cat sat")["input_ids"] != plain("the cat sat")["input_ids"]
    assert first[0] == tokenizer.bos_token_id == 0 and first[-1] == tokenizer.eos_token_id == 2
    assert not enc.token_type_ids.any()
