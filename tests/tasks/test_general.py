"""General distillation's objective against NumPy references: the masked-LM cross-entropy and KD
at the masked positions, and the intermediate terms added as configured."""
import numpy as np
import pytest

from jaxkd.losses import LossConfig
from jaxkd.model import ModelOutput
from jaxkd.tasks import general

B, P, V = 3, 4, 11


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(rng):
    labels = rng.integers(0, V, (B, P))
    labels[0, 3] = labels[2, 1:] = -1  # unused target slots
    weights = np.array([1.0, 1.0, 0.0], np.float32)  # row 2 pads the batch
    return {"labels": labels, "weights": weights, "attention_mask": np.ones((B, 6), np.int32)}


def test_masked_lm_objective_matches_numpy():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    s, t = rng.normal(size=(B, P, V)).astype(np.float32), rng.normal(size=(B, P, V)).astype(np.float32)
    objective = general.GeneralObjective(mlm_weight=2.0, kd_weight=0.5)
    loss, metrics = objective.distill_loss(LossConfig(temperature=2.0), ModelOutput(logits=s),
                                           ModelOutput(logits=t), {}, batch, None, None)
    real = [(b, p) for b in range(B) for p in range(P) if batch["labels"][b, p] >= 0 and batch["weights"][b]]
    ce = np.mean([-np_log_softmax(s[b, p])[batch["labels"][b, p]] for b, p in real])
    kd = np.mean([np.sum(np.exp(np_log_softmax(t[b, p] / 2)) * (np_log_softmax(t[b, p] / 2)
                                                                 - np_log_softmax(s[b, p] / 2)))
                  for b, p in real]) * 4
    np.testing.assert_allclose(metrics["loss/mlm"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(loss, 2.0 * ce + 0.5 * kd, rtol=1e-5)
    accuracy = np.mean([np.argmax(s[b, p]) == batch["labels"][b, p] for b, p in real])
    np.testing.assert_allclose(objective.metrics(s, batch)["mlm_accuracy"], accuracy, rtol=1e-6)


def test_intermediate_terms_are_added():
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    hidden = lambda seed: tuple(np.random.default_rng(seed + i).normal(size=(B, 6, 8)).astype(np.float32)  # noqa: E731
                                for i in range(3))
    s_out = ModelOutput(logits=np.zeros((B, P, V), np.float32), hidden_states=hidden(10))
    t_out = ModelOutput(logits=np.zeros((B, P, V), np.float32), hidden_states=hidden(20))
    cfg = LossConfig(cosine_weight=3.0)
    enc = type("Enc", (), {"num_layers": 2, "hidden_size": 8})
    loss, metrics = general.GeneralObjective().distill_loss(cfg, s_out, t_out, {}, batch, enc, enc)
    # NumPy: 1 - cosine of the last hidden states, over the real tokens of weighted rows.
    s, t = (np.asarray(o.hidden_states[-1], np.float64) for o in (s_out, t_out))
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    w = np.asarray(batch["weights"], np.float64)[:, None] * np.asarray(batch["attention_mask"])
    expected = ((1.0 - cos) * w).sum() / w.sum()
    np.testing.assert_allclose(loss, 3.0 * expected, rtol=1e-5)
    assert "loss/mlm" not in metrics and "loss/kd" not in metrics



def _mesh_history(devices: int):
    import jax

    from helpers import compile_mesh_step, general_world, run_mesh_steps
    from jaxkd import sharding, steps

    student, teacher, loss_cfg, objective, state, teacher_params, batches = general_world()
    step = steps.make_distill_step(student, teacher, loss_cfg, teacher="live", objective=objective)
    mesh = sharding.make_mesh(jax.devices()[:devices])
    final, history = run_mesh_steps(compile_mesh_step(step, mesh, state, teacher_params), mesh,
                                    state, teacher_params, batches)
    return final, [{k: float(v) for k, v in m.items()} for m in history]


@pytest.mark.slow
def test_general_step_is_the_same_on_1_and_4_devices():
    """The jitted distillation step with the masked-LM objectives and MiniLM-v2 relations over a
    4-device mesh equals the one-device step (masked-LM teacher and student, masked rows)."""
    (_, one), (_, four) = _mesh_history(1), _mesh_history(4)
    assert {"loss/mlm", "loss/kd", "loss/relation", "mlm_accuracy"} <= set(one[0])
    for a, b in zip(one, four):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert one[2]["loss/total"] != one[0]["loss/total"]


@pytest.mark.slow  # two processes start and compile
def test_general_step_is_the_same_over_2_processes(tmp_path):
    """Two processes of two devices each, one 4-device mesh, each feeding its rows: the same
    losses and student as the 4-device step in this process."""
    import jax

    import helpers

    result = helpers.two_process_result("general", tmp_path)
    state, history = _mesh_history(4)
    np.testing.assert_allclose(result["losses"], [m["loss/total"] for m in history], rtol=2e-5)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        np.testing.assert_allclose(result[jax.tree_util.keystr(path)], leaf, rtol=1e-4, atol=1e-5)


def test_a_tokenizer_without_what_packing_and_masking_need_is_refused_before_tokenizing():
    import types

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from jaxkd.data import DataError

    task = general.resolve(general.GeneralConfig(name="text"))
    no_mask = types.SimpleNamespace(cls_token_id=1, sep_token_id=2, mask_token_id=None)
    with pytest.raises(DataError, match="tokenizer has no mask_token"):
        task.check_tokenizer(no_mask)
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, "[UNK]": 4, "word": 5}
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]")
    task.check_tokenizer(word_level)  # token-level masking needs no word starts
    whole = general.resolve(general.GeneralConfig(name="text", whole_word=True))
    with pytest.raises(DataError, match="task.whole_word: .*WordLevel"):
        whole.check_tokenizer(word_level)
