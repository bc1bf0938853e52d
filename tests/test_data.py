"""Tests for jaxkd.data: reading, validation, tokenisation, bucketing, resuming, sharding."""
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import _multiprocess_data as mp_data
from jaxkd import data
from jaxkd.tasks import task_config, sequence

BATCH_KEYS = {"input_ids", "attention_mask", "token_type_ids", "labels", "weights", "hard_weights", "index"}


def _tokenizer(minilm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer.from_pretrained(str(minilm_dir))


def _write(path: pathlib.Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def _encode(examples, tokenizer, max_seq_len, cache_dir):
    return _sst2_task().encode(examples, tokenizer, max_seq_len, cache_dir)


def _sst2_task():
    return sequence.resolve(task_config("sst2"))


def _raw_tsv(path: pathlib.Path) -> list[list[str]]:
    """Reference reader: split lines on tabs, nothing else."""
    lines = path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    return [line.split("\t") for line in lines[1:]]


def _rows_of(batch, row_i):
    """Token ids and types of one batch row, cut by its attention mask."""
    n = int(batch["attention_mask"][row_i].sum())
    return list(batch["input_ids"][row_i, :n]), list(batch["token_type_ids"][row_i, :n])


# ----------------------------------------------------------------------------- tasks


def test_presets_resolve_columns_labels_and_metrics():
    mrpc = sequence.resolve(task_config("mrpc"))
    assert (mrpc.text, mrpc.text_pair, mrpc.label) == ("sentence1", "sentence2", "label")
    assert mrpc.metrics == ("accuracy", "f1") and mrpc.num_labels == 2
    stsb = sequence.resolve(task_config("stsb"))
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearman")
    assert sequence.resolve(task_config("cola")).metrics == ("matthews",)
    mnli = sequence.resolve(task_config("mnli"))
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched") and mnli.num_labels == 3
    assert sequence.resolve(task_config("mrpc", metric="f1")).metrics == ("f1", "accuracy")


def test_custom_task_infers_sorted_labels_and_regression():
    cfg = task_config("custom", text="t", labels=None)
    assert sequence.resolve(cfg, None, ["b", "a", "c", "a"]).label_names == ("a", "b", "c")
    assert sequence.resolve(cfg, None, ["10", "2", 1]).label_names == ("1", "2", "10")
    reg = sequence.resolve(task_config("custom", text="t", metric="spearman"))
    assert reg.is_regression and reg.metrics == ("spearman",)
    with pytest.raises(data.DataError, match="task.labels"):
        sequence.resolve(cfg)


def test_unknown_task_suggests_nearest_preset():
    with pytest.raises(data.DataError, match=r"unknown task.name 'sst-2'.*did you mean 'sst2'"):
        task_config("sst-2")


def test_metric_that_does_not_fit_the_task_is_refused():
    with pytest.raises(data.DataError, match="'accuracy' does not fit the regression task 'stsb'"):
        sequence.resolve(task_config("stsb", metric="accuracy"))
    with pytest.raises(data.DataError, match="needs 2 labels"):
        sequence.resolve(task_config("mnli", metric="f1"))


# ----------------------------------------------------------------------------- reading and errors


def test_formats_read_the_same_examples(tmp_path):
    rows = [("it's \"fine\", really", "1"), ("bad , movie", "0"), ("so-so", "negative")]
    expected_texts, expected_labels = [r[0] for r in rows], [1, 0, 0]
    tsv = _write(tmp_path / "a.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    csv_ = _write(tmp_path / "a.csv", 'sentence,label\n"it\'s ""fine"", really",1\n"bad , movie",0\nso-so,negative\n')
    jsonl = _write(tmp_path / "a.jsonl", "".join(json.dumps({"sentence": t, "label": l}) + "\n" for t, l in rows))
    js = _write(tmp_path / "a.json", json.dumps({"sentence": [r[0] for r in rows], "label": [1, 0, "negative"]}))
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"sentence": expected_texts, "label": [1, 0, 0]}), tmp_path / "a.parquet")
    for path in (tsv, csv_, jsonl, js, str(tmp_path / "a.parquet")):
        examples = _sst2_task().load(data.DataConfig(), path)
        assert examples.texts == expected_texts, path
        assert examples.labels.tolist() == expected_labels and examples.labels.dtype == np.int32


