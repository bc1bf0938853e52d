"""jaxkd.tasks.sbert: sentence-transformers directories read and written, and pooling as
sentence-transformers computes it (NumPy references; the real all-MiniLM-L6-v2 in PyTorch)."""
import json
import pathlib

import numpy as np
import pytest

from jaxkd.data import DataError
from jaxkd.tasks import sbert

SENTENCES = ["A man with a hard hat is dancing.", "A child is riding a horse.",
             "Three men are playing chess.",
             "A woman is slicing an onion into thin rings on a wooden cutting board in a kitchen.",
             "Hi.", "The cat sits on the mat while the dog, tired after a long walk, sleeps."]


def _write(path: pathlib.Path, value) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def _st_dir(tmp_path, modules, pooling=None, settings=None, tokenizer=None) -> pathlib.Path:
    """A sentence-transformers directory of `modules` (short type names) with its configs."""
    d = tmp_path / "st"
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense",
             "LayerNorm": "2_LayerNorm"}
    _write(d / "modules.json", [{"idx": i, "name": str(i), "path": paths[m],
                                 "type": f"sentence_transformers.models.{m}"}
                                for i, m in enumerate(modules)])
    _write(d / "1_Pooling" / "config.json", pooling or {"word_embedding_dimension": 8,
                                                        "pooling_mode_mean_tokens": True})
    if settings is not None:
        _write(d / "sentence_bert_config.json", settings)
    if tokenizer is not None:
        _write(d / "tokenizer_config.json", tokenizer)
    return d


# ----------------------------------------------------------------------------- reading


def test_reads_the_minilm_sentence_transformers_directory(minilm_dir):
    found = sbert.read_modules(minilm_dir)
    assert found == sbert.Layout(minilm_dir, ("mean",), True, 256, False, from_modules=True)
    assert sbert.layout(minilm_dir) == found  # no 2_Normalize folder: Normalize has no files


def test_reads_the_legacy_flags_in_sentence_transformers_order(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling"],
                pooling={"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True,
                         "pooling_mode_cls_token": True, "pooling_mode_max_tokens": False},
                settings={"max_seq_length": 64, "do_lower_case": True})
    found = sbert.read_modules(d)
    assert (found.pooling, found.normalize, found.max_seq_length, found.lowercase) == \
        (("cls", "mean"), False, 64, True)


def test_reads_the_sentence_transformers_6_layout(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling", "Normalize"],
                pooling={"embedding_dimension": 8, "pooling_mode": ["max", "mean_sqrt_len_tokens"],
                         "include_prompt": True},
                tokenizer={"model_max_length": 128})
    _write(d / "2_Normalize" / "config.json", {"module_input_name": "sentence_embedding"})
    found = sbert.read_modules(d)
    assert (found.pooling, found.normalize, found.max_seq_length) == \
        (("max", "mean_sqrt_len_tokens"), True, 128)


