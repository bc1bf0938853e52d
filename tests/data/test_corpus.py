"""Tests for jaxkd.data.rawtext and jaxkd.data.corpus: every source kind reads the documents a plain split gives, shards
hold what the tokenizer gives each document (+ [SEP]), resume after a lost shard or a kill -9,
packed rows against a NumPy reference, and errors that say what to fix."""
import collections
import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import helpers
from jaxkd.data import corpus as C
from jaxkd.data import rawtext as R
from jaxkd.data.config import DataError

# helpers.TRANSFER_VOCAB, plus single letters and digits so that any word has wordpieces
VOCAB = list(dict.fromkeys(helpers.TRANSFER_VOCAB + list("abcdefghijklmnopqrstuvwxyz0123456789-'")
                           + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]))
WORDS = ["the", "film", "was", "unbelievable", "great", "plot", "actors", "naïve", "Éclair", "x9",
         "don't", "中文", "!", "story", "awful"]

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real BERT WordPiece tokenizer (Rust-backed) of VOCAB. Loaded from its directory:
    transformers 5 ignores BertTokenizerFast(vocab_file=...), leaving only the special tokens."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("corpus_vocab")
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(directory))
    assert len(tokenizer) == len(VOCAB)
    return tokenizer

def random_docs(seed: int, n: int, max_words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, max_words + 1))) for _ in range(n)]

def reference_ids(tokenizer, docs) -> list[int]:
    """What the corpus stream must be: each document's ids (no specials), then [SEP]."""
    out = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    return out

def write_text(path, text: str) -> str:
    data = text.encode("utf-8")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)

def read_all(src) -> list[str]:
    return list(R.documents(src, False, collections.Counter()))

# ----------------------------------------------------------------------------- sources and documents

def test_sources_kind_by_suffix():
    srcs = R.sources(["a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz", "e.json", "f.parquet"],
                     documents="paragraphs", text_column="body")
    assert [s.kind for s in srcs] == ["paragraphs"] * 2 + ["jsonl"] * 3 + ["parquet"]
    assert all(s.text_column == "body" for s in srcs)
    with pytest.raises(DataError, match=r"a\.csv: unknown corpus file suffix; use one of \.txt"):
        R.sources(["a.csv"])
    with pytest.raises(DataError, match="'lines'"):
        R.sources(["a.txt"], documents="sentences")

@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz"])
def test_lines_and_paragraphs_match_a_plain_split(tmp_path, name):
    text = "first doc\r\nsecond  doc \n\n   \nthird\nfourth é 中\n\n\nlast line no newline"
    path = write_text(tmp_path / name, text)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    assert read_all(R.Source(path, "lines")) == [line for line in lines if line.strip()]
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    assert read_all(R.Source(path, "paragraphs")) == paragraphs == [
        "first doc\nsecond  doc ", "third\nfourth é 中", "last line no newline"]