def test_sst2_local_file_keeps_text_unchanged(data_dir):
    path = data_dir / "sst2" / "glue_dev.tsv"
    raw = _raw_tsv(path)
    examples = _sst2_task().load(data.DataConfig(), str(path))
    assert examples.texts == [r[0] for r in raw] and len(examples) == 872
    assert examples.labels.tolist() == [int(r[1]) for r in raw]
    # This copy quotes with ' only; the MRPC test covers ". Trailing spaces stay too.
    assert any("'" in text for text in examples.texts) and examples.texts[0].endswith(" ")


def test_mrpc_local_file_with_bom_and_overridden_columns(data_dir):
    path = data_dir / "mrpc" / "msr_paraphrase_test.txt"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    task = sequence.resolve(task_config("mrpc", text="#1 String", text_pair="#2 String", label="Quality"))
    examples = task.load(data.DataConfig(), str(path))
    raw = [line.split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines()[1:]]
    assert len(examples) == 1725
    assert examples.texts == [r[3] for r in raw] and examples.pairs == [r[4] for r in raw]
    assert examples.labels.tolist() == [int(r[0]) for r in raw]
    assert sum('"' in text for text in examples.texts) > 10


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _sst2_task().load(data.DataConfig(), str(missing))


def test_missing_column_names_it_and_lists_available(tmp_path):
    path = _write(tmp_path / "t.tsv", "text\tlabel\nhello\t1\n")
    with pytest.raises(data.DataError, match=r"no column 'sentence' \(task.text\).*available columns: \['text', 'label'\]"):
        _sst2_task().load(data.DataConfig(), path)


@pytest.mark.parametrize("name, content, message", [
    ("h.tsv", "sentence\tlabel\n", r"h.tsv: the split is empty"),
    ("e.tsv", "", r"e.tsv: the file is empty"),
    ("t.tsv", "sentence\tlabel\ngood\t1\nmeh\t7\n",
     r"t.tsv line 3: label '7' in column 'label' is not one of \['negative', 'positive'\]"),
    ("t.tsv", "sentence\tlabel\ngood\t1\n  \t0\n", r"t.tsv line 3: empty text in column 'sentence'"),
    ("t.jsonl", '{"sentence": "ok", "label": 1}\n\n{"sentence": null, "label": 0}\n',
     r"t.jsonl line 3: null text in column 'sentence'"),
    ("t.tsv", "sentence\tlabel\ngood\t1\na\ttab\t0\n", r"t.tsv line 3: 3 fields where the header has 2"),
    ("d.tsv", "sentence\tlabel\tlabel\nx\t1\t1\n", r"d.tsv: the header repeats the column names \['label'\]"),
    ("b.tsv", b"sentence\tlabel\ngood \xff\t1\n", r"b.tsv: not UTF-8 text"),
    ("x.xlsx", "", r"x.xlsx: unknown file type '.xlsx'"),
])
def test_bad_split_names_file_and_line(tmp_path, name, content, message):
    with pytest.raises(data.DataError, match=message):
        _sst2_task().load(data.DataConfig(), _write(tmp_path / name, content))


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    path = _write(tmp_path / "t.tsv", "sentence\tlabel\ngood\t1\n\t0\nx\t9\ny\t\nz\t0\tq\nfine\t0\n")
    with caplog.at_level(logging.WARNING, logger="jaxkd.tasks.base"):
        examples = _sst2_task().load(data.DataConfig(skip_invalid=True), path)
    assert examples.texts == ["good", "fine"] and examples.labels.tolist() == [1, 0]
    assert examples.skipped == {"empty text": 1, "bad label": 1, "missing label": 1, "wrong field count": 1}
    assert "skipped 4 invalid rows" in caplog.text
    with pytest.raises(data.DataError, match="no valid rows left"):
        _sst2_task().load(data.DataConfig(skip_invalid=True), _write(tmp_path / "b.tsv", "sentence\tlabel\n\t1\n"))


def test_unlabeled_split_gets_placeholder_labels(tmp_path):
    path = _write(tmp_path / "test.tsv", "sentence\nhello\n")
    examples = _sst2_task().load(data.DataConfig(), path, require_labels=False)
    assert not examples.has_labels and examples.labels.tolist() == [-1]
    stsb = sequence.resolve(task_config("stsb", text="s", text_pair="p"))
    path = _write(tmp_path / "s.tsv", "s\tp\nhello\tthere\n")
    assert np.isnan(stsb.load(data.DataConfig(), path, require_labels=False).labels).all()
    with pytest.raises(data.DataError, match="no column 'label'"):
        _sst2_task().load(data.DataConfig(), _write(tmp_path / "t2.tsv", "sentence\nhello\n"))


def test_hub_split_offline_says_to_use_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = data.DataConfig(cache_dir=str(tmp_path))
    with pytest.raises(data.DataError, match=r"glue/sst2 split 'train'.*Offline.*local files"):
        _sst2_task().load(cfg, "train")


