"""The masked-LM head beyond its transformers parity (tests/families): it scores only the
positions asked for, and its decoder is the word-embedding table itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxkd.model import Model, init_params


def _setup():
    cfg = tiny_model_config("masked_lm", 1, vocab_size=40)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 40, (2, 7))
    mask = np.ones((2, 7), np.int32)
    mask[1, 5:] = 0
    return cfg, params, ids, mask


def test_positions_score_only_those_positions():
    cfg, params, ids, mask = _setup()
    full = Model(cfg).apply({"params": params}, ids, mask).logits
    assert full.shape == (2, 7, 40)
    positions = np.array([[1, 4, 0], [2, 3, 0]])
    picked = Model(cfg).apply({"params": params}, ids, mask, positions=positions).logits
    assert picked.shape == (2, 3, 40) and picked.dtype == jnp.float32
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(full), positions[..., None], 1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_decoder_is_the_word_embedding_table():
    cfg, params, ids, mask = _setup()
    assert set(params["head"]) == {"transform", "transform_LayerNorm", "bias"}
    out = Model(cfg).apply({"params": params}, ids, mask, output_hidden_states=True)
    # NumPy from the last hidden states: transform, exact GELU, layer norm, then the word-embedding
    # table itself as the decoder, plus the bias.
    from scipy.special import erf
    head = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} if isinstance(d, dict)
            else np.asarray(d, np.float64) for k, d in params["head"].items()}
    h = np.asarray(out.hidden_states[-1], np.float64) @ head["transform"]["kernel"] + head["transform"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12)
    h = h * head["transform_LayerNorm"]["scale"] + head["transform_LayerNorm"]["bias"]
    table = np.asarray(params["encoder"]["embeddings"]["word_embeddings"]["embedding"], np.float64)
    np.testing.assert_allclose(out.logits, h @ table.T + head["bias"], rtol=1e-4, atol=1e-4)

    def loss(p):
        return Model(cfg).apply({"params": p}, ids, mask, positions=np.array([[2], [3]])).logits.sum()
    grads = jax.grad(loss)(params)
    # The gradient reaches rows of the table that are no input token (the decoder's use of it).
    unused = sorted(set(range(40)) - set(ids.ravel().tolist()))
    assert float(jnp.abs(grads["encoder"]["embeddings"]["word_embeddings"]["embedding"][np.array(unused)]).sum()) > 0


@pytest.mark.parametrize("model_type", ["bert", *(pytest.param(m, marks=pytest.mark.slow)
                                                 for m in ("roberta", "distilbert", "electra"))])
def test_a_checkpoint_with_a_decoder_of_its_own_is_refused_not_dropped(model_type, tmp_path):
    """The head ties its decoder to the word embeddings: a checkpoint whose decoder is another
    matrix would be scored with the wrong one, so it is refused naming the fix; its encoder
    alone still loads."""
    pytest.importorskip("torch")
    import json

    from helpers import torch_model
    from jaxkd import hf
    from jaxkd.families import CheckpointError

    torch_model(model_type, "masked_lm", 1, tie_word_embeddings=False).save_pretrained(tmp_path)
    for refuse in (lambda: hf.load_hf(tmp_path, head="masked_lm"),  # and before any work:
                   lambda: hf.check_tied_decoder(tmp_path, "masked_lm")):
        with pytest.raises(CheckpointError, match="tie_word_embeddings false.*ties its decoder"):
            refuse()
    hf.check_tied_decoder(tmp_path, "sequence")  # a head without a decoder: nothing to refuse
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="differs from the word embeddings"):
        hf.load_hf(tmp_path, head="masked_lm")
    hf.load_hf(tmp_path, head="sequence", num_labels=2)  # the encoder alone
    # A bare encoder saying the same has no decoder to misread: its head is the table, as always.
    bare = tmp_path / "bare"
    torch_model(model_type, "base", 1, tie_word_embeddings=False).save_pretrained(bare)
    hf.check_tied_decoder(bare, "masked_lm")
    hf.load_hf(bare, head="masked_lm")
