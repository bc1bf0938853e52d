"""Benchmark CLI smoke tests on a tiny checkpoint (no timings asserted), FLOP counting, and the
cheaper dropout of jaxkd.model (the benchmarks' speed change)."""
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import bench
from jaxkd.hf import save_hf
from jaxkd.model import BertConfig, Dropout, HeadConfig, ModelConfig, init_params, keep_mask

WORDS = ["good", "bad", "film", "very", "not", "a", "fun", "dull", "plot", "great"]
# Over 1000 ids: the PyTorch reference script draws token ids from 1000 up.
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = [f"[unused{i}]" for i in range(1100 - len(SPECIAL) - len(WORDS))]
TINY = ModelConfig(BertConfig(vocab_size=1100, hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=32, max_position_embeddings=64))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A saved 2-layer checkpoint with a WordPiece vocabulary of the test sentences' words."""
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("teacher")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *WORDS, *FILLER]) + "\n")
    save_hf(TINY, init_params(TINY, jax.random.key(0)), out, tokenizer=BertTokenizer(str(vocab)))
    return out


@pytest.fixture(scope="module")
def tiny_tsv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) + f"\t{i % 2}" for i in range(24)]
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_conll(tmp_path_factory):
    """A CoNLL file of 24 sentences (2-8 known words, random tags), led by a -DOCSTART- line."""
    rng = np.random.default_rng(0)
    tags = bench.EPOCH_TASKS["conll2003"].task.label_names
    sentences = ["\n".join(f"{w} NN O {rng.choice(tags)}" for w in rng.choice(WORDS, rng.integers(2, 9)))
                 for _ in range(24)]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(sentences) + "\n")
    return path


def _last_float(capsys) -> float:
    return float(capsys.readouterr().out.strip().splitlines()[-1])


def test_spread_layers_like_distilbert():
    assert bench.spread_layers(6, 3) == (0, 2, 4)
    assert bench.spread_layers(12, 4) == (0, 3, 6, 9)
    assert bench.spread_layers(12, 6) == (0, 2, 4, 6, 8, 10)
    with pytest.raises(ValueError, match="--student-layers"):
        bench.spread_layers(6, 7)


def test_flops_match_an_enumeration_of_every_matmul():
    cfg = ModelConfig(BertConfig(hidden_size=24, num_layers=3, num_heads=4, intermediate_size=40),
                      HeadConfig("sequence", num_labels=3))
    B, L, H, N, I = 5, 7, 24, 4, 40
    D, tokens = H // N, B * L
    per_layer = (4 * 2 * tokens * H * H  # q, k, v, attention output
                 + 2 * 2 * tokens * H * I  # FFN in and out
                 + 2 * 2 * B * N * L * L * D)  # q.k scores and probs.v
    last_layer = (2 * 2 * tokens * H * H  # k, v for every token
                  + 2 * 2 * B * H * H + 2 * 2 * B * H * I  # q, output, FFN for [CLS]
                  + 2 * 2 * B * N * 1 * L * D)  # one query row of scores and probs.v
    expected = 2 * per_layer + last_layer + 2 * B * H * H + 2 * B * H * 3  # pooler, classifier
    assert bench.forward_flops(cfg, B, L) == expected
    student = cfg.replace(num_layers=1)
    assert bench.step_flops(cfg, student, B, L) == expected + 3 * bench.forward_flops(student, B, L)
    # A token head: every layer for every token, and a classifier on every token.
    token = cfg.replace(kind="token")
    assert bench.forward_flops(token, B, L) == 3 * per_layer + 2 * tokens * H * 3


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA A100-SXM4-40GB", 312.0), ("TPU v4", 275.0),
                                       ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
                                       ("TPU v6 lite", 918.0), ("cpu", None)])
def test_peak_table(kind, peak):
    assert bench.peak_tflops(kind) == peak


def test_keep_mask_rate_and_unbiased_dropout():
    n = 200_000
    keep = np.asarray(keep_mask(jax.random.key(0), 0.1, (n,)))
    sd = math.sqrt(0.1 * 0.9 / n)
    assert abs((1 - keep.mean()) - 0.1) < 5 * sd
    # Odd sizes and other shapes: same draws for the same key, different for another key.
    a = keep_mask(jax.random.key(1), 0.3, (3, 5, 7))
    assert a.shape == (3, 5, 7) and np.array_equal(a, keep_mask(jax.random.key(1), 0.3, (3, 5, 7)))
    assert not np.array_equal(a, keep_mask(jax.random.key(2), 0.3, (3, 5, 7)))
    x = jnp.ones((n,))
    out = np.asarray(Dropout(0.25).apply({}, x, False, rngs={"dropout": jax.random.key(3)}))
    np.testing.assert_allclose(np.unique(out), [0.0, 4 / 3], rtol=1e-6)
    assert abs(out.mean() - 1.0) < 5 * math.sqrt(0.25 / 0.75 / n)
    assert np.array_equal(Dropout(0.25).apply({}, x, True), x)


