"""`python -m jaxkd.predict`, `python -m jaxkd.evaluate` and the `jaxkd` command on tiny random
exported models, against PyTorch transformers running the same directories (the library under
them, `jaxkd.exported`: tests/test_exported.py)."""
import importlib.util
import io
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import tiny_model_config, write_squad  # noqa: E402
from jaxkd import cli, evaluate, exported, predict, tasks  # noqa: E402
from jaxkd.data import DataConfig  # noqa: E402
from jaxkd.hf import save_hf  # noqa: E402
from jaxkd.model import init_params  # noqa: E402

MAX_LEN = 32
QA_LEN, QA_STRIDE = 64, 16  # the windows of the QA model exported with a run's settings
ENCODER = dict(vocab_size=30522, num_heads=4)  # tiny_model_config's encoder, the MiniLM's vocabulary
SEQ_LABELS = ["neg", "neu", "pos"]
NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]  # not the preset order
TEXTS = ["a gripping , funny film .", "dull and far too long", "The cast is great but the plot?",
         "it 's a \"mess\" of a movie , frankly", "Wonderful!",
         " ".join(["a very long review that keeps going"] * 12)]  # truncated at MAX_LEN
PAIRS = ["is it good ?", "yes", "no it is not", "maybe", "sure", "who knows"]
SENTENCES = [["John", "Smith", "lives", "in", "Paris", "."], ["EU", "rejects", "German", "call"],
             ["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22"],
             ["The", "European", "Commission", "said", "on", "Thursday", "it", "disagreed"]]


def _noisy(params, seed, scale=0.3):
    """Random values on every leaf: logits spread out, so argmax never meets a near tie."""
    rng = np.random.default_rng(seed)  # NumPy: jax.random would compile once per leaf shape
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
                        params)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_dir):
    """Exported classifier, regression and NER models (one init_params: it compiles slowly)."""
    root = tmp_path_factory.mktemp("models")
    seq_cfg = tiny_model_config("sequence", len(SEQ_LABELS), **ENCODER)
    hidden = seq_cfg.encoder.hidden_size
    base = init_params(seq_cfg, jax.random.key(0))
    classifier = base["head"]["classifier"]
    heads = {
        "seq": (seq_cfg, base["head"], SEQ_LABELS),  # seed 6: all three labels predicted
        "reg": (seq_cfg.replace(num_labels=1),
                {"pooler": base["head"]["pooler"], "classifier": {
                    "kernel": classifier["kernel"][:, :1], "bias": classifier["bias"][:1]}}, None),
        "ner": (seq_cfg.replace(kind="token", num_labels=len(NER_LABELS)),
                {"classifier": {"kernel": np.zeros((hidden, len(NER_LABELS)), np.float32),
                                "bias": np.zeros(len(NER_LABELS), np.float32)}}, NER_LABELS),
        "qa": (seq_cfg.replace(kind="span", num_labels=2),
               {"qa_outputs": {"kernel": classifier["kernel"][:, :2], "bias": classifier["bias"][:2]}},
               None),
    }
    out, saved = {}, {}
    for seed, (name, (cfg, head, labels)) in enumerate(heads.items(), start=6):
        params = _noisy({"encoder": base["encoder"], "head": head}, seed)
        saved[name] = (cfg, params, labels)
        out[name] = save_hf(cfg, params, root / name, tokenizer=minilm_dir, id2label=labels)
    # The same weights exported with the settings of a run (as the trainer writes them).
    runs = {"seq_run": ("seq", tasks.task_config(name="custom", text="review", labels=SEQ_LABELS),
                        DataConfig(max_seq_len=MAX_LEN)),
            "qa_run": ("qa", tasks.task_config(name="squad"),
                       DataConfig(max_seq_len=QA_LEN, doc_stride=QA_STRIDE))}
    for name, (like, task_cfg, data_cfg) in runs.items():
        cfg, params, labels = saved[like]
        settings = exported.export_settings(tasks.resolve(task_cfg, data_cfg), data_cfg)
        out[name] = save_hf(cfg, params, root / name, tokenizer=minilm_dir, id2label=labels,
                            settings=settings)
    return out


