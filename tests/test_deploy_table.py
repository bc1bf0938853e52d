"""The deployment table (jaxkd.deploy.table): which inputs it times, that its metrics and
agreement are the task's figures on every row (NumPy from per-row forwards), that each format
is timed over the same inputs in alternating rounds, and its Markdown."""
import tempfile
import time

import jax
import numpy as np
import pytest

from helpers import forward, tiny_model_config
from jaxkd import data as data_lib
from jaxkd import tasks
from jaxkd.data import DataConfig, Encoded
from jaxkd.deploy import table
from jaxkd.model import init_params

BUCKET, MAX_LEN = 8, 32


def _split(rows: int = 37, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([4, 9, 17, 30], rows)  # few lengths: few programs for the per-row reference
    ids = [[2] + list(rng.integers(5, 100, n - 2)) + [3] for n in lengths]
    return Encoded.from_lists(ids, [[0] * n for n in lengths], rng.integers(0, 2, rows))


def _task():
    return tasks.resolve(tasks.task_config(name="sst2"), DataConfig(max_seq_len=MAX_LEN))


def _row_logits(cfg, params, encoded: Encoded) -> np.ndarray:
    """Each row alone, unpadded: the reference the padded, bucketed batches must reproduce."""
    out = []
    for i in range(len(encoded)):
        ids = encoded.input_ids[encoded.offsets[i]:encoded.offsets[i + 1]][None]
        out.append(np.asarray(forward(cfg, params, ids, np.ones_like(ids), np.zeros_like(ids)).logits)[0])
    return np.stack(out)


def test_spread_rows_reach_the_shortest_and_the_longest_input():
    lengths = np.array([9, 3, 30, 12, 12, 7, 25, 4, 18, 3])
    rows = table.spread_rows(lengths, 4)
    assert len(set(rows.tolist())) == 4
    assert lengths[rows].min() == 3 and lengths[rows].max() == 30
    assert np.all(np.diff(lengths[rows]) >= 0)
    assert sorted(table.spread_rows(lengths, 50).tolist()) == list(range(10))


def test_fixed_batches_hold_each_row_once_padded_to_its_bucket():
    encoded = _split()
    rows = table.spread_rows(encoded.lengths, 20)
    batches = table.fixed_batches(encoded, rows, 6, bucket_multiple=BUCKET, max_seq_len=MAX_LEN)
    seen = np.concatenate([b["index"] for b in batches])
    assert sorted(seen.tolist()) == sorted(rows.tolist())
    buckets = data_lib.bucket_lengths(MAX_LEN, BUCKET)
    for b in batches:
        length = b["input_ids"].shape[1]
        assert length in buckets and length >= encoded.lengths[b["index"]].max()
        np.testing.assert_array_equal(b["attention_mask"].sum(1), encoded.lengths[b["index"]])
    assert [len(b["index"]) for b in batches] == [6, 6, 6, 2]


@pytest.mark.slow
def test_metrics_and_agreement_are_the_task_figures_of_every_row():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from jaxkd.deploy import export as deploy_export

    encoded, task = _split(), _task()
    cfg = tiny_model_config()
    rng = np.random.default_rng(1)
    # Weights large enough that the rows' predictions differ (fresh ones give near-zero logits).
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(np.float32),
                          init_params(cfg, jax.random.key(1)))
    mine = _row_logits(cfg, params, encoded)
    theirs = rng.standard_normal(mine.shape).astype(np.float32)  # a reference's outputs
    with tempfile.TemporaryDirectory() as tmp:
        (onnx_file,) = deploy_export.write(cfg, params, tmp, int8=False)
        formats = [table.jax_format("jax_fp32", cfg, params, "float32"),
                   table.onnx_format("onnx_fp32", onnx_file)]
        result = table.measure(formats, task=task, encoded=encoded, examples=None, split="test",
                               reference=theirs, reference_name="teacher", latency_inputs=5,
                               throughput_batch=8, rounds=1, bucket_multiple=BUCKET,
                               max_seq_len=MAX_LEN)
    accuracy = np.mean(mine.argmax(-1) == encoded.labels)
    agreement = np.mean(mine.argmax(-1) == theirs.argmax(-1))
    assert 0 < agreement < 1 and 0 < accuracy < 1
    for name in ("jax_fp32", "onnx_fp32"):
        entry = result["formats"][name]
        assert entry["metrics"]["accuracy"] == pytest.approx(accuracy)
        assert entry["agreement"] == pytest.approx(agreement)
        assert 0 < entry["latency_ms"]["p50"] <= entry["latency_ms"]["p95"]
        assert entry["throughput"] > 0 and entry["size_mb"] > 0
    assert result["latency_inputs"] == 5 and result["throughput_examples"] == 37
    assert result["split"] == "test" and result["reference"] == "teacher"


def test_every_format_is_timed_on_the_same_inputs_in_alternating_rounds():
    encoded, task = _split(), _task()
    calls = []

    def fake(name, sleep_s=0.0):
        def run(batch):
            calls.append((name, tuple(batch["index"].tolist()), batch["input_ids"].shape))
            time.sleep(sleep_s)
            return np.zeros((len(batch["index"]), 2), np.float32)
        return table.Format(name, run, 1.0)

    result = table.measure([fake("a"), fake("b", 0.004)], task=task, encoded=encoded, examples=None,
                           split="eval", latency_inputs=4, throughput_batch=16, rounds=2,
                           bucket_multiple=BUCKET, max_seq_len=MAX_LEN)
    metric_pass = 3  # 37 rows in batches of 16
    one, full = 4, 3  # 4 inputs at batch 1; 37 rows in batches of 16
    per_round = one + full
    names = [c[0] for c in calls]
    assert names == (["a"] * metric_pass + ["b"] * metric_pass + ["a"] * per_round + ["b"] * per_round
                     + (["a"] * per_round + ["b"] * per_round) * 2)
    timed = calls[2 * metric_pass:]
    inputs = {name: [c[1:] for c in timed if c[0] == name] for name in "ab"}
    assert inputs["a"] == inputs["b"]  # the same batches, in the same order, for every format
    assert all(len(rows) == 1 for rows, _ in inputs["a"][:one])
    # The sleeping format is at least as slow as its sleep, whatever the machine.
    assert result["formats"]["b"]["latency_ms"]["p50"] >= 4.0
    assert result["formats"]["b"]["throughput"] <= 37 / (full * 0.004)
    assert result["formats"]["a"]["metrics"]["accuracy"] == pytest.approx(np.mean(encoded.labels == 0))


def test_markdown_has_a_row_per_format():
    encoded, task = _split(), _task()
    fmt = table.Format("x", lambda b: np.zeros((len(b["index"]), 2), np.float32), 2.5)
    result = table.measure([fmt, table.Format("y", fmt.run, 1.25)], task=task, encoded=encoded,
                           examples=None, split="test", reference=np.zeros((37, 2), np.float32),
                           reference_name="teacher", latency_inputs=3, throughput_batch=8, rounds=1,
                           bucket_multiple=BUCKET, max_seq_len=MAX_LEN)
    lines = table.markdown(result)
    rows = [line for line in lines if line.startswith("| x ") or line.startswith("| y ")]
    assert len(rows) == 2
    assert rows[0].split(" | ")[1] == f"{np.mean(encoded.labels == 0):.4f}"
    assert rows[0].split(" | ")[2] == "1.0000" and rows[1].split(" | ")[3] == "1.2"
    assert "agreement with the teacher" in lines[4]
