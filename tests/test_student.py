"""Student construction: layer subsets, fresh shapes, pretrained checkpoints."""
import pathlib

import jax
import numpy as np
import pytest

from helpers import forward, tiny_model_config
from jaxkd import hf
from jaxkd.model import init_params
from jaxkd.student import student_from_pretrained, student_from_shape, student_from_teacher

TEACHER = tiny_model_config("sequence", 3, vocab_size=40, num_layers=6, num_heads=4,
                            max_position_embeddings=16, hidden_act="gelu_tanh")


@pytest.fixture(scope="module")
def teacher_params():
    return init_params(TEACHER, jax.random.key(0))


def test_student_from_layers_copies_teacher_weights(teacher_params):
    cfg, params = student_from_teacher(TEACHER, teacher_params, layers=[0, 2, 4])
    assert cfg == TEACHER.replace(num_layers=3)
    assert sorted(params["encoder"]) == ["embeddings", "layer_0", "layer_1", "layer_2"]
    pairs = {("encoder", "embeddings"): ("encoder", "embeddings"), ("head",): ("head",),
             ("encoder", "layer_0"): ("encoder", "layer_0"), ("encoder", "layer_1"): ("encoder", "layer_2"),
             ("encoder", "layer_2"): ("encoder", "layer_4")}

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    for student_path, teacher_path in pairs.items():
        s_flat = jax.tree_util.tree_leaves_with_path(at(params, student_path))
        t_flat = dict(jax.tree_util.tree_leaves_with_path(at(teacher_params, teacher_path)))
        assert len(s_flat) == len(t_flat)
        for path, value in s_flat:
            np.testing.assert_array_equal(value, t_flat[path])
            assert value is not t_flat[path]  # a copy: donating the student must not free the teacher
    ids = np.array([[1, 5, 7, 2]])
    assert forward(cfg, params, ids).logits.shape == (1, 3)


@pytest.mark.parametrize("layers, match", [
    ((0, 6), r"\[6\] are out of range for a 6-layer teacher.*\[0, 5\]"),
    ((-1, 2), r"out of range.*\[0, 5\]"),
    ((2, 2), r"duplicates or are unsorted.*\[0, 5\]"),
    ((3, 1), r"duplicates or are unsorted"),
    ((), r"empty"),
])
def test_bad_layer_indices(teacher_params, layers, match):
    with pytest.raises(ValueError, match=match):
        student_from_teacher(TEACHER, teacher_params, layers)


def test_student_from_shape_init_statistics():
    cfg, params = student_from_shape(TEACHER, jax.random.key(1), num_layers=2, hidden_size=64,
                                     num_heads=8, intermediate_size=128, hidden_dropout=0.0)
    for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_act"):
        assert getattr(cfg.encoder, name) == getattr(TEACHER.encoder, name)
    assert cfg.head == TEACHER.head
    enc = cfg.encoder
    assert (enc.num_layers, enc.hidden_size, enc.num_heads, enc.intermediate_size) == (2, 64, 8, 128)
    assert enc.hidden_dropout == 0.0
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, value in leaves:
        name, value = jax.tree_util.keystr(path), np.asarray(value)
        if name.endswith("['bias']"):
            assert not value.any(), name
        elif name.endswith("['scale']"):
            np.testing.assert_array_equal(value, 1.0, err_msg=name)
        elif value.size >= 1024:
            assert abs(value.std() - 0.02) < 0.002 and abs(value.mean()) < 0.002, name
    assert params["encoder"]["layer_1"]["intermediate"]["kernel"].shape == (64, 128)
    assert student_from_shape(TEACHER, jax.random.key(1), 1, 32, 4)[0].encoder.intermediate_size == 128


def test_student_from_shape_not_divisible_message():
    with pytest.raises(ValueError, match=r"hidden_size 100 is not divisible by num_heads 12: set num_heads "
                                         r"to one of \[1, 2, 4, 5, 10, 20, 25, 50\].*e\.g\. 96 or 108"):
        student_from_shape(TEACHER, jax.random.key(0), num_layers=2, hidden_size=100, num_heads=12)


def _write_checkpoint(directory, vocab_size, num_labels=2):
    cfg = TEACHER.replace(vocab_size=vocab_size, num_layers=2, num_labels=num_labels)
    return hf.save_hf(cfg, init_params(cfg, jax.random.key(5)), directory), cfg


def test_student_from_pretrained_matching_vocab(tmp_path, teacher_params):
    directory, saved = _write_checkpoint(tmp_path, TEACHER.encoder.vocab_size, num_labels=2)
    cfg, params = student_from_pretrained(directory, TEACHER.replace(dtype="bfloat16"))
    assert cfg.encoder.num_layers == 2 and cfg.head == TEACHER.head and cfg.encoder.dtype == "bfloat16"
    assert params["head"]["classifier"]["kernel"].shape == (16, 3)
    # The tensor as the file holds it (PyTorch's [out, in]), read without jaxkd's loader.
    from safetensors.numpy import load_file
    tensors = load_file(pathlib.Path(directory) / "model.safetensors")
    np.testing.assert_array_equal(params["encoder"]["layer_1"]["output"]["kernel"],
                                  tensors["bert.encoder.layer.1.output.dense.weight"].T)


def test_student_from_pretrained_takes_the_teachers_head_kind(tmp_path):
    directory, _ = _write_checkpoint(tmp_path, TEACHER.encoder.vocab_size, num_labels=3)
    token_teacher = TEACHER.replace(kind="token", num_labels=5)
    cfg, params = student_from_pretrained(directory, token_teacher)
    assert cfg.head == token_teacher.head and sorted(params["head"]) == ["classifier"]
    assert params["head"]["classifier"]["kernel"].shape == (16, 5)


def test_student_from_pretrained_mismatched_vocab(tmp_path):
    directory, _ = _write_checkpoint(tmp_path, vocab_size=41)
    with pytest.raises(ValueError, match="vocab_size 41 but the teacher has 40.*tokenizers must agree"):
        student_from_pretrained(directory, TEACHER, num_labels=3)


def test_a_head_module_of_another_shape_is_fresh_and_one_that_fits_is_kept():
    """A teacher's projection from a narrower pooling (a Dense module after mean pooling) cannot
    serve a student pooling [mean, max]: it is initialised afresh at the wider shape."""
    from jaxkd.plan import _with_fresh_head

    narrow = tiny_model_config("sentence_embedding", 1).replace(pooling=("mean",), projection=8)
    wide = narrow.replace(pooling=("mean", "max"))
    params = init_params(narrow, jax.random.key(0))
    hidden = narrow.encoder.hidden_size
    assert params["head"]["projection"]["kernel"].shape == (hidden, 8)
    assert _with_fresh_head(narrow, params, jax.random.key(1)) is params
    widened = _with_fresh_head(wide, params, jax.random.key(1))
    assert widened["head"]["projection"]["kernel"].shape == (2 * hidden, 8)
    assert widened["encoder"] is params["encoder"]
