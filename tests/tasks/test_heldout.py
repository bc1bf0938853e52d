"""jaxkd.tasks.heldout against transformers: a BertForMaskedLM's held-out masked-LM accuracy and
perplexity at fixed masks equal a PyTorch forward counted in NumPy (the last batch's filler rows
at weight 0 left out), and the one-pass evaluation of head and terms gives what each gives alone."""
import jax
import numpy as np
import pytest

import helpers
from jaxkd import hf, losses, model, sharding
from jaxkd.tasks import heldout
from jaxkd.data.masked import MaskedEvalBatches, Vocabulary
from jaxkd.data.masking import MaskingConfig
from jaxkd.tasks.general import GeneralObjective

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLS, SEP, MASK = 101, 102, 103
MLM = helpers.TINY_TEACHER.replace(kind="masked_lm", num_labels=1)


class Rows:
    """What MaskedEvalBatches reads: len() and rows(indices)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def rows(self, indices):
        return self.ids[np.asarray(indices)]


@pytest.fixture(scope="module")
def setting():
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (11, 16)).astype(np.int32)
    ids[:, 0], ids[:, -1] = CLS, SEP
    vocab = Vocabulary(mask_id=MASK, special_ids=(0, CLS, SEP, MASK), size=MLM.encoder.vocab_size)
    # 11 rows in batches of 4: the last batch holds 3 rows and one filler at weight 0
    batches = list(MaskedEvalBatches(Rows(ids), 4, cfg=MaskingConfig(probability=0.3), vocab=vocab,
                                     seed=0))
    return model.init_params(MLM, jax.random.key(3)), batches


def test_mlm_figures_equal_a_pytorch_count(tmp_path, setting):
    params, batches = setting
    hf.save_hf(MLM, params, tmp_path / "mlm")
    torch_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    nll = correct = targets = 0.0
    for batch in batches:
        with torch.no_grad():
            logits = torch_model(input_ids=torch.tensor(np.asarray(batch["input_ids"]))).logits.numpy()
        for b in range(logits.shape[0]):
            if batch["weights"][b] == 0:
                continue
            for position, label in zip(batch["positions"][b], batch["labels"][b]):
                if label < 0:
                    continue
                row = logits[b, position].astype(np.float64)
                log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
                nll += log_z - row[label]
                correct += float(np.argmax(row) == label)
                targets += 1
    assert batches[-1]["weights"].tolist() == [1, 1, 1, 0] and targets > 20
    got = heldout.scores(batches, sharding.make_mesh(),
                         mlm=(heldout.jitted_mlm_eval(MLM), params))
    np.testing.assert_allclose(got["mlm_accuracy"], correct / targets, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / targets), rtol=1e-4)


@pytest.mark.slow
def test_one_pass_gives_what_each_evaluation_gives_alone(setting):
    teacher_params, batches = setting
    student = MLM.replace(num_layers=2)
    params = model.init_params(student, jax.random.key(4))
    loss_cfg = losses.LossConfig(relation_weight=1.0, relation_heads=4)
    objective = GeneralObjective(mlm_weight=1.0)
    terms_fn = jax.jit(heldout.make_terms_eval(student, MLM, loss_cfg, objective))
    mesh = sharding.make_mesh()
    mlm = (heldout.jitted_mlm_eval(student), params)
    terms = (terms_fn, params, {}, teacher_params)
    both = heldout.scores(batches, mesh, mlm=mlm, terms=terms)
    alone = {**heldout.scores(batches, mesh, terms=terms), **heldout.scores(batches, mesh, mlm=mlm)}
    assert set(both) == {"heldout_score", "loss/mlm", "loss/relation", "loss/total",
                         "mlm_accuracy", "perplexity"}
    assert both == pytest.approx(alone, rel=1e-6)
    assert both["heldout_score"] == -both["loss/total"]