@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.parquet"])
def test_jsonl_and_parquet_read_the_text_column(tmp_path, name):
    rows = [{"body": "one doc", "id": 1}, {"body": "", "id": 2}, {"body": "two\nlines é", "id": 3},
            {"body": None, "id": 4}, {"body": "three", "id": 5}]
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name, row_group_size=2)
        path = str(tmp_path / name)
    else:
        path = write_text(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (src,) = R.sources([path], text_column="body")
    R.check_sources([src])
    assert read_all(src) == [r["body"] for r in rows if r["body"]]

def hub_dir(tmp_path, rows) -> str:
    """A dataset directory as the Hub lays one out (data/<split>-*.parquet), opened offline by
    `datasets.load_dataset(<directory>, streaming=True)`: the code path of a Hub name."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    data = tmp_path / "hubset" / "data"
    data.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), data / "train-00001-of-00002.parquet")
    return str(tmp_path / "hubset")

def test_a_hub_split_streams_the_text_column_in_order(tmp_path, tokenizer):
    rows = [{"body": doc, "id": i} for i, doc in enumerate(random_docs(5, 40))]
    rows[3]["body"] = ""
    (src,) = R.sources([f"hub:{hub_dir(tmp_path, rows)}:train"], text_column="body")
    assert src.kind == "hub" and src.hub[1:] == (None, "train")
    R.check_sources([src])
    docs = [r["body"] for r in rows if r["body"]]
    assert read_all(src) == docs
    corpus = C.tokenize([src], tokenizer, tmp_path / "out", workers=1, chunk_bytes=256,
                        progress=False)
    np.testing.assert_array_equal(corpus.read(0, corpus.tokens), reference_ids(tokenizer, docs))

def test_hub_names_and_columns_are_checked_before_any_work(tmp_path):
    directory = hub_dir(tmp_path, [{"body": "one doc"}, {"body": "two"}])
    with pytest.raises(DataError, match="hub:<dataset>:<split> or hub:<dataset>:<config>:<split>"):
        R.sources(["hub:only-a-name"])
    (src,) = R.sources([f"hub:{directory}:train"], text_column="bodi")
    with pytest.raises(DataError, match="no column 'bodi' .did you mean 'body'.*Set the text column"):
        R.check_sources([src])
    (src,) = R.sources([f"hub:{directory}:nosuchsplit"], text_column="body")
    with pytest.raises(DataError, match="nosuchsplit: cannot (open|read) the Hub split"):
        R.check_sources([src])

# ----------------------------------------------------------------------------- tokenizing

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, tokenizer):
    """Two sources (lines, jsonl.gz) of random documents, tokenized with two workers into
    ~1 KB chunks: (srcs, docs, corpus)."""
    directory = tmp_path_factory.mktemp("small_corpus")
    docs_a, docs_b = random_docs(0, 150), random_docs(1, 120)
    a = write_text(directory / "a.txt", "\n".join(docs_a) + "\n")
    b = write_text(directory / "b.jsonl.gz", "".join(json.dumps({"text": d}) + "\n" for d in docs_b))
    srcs = R.sources([a, b])
    return srcs, docs_a + docs_b, C.tokenize(srcs, tokenizer, directory / "out", workers=2,
                                             chunk_bytes=1024, progress=False)

def stream(corpus) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in corpus.shards])

def test_shards_hold_each_document_then_sep_two_workers(small_corpus, tokenizer):
    srcs, docs, corpus = small_corpus
    assert len(corpus.shards) > 5 and corpus.dtype == np.uint16
    assert all(s.dtype == np.uint16 and isinstance(s, np.memmap) for s in corpus.shards)
    np.testing.assert_array_equal(stream(corpus), reference_ids(tokenizer, docs))
    assert len(np.unique(stream(corpus))) > 20  # real wordpieces, not [UNK] after [UNK]
    assert corpus.documents == len(docs) and corpus.tokens == len(stream(corpus))
    assert sum(s["documents"] for s in corpus.manifest["shards"]) == len(docs)
    assert corpus.manifest["tokenized_shards"] == list(range(len(corpus.shards)))
    # read() across shard boundaries is a slice of the stream, as int32
    full = stream(corpus)
    for start, count in [(0, 5), (int(corpus.offsets[1]) - 3, 7), (100, 900), (corpus.tokens - 4, 4)]:
        got = corpus.read(start, count)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, full[start:start + count])
    with pytest.raises(IndexError):
        corpus.read(corpus.tokens - 1, 2)
    # a finished corpus is returned as it is
    again = C.tokenize(srcs, tokenizer, corpus.directory.parent, workers=2, chunk_bytes=1024,
                       progress=False)
    assert again.directory == corpus.directory and again.manifest == corpus.manifest

def test_one_worker_gives_the_same_shards(small_corpus, tokenizer, tmp_path):
    srcs, docs, corpus = small_corpus
    one = C.tokenize(srcs, tokenizer, tmp_path, workers=1, chunk_bytes=1024, progress=False)
    assert one.directory.name == corpus.directory.name  # the same key: workers do not matter
    for mine, theirs in zip(one.shards, corpus.shards, strict=True):
        np.testing.assert_array_equal(mine, theirs)

def test_resume_tokenizes_only_the_missing_shard(small_corpus, tokenizer, tmp_path):
    srcs, _, corpus = small_corpus

    copy = tmp_path / corpus.directory.name
    shutil.copytree(corpus.directory, copy)
    (copy / C.MANIFEST).unlink()
    middle = len(corpus.shards) // 2
    (copy / C.shard_name(middle)).unlink()
    resumed = C.tokenize(srcs, tokenizer, tmp_path, workers=1, chunk_bytes=1024, progress=False)
    assert resumed.directory == copy
    assert resumed.manifest["tokenized_shards"] == [middle]
    assert {k: v for k, v in resumed.manifest.items() if k not in ("tokenized_shards", "seconds")} == \
        {k: v for k, v in corpus.manifest.items() if k not in ("tokenized_shards", "seconds")}
    np.testing.assert_array_equal(stream(resumed), stream(corpus))

def test_key_follows_tokenizer_chunking_and_file(small_corpus, tokenizer, tmp_path):
    srcs, _, _ = small_corpus
    key = C.corpus_key(srcs, tokenizer, 1024, False)
    assert C.corpus_key(srcs, tokenizer, 2048, False) != key
    assert C.corpus_key(srcs, tokenizer, 1024, True) != key
    assert C.corpus_key(srcs[:1], tokenizer, 1024, False) != key


def test_key_follows_the_bytes_not_the_mtime_or_the_folder(tmp_path, tokenizer):
    """A corpus copied to another folder or given a new mtime (a data volume provisioned
    again) finds its shards; the same file with one byte changed, size and mtime kept, does
    not, in the same process too."""
    text = "".join(f"{d}\n" for d in random_docs(2, 40))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = pathlib.Path(write_text(tmp_path / "one" / "c.txt", text))
    key = C.corpus_key(R.sources([first]), tokenizer, 1024, False)
    copy = write_text(tmp_path / "two" / "c.txt", text)
    os.utime(copy, ns=(10**18, 10**18))
    assert C.corpus_key(R.sources([copy]), tokenizer, 1024, False) == key
    stat = first.stat()
    first.write_text(text.replace(text[0], "#" if text[0] != "#" else "$", 1), encoding="utf-8")
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert first.stat().st_size == stat.st_size
    assert C.corpus_key(R.sources([first]), tokenizer, 1024, False) != key

KILL_SCRIPT = textwrap.dedent("""
    import sys, transformers
    from jaxkd.data import corpus as C, rawtext as R
    tok = transformers.BertTokenizerFast.from_pretrained(sys.argv[1])
    C.tokenize(R.sources([sys.argv[2]]), tok, sys.argv[3], workers=1, chunk_bytes=16 << 10,
               progress=False)
""")

def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found

def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

@pytest.mark.slow
def test_kill9_then_rerun_equals_an_uninterrupted_run(tokenizer, tmp_path):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    path = write_text(tmp_path / "big.txt", "\n".join(random_docs(2, 40_000)) + "\n")  # ~2.4 MB
    srcs = R.sources([path])
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(helpers.ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(vocab), path, str(out)], env=env)
    directory = out / C.corpus_key(srcs, tokenizer, 16 << 10, False)
    deadline = time.time() + 120
    while not (directory / C.shard_name(0)).is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first shard"
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (directory / C.MANIFEST).exists(), "the run finished before it was killed"
    # Its spawned workers (and multiprocessing's resource tracker) end with it.
    deadline = time.time() + 20
    while [pid for pid in workers if _running(pid)] and time.time() < deadline:
        time.sleep(0.1)
    assert workers and not [pid for pid in workers if _running(pid)]
    kept = sorted(p.name for p in directory.glob("shard-*[0-9].npy"))
    resumed = C.tokenize(srcs, tokenizer, out, workers=2, chunk_bytes=16 << 10, progress=False)
    reference = C.tokenize(srcs, tokenizer, tmp_path / "whole", workers=2, chunk_bytes=16 << 10,
                           progress=False)
    assert len(resumed.manifest["tokenized_shards"]) < len(reference.shards) and kept
    assert not set(kept) & {C.shard_name(i) for i in resumed.manifest["tokenized_shards"]}
    np.testing.assert_array_equal(stream(resumed), stream(reference))
    assert resumed.manifest["shards"] == reference.manifest["shards"]

# ----------------------------------------------------------------------------- packed rows

@pytest.mark.parametrize("seq_len", [3, 8, 37])
def test_packed_rows_match_a_numpy_reference(small_corpus, tokenizer, seq_len):
    _, docs, corpus = small_corpus
    ids = np.asarray(reference_ids(tokenizer, docs))
    window = seq_len - 2
    n = len(ids) // window
    windows = ids[:n * window].reshape(n, window)
    expected = np.concatenate([np.full((n, 1), tokenizer.cls_token_id), windows,
                               np.full((n, 1), tokenizer.sep_token_id)], axis=1)
    rows = C.PackedRows.of(corpus, tokenizer, seq_len)
    assert len(rows) == n
    pick = np.random.default_rng(seq_len).permutation(n)[:50]
    got = rows.rows(pick)
    assert got.dtype == np.int32 and got.shape == (len(pick), seq_len)
    np.testing.assert_array_equal(got, expected[pick])
    np.testing.assert_array_equal(rows.rows(np.arange(n)), expected)
    with pytest.raises(IndexError):
        rows.rows([n])
    with pytest.raises(DataError, match="seq_len"):
        C.PackedRows.of(corpus, tokenizer, 2)

def test_token_chunks_are_the_windows_of_the_rows_alone(small_corpus, tokenizer):
    """Smoothing counts read the training rows' tokens: the kept rows' windows, held-out ones
    left out, in chunks of any size."""
    _, docs, corpus = small_corpus
    ids = np.asarray(reference_ids(tokenizer, docs))
    kept, held = C.PackedRows.of(corpus, tokenizer, 10).split(0.25)
    for rows in (kept, held):
        body = rows.rows(np.arange(len(rows)))[:, 1:-1].reshape(-1)
        for size in (7, 1 << 22):
            np.testing.assert_array_equal(np.concatenate(list(rows.token_chunks(size))), body)
    np.testing.assert_array_equal(np.concatenate(list(kept.token_chunks())), ids[:len(kept) * 8])


def test_a_corpus_of_more_shards_than_open_files_allowed_reads_whole(tmp_path):
    """Shards are mapped when read, a few at a time: 400 shards under a limit of 160 open files."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 1000, rng.integers(1, 20)).astype(np.uint16) for _ in range(400)]
    for i, shard in enumerate(shards):
        np.save(tmp_path / C.shard_name(i), shard)
    (tmp_path / C.MANIFEST).write_text(json.dumps({
        "dtype": "uint16", "documents": 400,
        "shards": [{"file": C.shard_name(i), "tokens": len(s)} for i, s in enumerate(shards)]}))
    np.save(tmp_path / "expected.npy", np.concatenate(shards))
    script = (
        "import resource, sys, numpy as np\n"
        "from jaxkd.data import corpus as C\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (160, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "c = C.Corpus.open(sys.argv[1])\n"
        "expected = np.load(sys.argv[1] + '/expected.npy')\n"
        "assert c.tokens == len(expected)\n"
        "for _ in range(2):\n"
        "    np.testing.assert_array_equal(c.read(0, c.tokens), expected)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_word_starts_wordpiece(tokenizer):
    starts = C.word_starts(tokenizer)
    assert starts.shape == (len(VOCAB),) and starts.dtype == bool
    assert starts.tolist() == [not token.startswith("##") for token in VOCAB]

def test_word_starts_byte_level_bpe():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ġthe": 4, "the": 5, "Ġfilm": 6, "s": 7,
             "Ġ": 8, "<mask>": 9}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    starts = C.word_starts(tokenizer)
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if starts[i]] == [
        "<s>", "<pad>", "</s>", "<unk>", "Ġthe", "Ġfilm", "Ġ", "<mask>"]


