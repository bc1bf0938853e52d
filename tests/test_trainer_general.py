"""General distillation through train.py's pipeline on tiny models: a corpus of raw text, a
masked-LM teacher (and one without a head), the export loaded by transformers, the two-stage
recipe (a task student from the general student), refusals before any work, kill -9 resume."""
import json

import jax
import numpy as np
import pytest

import helpers
from jaxkd import hf, model
from jaxkd.config import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mlm_teacher(tmp_path_factory, minilm_dir):
    """helpers.TINY_TEACHER's encoder with a masked-LM head, as a BertForMaskedLM directory."""
    out = tmp_path_factory.mktemp("mlm_teacher")
    cfg = helpers.TINY_TEACHER.replace(kind="masked_lm", num_labels=1)
    hf.save_hf(cfg, model.init_params(cfg, jax.random.key(0)), out, tokenizer=minilm_dir)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SST-2 sentences (shipped in data/) as raw text, one document a line: train and eval."""
    out = tmp_path_factory.mktemp("corpus")
    lines = [row.split("\t")[0] for row in (helpers.ROOT / "data" / "sst2" / "glue_dev.tsv")
             .read_text(encoding="utf-8").splitlines()[1:]]
    (out / "train.txt").write_text("\n".join(lines[:600]) + "\n", encoding="utf-8")
    (out / "eval.txt").write_text("\n".join(lines[600:760]) + "\n", encoding="utf-8")
    return out


def general_config(workdir, teacher, corpus, **over) -> dict:
    cfg = {
        "workdir": str(workdir), "seed": 1,
        "task": {"type": "general", "mlm_weight": 1.0, "kd_weight": 1.0},
        "data": {"train": str(corpus / "train.txt"), "eval": str(corpus / "eval.txt"),
                 "batch_size": 8, "max_seq_len": 32},
        "teacher": {"model": str(teacher)},
        "student": {"layers": [1, 3]},
        **helpers.tiny_run_sections(),
    }
    cfg["distill"] = {"steps": 12, "eval_every": 6, "relation_weight": 1.0, "relation_heads": 4}
    return helpers.with_overrides(cfg, over)


@pytest.mark.slow
def test_general_run_reports_and_exports_a_masked_lm(tmp_path, mlm_teacher, corpus,
                                                       tiny_teacher, sst2_small):
    report = helpers.run_in_process(general_config(tmp_path / "run", mlm_teacher, corpus))
    assert report["task_type"] == "general" and report["teacher_has_masked_lm_head"]
    student, teacher = report["student"]["splits"]["eval"], report["teacher"]["splits"]["eval"]
    assert 0 <= student["mlm_accuracy"] <= 1 and student["perplexity"] > 1
    assert teacher["perplexity"] > 1
    assert set(report["heldout"]["eval"]) == {"loss/mlm", "loss/kd", "loss/relation", "loss/total"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["heldout_score"] == -r["loss/total"] for r in evals)

    # The export is a BertForMaskedLM whose logits are jaxkd's.
    out = tmp_path / "run" / "student"
    torch_model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    cfg, params = hf.load_hf(out)
    assert cfg.head.kind == "masked_lm" and cfg.encoder.num_layers == 2
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(model.apply_model(cfg, params, ids, np.ones_like(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-4)

    # The two-stage recipe: the general student initialises a task student.
    task_report = helpers.run_in_process(helpers.tiny_config(
        tmp_path / "sst2", tiny_teacher, sst2_small,
        **{"student": {"init": "pretrained", "pretrained": str(out)}, "distill.steps": 4,
           "distill.eval_every": 4}))
    assert task_report["student"]["layers"] == 2 and task_report["student"]["init"] == "pretrained"


def test_headless_teacher_with_masked_lm_kd_is_refused_before_any_work(tmp_path, tiny_teacher,
                                                                       corpus):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="no masked-LM head.*task.kd_weight.*relation_weight"):
        helpers.run_in_process(general_config(workdir, tiny_teacher, corpus))
    assert not (workdir / "cache").exists() and not (workdir / "stages.json").exists()


def test_a_teacher_or_student_with_an_untied_decoder_is_refused_before_any_work(
        tmp_path, mlm_teacher, corpus):
    """The masked-LM head ties its decoder to the word embeddings: a checkpoint whose config
    says its decoder is a matrix of its own is refused by the plan, as teacher or as pretrained
    student, before the corpus is tokenized."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    untied = tmp_path / "untied"
    shutil.copytree(mlm_teacher, untied)
    tensors = load_file(untied / "model.safetensors")  # a decoder of its own, as transformers saves
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"] + 1
    save_file(tensors, untied / "model.safetensors")
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    for teacher, over in ((untied, {}), (mlm_teacher, {"student.init": "pretrained",
                                                       "student.pretrained": str(untied)})):
        workdir = tmp_path / f"run-{len(over)}"
        with pytest.raises(ConfigError, match="tie_word_embeddings false.*ties its decoder"):
            helpers.run_in_process(general_config(workdir, teacher, corpus, **over))
        assert not (workdir / "cache").exists() and not (workdir / "stages.json").exists()


