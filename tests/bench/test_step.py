"""bench step on a tiny checkpoint (no timings asserted): the CLI, --breakdown, --profile and its
op table, the params digest, bad shapes, --vs-torch; and the cheaper dropout of jaxkd.model (the
benchmarks' speed change)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.bench import common, step
from jaxkd.bench.__main__ import main
from jaxkd.layers import Dropout, keep_mask


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
    assert step.op_seconds(events, steps=2) == [("ynn_fusion", 2.0), ("copy", 1.0)]


@pytest.mark.slow  # a profiled CLI run (test_step_and_breakdown_cli: fast)
def test_step_profile_writes_a_trace(tiny_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add a flag
    main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "1", "--warmup", "1", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    assert "profile: " in out and list(tmp_path.glob("**/*.trace.json.gz"))
    assert float(out.strip().splitlines()[-1]) > 0


def test_step_and_breakdown_cli(tiny_teacher, capsys):
    main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                "--seq", "8", "--steps", "2", "--warmup", "1", "--breakdown"])
    out = capsys.readouterr().out
    assert "breakdown (median s): teacher_forward=" in out and "peak host memory" in out
    assert float(out.strip().splitlines()[-1]) > 0


@pytest.mark.slow
def test_step_prints_the_same_digest_for_the_same_flags(tiny_teacher, capsys):
    """The digest that shows a flag or environment leaves the results alone is reproducible."""
    digests = []
    for steps in ("2", "2", "3"):
        main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1", "--batch", "4",
                    "--seq", "8", "--steps", steps, "--warmup", "1"])
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("params after"))
        digests.append(line.split()[-1])
    assert digests[0] == digests[1] != digests[2]


def test_step_rejects_bad_shapes(tiny_teacher):
    with pytest.raises(ValueError, match="--batch"):
        main(["step", "--teacher", str(tiny_teacher), "--batch", "0"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        main(["step", "--teacher", str(tiny_teacher), "--student-layers", "1",
                    "--batch", "4", "--seq", "65"])


@pytest.mark.slow
def test_step_vs_torch_alternates_processes(tiny_teacher, capsys):
    pytest.importorskip("torch")
    if not common.TORCH_STEP_SCRIPT.is_file():
        pytest.skip(f"the PyTorch reference step {common.TORCH_STEP_SCRIPT} is not beside the repository")
    main(["step", "--vs-torch", "--rounds", "1", "--teacher", str(tiny_teacher),
                "--student-layers", "1", "--batch", "4", "--seq", "8", "--steps", "1", "--warmup", "1",
                "--breakdown", "--torch-dtype", "float32,bfloat16"])
    out = capsys.readouterr().out
    assert "round 1 jaxkd" in out and "round 1 torch-float32" in out and "round 1 torch-bfloat16" in out
    assert "breakdown (median s): teacher_forward=" in out  # passed on to the jaxkd runs
    assert "against float32" in out and "against bfloat16" in out
    assert float(out.strip().splitlines()[-1]) > 0