# ----------------------------------------------------------------------------- errors

def test_missing_empty_and_blank_sources(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"nope\.txt: corpus file not found"):
        R.check_sources(R.sources([str(tmp_path / "nope.txt")]))
    empty = write_text(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match=r"empty\.txt: the corpus file is empty"):
        R.check_sources(R.sources([empty]))
    empty_gz = write_text(tmp_path / "empty.txt.gz", "")
    with pytest.raises(DataError, match=r"empty\.txt\.gz: the corpus file is empty"):
        R.check_sources(R.sources([empty_gz]))
    blank = write_text(tmp_path / "blank.txt", "\n  \n\n")
    with pytest.raises(DataError, match=r"empty corpus: no document in .*blank\.txt"):
        C.tokenize(R.sources([blank]), tokenizer, tmp_path / "out", workers=1, progress=False)

@pytest.mark.parametrize("name", ["bad.txt", "bad.txt.gz"])
def test_non_utf8_names_file_and_byte_offset(tmp_path, tokenizer, name):
    good = "fine line\nanother é line\n"
    offset = len(good.encode("utf-8")) + len(b"ok ")
    data = good.encode("utf-8") + b"ok \xff\xfe here\nlast line\n"
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    srcs = R.sources([str(path)])
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 at byte offset {offset};"):
        R.check_sources(srcs)
    with pytest.raises(DataError, match=rf"{name} line 3: not UTF-8 at byte offset {offset};"):
        read_all(srcs[0])
    R.check_sources(srcs, skip_invalid=True)
    counts = collections.Counter()
    assert list(R.documents(srcs[0], True, counts)) == ["fine line", "another é line", "last line"]
    assert counts == {"not utf-8": 1}
    corpus = C.tokenize(srcs, tokenizer, tmp_path / "out", workers=1, skip_invalid=True,
                        progress=False)
    assert corpus.manifest["skipped"] == {"not utf-8": 1} and corpus.documents == 3