def _torch_sequence(model_dir, texts, pairs=None):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = tok(texts, pairs, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def _torch_tags(model_dir, sentences):
    """Tag names at each word's first sub-token."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    names = model.config.id2label
    tags = []
    for words in sentences:
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=MAX_LEN,
                  return_tensors="pt")
        with torch.no_grad():
            pred = model(**enc).logits[0].argmax(-1).numpy()
        first = {}
        for position, word in enumerate(enc.word_ids(0)):
            if word is not None:
                first.setdefault(word, position)
        tags.append([names[int(pred[first[w]])] for w in range(len(words))])
    return tags


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _run(capsys, module, argv):
    code = module.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lines(out):
    return [json.loads(line) for line in out.splitlines()]


def _write_tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    return path


# ----------------------------------------------------------------------------- predict


def test_sequence_predictions_match_pytorch(models, tmp_path, capsys):
    data = _write_tsv(tmp_path / "in.tsv", ["sentence"], [[t] for t in TEXTS])  # no label column
    code, out, err = _run(capsys, predict, [models["seq"], data, "--max-seq-len", MAX_LEN,
                                            "--batch-size", 4])
    assert code == 0, err
    rows = _lines(out)
    probs = _softmax(_torch_sequence(models["seq"], TEXTS))
    assert [r["label"] for r in rows] == [SEQ_LABELS[i] for i in probs.argmax(-1)]
    np.testing.assert_allclose([r["probs"] for r in rows], probs, atol=1e-4)
    assert len(set(r["label"] for r in rows)) > 1  # the check is not vacuous
    assert "predict" in err  # the progress bar and summary go to stderr, stdout is pure JSON


def test_pair_predictions_from_jsonl_to_output_file(models, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"q": t, "a": p, "label": "neu"}) + "\n"
                            for t, p in zip(TEXTS, PAIRS)))
    out_file = tmp_path / "preds.jsonl"
    code, out, err = _run(capsys, predict, [models["seq"], data, "--text", "q", "--text-pair", "a",
                                            "--max-seq-len", MAX_LEN, "-o", out_file, "-q"])
    assert code == 0, err
    assert out == "" and err == ""
    rows = _lines(out_file.read_text())
    probs = _softmax(_torch_sequence(models["seq"], TEXTS, PAIRS))
    np.testing.assert_allclose([r["probs"] for r in rows], probs, atol=1e-4)


def test_regression_scores_match_pytorch(models, tmp_path, capsys):
    data = tmp_path / "in.csv"
    data.write_text("id,sentence\n" + "".join(f'{i},"{t.replace(chr(34), 2 * chr(34))}"\n'
                                              for i, t in enumerate(TEXTS)))
    code, out, err = _run(capsys, predict, [models["reg"], data, "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    np.testing.assert_allclose([r["score"] for r in _lines(out)],
                               _torch_sequence(models["reg"], TEXTS)[:, 0], atol=1e-4)


def test_token_predictions_match_pytorch(models, tmp_path, capsys):
    expected = _torch_tags(models["ner"], SENTENCES)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"words": w}) + "\n" for w in SENTENCES))
    words_only = tmp_path / "words.conll"  # CoNLL columns without tags
    words_only.write_text("\n\n".join("\n".join(w) for w in SENTENCES) + "\n")
    tagged = tmp_path / "tagged.txt"  # CoNLL with POS and (any valid) tags
    tagged.write_text("\n\n".join("\n".join(f"{w} NN O" for w in s) for s in SENTENCES) + "\n")
    for source, extra in ((rows_file, ["--tokens", "words"]), (words_only, []), (tagged, [])):
        code, out, err = _run(capsys, predict, [models["ner"], source, "--max-seq-len", MAX_LEN,
                                                "-q", *extra])
        assert code == 0, (source, err)
        rows = _lines(out)
        assert [r["tokens"] for r in rows] == SENTENCES
        assert [r["tags"] for r in rows] == expected, source
    assert any(r["entities"] for r in rows)
    for row in rows:
        for ent in row["entities"]:
            assert ent["text"] == " ".join(row["tokens"][ent["start"]:ent["end"]])
            assert row["tags"][ent["start"]][2:] == ent["type"]


def test_stdin(models, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS[:3]) + "\n\n"))
    code, out, err = _run(capsys, predict, [models["seq"], "-", "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    probs = _softmax(_torch_sequence(models["seq"], TEXTS[:3]))
    np.testing.assert_allclose([r["probs"] for r in _lines(out)], probs, atol=1e-4)

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(" ".join(s) + "\n" for s in SENTENCES)))
    code, out, err = _run(capsys, predict, [models["ner"], "-", "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    assert [r["tags"] for r in _lines(out)] == _torch_tags(models["ner"], SENTENCES)


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def labelled(models, tmp_path_factory):
    """A TSV whose gold labels agree with PyTorch's predictions on 4 rows of 6, and that
    accuracy as computed from the PyTorch predictions."""
    pred = _torch_sequence(models["seq"], TEXTS).argmax(-1)
    gold = [p if i % 3 else (p + 1) % 3 for i, p in enumerate(pred)]
    path = _write_tsv(tmp_path_factory.mktemp("eval") / "dev.tsv", ["sentence", "label"],
                      [[t, SEQ_LABELS[g]] for t, g in zip(TEXTS, gold)])
    return path, float(np.mean(pred == np.asarray(gold)))


def _scores(out):
    return {k: float(v) for k, v in (line.split("=") for line in out.splitlines())}


def test_evaluate_accuracy_matches_pytorch(models, labelled, tmp_path, capsys):
    data, accuracy = labelled
    assert 0 < accuracy < 1
    base = [models["seq"], "--max-seq-len", MAX_LEN, "-q"]
    code, out, err = _run(capsys, evaluate, [*base, "--task", "custom", "--text", "sentence",
                                             "--data", data])
    assert code == 0, err
    assert out.splitlines()[0].startswith("accuracy=")
    assert _scores(out)["accuracy"] == pytest.approx(accuracy, abs=1e-6)

    # Another label order in the task: the outputs are reordered, the score is the same.
    code, out, err = _run(capsys, evaluate, [*base, "--task", "custom", "--text", "sentence",
                                             "--labels", "pos,neg,neu", "--data", data])
    assert code == 0, err
    assert _scores(out)["accuracy"] == pytest.approx(accuracy, abs=1e-6)

    # The same from a training config's task section and test split.
    config = tmp_path / "run.yaml"
    config.write_text(f"task:\n  name: custom\n  text: sentence\n  labels: [neu, pos, neg]\n"
                      f"data:\n  test: {data}\n  max_seq_len: {MAX_LEN}\n")
    code, out, err = _run(capsys, evaluate, [models["seq"], "--config", config, "-q"])
    assert code == 0, err
    assert _scores(out)["accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_evaluate_refuses_other_label_names(models, labelled, capsys):
    data, _ = labelled
    code, out, err = _run(capsys, evaluate, [models["seq"], "--task", "sst2", "--text", "sentence",
                                             "--data", data, "-q"])
    assert code == 2 and out == ""
    assert "['neg', 'neu', 'pos']" in err and "['negative', 'positive']" in err


def test_evaluate_token_model(models, tmp_path, capsys):
    """Gold tags equal to PyTorch's predictions: every token and entity is right."""
    gold = _torch_tags(models["ner"], SENTENCES)
    data = tmp_path / "gold.conll"
    data.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(s, g))
                                for s, g in zip(SENTENCES, gold)) + "\n")
    code, out, err = _run(capsys, evaluate, [models["ner"], "--task", "conll2003", "--data", data,
                                             "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    scores = _scores(out)
    assert list(scores)[:4] == ["f1", "precision", "recall", "accuracy"]
    assert scores["accuracy"] == 1.0 and scores["f1"] == 1.0


# ----------------------------------------------------------------------------- errors


def test_usage_errors_exit_2_before_loading_weights(models, labelled, tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr("jaxkd.hf.load_hf", no_weights)
    data, _ = labelled
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((models["seq"] / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    cases = [
        ([tmp_path / "nope", data], "model directory not found"),
        ([data, data], "is a file"),
        ([tmp_path, data], "no config.json"),
        ([bare, data], "not a model of a task jaxkd knows"),
        ([models["seq"], data, "--text", "review"], "no column 'review'"),
        ([models["seq"], tmp_path / "missing.tsv"], "input file not found"),
        ([models["seq"], data, "--max-seq-len", 512], "max_position_embeddings"),
        ([models["ner"], data, "--text", "sentence"], "--text is for sentence classifiers"),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, predict, [*argv, "-q"])
        assert code == 2 and out == "", (argv, err)
        assert message in err and err.startswith("error: "), (message, err)
    code, _, err = _run(capsys, evaluate, [models["seq"], "--task", "custom", "--text", "body",
                                           "--data", data])
    assert code == 2 and "no column 'body'" in err
    code, _, err = _run(capsys, evaluate, [models["ner"], "--task", "sst2", "--data", data])
    assert code == 2 and "BertForTokenClassification" in err
    code, _, err = _run(capsys, evaluate, [models["seq"], "--data", data])
    assert code == 2 and "--config" in err


# ----------------------------------------------------------------------------- jaxkd command


def test_cli_dispatch(models, labelled, capsys):
    data, accuracy = labelled
    code, out, err = _run(capsys, cli, ["evaluate", models["seq"], "--task", "custom", "--text",
                                        "sentence", "--data", data, "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    assert _scores(out)["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    for command in ("train", "predict", "evaluate", "export", "bench"):
        code, out, _ = _run(capsys, cli, [command, "--help"])
        assert code == 0 and "usage:" in out, command
    code, _, err = _run(capsys, cli, ["predcit"])
    assert code == 2 and "did you mean 'predict'" in err
    code, out, _ = _run(capsys, cli, ["--help"])
    assert code == 0 and all(c in out for c in cli.COMMANDS)


def _official_f1():
    """The official SQuAD v1.1 F1, as scripts/check_qa_export.py writes it out (not jaxkd's)."""
    spec = importlib.util.spec_from_file_location(
        "check_qa_export", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_qa_export.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check.f1


def test_qa_predictions_and_evaluate_agree_with_the_official_metric(models, tmp_path, capsys):
    """predict's answers, scored here by the official v1.1 definitions, give evaluate's F1."""
    _f1 = _official_f1()
    path = write_squad(tmp_path / "dev.json", np.random.default_rng(1), 3)
    code, out, err = _run(capsys, predict, [models["qa"], path, "--max-seq-len", 64, "--quiet"])
    assert code == 0, err
    predicted = {row["id"]: row["answer"] for row in _lines(out)}
    data = json.loads(path.read_text())["data"][0]["paragraphs"]
    golds = {qa["id"]: ([a["text"] for a in qa["answers"]], p["context"]) for p in data for qa in p["qas"]}
    assert set(predicted) == set(golds)
    assert all(answer in golds[qid][1] for qid, answer in predicted.items())  # spans of the context
    f1 = np.mean([max(_f1(predicted[q], g) for g in golds[q][0]) for q in golds])
    code, out, err = _run(capsys, evaluate, [models["qa"], "--task", "squad", "--type",
                                             "question_answering", "--data", path,
                                             "--max-seq-len", 64, "--quiet"])
    assert code == 0, err
    assert _scores(out)["f1"] == pytest.approx(f1, abs=1e-6)  # printed with 6 decimals


# ----------------------------------------------------------------------------- line numbers


def test_stdin_lines_count_blank_lines(models, monkeypatch, capsys):
    """`line` is the physical stdin line; a blank one gives no output but is counted."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"\n{TEXTS[0]}\n\n  \n{TEXTS[1]}\n{TEXTS[2]}\n\n"))
    code, out, err = _run(capsys, predict, [models["seq"], "-", "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    rows = _lines(out)
    assert [r["line"] for r in rows] == [2, 5, 6]
    assert list(rows[0]) == ["line", "label", "probs"]  # `line` leads, the rest as before
    np.testing.assert_allclose([r["probs"] for r in rows],
                               _softmax(_torch_sequence(models["seq"], TEXTS[:3])), atol=1e-4)

    # A line ends at "\n" (CRLF too) alone: a form feed or U+2028 inside a text does not cut it.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TEXTS[0]}\x0c{TEXTS[1]}\r\n{TEXTS[2]}\u2028x\n"))
    code, out, err = _run(capsys, predict, [models["seq"], "-", "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    assert [r["line"] for r in _lines(out)] == [1, 2]

    monkeypatch.setattr(sys, "stdin", io.StringIO("who?\n\nwhere does anna live?\tanna lives in rome .\n"))
    code, out, err = _run(capsys, predict, [models["qa"], "-", "--max-seq-len", 64, "-q"])
    assert code == 2 and "<stdin> line 1: expected question<TAB>context" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nwhere does anna live?\tanna lives in rome .\n"))
    code, out, err = _run(capsys, predict, [models["qa"], "-", "--max-seq-len", 64, "-q"])
    assert code == 0, err
    assert [(r["line"], r["id"]) for r in _lines(out)] == [(2, "2")]


def test_file_lines_number_the_rows(models, tmp_path, capsys):
    """In a file `line` is the row's number: a tsv data row (header not counted), a CoNLL
    sentence, a SQuAD question."""
    data = _write_tsv(tmp_path / "in.tsv", ["sentence"], [[t] for t in TEXTS])
    code, out, err = _run(capsys, predict, [models["seq"], data, "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    assert [r["line"] for r in _lines(out)] == list(range(1, len(TEXTS) + 1))

    conll = tmp_path / "words.conll"
    conll.write_text("-DOCSTART- O\n\n" + "\n\n".join("\n".join(w) for w in SENTENCES) + "\n\n\n")
    code, out, err = _run(capsys, predict, [models["ner"], conll, "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0, err
    rows = _lines(out)
    assert [r["line"] for r in rows] == list(range(1, len(SENTENCES) + 1))
    assert [r["tokens"] for r in rows] == SENTENCES

    squad = write_squad(tmp_path / "dev.json", np.random.default_rng(2), 2)
    code, out, err = _run(capsys, predict, [models["qa"], squad, "--max-seq-len", 64, "-q"])
    assert code == 0, err
    ids = [qa["id"] for p in json.loads(squad.read_text())["data"][0]["paragraphs"] for qa in p["qas"]]
    assert [(r["line"], r["id"]) for r in _lines(out)] == list(enumerate(ids, start=1))


# ----------------------------------------------------------------------------- settings of the run


def test_predict_defaults_from_the_exported_run(models, tmp_path, capsys):
    """A model exported with its run's settings needs no --text or --max-seq-len; flags win."""
    data = _write_tsv(tmp_path / "in.tsv", ["id", "review"], [[str(i), t] for i, t in enumerate(TEXTS)])
    code, out, err = _run(capsys, predict, [models["seq_run"], data])
    assert code == 0, err
    probs = _softmax(_torch_sequence(models["seq"], TEXTS))  # truncated at the run's MAX_LEN
    np.testing.assert_allclose([r["probs"] for r in _lines(out)], probs, atol=1e-4)
    assert f"max_seq_len {MAX_LEN} (the model's max_seq_len), text review (the model's)" in err

    code, out, err = _run(capsys, predict, [models["seq_run"], data, "--text", "id",
                                            "--max-seq-len", 16])
    assert code == 0, err
    assert "max_seq_len 16 (--max-seq-len)" in err and "text review" not in err
    code, out, err = _run(capsys, predict, [models["seq_run"], data, "-q"])
    assert code == 0 and err == ""


def test_qa_windows_default_to_the_exported_run(models, tmp_path, capsys):
    """Without --max-seq-len a QA model scores with its run's windows, and stderr says which;
    the same as giving them, not the 128-token default."""
    path = write_squad(tmp_path / "dev.json", np.random.default_rng(3), 4)
    base = [models["qa_run"], "--task", "squad", "--data", path]
    code, out, err = _run(capsys, evaluate, base)
    assert code == 0, err
    assert (f"windows of {QA_LEN} tokens (the model's max_seq_len), "
            f"stride {QA_STRIDE} (the model's doc_stride)") in err
    from_model = _scores(out)
    code, out, err = _run(capsys, evaluate, [*base, "--max-seq-len", QA_LEN, "--doc-stride",
                                             QA_STRIDE, "-q"])
    assert code == 0, err
    assert _scores(out) == from_model
    # The same weights without settings: the built-in 128-token windows (more than the tiny
    # model's 64 positions hold).
    code, out, err = _run(capsys, evaluate, [models["qa"], "--task", "squad", "--data", path])
    assert code == 2, err
    assert "windows of 128 tokens (default max_seq_len), stride 32 (default doc_stride)" in err
    assert "128 exceeds the 64 positions" in err
    # Another length: the model's stride belongs to its length, so the default for 48.
    code, out, err = _run(capsys, evaluate, [*base, "--max-seq-len", 48])
    assert code == 0, err
    assert "windows of 48 tokens (--max-seq-len), stride 12 (default doc_stride)" in err
    assert f"the model was exported with max_seq_len {QA_LEN}" in err

    code, out, err = _run(capsys, predict, [models["qa_run"], path])
    assert code == 0, err
    assert f"windows of {QA_LEN} tokens (the model's max_seq_len)" in err
    code, out2, err = _run(capsys, predict, [models["qa_run"], path, "--max-seq-len", QA_LEN,
                                             "--doc-stride", QA_STRIDE, "-q"])
    assert out2 == out


# ----------------------------------------------------------------------------- help and messages


def test_help_documents_question_answering(capsys):
    for module in (predict, evaluate):
        code, out, _ = _run(capsys, module, ["--help"])
        assert code == 0
        text = " ".join(out.split())
        assert "question answering" in text and "--doc-stride" in text, module.__name__
        assert "SQuAD" in text and "the model's" in text


def test_unknown_suffix_names_the_flag(models, labelled, tmp_path, capsys):
    data, _ = labelled
    odd = tmp_path / "dev.data"
    odd.write_text(data.read_text())
    for module, argv in ((predict, [models["seq"], odd]),
                         (evaluate, [models["seq"], "--task", "custom", "--text", "sentence",
                                     "--data", odd])):
        code, out, err = _run(capsys, module, [*argv, "-q"])
        assert code == 2 and out == "", err
        assert "unknown file type '.data'" in err and "pass --format" in err, err
        assert "data.format" not in err
    config = tmp_path / "run.yaml"
    config.write_text(f"task:\n  name: custom\n  text: sentence\ndata:\n  test: {odd}\n")
    code, out, err = _run(capsys, evaluate, [models["seq"], "--config", config, "-q"])
    assert code == 2 and "set data.format" in err, err
    code, out, err = _run(capsys, predict, [models["seq"], odd, "--format", "tsv",
                                            "--max-seq-len", MAX_LEN, "-q"])
    assert code == 0 and len(_lines(out)) == len(TEXTS), err


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name, data", [("seq", None), ("ner", None)])
def test_onnx_export_then_predict_equals_the_directory(models, tmp_path, capsys, name, data):
    """`jaxkd export --onnx --int8 --output DIR`, then `jaxkd predict DIR/model.onnx` gives the
    directory's predictions (fp32 within 1e-4); the int8 model runs and stays close."""
    pytest.importorskip("onnxruntime")
    if name == "seq":
        source = _write_tsv(tmp_path / "in.tsv", ["sentence"], [[t] for t in TEXTS])
    else:
        source = tmp_path / "in.jsonl"
        source.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in SENTENCES))
    out_dir = tmp_path / "deploy"
    code, out, err = _run(capsys, cli, ["export", models[name], "--onnx", "--int8", "--output", out_dir])
    assert code == 0, err
    assert (out_dir / "model.onnx").is_file() and (out_dir / "model.int8.onnx").is_file()
    assert not (out_dir / "model.safetensors").exists()  # the ONNX file holds the weights
    base = ["--max-seq-len", MAX_LEN, "-q"]
    if name == "seq":  # .npy: the raw output rows
        arrays = {}
        for label, model in (("jax", models[name]), ("onnx", out_dir / "model.onnx"),
                             ("int8", out_dir / "model.int8.onnx")):
            target = tmp_path / f"{label}.npy"
            code, _, err = _run(capsys, predict, [model, source, "--output", target, *base])
            assert code == 0, err
            arrays[label] = np.load(target)
        np.testing.assert_allclose(arrays["onnx"], arrays["jax"], atol=1e-4)
        assert np.abs(arrays["int8"] - arrays["jax"]).max() < 0.1 * np.abs(arrays["jax"]).max()
    else:  # token classification: the JSON lines, tags and entities, are the same
        code, jax_out, err = _run(capsys, predict, [models[name], source, *base])
        assert code == 0, err
        code, onnx_out, err = _run(capsys, predict, [out_dir / "model.onnx", source, *base])
        assert code == 0, err
        assert _lines(onnx_out) == _lines(jax_out)


def test_onnx_usage_errors(models, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    code, _, err = _run(capsys, cli, ["export", models["seq"]])
    assert code == 2 and "pass --onnx" in err
    code, _, err = _run(capsys, predict, [tmp_path / "missing.onnx", "-"])
    assert code == 2 and "ONNX file not found" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in pathlib.Path(models["seq"]).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.onnx").write_bytes(b"not a model")
    source = _write_tsv(tmp_path / "in.tsv", ["sentence"], [["fine"]])
    code, _, err = _run(capsys, predict, [bad / "model.onnx", source, "-q", "--max-seq-len", MAX_LEN])
    assert code == 2 and "not an ONNX model ONNX Runtime can run" in err
    code, _, err = _run(capsys, predict, [bad / "model.onnx", source, "-q", "--max-seq-len", MAX_LEN,
                                          "--dtype", "bfloat16"])
    assert code == 2 and "runs as it was exported" in err