def test_no_limit_in_the_tokenizer_config_is_no_max_seq_length(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling"], tokenizer={"model_max_length": int(1e30)})
    assert sbert.read_modules(d).max_seq_length is None


def test_a_module_jaxkd_cannot_reproduce_is_named(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling", "LayerNorm"])
    with pytest.raises(DataError, match=r"module 'sentence_transformers\.models\.LayerNorm' is not "
                                        r"one jaxkd reproduces"):
        sbert.read_modules(d)


def test_a_dense_module_with_an_activation_is_named(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling", "Dense", "Normalize"])
    _write(d / "2_Dense" / "config.json", {"in_features": 8, "out_features": 4, "bias": True,
                                           "activation_function": "torch.nn.modules.activation.Tanh"})
    with pytest.raises(DataError, match=r"2_Dense/config.json: a Dense module with activation "
                                        r"'torch.nn.modules.activation.Tanh' is not one jaxkd"):
        sbert.read_modules(d)
    _write(d / "2_Dense" / "config.json", {"in_features": 8, "out_features": 4, "bias": True,
                                           "activation_function": "torch.nn.modules.linear.Identity"})
    found = sbert.read_modules(d)
    assert (found.dense_dir, found.dense_width, found.normalize) == (d / "2_Dense", 4, True)
    with pytest.raises(DataError, match=r"2_Dense: the Dense module has no weights \(no weights in"):
        sbert.read_dense(found.dense_dir, 8)
    from safetensors.numpy import save_file  # weights in shards, as transformers saves large ones
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 8)).astype(np.float32), np.ones(4, np.float32)
    save_file({"linear.weight": weight}, d / "2_Dense" / "a.safetensors")
    save_file({"linear.bias": bias}, d / "2_Dense" / "b.safetensors")
    _write(d / "2_Dense" / "model.safetensors.index.json",
           {"weight_map": {"linear.weight": "a.safetensors", "linear.bias": "b.safetensors"}})
    dense = sbert.read_dense(found.dense_dir, 8)
    np.testing.assert_array_equal(dense["kernel"], weight.T)
    np.testing.assert_array_equal(dense["bias"], bias)


def test_modules_out_of_order_are_refused(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Normalize", "Pooling"])
    with pytest.raises(DataError, match=r"modules \['Transformer', 'Normalize', 'Pooling'\]"):
        sbert.read_modules(d)


@pytest.mark.parametrize("pooling, mode", [
    ({"pooling_mode_weightedmean_tokens": True}, "weightedmean"),
    ({"pooling_mode": "lasttoken"}, "lasttoken")])
def test_a_pooling_mode_jaxkd_cannot_reproduce_is_named(tmp_path, pooling, mode):
    d = _st_dir(tmp_path, ["Transformer", "Pooling"], pooling={"word_embedding_dimension": 8, **pooling})
    with pytest.raises(DataError, match=rf"1_Pooling/config.json: pooling mode '{mode}' is not one"):
        sbert.read_modules(d)


def test_a_default_prompt_is_refused(tmp_path):
    d = _st_dir(tmp_path, ["Transformer", "Pooling"])
    _write(d / "config_sentence_transformers.json", {"default_prompt_name": "query"})
    with pytest.raises(DataError, match="default_prompt_name 'query'"):
        sbert.read_modules(d)


def test_a_plain_encoder_takes_the_task_settings(tmp_path):
    _write(tmp_path / "config.json", {"model_type": "bert"})
    assert sbert.layout(tmp_path) == sbert.Layout(tmp_path, ("mean",), False)
    assert sbert.layout(tmp_path, "cls", True) == sbert.Layout(tmp_path, ("cls",), True)
    with pytest.raises(DataError, match="pooling mode 'weightedmean' is not one jaxkd computes"):
        sbert.layout(tmp_path, "weightedmean")


def test_task_settings_that_contradict_the_modules_are_refused(minilm_dir):
    assert sbert.layout(minilm_dir, "mean", True).from_modules
    with pytest.raises(DataError, match=r"task.pooling is \('cls',\) but .* computes \['mean'\]"):
        sbert.layout(minilm_dir, "cls")
    with pytest.raises(DataError, match="task.normalize is False but .* computes True"):
        sbert.layout(minilm_dir, normalize=False)


def test_written_modules_read_back(tmp_path):
    for modes, normalize in ((("mean",), True), (("cls", "max"), False)):
        out = tmp_path / "_".join(modes)
        sbert.write_modules(out, modes, normalize, width=16, max_seq_length=96)
        assert sbert.read_modules(out) == sbert.Layout(out, modes, normalize, 96, False, True)
    with pytest.raises(DataError, match=r"use \['cls', 'mean'\]"):
        sbert.write_modules(tmp_path / "bad", ("mean", "cls"), False, 16, 96)
    with pytest.raises(DataError, match=r"each mode once"):
        sbert.check_writable(("mean", "mean"))
    sbert.write_modules(tmp_path / "lower", ("mean",), True, 16, 96, lowercase=True)
    assert sbert.read_modules(tmp_path / "lower").lowercase


def test_a_student_pooling_that_cannot_be_exported_is_refused_when_the_config_is_read():
    from jaxkd import config as config_lib

    for key, modes in (("student_pooling", ["mean", "max"]), ("pooling", ["mean", "cls"]),
                       ("student_pooling", ["cls", "cls"])):
        with pytest.raises(config_lib.ConfigError, match=f"task.{key}: pooling modes"):
            config_lib.from_dict({"task": {"type": "sentence_embedding", key: modes}})
    # a teacher pooling the student does not use is not exported
    config_lib.from_dict({"task": {"type": "sentence_embedding", "pooling": ["mean", "cls"],
                                   "student_pooling": ["cls", "mean"]}})


def test_a_window_beyond_the_teachers_is_refused(minilm_dir):
    from jaxkd.data import DataConfig
    from jaxkd.tasks import resolve, task_config

    window = sbert.layout(minilm_dir).max_seq_length
    assert window == json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    cfg = task_config("sts", type="sentence_embedding")
    for length, refused in ((window, False), (window + 1, True)):
        task = resolve(cfg, DataConfig(max_seq_len=length))
        if refused:
            with pytest.raises(DataError, match=f"beyond the teacher's window of {window} tokens"):
                task.for_teacher(minilm_dir)
        else:
            assert task.for_teacher(minilm_dir).pooling == ("mean",)


# ----------------------------------------------------------------------------- pooling


def _numpy_pool(x, mask, mode):
    out = []
    for row, m in zip(x.astype(np.float64), mask.astype(bool)):
        real = row[m]
        if mode == "cls":
            out.append(row[np.argmax(m)])
        elif not len(real):
            out.append(np.zeros(row.shape[1]))
        elif mode == "max":
            out.append(real.max(0))
        elif mode == "mean":
            out.append(real.sum(0) / len(real))
        else:
            out.append(real.sum(0) / np.sqrt(len(real)))
    return np.stack(out)


@pytest.mark.parametrize("mode", sbert.POOLING_MODES)
def test_pooling_matches_numpy(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7, 6)).astype(np.float32) - 3.0  # all negative: max must skip padding zeros
    lengths = np.array([7, 3, 1, 5, 0])  # the last row is padding: no real token
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
    x[mask == 0] = 100.0  # padded positions must never count
    got = np.asarray(sbert.pool(x, mask, mode))
    expect = _numpy_pool(x, mask, mode)
    np.testing.assert_allclose(got[:4], expect[:4], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(got))
    if mode != "cls":
        np.testing.assert_array_equal(got[4], 0.0)


def test_embeddings_concatenate_then_normalise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    got = np.asarray(sbert.sentence_embeddings(x, mask, ("cls", "mean"), normalize=True))
    joined = np.concatenate([_numpy_pool(x, mask, "cls"), _numpy_pool(x, mask, "mean")], axis=1)
    expect = joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 10)
    np.testing.assert_allclose(np.asarray(sbert.l2_normalize(np.zeros((1, 3)))), 0.0)
    # A Dense module sits between the pooling and the normalisation.
    kernel, bias = rng.normal(size=(10, 4)).astype(np.float32), np.arange(4, dtype=np.float32)
    got = np.asarray(sbert.sentence_embeddings(x, mask, ("cls", "mean"), normalize=True,
                                               dense=lambda v: v @ kernel + bias))
    mapped = joined @ kernel + bias
    np.testing.assert_allclose(got, mapped / np.linalg.norm(mapped, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- against PyTorch


@pytest.fixture(scope="module")
def minilm_hidden(minilm_dir):
    """The MiniLM's jaxkd encoder and the batch sentence-transformers tokenises SENTENCES into."""
    st = pytest.importorskip("sentence_transformers")
    import jax

    from jaxkd import hf
    from jaxkd.model import Encoder

    reference = st.SentenceTransformer(str(minilm_dir), device="cpu")
    features = {k: v.numpy() for k, v in reference.preprocess(SENTENCES).items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}
    assert (features["attention_mask"] == 0).any()  # a padded batch
    cfg, params = hf.load_hf(minilm_dir)
    hidden = jax.jit(lambda p, i, m, t: Encoder(cfg.encoder).apply(
        {"params": p}, i, m, t).last_hidden_state)(
        params["encoder"], features["input_ids"], features["attention_mask"],
        features["token_type_ids"])
    return reference, np.asarray(hidden), features["attention_mask"]


@pytest.mark.slow
@pytest.mark.parametrize("mode, normalize", [("mean", True), ("cls", False), ("max", False),
                                             ("mean_sqrt_len_tokens", True), ("mean", False)])
def test_embeddings_match_sentence_transformers(minilm_dir, minilm_hidden, mode, normalize):
    st = pytest.importorskip("sentence_transformers")
    reference, hidden, mask = minilm_hidden
    if (mode, normalize) != ("mean", True):  # the same transformer under another Pooling
        modules = [reference[0], st.models.Pooling(384, pooling_mode=mode)]
        reference = st.SentenceTransformer(modules=modules + ([st.models.Normalize()] if normalize
                                                              else []), device="cpu")
    expect = reference.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    layout = sbert.read_modules(minilm_dir) if (mode, normalize) == ("mean", True) else \
        sbert.Layout(minilm_dir, (mode,), normalize)
    got = np.asarray(sbert.sentence_embeddings(hidden, mask, layout.pooling, layout.normalize))
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("pooling, normalize, projection", [
    (("mean",), True, 0), (("cls", "max"), False, 0), (("mean",), True, 96)])
def test_a_saved_student_loads_in_sentence_transformers_with_the_same_embeddings(
        tmp_path, minilm_dir, pooling, normalize, projection):
    """The exported directory (with a Dense module for a projection) gives in
    sentence-transformers the embeddings jaxkd computes, and reads back into the same params."""
    st = pytest.importorskip("sentence_transformers")
    import dataclasses

    import jax

    from jaxkd import hf
    from jaxkd.model import HeadConfig, ModelConfig, apply_model, init_params
    from jaxkd.tasks import embedding

    teacher_cfg, teacher = hf.load_hf(minilm_dir, head="sentence_embedding")
    head = HeadConfig(kind="sentence_embedding", num_labels=1, pooling=pooling, normalize=normalize,
                      projection=projection)
    cfg = ModelConfig(teacher_cfg.encoder.replace(num_layers=3), head)  # layers 0, 2 and 4
    params = {"encoder": {"embeddings": teacher["encoder"]["embeddings"],
                          **{f"layer_{i}": teacher["encoder"][f"layer_{j}"] for i, j in enumerate((0, 2, 4))}}}
    if projection:
        params["head"] = init_params(cfg, jax.random.key(3))["head"]
    out = sbert.save(tmp_path / "student", cfg, params, hf.load_tokenizer(minilm_dir),
                     {"max_seq_len": 64})
    found = sbert.read_modules(out)
    assert (found.pooling, found.normalize, found.max_seq_length, found.dense_width) == \
        (pooling, normalize, 64, projection)
    loaded = st.SentenceTransformer(str(out), device="cpu")
    assert loaded.max_seq_length == 64
    features = {k: v.numpy() for k, v in loaded.preprocess(SENTENCES).items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}
    expect = jax.jit(lambda p, i, m, t: apply_model(cfg, p, i, m, t).logits)(
        params, features["input_ids"], features["attention_mask"], features["token_type_ids"])
    got = loaded.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    assert got.shape == (len(SENTENCES), projection or 384 * len(pooling))
    np.testing.assert_allclose(got, np.asarray(expect), atol=1e-4, rtol=0)
    # Read back as a teacher would be: the same config and params.
    task = embedding.resolve(embedding.EmbeddingConfig()).for_teacher(out)
    back_cfg, back = task.load_model(task.encoder_dir(out), task.model_head(
        dataclasses.replace(cfg.head, pooling=("mean",), normalize=False, projection=0)))
    assert back_cfg.head == cfg.head
    jax.tree.map(np.testing.assert_array_equal, back, params)