def test_check_accepts_a_character_cut_at_the_head_end(tmp_path):
    text = "a" * ((1 << 20) - 1) + "é tail\n"  # é's two bytes straddle the first MiB
    R.check_sources(R.sources([write_text(tmp_path / "cut.txt", text)]))

def test_jsonl_missing_column_names_the_columns(tmp_path):
    path = write_text(tmp_path / "x.jsonl", '\n{"txt": "hello", "id": 1}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2: no field 'text' \(did you mean 'txt'\?\); "
                                         r"its fields: \['txt', 'id'\]"):
        R.check_sources(R.sources([path]))
    later = write_text(tmp_path / "y.jsonl", '{"text": "hello"}\n{"txt": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"y\.jsonl line 2: no text in field 'text'"):
        read_all(R.sources([later])[0])
    counts = collections.Counter()
    assert list(R.documents(R.sources([later])[0], True, counts)) == ["hello"]
    assert counts == {"no text in 'text'": 1, "not json": 1}

def test_parquet_missing_column_names_the_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"texts": ["a"], "n": [1]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(did you mean 'texts'\?\); "
                                         r"its columns: \['texts', 'n'\]"):
        R.check_sources(R.sources([str(tmp_path / "p.parquet")]))
    with pytest.raises(DataError, match="holds int64, not text"):
        R.check_sources(R.sources([str(tmp_path / "p.parquet")], text_column="n"))