@pytest.mark.slow
def test_headless_teacher_teaches_relations_and_exports_the_bare_encoder(tmp_path, tiny_teacher,
                                                                         corpus):
    report = helpers.run_in_process(general_config(
        tmp_path / "run", tiny_teacher, corpus, **{"task.mlm_weight": 0.0, "task.kd_weight": 0.0}))
    assert report["teacher_has_masked_lm_head"] is False
    assert report["student"]["splits"]["eval"] == report["teacher"]["splits"]["eval"] == {}
    assert set(report["heldout"]["eval"]) == {"loss/relation", "loss/total"}
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    bare = transformers.AutoModel.from_pretrained(tmp_path / "run" / "student")
    assert bare.config.num_hidden_layers == 2


@pytest.mark.parametrize("over, match", [
    ({"task.mlm_weight": 0.0, "task.kd_weight": 0.0, "distill.relation_weight": 0.0},
     "no objective"),
    ({"data.max_seq_len": 4096}, "max_seq_len=4096 exceeds"),
    ({"teacher.finetune.steps": 3}, "no labels to fine-tune"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, mlm_teacher, corpus, over, match):
    workdir = tmp_path / "run"
    with pytest.raises((ConfigError, ValueError), match=match):
        helpers.run_in_process(general_config(workdir, mlm_teacher, corpus, **over))
    assert not (workdir / "cache").exists()


@pytest.mark.slow
def test_eval_fraction_holds_out_the_last_packed_rows(tmp_path, mlm_teacher, corpus):
    """data.eval_fraction on a corpus: training keeps the first rows of the packing, the
    held-out split is the rest, row for row (the same text, one contiguous stretch)."""
    from jaxkd import config as config_lib
    from jaxkd import plan as plan_lib

    def prepared(**over):
        cfg = general_config(tmp_path / "run", mlm_teacher, corpus, **over)
        return plan_lib.prepare(config_lib.from_dict(cfg))

    whole = prepared(**{"data.eval": None}).splits["train"].encoded.rows
    plan = prepared(**{"data.eval": None, "data.eval_fraction": 0.1})
    splits = plan.splits
    kept, held = splits["train"].encoded.rows, splits["eval"].encoded.rows
    assert len(held) == round(0.1 * len(whole)) and len(kept) + len(held) == len(whole)
    np.testing.assert_array_equal(kept.rows(range(len(kept))), whole.rows(range(len(kept))))
    np.testing.assert_array_equal(held.rows(range(len(held))),
                                  whole.rows(range(len(kept), len(whole))))
    assert "the last 0.1 of its packed rows held out" in splits["eval"].source
    lines = len((corpus / "train.txt").read_text(encoding="utf-8").splitlines())
    for name, part in (("train", kept), ("eval", held)):  # the documents are the whole file's
        assert plan.data_stats[name]["corpus_documents"] == lines
        assert plan.data_stats[name]["tokens"] == len(part) * (part.seq_len - 2)
    with pytest.raises(IndexError):
        kept.rows([len(kept)])


@pytest.mark.slow
def test_a_hub_split_trains_as_its_text_file_would(tmp_path, mlm_teacher, corpus):
    """data.train as hub:<dataset>:<split> (a local dataset directory, opened as a Hub name is):
    the same packed rows as the text file holding the same documents."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from jaxkd import config as config_lib
    from jaxkd import plan as plan_lib

    lines = (corpus / "train.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "hubset" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": line} for line in lines]),
                   tmp_path / "hubset" / "data" / "train-00000-of-00001.parquet")

    def rows(train):
        cfg = general_config(tmp_path / "run", mlm_teacher, corpus, **{"data.train": train})
        packed = plan_lib.prepare(config_lib.from_dict(cfg)).splits["train"].encoded.rows
        return packed.rows(range(len(packed)))

    np.testing.assert_array_equal(rows(f"hub:{tmp_path / 'hubset'}:train"),
                                  rows(str(corpus / "train.txt")))


def test_check_describes_a_tokenized_corpus_and_names_one_that_is_not(tmp_path, mlm_teacher,
                                                                     corpus, capsys):
    """train.py --check writes nothing: before the corpus is tokenized it says so (exit 2);
    once a run has tokenized it, it reads the shards and prints the whole plan."""
    import yaml

    from jaxkd import config as config_lib
    from jaxkd import launch
    from jaxkd import plan as plan_lib

    cfg = general_config(tmp_path / "run", mlm_teacher, corpus,
                         **{"data.cache_dir": str(tmp_path / "cache")})
    path = tmp_path / "general.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert launch.main(["--config", str(path), "--check"]) == 2
    assert "train.txt is not tokenized yet" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()

    prepared = plan_lib.prepare(config_lib.from_dict(cfg))  # what a run does first: tokenize
    written = sorted(p for p in (tmp_path / "cache").rglob("*"))
    assert launch.main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "stage distill: 12 steps" in out
    rows = len(prepared.splits["train"].encoded)
    assert f"train.txt: 1 text file, {rows} packed rows of {cfg['data']['max_seq_len']} tokens" in out
    # report.json's counts: documents are the file's lines, the text tokens those the tokenizer
    # gives them with a [SEP] after each, cut to whole rows of max_seq_len - 2.
    lines = (corpus / "train.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(mlm_teacher))
    stream = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines)
    window = cfg["data"]["max_seq_len"] - 2
    assert prepared.data_stats["train"] == {
        "source": str(corpus / "train.txt"), "files": 1, "documents": len(lines),
        "rows": stream // window, "tokens": stream // window * window, "skipped": {}}
    assert sorted(p for p in (tmp_path / "cache").rglob("*")) == written
    assert not (tmp_path / "run").exists()
    assert "teacher: BertForMaskedLM, 4 layers" in out and "student: BertForMaskedLM, 2 layers" in out


def test_check_names_the_bare_encoder_where_no_masked_lm_head_is_used(tmp_path, tiny_teacher,
                                                                      corpus):
    """A teacher without a masked-LM head, and a student whose head no objective trains, are
    described as the bare encoder they are (the export is a BertModel)."""
    from jaxkd import config as config_lib
    from jaxkd import plan as plan_lib

    cfg = config_lib.from_dict(general_config(tmp_path / "run", tiny_teacher, corpus,
                                              **{"task.mlm_weight": 0.0, "task.kd_weight": 0.0}))
    out = plan_lib.describe(cfg, plan_lib.prepare(cfg))
    assert "teacher: BertModel (no masked-LM head in the checkpoint), 4 layers" in out
    assert ("student: BertModel (no objective trains a masked-LM head; exported without one), "
            "2 layers") in out


def test_a_corpus_file_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path, mlm_teacher,
                                                                      corpus):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\n" + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8 at byte offset 13.*data.skip_invalid"):
        helpers.run_in_process(general_config(tmp_path / "run", mlm_teacher, corpus,
                                              **{"data.train": str(bad)}))


@pytest.mark.slow
def test_kill_9_during_training_resumes_to_the_same_student(tmp_path, mlm_teacher, corpus):
    """Killed at step 5 of 12 and run again: the same held-out figures (to float rounding: the
    reference ran over 4 devices), the same student (the data position and the masks, keyed by
    step, resume with the checkpoint of step 4)."""
    def make(workdir, **over):
        return general_config(workdir, mlm_teacher, corpus, **over)
    resumed = helpers.assert_kill_resume_matches(make, tmp_path, {}, kill_at=5, rtol=1e-5)
    assert resumed["heldout"]["eval"]["loss/total"] > 0
