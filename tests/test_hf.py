"""Hugging Face import/export against PyTorch transformers as the reference."""
import json
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

from helpers import tiny_model_config  # noqa: E402
from jaxkd import hf  # noqa: E402
from jaxkd.model import Bert, HeadConfig, apply_model  # noqa: E402

HF_TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=24, max_position_embeddings=20, hidden_act="gelu_new")


def _torch_model(cls=transformers.BertForSequenceClassification, num_labels=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**HF_TINY, num_labels=num_labels), **kwargs).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mix-up shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(L=9):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, HF_TINY["vocab_size"], (2, L))
    mask = np.ones((2, L), np.int64)
    mask[1, 6:] = 0
    types = np.zeros((2, L), np.int64)
    types[:, 4:] = 1
    return ids * mask, mask, types * mask


def _torch_outputs(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), output_hidden_states=True)


def _assert_same_encoder(cfg, params, torch_out, ids, mask, types, atol=1e-5):
    ours = Bert(cfg).apply({"params": params}, ids, mask, types, output_hidden_states=True)
    valid = mask.astype(bool)
    assert len(ours.hidden_states) == len(torch_out.hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, torch_out.hidden_states)):
        np.testing.assert_allclose(np.asarray(a)[valid], b.numpy()[valid], atol=atol, err_msg=f"layer {i}")
    return ours


def _state_dict_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write_safetensors(directory, model, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# ----------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm_batch(minilm_dir):
    tok = hf.load_tokenizer(minilm_dir)
    assert tok.is_fast  # transformers 5: the Rust backend behind BertTokenizer
    enc = tok(["A short one.", "The quick brown fox jumps over the lazy dog by the river bank."],
              ["Is it?", "Yes."], padding=True, return_tensors="np")
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.slow
def test_minilm_hidden_states_match_pytorch(minilm_dir, minilm_batch):
    cfg, params, report = hf.load_hf(minilm_dir, return_report=True)
    assert (cfg.encoder.num_layers, cfg.encoder.hidden_size, cfg.encoder.num_heads) == (6, 384, 12)
    assert report.fresh == ("classifier",) and report.ignored == ("embeddings.position_ids",)
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    _assert_same_encoder(cfg, params, _torch_outputs(reference, *minilm_batch), *minilm_batch, atol=1e-4)


@pytest.mark.slow
def test_minilm_export_round_trip(minilm_dir, minilm_batch, tmp_path):
    cfg, params = hf.load_hf(minilm_dir, num_labels=3, rng=jax.random.key(3))
    out = hf.save_hf(cfg, params, tmp_path / "export", tokenizer=minilm_dir, id2label=["neg", "neu", "pos"])
    model, info = transformers.BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    logits = Bert(cfg).apply({"params": params}, *minilm_batch).logits
    np.testing.assert_allclose(logits, _torch_outputs(model.eval(), *minilm_batch).logits.numpy(), atol=1e-4)

    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    tok = hf.load_tokenizer(out)
    assert tok("hello world")["input_ids"] == hf.load_tokenizer(minilm_dir)("hello world")["input_ids"]


# ----------------------------------------------------------------------------- key layouts (tiny)


def test_sequence_classification_checkpoint_keeps_its_head(tmp_path):
    model = _torch_model()
    model.save_pretrained(tmp_path)
    cfg, params, report = hf.load_hf(tmp_path, return_report=True)
    assert cfg.head == HeadConfig("sequence", 3) and cfg.encoder.hidden_act == "gelu_tanh"
    assert report.fresh == () and report.ignored == ()
    batch = _inputs()
    ours = _assert_same_encoder(cfg, params, _torch_outputs(model, *batch), *batch)
    np.testing.assert_allclose(ours.logits, _torch_outputs(model, *batch).logits.numpy(), atol=1e-5)


def test_bare_bert_model_gets_fresh_classifier(tmp_path):
    model = _torch_model(transformers.BertModel)
    model.save_pretrained(tmp_path)
    cfg, params, report = hf.load_hf(tmp_path, num_labels=1, rng=jax.random.key(0), return_report=True)
    assert report.fresh == ("classifier",) and cfg.head.num_labels == 1
    head = params["head"]
    kernel, bias = np.asarray(head["classifier"]["kernel"]), np.asarray(head["classifier"]["bias"])
    assert kernel.shape == (16, 1) and not bias.any() and 0 < kernel.std() < 0.05
    np.testing.assert_allclose(head["pooler"]["kernel"], model.pooler.dense.weight.detach().numpy().T)
    _assert_same_encoder(cfg, params, _torch_outputs(model, *_inputs()), *_inputs())


def test_no_pooler_gets_fresh_pooler(tmp_path):
    model = _torch_model(transformers.BertModel, add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    _, params, report = hf.load_hf(tmp_path, return_report=True)
    assert report.fresh == ("classifier", "pooler")
    pooler = params["head"]["pooler"]
    assert pooler["kernel"].shape == (16, 16) and not np.asarray(pooler["bias"]).any()


def test_pretraining_heads_are_ignored_and_reported(tmp_path, caplog):
    model = _torch_model(transformers.BertForPreTraining)
    model.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="jaxkd.hf"):
        cfg, params, report = hf.load_hf(tmp_path, return_report=True)
    assert report.ignored and all(k.startswith("cls.") for k in report.ignored)
    assert "cls.predictions.bias" in caplog.text and "classifier" in caplog.text
    _assert_same_encoder(cfg, params, _torch_outputs(model.bert, *_inputs()), *_inputs())


def test_gamma_beta_names(tmp_path):
    model = _torch_model()
    tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in _state_dict_np(model).items()}
    assert any(k.endswith("gamma") for k in tensors)
    cfg, params = hf.load_hf(_write_safetensors(tmp_path, model, tensors))
    _assert_same_encoder(cfg, params, _torch_outputs(model, *_inputs()), *_inputs())


