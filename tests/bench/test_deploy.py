"""bench deploy on a tiny saved classifier: every format's metric and agreement against
transformers run row by row in PyTorch, the record written, and the formats it lists."""
import json

import jax
import numpy as np
import pytest

from bench.conftest import FILLER, SPECIAL, TINY, WORDS
from jaxkd.bench.__main__ import parser
from jaxkd.bench import deploy
from jaxkd.hf import save_hf
from jaxkd.model import init_params


def _classifier(out, seed: int):
    """A saved tiny SST-2 classifier whose rows' predictions differ (weights scaled up)."""
    from transformers import BertTokenizer

    out.mkdir()
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *WORDS, *FILLER]) + "\n")
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "scale" in jax.tree_util.keystr(path):  # layer norms near 1
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(draw, init_params(TINY, jax.random.key(seed)))
    save_hf(TINY, params, out, tokenizer=BertTokenizer(str(vocab)), id2label=["negative", "positive"])
    return out


def _torch_predictions(directory, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with torch.no_grad():
        return np.array([int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts])


@pytest.mark.slow  # PyTorch, ONNX export and quantisation, six formats timed
def test_deploy_scores_every_format_as_transformers_does(tmp_path, tiny_tsv, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    student, teacher = _classifier(tmp_path / "student", 3), _classifier(tmp_path / "teacher", 1)
    out = tmp_path / "record.json"
    args = parser().parse_args(["deploy", str(student), "--task", "sst2", "--data", str(tiny_tsv),
                                "--teacher", str(teacher), "--torch", "--per-tensor", "--gather", "--full-range",
                                "--inputs", "4", "--rounds", "1", "--max-seq-len", "32",
                                "--out", str(out)])
    record = deploy.run_deploy(args)
    assert json.loads(out.read_text())["formats"].keys() == record["formats"].keys()
    assert list(record["formats"]) == ["jax_fp32", "jax_bf16", "onnx_fp32", "onnx_int8",
                                       "onnx_int8_per_tensor", "onnx_int8_full_range", "onnx_int8_gather",
                                       "torch_eager_fp32"]
    rows = [line.split("\t") for line in tiny_tsv.read_text().splitlines()[1:]]
    texts, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    mine, theirs = _torch_predictions(student, texts), _torch_predictions(teacher, texts)
    assert 0 < np.mean(mine == labels) < 1 and 0 < np.mean(mine == theirs) < 1
    for name in ("jax_fp32", "onnx_fp32", "torch_eager_fp32"):
        entry = record["formats"][name]
        assert entry["metrics"]["accuracy"] == pytest.approx(np.mean(mine == labels)), name
        assert entry["agreement"] == pytest.approx(np.mean(mine == theirs)), name
    for name in ("jax_bf16", "onnx_int8", "onnx_int8_per_tensor", "onnx_int8_full_range",
                 "onnx_int8_gather"):  # rounding may flip a near tie
        assert abs(record["formats"][name]["metrics"]["accuracy"] - np.mean(mine == labels)) <= 2 / 24
    assert record["latency_inputs"] == 4 and record["machine"]["threads"] >= 1
    assert record["p50_speedup_vs_torch_eager_fp32"]["torch_eager_fp32"] == 1.0
    assert "| onnx_int8 |" in capsys.readouterr().out


def test_deploy_refuses_torch_for_a_head_without_a_transformers_class():
    import dataclasses

    from jaxkd.model import HeadConfig

    class Model:  # what torch_format reads of a loaded model
        config = dataclasses.replace(TINY, head=HeadConfig("sentence_embedding", 1, pooling=("mean",)))

    pytest.importorskip("torch")
    with pytest.raises(SystemExit, match="no transformers class"):
        deploy.torch_format(Model(), 1)
