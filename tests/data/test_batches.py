"""Tests for jaxkd.data.batches: bucketing, epochs, resuming, evaluation padding, process shares."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import helpers
from jaxkd import data

BATCH_KEYS = {"input_ids", "attention_mask", "token_type_ids", "labels", "weights", "hard_weights", "index"}


def _rows_of(batch, row_i):
    """Token ids and types of one batch row, cut by its attention mask."""
    n = int(batch["attention_mask"][row_i].sum())
    return list(batch["input_ids"][row_i, :n]), list(batch["token_type_ids"][row_i, :n])


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_glue_dev_every_row_evaluated_once_with_tokenizer_ids(data_dir, tmp_path, sst2_task, raw_tsv,
                                                              bert_tokenizer):
    tok = bert_tokenizer
    path = data_dir / "sst2" / "glue_dev.tsv"
    raw = raw_tsv(path)
    examples = sst2_task.load(data.DataConfig(), str(path))
    encoded = sst2_task.encode(examples, tok, 128, tmp_path)
    batches = data.EvalBatches(encoded, 32, bucket_multiple=8, max_seq_len=128)
    assert len(batches) == 28
    seen = []
    for batch in batches:
        assert set(batch) == BATCH_KEYS and batch["input_ids"].shape[0] == 32
        assert batch["input_ids"].shape[1] in data.bucket_lengths(128, 8)
        assert batch["input_ids"].dtype == np.int32 and batch["weights"].dtype == np.float32
        for row_i in np.flatnonzero(batch["weights"] == 1):
            i = int(batch["index"][row_i])
            ids, types = _rows_of(batch, row_i)
            assert ids == tok(raw[i][0])["input_ids"], i
            assert types == [0] * len(ids) and batch["labels"][row_i] == int(raw[i][1])
            seen.append(i)
        assert (batch["index"][batch["weights"] == 0] == -1).all()
    assert sorted(seen) == list(range(872))
    quoted = next(i for i, r in enumerate(raw) if "'" in r[0])
    assert examples.texts[quoted] == raw[quoted][0]


def test_padding_of_rows_of_one_length_takes_no_memory_per_row():
    """Packed text (a general corpus: every row max_seq_len long, `lengths` a broadcast) is one
    shape and a fixed share of padding, found without an epoch order of its rows."""
    import tracemalloc
    from types import SimpleNamespace

    rows = SimpleNamespace(lengths=np.broadcast_to(np.int64(100), (1_000_000,)))
    tracemalloc.start()
    stats = data.padding_stats(rows, 32, bucket_multiple=8, max_seq_len=128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # an order of the rows alone would be 8 MB
    # 100 tokens fill a bucket of 128 (buckets 8 16 24 32 48 64 96 128); 1,000,000 // 32 batches
    assert stats.shapes == ((32, 128),) and stats.num_batches == 31_250
    assert stats.pad_fraction == pytest.approx(1 - 100 / 128)


@pytest.mark.slow
def test_sst2_train_bucketing_padding_and_shapes(data_dir, tmp_path, sst2_task, bert_tokenizer):
    tok = bert_tokenizer
    examples = sst2_task.load(data.DataConfig(), str(data_dir / "sst2" / "train.tsv"))
    encoded = sst2_task.encode(examples, tok, 128, tmp_path)
    stats = data.padding_stats(encoded, 32, bucket_multiple=8, max_seq_len=128)
    print(f"SST-2 train, batch 32, max 128: padding {stats.pad_fraction:.1%} of token slots, "
          f"{len(stats.shapes)} shapes {stats.shapes}")
    assert stats.pad_fraction < 0.25 and len(stats.shapes) <= 12
    # The figure must describe the batches the iterator really gives.
    train = data.TrainBatches(encoded, 32, seed=0, bucket_multiple=8, max_seq_len=128)
    tokens = slots = 0
    shapes = set()
    for _ in range(train.epoch_steps):
        mask = next(train)["attention_mask"]
        tokens, slots = tokens + int(mask.sum()), slots + mask.size
        shapes.add(mask.shape)
    assert shapes == set(stats.shapes)
    assert abs((1 - tokens / slots) - stats.pad_fraction) < 1e-9


# ----------------------------------------------------------------------------- batching


def _synthetic(num_examples=29):
    return helpers.synthetic_encoded(num_examples)


def _lists(encoded):
    return [encoded.input_ids[a:b].tolist() for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]


def test_bucket_lengths_are_few_multiples():
    assert data.bucket_lengths(128, 8) == (8, 16, 24, 32, 48, 64, 96, 128)
    assert data.bucket_lengths(512, 8)[-4:] == (192, 256, 384, 512)
    assert data.bucket_lengths(100, 16) == (16, 32, 48, 64, 96, 100)


def test_train_epoch_covers_each_example_at_most_once_in_tight_buckets():
    encoded = _synthetic(29)
    rows = _lists(encoded)
    train = data.TrainBatches(encoded, 8, seed=1, bucket_multiple=8, max_seq_len=32)
    assert train.epoch_steps == 3
    seen = []
    for _ in range(3):
        batch = next(train)
        longest = int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].shape[1] == min(b for b in (8, 16, 24, 32) if b >= longest)
        assert (batch["weights"] == 1).all()
        for row_i, i in enumerate(batch["index"]):
            assert _rows_of(batch, row_i)[0] == rows[i]
            assert batch["labels"][row_i] == encoded.labels[i]
        seen += batch["index"].tolist()
    assert len(set(seen)) == 24
    assert train.position["epoch"] == 1 and train.position["step"] == 0
    assert next(train)["index"].tolist() != data.TrainBatches(
        encoded, 8, seed=1, bucket_multiple=8, max_seq_len=32).__next__()["index"].tolist()


@pytest.mark.parametrize("stop_after", [0, 2, 3, 4, 7])
def test_resume_gives_the_batches_of_an_uninterrupted_run(stop_after):
    encoded = _synthetic(29)
    kwargs = dict(seed=3, bucket_multiple=8, max_seq_len=32)
    straight = data.TrainBatches(encoded, 8, **kwargs)
    expected = [next(straight) for _ in range(10)]
    first = data.TrainBatches(encoded, 8, **kwargs)
    for _ in range(stop_after):
        next(first)
    saved = json.loads(json.dumps(first.position))
    resumed = data.TrainBatches(encoded, 8, position=saved, **kwargs)
    for want in expected[stop_after:]:
        got = next(resumed)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_resume_with_other_data_is_refused():
    position = data.TrainBatches(_synthetic(29), 8, seed=0, bucket_multiple=8, max_seq_len=32).position
    with pytest.raises(data.DataError, match="num_examples=29, now 30"):
        data.TrainBatches(_synthetic(30), 8, seed=0, bucket_multiple=8, max_seq_len=32, position=position)


def test_eval_pads_last_batch_with_weight_zero_rows():
    encoded = _synthetic(29)
    batches = list(data.EvalBatches(encoded, 8, bucket_multiple=8, max_seq_len=32))
    assert len(batches) == 4
    last = batches[-1]
    assert last["weights"].tolist() == [1] * 5 + [0] * 3 and last["index"][5:].tolist() == [-1] * 3
    assert last["hard_weights"].tolist() == last["weights"].tolist()  # no transfer rows: all labelled
    np.testing.assert_array_equal(last["input_ids"][5:], np.repeat(last["input_ids"][:1], 3, 0))
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[index >= 0].tolist()) == list(range(29))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_concatenate_to_the_global_batch(process_count):
    encoded = _synthetic(29)
    kwargs = dict(bucket_multiple=8, max_seq_len=32)
    whole = data.TrainBatches(encoded, 8, seed=5, **kwargs)
    parts = [data.TrainBatches(encoded, 8, seed=5, process_index=p, process_count=process_count, **kwargs)
             for p in range(process_count)]
    evals = [list(data.EvalBatches(encoded, 8, process_index=p, process_count=process_count, **kwargs))
             for p in range(process_count)]
    whole_eval = list(data.EvalBatches(encoded, 8, **kwargs))
    for step in range(5):
        want, got = next(whole), [next(p) for p in parts]
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    for step, want in enumerate(whole_eval):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([e[step][key] for e in evals]), want[key])
    with pytest.raises(data.DataError, match="multiple of the process count 3"):
        data.TrainBatches(encoded, 8, seed=0, process_count=3, **kwargs)


@pytest.mark.slow
def test_two_processes_assemble_the_global_batches_of_one(tmp_path):
    import jax

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    single = helpers.collect_global_batches(mesh, 0, 1)
    script = helpers.TESTS / "_multiprocess_data.py"
    root = script.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(script.parent)]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port, out = helpers.free_port(), tmp_path / "two.npz"
    procs = [subprocess.Popen([sys.executable, str(script), str(p), "2", "2", str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    logs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
    with np.load(out) as two:
        assert set(two.files) == set(single)
        for key, value in single.items():
            np.testing.assert_array_equal(two[key], value, err_msg=key)
    # And both equal the plain NumPy global batch.
    reference = data.TrainBatches(helpers.synthetic_encoded(), helpers.DATA_BATCH_SIZE, seed=7,
                                   bucket_multiple=8, max_seq_len=helpers.DATA_MAX_SEQ_LEN)
    for step in range(helpers.DATA_TRAIN_STEPS):
        for key, value in next(reference).items():
            np.testing.assert_array_equal(single[f"train{step}/{key}"], value)