def test_sharded_safetensors(tmp_path):
    model = _torch_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    cfg, params, report = hf.load_hf(tmp_path, return_report=True)
    assert len(report.weights) > 1
    _assert_same_encoder(cfg, params, _torch_outputs(model, *_inputs()), *_inputs())


def test_pytorch_bin(tmp_path, monkeypatch):
    model = _torch_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg, params = hf.load_hf(tmp_path)
    ours = _assert_same_encoder(cfg, params, _torch_outputs(model, *_inputs()), *_inputs())
    np.testing.assert_allclose(ours.logits, _torch_outputs(model, *_inputs()).logits.numpy(), atol=1e-5)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="pip install torch==.*safetensors"):
        hf.load_hf(tmp_path)


def test_bf16_safetensors(tmp_path):
    model = _torch_model()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    _, params = hf.load_hf(tmp_path)
    expected = model.bert.embeddings.word_embeddings.weight.float().detach().numpy()
    table = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(table, expected)
    assert table.dtype == np.float32


def test_missing_key_is_named(tmp_path):
    model = _torch_model()
    tensors = _state_dict_np(model)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match=r"lacks \['bert.encoder.layer.1.output.dense.bias'\]"):
        hf.load_hf(_write_safetensors(tmp_path, model, tensors))


def test_wrong_shape_names_key_expected_and_got(tmp_path):
    model = _torch_model()
    config = json.loads(model.config.to_json_string())
    tensors = _state_dict_np(model)
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((20, 16), np.float32)
    _write_safetensors(tmp_path, model, tensors)
    with pytest.raises(ValueError, match=r"layer.0.intermediate.dense.weight: expected \(24, 16\), got \(20, 16\)"):
        hf.load_hf(tmp_path)
    assert config["intermediate_size"] == 24


def test_unexpected_key_is_named(tmp_path):
    model = _torch_model()
    tensors = {**_state_dict_np(model), "bert.encoder.layer.2.output.dense.bias": np.zeros(16, np.float32)}
    with pytest.raises(ValueError, match="layer.2.output.dense.bias"):
        hf.load_hf(_write_safetensors(tmp_path, model, tensors))


def test_head_size_mismatch(tmp_path):
    model = _torch_model(num_labels=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    config.pop("label2id", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="classifier.weight has 3 labels but config.json says 2"):
        hf.load_hf(tmp_path)
    cfg, params, report = hf.load_hf(tmp_path, num_labels=5, return_report=True)
    assert cfg.head.num_labels == 5 and report.fresh == ("classifier",)
    assert "classifier.weight" in report.ignored
    assert params["head"]["classifier"]["kernel"].shape == (16, 5)


# ----------------------------------------------------------------------------- configs and errors


def test_config_round_trip_and_activation_names():
    cfg = tiny_model_config("sequence", 1, vocab_size=60, num_heads=4, intermediate_size=24,
                            max_position_embeddings=512, hidden_act="gelu_tanh", dropout=0.2)
    d = hf.config_to_hf(cfg)
    assert d["hidden_act"] == "gelu_new" and d["problem_type"] == "regression"
    assert d["architectures"] == ["BertForSequenceClassification"] and d["id2label"] == {"0": "LABEL_0"}
    assert hf.config_from_hf(d) == cfg.encoder
    assert hf.model_config_from_hf(d) == cfg
    assert hf.model_config_from_hf(transformers.BertConfig(**d)) == cfg
    assert hf.config_to_hf(cfg.replace(hidden_act="gelu", num_labels=2))["problem_type"] == \
        "single_label_classification"
    token = hf.config_to_hf(cfg.replace(kind="token", num_labels=3))
    assert token["architectures"] == ["BertForTokenClassification"] and "problem_type" not in token
    assert hf.model_config_from_hf(token).head == HeadConfig("token", 3, dropout=0.2)
    assert hf.config_from_hf({**d, "hidden_act": "gelu_pytorch_tanh"}).hidden_act == "gelu_tanh"
    with pytest.raises(ValueError, match="hidden_act 'silu' is not supported"):
        hf.config_from_hf({**d, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="lacks \\['intermediate_size'\\]"):
        hf.config_from_hf({k: v for k, v in d.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="id2label must name labels 0..0"):
        hf.config_to_hf(cfg, id2label=["a", "b"])


def test_dtype_sets_compute_dtype_only(tmp_path):
    _torch_model().save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path, dtype="bfloat16")
    assert cfg.encoder.dtype == "bfloat16" and all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        hf.load_hf(tmp_path, dtype="int8")


def test_unknown_hub_id_offline_suggests_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a reachable Hugging Face Hub id"):
        hf.load_hf("nobody-here/no-such-bert-model")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path)
    _torch_model().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="BERT tokenizer"):
        hf.load_tokenizer(tmp_path / "nowhere")


