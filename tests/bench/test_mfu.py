"""bench mfu: FLOP counting against an enumeration of every matmul and against XLA, the peak
table, the matmul rates, and the CLI on a tiny checkpoint."""
import math
import re

import pytest

from helpers import tiny_model_config
from jaxkd.bench import mfu
from jaxkd.bench.__main__ import main


def test_flops_match_an_enumeration_of_every_matmul():
    cfg = tiny_model_config("sequence", 3, vocab_size=30522, hidden_size=24, num_layers=3, num_heads=4,
                            intermediate_size=40, max_position_embeddings=512)
    B, L, H, N, I = 5, 7, 24, 4, 40
    D, tokens = H // N, B * L
    per_layer = (4 * 2 * tokens * H * H  # q, k, v, attention output
                 + 2 * 2 * tokens * H * I  # FFN in and out
                 + 2 * 2 * B * N * L * L * D)  # q.k scores and probs.v
    last_layer = (2 * 2 * tokens * H * H  # k, v for every token
                  + 2 * 2 * B * H * H + 2 * 2 * B * H * I  # q, output, FFN for [CLS]
                  + 2 * 2 * B * N * 1 * L * D)  # one query row of scores and probs.v
    expected = 2 * per_layer + last_layer + 2 * B * H * H + 2 * B * H * 3  # pooler, classifier
    assert mfu.forward_flops(cfg, B, L) == expected
    student = cfg.replace(num_layers=1)
    assert mfu.step_flops(cfg, student, B, L) == expected + 3 * mfu.forward_flops(student, B, L)
    # A token head: every layer for every token, and a classifier on every token.
    token = cfg.replace(kind="token")
    assert mfu.forward_flops(token, B, L) == 3 * per_layer + 2 * tokens * H * 3


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                       ("NVIDIA A100-SXM4-40GB", 312.0), ("TPU v4", 275.0),
                                       ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
                                       ("TPU v6 lite", 918.0), ("cpu", None)])
def test_peak_table(kind, peak):
    assert mfu.peak_tflops(kind) == peak


@pytest.mark.slow  # the CLI end to end, timing real steps
def test_mfu_cli_with_peak_override(tiny_teacher, capsys):
    main(["mfu", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "2", "--warmup", "1", "--dtype", "float32",
                "--peak-tflops", "1", "--gemm-size", "256"])
    out = capsys.readouterr().out
    assert "MFU" in out and "measured matmul rate (256^3 GEMM" in out
    # A tiny step is far from what the device can do: a fraction of the measured rate.
    assert 0 < float(out.strip().splitlines()[-1]) < 1


@pytest.mark.slow  # the CLI end to end, timing real steps
def test_mfu_without_peak_on_cpu_prints_fraction_of_measured_rate(tiny_teacher, capsys):
    main(["mfu", "--teacher", str(tiny_teacher), "--student-layers", "2", "--batch", "4",
                "--seq", "8", "--steps", "1", "--warmup", "1", "--dtype", "bfloat16", "--gemm-size", "256"])
    out = capsys.readouterr().out
    assert "peak unknown" in out and "of the bfloat16 rate" in out
    assert 0 < float(out.strip().splitlines()[-1]) < 1


def test_gemm_rate_counts_flops_of_the_timed_matmul(monkeypatch):
    # 2 n^3 FLOPs over the best of the timed calls.
    monkeypatch.setattr(mfu, "seconds", lambda fn, steps, warmup: [0.5, 0.25, 0.4])
    assert mfu.gemm_rate("bfloat16", 64) == pytest.approx(2 * 64 ** 3 / 0.25)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_matmuls_flop_count_matches_xla(dtype):
    """bench mfu's per-layer matmul rate counts the FLOPs XLA's cost analysis finds in it."""
    from jaxkd.model import BertConfig
    cfg = BertConfig(hidden_size=64, num_heads=4, intermediate_size=256, num_layers=1, vocab_size=100)
    grads, args, flops = mfu.layer_matmuls(dtype, cfg, batch=4, seq=32)
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
    grads, args, _ = mfu.layer_matmuls("bfloat16", cfg, batch=4, seq=32)
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
        assert 0 < mfu.layer_matmul_rate(dtype, cfg, batch=32, seq=128, repeats=1) < math.inf
