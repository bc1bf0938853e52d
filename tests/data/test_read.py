"""Tests for jaxkd.data.read (and holdout): every format, text kept as written, errors that
name the file and line, Hub splits offline."""
import json

import numpy as np
import pytest

from jaxkd import data
from jaxkd.tasks import sequence, task_config


# ----------------------------------------------------------------------------- reading and errors


def test_formats_read_the_same_examples(tmp_path, sst2_task, write_file):
    rows = [("it's \"fine\", really", "1"), ("bad , movie", "0"), ("so-so", "negative")]
    expected_texts, expected_labels = [r[0] for r in rows], [1, 0, 0]
    tsv = write_file(tmp_path / "a.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    csv_ = write_file(tmp_path / "a.csv", 'sentence,label\n"it\'s ""fine"", really",1\n"bad , movie",0\nso-so,negative\n')
    jsonl = write_file(tmp_path / "a.jsonl", "".join(json.dumps({"sentence": t, "label": l}) + "\n" for t, l in rows))
    js = write_file(tmp_path / "a.json", json.dumps({"sentence": [r[0] for r in rows], "label": [1, 0, "negative"]}))
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"sentence": expected_texts, "label": [1, 0, 0]}), tmp_path / "a.parquet")
    for path in (tsv, csv_, jsonl, js, str(tmp_path / "a.parquet")):
        examples = sst2_task.load(data.DataConfig(), path)
        assert examples.texts == expected_texts, path
        assert examples.labels.tolist() == expected_labels and examples.labels.dtype == np.int32


def test_sst2_local_file_keeps_text_unchanged(data_dir, sst2_task, raw_tsv):
    path = data_dir / "sst2" / "glue_dev.tsv"
    raw = raw_tsv(path)
    examples = sst2_task.load(data.DataConfig(), str(path))
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


def test_missing_file_names_the_path(tmp_path, sst2_task):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sst2_task.load(data.DataConfig(), str(missing))


def test_missing_column_names_it_and_lists_available(tmp_path, sst2_task, write_file):
    path = write_file(tmp_path / "t.tsv", "text\tlabel\nhello\t1\n")
    with pytest.raises(data.DataError, match=r"no column 'sentence' \(task.text\).*available columns: \['text', 'label'\]"):
        sst2_task.load(data.DataConfig(), path)


# Files the readers refuse; tests/tasks/test_sequence.py has the rows the task refuses.
@pytest.mark.parametrize("name, content, message", [
    ("e.tsv", "", r"e.tsv: the file is empty"),
    ("t.tsv", "sentence\tlabel\ngood\t1\na\ttab\t0\n", r"t.tsv line 3: 3 fields where the header has 2"),
    ("d.tsv", "sentence\tlabel\tlabel\nx\t1\t1\n", r"d.tsv: the header repeats the column names \['label'\]"),
    ("b.tsv", b"sentence\tlabel\ngood \xff\t1\n", r"b.tsv: not UTF-8 text"),
    ("x.xlsx", "", r"x.xlsx: unknown file type '.xlsx'"),
    ("c.json", '{"sentence": ["a", "b", "c"], "label": [0, 1]}',
     r"c.json: its columns have different lengths \(\{'sentence': 3, 'label': 2\}\)"),
])
def test_bad_split_names_file_and_line(tmp_path, name, content, message, sst2_task, write_file):
    with pytest.raises(data.DataError, match=message):
        sst2_task.load(data.DataConfig(), write_file(tmp_path / name, content))


def test_hub_split_offline_says_to_use_local_files(tmp_path, monkeypatch, sst2_task):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = data.DataConfig(cache_dir=str(tmp_path))
    with pytest.raises(data.DataError, match=r"glue/sst2 split 'train'.*Offline.*local files"):
        sst2_task.load(cfg, "train")


def test_holdout_is_seeded_disjoint_and_complete():
    kept, held = data.holdout(1000, 0.1, seed=3)
    assert len(held) == 100 and len(kept) == 900
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(1000))
    again = data.holdout(1000, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(data.holdout(1000, 0.1, seed=4)[1], held)