def test_op_seconds_groups_op_kinds_per_step():
    events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 3e6}, {"ph": "X", "name": "ynn_fusion.41", "dur": 1e6},
              {"ph": "X", "name": "copy", "dur": 2e6}, {"ph": "X", "name": "$bench.py:12 run", "dur": 9e6},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6}, {"ph": "i", "name": "copy"},
              {"ph": "X", "name": "dot.2"}]
    assert bench.op_seconds(events, steps=2) == [("ynn_fusion", 2.0), ("copy", 1.0)]


def test_step_profile_writes_a_trace(tiny_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add a flag
    bench.main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "1", "--warmup", "1", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    assert "profile: " in out and list(tmp_path.glob("**/*.trace.json.gz"))
    assert float(out.strip().splitlines()[-1]) > 0


def test_step_and_breakdown_cli(tiny_teacher, capsys):
    bench.main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "2", "--warmup", "1", "--breakdown"])
    out = capsys.readouterr().out
    assert "breakdown (median s): teacher_forward=" in out and "peak host memory" in out
    assert float(out.strip().splitlines()[-1]) > 0


def test_params_digest_changes_with_one_bit():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(4, np.float32)}}
    same = jax.tree.map(np.copy, params)
    assert bench.params_digest(params) == bench.params_digest(same)
    flipped = jax.tree.map(np.copy, params)
    flipped["b"]["c"].view(np.uint32)[2] ^= 1  # the lowest mantissa bit of one element
    assert bench.params_digest(flipped) != bench.params_digest(params)


def test_step_prints_the_same_digest_for_the_same_flags(tiny_teacher, capsys):
    """The digest that shows a flag or environment leaves the results alone is reproducible."""
    digests = []
    for steps in ("2", "2", "3"):
        bench.main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                    "--seq", "8", "--steps", steps, "--warmup", "1"])
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("params after"))
        digests.append(line.split()[-1])
    assert digests[0] == digests[1] != digests[2]


def test_mfu_cli_with_peak_override(tiny_teacher, capsys):
    bench.main(["mfu", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "2", "--warmup", "1", "--dtype", "float32",
                "--peak-tflops", "1", "--gemm-size", "256"])
    out = capsys.readouterr().out
    assert "MFU" in out and "measured matmul rate (256^3 GEMM" in out
    # A tiny step is far from what the device can do: a fraction of the measured rate.
    assert 0 < float(out.strip().splitlines()[-1]) < 1


def test_mfu_without_peak_on_cpu_prints_fraction_of_measured_rate(tiny_teacher, capsys):
    bench.main(["mfu", "--teacher", str(tiny_teacher), "--student-layers", "2", "--batch", "4",
                "--seq", "8", "--steps", "1", "--warmup", "1", "--dtype", "bfloat16", "--gemm-size", "256"])
    out = capsys.readouterr().out
    assert "peak unknown" in out and "of the bfloat16 rate" in out
    assert 0 < float(out.strip().splitlines()[-1]) < 1


def test_gemm_rate_counts_flops_of_the_timed_matmul(monkeypatch):
    # 2 n^3 FLOPs over the best of the timed calls.
    monkeypatch.setattr(bench, "seconds", lambda fn, steps, warmup: [0.5, 0.25, 0.4])
    assert bench.gemm_rate("bfloat16", 64) == pytest.approx(2 * 64 ** 3 / 0.25)


