"""The sentence-embedding pipeline end to end on a tiny random sentence-transformers teacher:
its STS scores against sentence-transformers and SciPy, the exported students (one with a
projection to the teacher's width) loaded by sentence-transformers, the teacher-embedding cache
keys, bad input refused before work, and one result over 1 and 4 devices, 2 processes and a
kill -9 resume."""
import json
import pathlib
import signal

import jax
import numpy as np
import pytest

from helpers import (ROOT, TINY_TEACHER, assert_resumed, assert_trees_close, free_port, launch,
                     run_in_process, tiny_run_sections, wait_for_checkpoint, wait_for_distill_step,
                     with_overrides)
from jaxkd import evaluate as evaluate_lib
from jaxkd import hf
from jaxkd import predict as predict_lib
from jaxkd.config import ConfigError
from jaxkd.data import DataError
from jaxkd.model import HeadConfig, ModelConfig, init_params
from jaxkd.tasks import embedding, sbert

st = pytest.importorskip("sentence_transformers")
scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def st_teacher(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A 4-layer, 32-wide random BERT as a sentence-transformers directory: mean pooling, then
    Normalize, with the MiniLM's tokenizer."""
    cfg = ModelConfig(TINY_TEACHER.encoder,
                      HeadConfig("sentence_embedding", 1, pooling=("mean",), normalize=True))
    out = tmp_path_factory.mktemp("st_teacher")
    return sbert.save(out, cfg, init_params(cfg, jax.random.key(0)), hf.load_tokenizer(minilm_dir),
                      {"max_seq_len": 32})


def _sts_line(i: int, score: float, a: str, b: str) -> str:
    return "\t".join(["main-captions", "MSRvid", "2012test", f"{i:04d}", f"{score:.2f}", a, b])


@pytest.fixture(scope="module")
def sts_data(tmp_path_factory) -> pathlib.Path:
    """train.tsv: 160 SST-2 sentences (a `sentence` column); dev.csv (40 pairs) and test.csv
    (48 pairs): other sentences paired at random, random gold scores, as the STS release lays
    them out (no header, seven tab-separated fields)."""
    out = tmp_path_factory.mktemp("sts")
    lines = (ROOT / "data" / "sst2" / "glue_dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines]
    (out / "train.tsv").write_text("sentence\n" + "\n".join(sentences[:160]) + "\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    start = 160
    for name, n in (("dev", 40), ("test", 48)):
        pairs = sentences[start:start + 2 * n]
        start += 2 * n
        scores = rng.uniform(0, 5, n)
        (out / f"{name}.csv").write_text("\n".join(
            _sts_line(i, s, pairs[2 * i], pairs[2 * i + 1]) for i, s in enumerate(scores)) + "\n",
            encoding="utf-8")
    return out


def embed_config(workdir, teacher, data, **over) -> dict:
    cfg = {
        "workdir": str(workdir), "seed": 2,
        "task": {"type": "sentence_embedding"},
        "data": {"train": str(data / "train.tsv"), "eval": str(data / "dev.csv"),
                 "test": str(data / "test.csv"), "batch_size": 8, "max_seq_len": 32,
                 "bucket_multiple": 16},
        "teacher": {"model": str(teacher)},
        "student": {"layers": [1, 3]},
        **tiny_run_sections(),
    }
    return with_overrides(cfg, over)


def _pairs(path: pathlib.Path):
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return [r[5] for r in rows], [r[6] for r in rows], np.array([float(r[4]) for r in rows])


def _st_spearman(model_dir: pathlib.Path, test: pathlib.Path) -> float:
    """Spearman of the cosine similarity with the gold scores, as sentence-transformers embeds
    and SciPy ranks."""
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    first, second, gold = _pairs(test)
    a = model.encode(first, convert_to_numpy=True)
    b = model.encode(second, convert_to_numpy=True)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(scipy_stats.spearmanr(cos, gold).statistic)


def _load_student(workdir: pathlib.Path):
    out = workdir / "student"
    task = embedding.resolve(embedding.EmbeddingConfig()).for_teacher(out)
    head = task.model_head(HeadConfig("sentence_embedding", 1))
    return task.load_model(task.encoder_dir(out), head)


@pytest.mark.slow
def test_pipeline_scores_as_sentence_transformers_and_scipy_do(tmp_path, st_teacher, sts_data,
                                                               capsys):
    """The report's teacher and student STS scores are those of the teacher directory and the
    exported student under sentence-transformers and SciPy; a narrower student learns a
    projection, exported as a Dense module."""
    report = run_in_process(embed_config(tmp_path / "run", st_teacher, sts_data))
    assert report["task_type"] == "sentence_embedding"
    assert report["metric_names"] == ["spearman", "pearson"]
    test = sts_data / "test.csv"
    assert report["teacher"]["metrics"]["spearman"] == pytest.approx(_st_spearman(st_teacher, test),
                                                                     abs=1e-3)
    assert report["student"]["metrics"]["spearman"] == pytest.approx(
        _st_spearman(tmp_path / "run" / "student", test), abs=1e-3)
    # jaxkd.evaluate and jaxkd.predict read the exported directory back: the same scores, and
    # sentence-transformers' embeddings.
    student = tmp_path / "run" / "student"
    assert evaluate_lib.main([str(student), "--task", "sts", "--data", str(test), "--quiet"]) == 0
    printed = dict(line.split("=") for line in capsys.readouterr().out.split())
    assert float(printed["spearman"]) == pytest.approx(report["student"]["metrics"]["spearman"], abs=1e-6)
    assert predict_lib.main([str(student), str(sts_data / "train.tsv"), "-o",
                             str(tmp_path / "e.npy"), "--quiet"]) == 0
    sentences = (sts_data / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    expect = st.SentenceTransformer(str(student), device="cpu").encode(sentences, convert_to_numpy=True)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expect, atol=1e-4)
    agreement = report["agreement"]["test"]
    assert set(agreement) == {"recall@10", "mean_cosine"} and 0 <= agreement["recall@10"] <= 1
    assert "teacher" not in report["stages"]  # used as it is: no fine-tuning stage

    narrow = run_in_process(embed_config(
        tmp_path / "narrow", st_teacher, sts_data,
        **{"student": {"init": "shape", "num_layers": 2, "hidden_size": 16, "num_heads": 2,
                       "intermediate_size": 32},
           "export.onnx": "auto", "export.deployment": True, "export.latency_inputs": 4}))
    found = sbert.read_modules(tmp_path / "narrow" / "student")
    assert (found.dense_width, found.normalize) == (32, True)  # the teacher's width
    assert narrow["student"]["metrics"]["spearman"] == pytest.approx(
        _st_spearman(tmp_path / "narrow" / "student", test), abs=1e-3)
    assert narrow["student"]["hidden_size"] == 16
    # The ONNX files of the projected student score as the JAX model does in the deployment table.
    assert (tmp_path / "narrow" / "student" / "model.onnx").is_file()
    formats = narrow["deployment"]["formats"]
    for name in ("jax_fp32", "onnx_fp32", "onnx_int8"):
        assert formats[name]["metrics"]["spearman"] == pytest.approx(
            narrow["student"]["metrics"]["spearman"], abs=1e-3 if name != "onnx_int8" else 0.05), name
    assert set(formats["onnx_fp32"]["agreement"]) == {"recall@10", "mean_cosine"}


@pytest.mark.slow
def test_a_student_pooling_of_its_own_is_trained_and_exported(tmp_path, st_teacher, sts_data):
    """task.student_pooling [cls, max] under a mean-pooling teacher: the student's embeddings
    (twice its width: a projection to the teacher's) are what sentence-transformers computes
    from the exported directory, whose Pooling module says cls and max."""
    report = run_in_process(embed_config(tmp_path / "run", st_teacher, sts_data, **{
        "task.student_pooling": ["cls", "max"], "distill.steps": 4, "distill.eval_every": 0}))
    student = tmp_path / "run" / "student"
    found = sbert.read_modules(student)
    assert found.pooling == ("cls", "max") and found.normalize
    assert found.dense_width == 32  # 2 x 32 pooled, projected to the teacher's 32
    assert sbert.read_modules(st_teacher).pooling == ("mean",)
    assert report["student"]["metrics"]["spearman"] == pytest.approx(
        _st_spearman(student, sts_data / "test.csv"), abs=1e-3)


def test_an_unknown_student_pooling_is_named_before_work(tmp_path, st_teacher, sts_data):
    cfg = embed_config(tmp_path / "run", st_teacher, sts_data, **{"task.student_pooling": "avg"})
    with pytest.raises(ConfigError, match="task.student_pooling: pooling mode 'avg'"):
        run_in_process(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_raw_text_trains_a_sentence_a_row(tmp_path, st_teacher, sts_data):
    """data.train as raw text (a general-distillation corpus file): a row per sentence, with
    task.split_sentences cutting each line's document."""
    from jaxkd import config as config_lib
    from jaxkd import plan as plan_lib

    corpus = tmp_path / "wiki.txt"
    corpus.write_text("Anarchism is a philosophy. It has many forms.\n\nAutism is a condition.\n",
                      encoding="utf-8")
    for split, rows in ((False, 2), (True, 3)):
        cfg = embed_config(tmp_path / "run", st_teacher, sts_data, **{
            "data.train": str(corpus), "task.split_sentences": split})
        plan = plan_lib.prepare(config_lib.from_dict(cfg), write_cache=False)
        assert len(plan.splits["train"].encoded) == rows
    assert not (tmp_path / "run").exists()


def test_a_width_mismatch_without_a_projection_is_refused_before_work(tmp_path, st_teacher, sts_data):
    cfg = embed_config(tmp_path / "run", st_teacher, sts_data, **{
        "task.projection": False,
        "student": {"init": "shape", "num_layers": 2, "hidden_size": 16, "num_heads": 2,
                    "intermediate_size": 32}})
    with pytest.raises(ConfigError, match=r"16 wide and the teacher's 32: .*task.projection: true"):
        run_in_process(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize("score, problem", [("7.5", r"score 7.5 .* outside task.score_range \[0, 5\]"),
                                            ("", "no score in column 'score'")])
def test_bad_sts_rows_stop_before_work(tmp_path, st_teacher, sts_data, score, problem):
    bad = tmp_path / "test.csv"
    lines = (sts_data / "test.csv").read_text(encoding="utf-8").splitlines()
    fields = lines[3].split("\t")
    fields[4] = score
    lines[3] = "\t".join(fields)
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = embed_config(tmp_path / "run", st_teacher, sts_data, **{"data.test": str(bad)})
    with pytest.raises(DataError, match=rf"test.csv line 4: {problem}"):
        run_in_process(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_unscored_eval_sentences_are_refused(tmp_path, st_teacher, sts_data):
    cfg = embed_config(tmp_path / "run", st_teacher, sts_data,
                       **{"data.eval": str(sts_data / "train.tsv")})
    with pytest.raises(DataError, match="data.eval .* is not scored sentence pairs"):
        run_in_process(cfg)


def test_an_eval_fraction_of_unscored_sentences_is_refused_before_work(tmp_path, st_teacher, sts_data):
    cfg = embed_config(tmp_path / "run", st_teacher, sts_data,
                       **{"data.eval": None, "data.eval_fraction": 0.2})
    with pytest.raises(ConfigError, match=r"data.eval_fraction .* is not scored sentence pairs.*set data.eval"):
        run_in_process(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_task_metric_orders_the_scores_so_selection_reads_it(st_teacher):
    from jaxkd.tasks import similarity

    outputs = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    gold = np.linspace(0.0, 5.0, 6)
    examples = similarity.Examples("s", [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)],
                                   gold, True, {})
    for metric in ("spearman", "pearson"):
        task = embedding.resolve(embedding.EmbeddingConfig(metric=metric))
        scores = task.scores(outputs, None, examples)
        cos = np.sum(outputs[:6] * outputs[6:], 1) / (np.linalg.norm(outputs[:6], axis=1)
                                                      * np.linalg.norm(outputs[6:], axis=1))
        reference = {"spearman": scipy_stats.spearmanr(cos, gold).statistic,
                     "pearson": scipy_stats.pearsonr(cos, gold).statistic}
        assert list(scores)[0] == metric  # the first is what the loop selects on
        assert scores == pytest.approx(reference)


@pytest.mark.slow
def test_the_embedding_cache_is_keyed_by_teacher_and_pooling(tmp_path, sts_data, minilm_dir):
    """A plain encoder teacher under two poolings, and another teacher, give three caches."""
    teacher = tmp_path / "plain"
    hf.save_hf(TINY_TEACHER, init_params(TINY_TEACHER, jax.random.key(1)), teacher, tokenizer=minilm_dir)
    other = tmp_path / "other"
    hf.save_hf(TINY_TEACHER, init_params(TINY_TEACHER, jax.random.key(2)), other, tokenizer=minilm_dir)
    cache = tmp_path / "cache"
    short = {"distill.steps": 2, "distill.eval_every": 0, "data.cache_dir": str(cache),
             "data.test": None}
    for name, model, pooling in (("mean", teacher, "mean"), ("cls", teacher, "cls"),
                                 ("other", other, "mean")):
        run_in_process(embed_config(tmp_path / name, model, sts_data,
                                    **{**short, "task.pooling": pooling}))
    logits = sorted(p.name for p in cache.iterdir() if p.name.startswith("teacher_logits-")
                    and not p.name.endswith(".check.json"))
    assert len(logits) == 3, logits


@pytest.mark.slow
def test_a_float16_embedding_cache_holds_the_teachers_embeddings_rounded(tmp_path, st_teacher,
                                                                           sts_data):
    """distill.teacher_cache_dtype float16: a cache of its own, holding the float32 cache's
    rows rounded to float16, and training that sees no more than that rounding (the same
    first-step loss and eval scores to float16's precision)."""
    cache = tmp_path / "cache"
    short = {"distill.steps": 4, "distill.eval_every": 0, "data.cache_dir": str(cache),
             "data.test": None, "log.every_steps": 1}
    reports, first = {}, {}
    for dtype in ("float32", "float16"):
        reports[dtype] = run_in_process(embed_config(
            tmp_path / dtype, st_teacher, sts_data, **{**short, "distill.teacher_cache_dtype": dtype}))
        rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").open()]
        first[dtype] = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    tables = {str(t.dtype): t for t in (np.load(p) for p in cache.glob("teacher_logits-*.npy"))}
    assert sorted(tables) == ["float16", "float32"]
    np.testing.assert_array_equal(tables["float16"], tables["float32"].astype(np.float16))
    # The loss is the rows' mean squared error to the teacher's rows. Rounding moves each row by
    # delta, and the loss by at most 2 sqrt(L) max-row-rms(delta) + max-row-mean(delta^2)
    # (Cauchy-Schwarz within a row, Jensen across rows), whatever rows the first batch holds.
    delta = tables["float16"].astype(np.float64) - tables["float32"]
    loss32 = first["float32"]["loss"]
    bound = (2 * np.sqrt(loss32) * np.sqrt((delta ** 2).mean(1)).max() + (delta ** 2).mean(1).max()
             + 1e-6 * loss32)  # float32 sums
    assert first["float32"]["loss/embedding_mse"] == pytest.approx(loss32, rel=1e-6)  # the whole loss
    assert abs(first["float16"]["loss"] - loss32) <= bound
    assert first["float16"]["mean_cosine"] == pytest.approx(first["float32"]["mean_cosine"], abs=1e-4)
    assert (reports["float16"]["student"]["splits"]["eval"]
            == pytest.approx(reports["float32"]["student"]["splits"]["eval"], abs=1e-3))


@pytest.mark.slow
def test_devices_processes_and_a_kill_resume_give_one_student(tmp_path, st_teacher, sts_data):
    """4 devices in process, 1 device, 2 processes x 2 devices, and a run killed (-9) and
    started again: the same STS scores and the same student."""
    over = {"distill.steps": 12, "distill.eval_every": 6, "checkpoint.every_steps": 2,
            "log.every_steps": 2, "distributed.cpu_devices": 4}
    ref = run_in_process(embed_config(tmp_path / "ref", st_teacher, sts_data, **over))
    ref_params = _load_student(tmp_path / "ref")[1]

    def same(workdir, atol):
        report = json.loads((workdir / "report.json").read_text())
        for split in ("eval", "test"):
            assert report["student"]["splits"][split] == pytest.approx(ref["student"]["splits"][split],
                                                                       abs=1e-5)
        assert_trees_close(_load_student(workdir)[1], ref_params, atol)

    one = embed_config(tmp_path / "one", st_teacher, sts_data, **{**over, "distributed.cpu_devices": 1})
    proc = launch(one, tmp_path / "one.yaml")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    # One device sums the batch's gradient in another order than four: last-bit differences,
    # which Adam's division by sqrt(v) shows in a parameter whose gradient is near zero (1.5e-5
    # seen in one of 976,704 values); a real fault moves parameters by whole updates (lr 1e-3).
    same(tmp_path / "one", 1e-4)

    port = free_port()
    multi = embed_config(tmp_path / "multi", st_teacher, sts_data,
                         **{**over, "distributed.cpu_devices": 2,
                            "distributed.coordinator_address": f"127.0.0.1:{port}",
                            "distributed.num_processes": 2})
    procs = [launch({**multi, "distributed": {**multi["distributed"], "process_id": pid}},
                    tmp_path / f"multi{pid}.yaml") for pid in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    same(tmp_path / "multi", 1e-4)  # gloo sums the shards' gradients in another order

    killed = embed_config(tmp_path / "killed", st_teacher, sts_data, **over)
    proc = launch(killed, tmp_path / "killed.yaml")
    wait_for_distill_step(tmp_path / "killed", proc, 5)
    wait_for_checkpoint(tmp_path / "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    proc = launch(killed, tmp_path / "killed.yaml")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert_resumed(out)  # from the killed run's checkpoint: a rerun from scratch ends the same
    same(tmp_path / "killed", 1e-6)
