"""bench step --general: the jaxkd step and its PyTorch reference (jaxkd/bench/torch_general.py)
compute the same terms on the same batch and weights; the CLI runs (no timings asserted)."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxkd.bench import common, general
from jaxkd.bench.__main__ import main
from jaxkd.hf import save_hf
from jaxkd.model import init_params

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mlm_teacher(tmp_path_factory, tiny_teacher):
    """bench's tiny 2-layer teacher (vocabulary of 1,100) with a masked-LM head, no dropout."""
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("mlm_teacher")
    cfg = tiny_model_config("masked_lm", 1, vocab_size=1100, hidden_dropout=0.0,
                            attention_dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, params)  # logits far from flat
    save_hf(cfg, params, out, tokenizer=BertTokenizer(str(tiny_teacher / "vocab.txt")))
    return out


@pytest.mark.slow
def test_first_step_terms_equal_the_pytorch_reference(mlm_teacher, tmp_path):
    setup = common.StepSetup(teacher=str(mlm_teacher), student_layers=1, batch=4, seq=16, steps=1,
                             warmup=0, temperature=2.0, alpha=0.5)
    arrays = general.masked_batch(mlm_teacher, 1100, setup.batch, setup.seq)
    np.savez(tmp_path / "batch.npz", **arrays)
    p = general.prepare_general(setup, arrays)
    _, metrics = p.step(p.state, p.teacher_params, p.batch, p.keys[0])
    out = subprocess.run([sys.executable, str(general.TORCH_SCRIPT), "--teacher", str(mlm_teacher),
                          "--student-layers", "1", "--steps", "1", "--warmup", "0",
                          "--batch-file", str(tmp_path / "batch.npz"), "--losses"],
                         capture_output=True, text=True, check=True).stdout
    reference = json.loads(out.splitlines()[0])
    assert reference["loss/kd"] > 1e-3 and reference["loss/cosine"] > 1e-4
    for name, value in reference.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-4, err_msg=name)


def test_cli_times_the_general_step(mlm_teacher, capsys):
    assert main(["step", "--general", "--teacher", str(mlm_teacher), "--student-layers", "1",
                 "--batch", "4", "--seq", "16", "--steps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "batch=4 seq=16 student_layers=1" in lines[0] and float(lines[-1]) > 0


@pytest.mark.slow  # starts three processes
def test_vs_torch_alternates_with_the_general_reference(mlm_teacher, capsys):
    args = ["step", "--general", "--vs-torch", "--rounds", "1", "--teacher", str(mlm_teacher),
            "--student-layers", "1", "--batch", "4", "--seq", "16", "--steps", "1",
            "--torch-dtype", "float32,bfloat16"]
    with pytest.raises(SystemExit, match="needs --warmup >= 1"):  # a timed compile is no step
        main([*args, "--warmup", "0"])
    assert main([*args, "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "round 1 torch-float32" in out and "round 1 torch-bfloat16" in out
    assert float(out.strip().splitlines()[-1]) > 0