@pytest.mark.parametrize("impl", ["jaxkd", "torch"])
def test_epoch_cli(tiny_teacher, tiny_tsv, impl, capsys):
    if impl == "torch":
        pytest.importorskip("torch")
    bench.main(["epoch", "--impl", impl, "--teacher", str(tiny_teacher), "--train", str(tiny_tsv),
                "--limit", "20", "--batch", "4", "--student-layers", "1", "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert f"{impl}: 20 examples in 5 steps" in out
    assert float(out.strip().splitlines()[-1]) > 0


def test_conll_limit_takes_whole_sentences_as_the_torch_reader_does(tiny_conll):
    setup = bench.EpochSetup(teacher="unused", train=str(tiny_conll), limit=7, task="conll2003",
                             batch=4)
    first = bench.read_examples(setup)
    whole = bench.read_examples(dataclasses.replace(setup, limit=None))
    assert len(first) == 7 and len(whole) == 24
    assert len(first.tags) == sum(map(len, first.words)) == int(whole.word_offsets[7])
    np.testing.assert_array_equal(first.tags, whole.tags[:len(first.tags)])
    words, tags = bench.read_conll(setup)
    assert words == first.words and [t for s in tags for t in s] == first.tags.tolist()


def test_first_subtoken_labels_mask_the_rest():
    # [CLS] w0 w1 w1 w2 [SEP]: only the first sub-token of each word keeps its tag.
    assert bench.first_subtoken_labels([None, 0, 1, 1, 2, None], [5, 3, 0]) == [-100, 5, 3, -100, 0, -100]


@pytest.mark.parametrize("impl", ["jaxkd", "torch"])
def test_epoch_conll_cli(tiny_teacher, tiny_conll, impl, capsys):
    if impl == "torch":
        pytest.importorskip("torch")
    bench.main(["epoch", "--task", "conll2003", "--impl", impl, "--teacher", str(tiny_teacher),
                "--train", str(tiny_conll), "--limit", "20", "--batch", "4", "--student-layers", "1",
                "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert f"{impl}: 20 examples in 5 steps" in out  # every sentence fits one window of 16
    assert 0 < float(out.strip().splitlines()[-1]) < math.inf


@pytest.mark.slow
def test_epoch_conll_vs_torch_prints_a_ratio(tiny_teacher, tiny_conll, capsys):
    pytest.importorskip("torch")
    bench.main(["epoch", "--task", "conll2003", "--vs-torch", "--teacher", str(tiny_teacher),
                "--train", str(tiny_conll), "--limit", "8", "--batch", "4", "--student-layers", "1",
                "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert "round 1 jaxkd: 8 examples in 2 steps" in out and "round 1 torch: 8 examples" in out
    assert "task conll2003" in out
    assert 0 < float(out.strip().splitlines()[-1]) < math.inf


def test_epoch_rejects_missing_file_and_random_teacher(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        bench.main(["epoch", "--impl", "jaxkd", "--train", str(tmp_path / "nothere.tsv")])
    with pytest.raises(ValueError, match="tokenizer"):
        bench.main(["epoch", "--impl", "jaxkd", "--teacher", bench.RANDOM_BASE,
                    "--train", str(tmp_path)])


def test_step_rejects_bad_shapes(tiny_teacher):
    with pytest.raises(ValueError, match="--batch"):
        bench.main(["step", "--teacher", str(tiny_teacher), "--batch", "0"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bench.main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1",
                    "--batch", "4", "--seq", "65"])


@pytest.mark.slow
def test_step_vs_torch_alternates_processes(tiny_teacher, capsys):
    pytest.importorskip("torch")
    if not bench.TORCH_STEP_SCRIPT.is_file():
        pytest.skip(f"the PyTorch reference step {bench.TORCH_STEP_SCRIPT} is not beside the repository")
    bench.main(["step", "--vs-torch", "--rounds", "1", "--teacher", str(tiny_teacher),
                "--student-layers", "1", "--batch", "4", "--seq", "8", "--steps", "1", "--warmup", "1",
                "--breakdown", "--torch-dtype", "float32,bfloat16"])
    out = capsys.readouterr().out
    assert "round 1 jaxkd" in out and "round 1 torch-float32" in out and "round 1 torch-bfloat16" in out
    assert "breakdown (median s): teacher_forward=" in out  # passed on to the jaxkd runs
    assert "against float32" in out and "against bfloat16" in out
    assert float(out.strip().splitlines()[-1]) > 0


def test_torch_autocast_command_runs_the_script_under_bf16_autocast(tmp_path):
    pytest.importorskip("torch")
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text("import sys, torch\n"
                      "x = torch.ones(2, 2)\n"
                      "print(sys.argv[1:], (x @ x).dtype, __name__)\n")
    for dtype, seen in (("float32", "torch.float32"), ("bfloat16", "torch.bfloat16")):
        out = subprocess.run(bench.torch_step_cmd(script, ["--steps", "1"], dtype), check=True,
                             capture_output=True, text=True).stdout
        assert out.strip() == f"['--steps', '1'] {seen} __main__"


@pytest.fixture(scope="module")
def tiny_squad(tmp_path_factory):
    """A SQuAD v1.1 file of 12 questions on 3 contexts of known words, one answer each."""
    rng = np.random.default_rng(0)
    paragraphs = []
    for p in range(3):
        words = list(rng.choice(WORDS, 30))
        context = " ".join(words)
        qas = []
        for q in range(4):
            k = int(rng.integers(0, 28))
            answer = " ".join(words[k:k + 2])
            qas.append({"id": f"{p}-{q}", "question": " ".join(rng.choice(WORDS, 4)),
                        "answers": [{"text": answer, "answer_start": len(" ".join(words[:k])) + (k > 0)}]})
        paragraphs.append({"context": context, "qas": qas})
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_squad_features_label_the_answer_tokens(tiny_teacher, tiny_squad):
    """The PyTorch side's windows: the labelled tokens spell the answer, or point at [CLS] when
    the window does not hold it whole; every question has a window with its answer."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tiny_teacher))
    setup = bench.EpochSetup(teacher=str(tiny_teacher), train=str(tiny_squad), limit=None,
                             task="squad", batch=4, max_seq_len=24)
    features = bench.squad_features(setup, tokenizer)
    rows = bench.read_squad(setup)
    assert len(rows) == 12 and len(features) > 12  # contexts longer than a window: several each
    spelled = [tokenizer.decode(f["input_ids"][f["labels"][0]:f["labels"][1] + 1]) for f in features
               if f["labels"] != [0, 0]]
    assert set(spelled) == {answer for _, _, answer, _ in rows}


def test_epoch_squad_cli_same_windows_on_both_sides(tiny_teacher, tiny_squad, capsys):
    """jaxkd's windows and the PyTorch loop's (transformers' overflowing tokens) are as many."""
    pytest.importorskip("torch")
    counts = {}
    for impl in ("jaxkd", "torch"):
        bench.main(["epoch", "--task", "squad", "--impl", impl, "--teacher", str(tiny_teacher),
                    "--train", str(tiny_squad), "--limit", "8", "--batch", "4", "--student-layers", "1",
                    "--max-seq-len", "24"])
        out = capsys.readouterr().out
        counts[impl] = int(re.search(rf"{impl}: \d+ examples in (\d+) steps", out).group(1))
        assert 0 < float(out.strip().splitlines()[-1]) < math.inf
    # 8 questions in windows of 24 tokens: more windows than questions, the same on both sides.
    assert counts["jaxkd"] == counts["torch"] >= 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_matmuls_flop_count_matches_xla(dtype):
    """bench mfu's per-layer matmul rate counts the FLOPs XLA's cost analysis finds in it."""
    from jaxkd.model import BertConfig
    cfg = BertConfig(hidden_size=64, num_heads=4, intermediate_size=256, num_layers=1, vocab_size=100)
    grads, args, flops = bench.layer_matmuls(dtype, cfg, batch=4, seq=32)
    cost = grads.lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA also counts the few elementwise ops (the sum, casts): within 2%.
    assert cost["flops"] == pytest.approx(flops, rel=0.02)
    assert all(g.shape == a.shape for g, a in zip(grads(*args)[1], args[:7]))


def test_layer_matmuls_take_the_models_gemm_form_backward_too():
    """In bf16 every GEMM of the layer, forward and backward, is bf16 x bf16 -> fp32, as the
    model's (a plain matmul's transpose would multiply an fp32 cotangent by a bf16 operand)."""
    from jaxkd.model import BertConfig
    cfg = BertConfig(hidden_size=64, num_heads=4, intermediate_size=256, num_layers=1, vocab_size=100)
    grads, args, _ = bench.layer_matmuls("bfloat16", cfg, batch=4, seq=32)
    dots = [line for line in grads.lower(*args).as_text().splitlines() if "dot_general" in line]
    forms = [re.search(r":\s*\((tensor<[^>]*>), (tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)", line).groups()
             for line in dots]
    # 8 forward GEMMs (Q, K, V, scores, values, output, two FFN) and two per GEMM backward.
    assert len(forms) == 24
    assert all(a.endswith("xbf16>") and b.endswith("xbf16>") and out.endswith("xf32>")
               for a, b, out in forms), forms


@pytest.mark.slow
def test_layer_matmul_rate_runs_at_the_steps_shapes():
    # At these shapes XLA's CPU backend once refused a bf16 x bf16 -> fp32 batched dot whose
    # batch dimensions were not leading (the tiny shapes above did not show it).
    from jaxkd.model import BertConfig
    cfg = BertConfig(hidden_size=384, num_heads=12, intermediate_size=1536, num_layers=3)
    for dtype in ("bfloat16", "float32"):
        assert 0 < bench.layer_matmul_rate(dtype, cfg, batch=32, seq=128, repeats=1) < math.inf