def test_save_without_tokenizer_files_fails(tmp_path):
    cfg, params = hf.load_hf(_write_safetensors(tmp_path / "m", _torch_model(), _state_dict_np(_torch_model())))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        hf.save_hf(cfg, params, tmp_path / "out", tokenizer=tmp_path / "empty")


# ----------------------------------------------------------------------------- token classification


def test_token_classification_checkpoint_matches_pytorch(tmp_path):
    model = _torch_model(transformers.BertForTokenClassification, num_labels=5)
    model.save_pretrained(tmp_path)
    cfg, params, report = hf.load_hf(tmp_path, return_report=True)
    assert cfg.head == HeadConfig("token", 5) and report.fresh == () and report.ignored == ()
    batch = _inputs()
    reference = _torch_outputs(model, *batch)
    ours = _assert_same_encoder(cfg, params, reference, *batch)
    valid = batch[1].astype(bool)
    np.testing.assert_allclose(np.asarray(ours.logits)[valid], reference.logits.numpy()[valid], atol=1e-5)
    out = hf.save_hf(cfg, params, tmp_path / "export")
    again, info = transformers.AutoModelForTokenClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    logits = _torch_outputs(again.eval(), *batch).logits.numpy()
    np.testing.assert_allclose(logits[valid], reference.logits.numpy()[valid], atol=1e-6)


def test_head_of_another_task_is_replaced_not_reused(tmp_path):
    """A sequence classifier loaded for token classification keeps its encoder, not its head."""
    model = _torch_model(num_labels=5)
    model.save_pretrained(tmp_path)
    cfg, params, report = hf.load_hf(tmp_path, head="token", return_report=True)
    assert cfg.head.kind == "token" and report.fresh == ("classifier",)
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(report.ignored)
    assert not np.allclose(params["head"]["classifier"]["kernel"],
                           model.classifier.weight.detach().numpy().T)
    _assert_same_encoder(cfg, params, _torch_outputs(model, *_inputs()), *_inputs())


@pytest.mark.slow  # the real MiniLM (test_token_classification_checkpoint_matches_pytorch: fast)
def test_minilm_token_head_matches_pytorch(minilm_dir, minilm_batch, tmp_path):
    cfg, params = hf.load_hf(minilm_dir, head=HeadConfig("token", 9), rng=jax.random.key(1))
    out = hf.save_hf(cfg, params, tmp_path / "ner", tokenizer=minilm_dir, id2label=[str(i) for i in range(9)])
    model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    ids, mask, types = minilm_batch
    reference = _torch_outputs(model, ids, mask, types).logits.numpy()
    ours = np.asarray(apply_model(cfg, params, ids, mask, types).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], reference[valid], atol=1e-4)


class _NotATensor:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def test_a_pickle_with_objects_is_refused_unloaded(tmp_path):
    model = _torch_model()
    model.config.save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="holds more than tensors .* was not loaded"):
        hf.load_hf(tmp_path)


def test_export_honours_the_umask_and_drops_remote_code_keys(tmp_path):
    import os
    import stat

    model = _torch_model()
    model.config.save_pretrained(tmp_path / "src")
    _write_safetensors(tmp_path / "src", model, _state_dict_np(model))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    cfg, params = hf.load_hf(tmp_path / "src")
    old = os.umask(0o022)
    try:
        out = hf.save_hf(cfg, params, tmp_path / "out", tokenizer=tokenizer_dir)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    kept = json.loads((out / "tokenizer_config.json").read_text())
    assert kept == {"do_lower_case": True}
    assert "auto_map" not in json.loads((out / "config.json").read_text())