# ----------------------------------------------------------------------------- tokenisation


class _CountingTokenizer:
    """Whitespace tokenizer that counts its calls: [CLS]=1, a word = 10 + its length, [SEP]=2."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's

    def __init__(self):
        self.calls = 0

    def get_vocab(self):
        return {"[CLS]": 1, "[SEP]": 2}

    def __call__(self, texts, pairs, truncation, max_length, **_):
        self.calls += 1
        assert truncation == "longest_first"
        ids, types = [], []
        for text in texts:
            a = [1] + [10 + len(w) for w in text.split()][:max_length - 2] + [2]
            ids.append(a)
            types.append([0] * len(a))
        return {"input_ids": ids, "token_type_ids": types}


def test_tokenize_cache_is_reused_and_keyed_by_max_len(tmp_path):
    examples = _sst2_task().load(data.DataConfig(), _write(tmp_path / "t.tsv", "sentence\tlabel\na bb ccc\t1\nd\t0\n"))
    tok = _CountingTokenizer()
    first = _encode(examples, tok, 8, tmp_path / "cache")
    second = _encode(examples, tok, 8, tmp_path / "cache")
    assert tok.calls == 1
    np.testing.assert_array_equal(first.input_ids, second.input_ids)
    np.testing.assert_array_equal(second.input_ids, [1, 11, 12, 13, 2, 1, 11, 2])
    assert second.lengths.tolist() == [5, 3] and second.labels.tolist() == [1, 0]
    _encode(examples, tok, 4, tmp_path / "cache")
    assert tok.calls == 2
    assert _encode(examples, tok, 4, tmp_path / "cache").lengths.tolist() == [4, 3]


@pytest.mark.slow
def test_glue_dev_every_row_evaluated_once_with_tokenizer_ids(data_dir, minilm_dir, tmp_path):
    tok = _tokenizer(minilm_dir)
    path = data_dir / "sst2" / "glue_dev.tsv"
    raw = _raw_tsv(path)
    examples = _sst2_task().load(data.DataConfig(), str(path))
    encoded = _encode(examples, tok, 128, tmp_path)
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


@pytest.mark.slow
def test_mrpc_pairs_match_tokenizer_with_truncation(data_dir, minilm_dir):
    tok = _tokenizer(minilm_dir)
    task = sequence.resolve(task_config("mrpc", text="#1 String", text_pair="#2 String", label="Quality"))
    examples = task.load(data.DataConfig(), str(data_dir / "mrpc" / "msr_paraphrase_test.txt"))
    encoded = _encode(examples, tok, 32, None)
    for i in range(0, len(examples), 25):
        want = tok(examples.texts[i], examples.pairs[i], truncation="longest_first", max_length=32)
        start, stop = encoded.offsets[i], encoded.offsets[i + 1]
        assert encoded.input_ids[start:stop].tolist() == want["input_ids"]
        assert encoded.token_type_ids[start:stop].tolist() == want["token_type_ids"]
    assert encoded.lengths.max() == 32 and set(np.unique(encoded.token_type_ids)) == {0, 1}


@pytest.mark.slow
def test_sst2_train_bucketing_padding_and_shapes(data_dir, minilm_dir, tmp_path):
    tok = _tokenizer(minilm_dir)
    examples = _sst2_task().load(data.DataConfig(), str(data_dir / "sst2" / "train.tsv"))
    encoded = _encode(examples, tok, 128, tmp_path)
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
    return mp_data.synthetic_encoded(num_examples)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_assemble_the_global_batches_of_one(tmp_path):
    import jax

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    single = mp_data.collect(mesh, 0, 1)
    script = pathlib.Path(mp_data.__file__)
    root = script.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(script.parent)]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port, out = _free_port(), tmp_path / "two.npz"
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
    reference = data.TrainBatches(mp_data.synthetic_encoded(), mp_data.BATCH_SIZE, seed=7,
                                   bucket_multiple=8, max_seq_len=mp_data.MAX_SEQ_LEN)
    for step in range(mp_data.TRAIN_STEPS):
        for key, value in next(reference).items():
            np.testing.assert_array_equal(single[f"train{step}/{key}"], value)


def test_holdout_is_seeded_disjoint_and_complete():
    kept, held = data.holdout(1000, 0.1, seed=3)
    assert len(held) == 100 and len(kept) == 900
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(1000))
    again = data.holdout(1000, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(data.holdout(1000, 0.1, seed=4)[1], held)
