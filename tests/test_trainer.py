"""The pipeline end to end on a tiny random teacher: stages, resume after kill -9 and SIGTERM,
bad input stopping before work, and the teacher cache."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from helpers import (ROOT, TINY_TEACHER, assert_resumed, assert_trees_close, free_port, launch,
                     run_in_process, student_params, tiny_config, train_env, wait_for_distill_step)
from jaxkd import hf, loop, trainer
from jaxkd import report as report_lib
from jaxkd.config import ConfigError
from jaxkd.model import init_params

@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, tiny_teacher, sst2_small):
    cfg = tiny_config(tmp_path / "run", tiny_teacher, sst2_small,
                      **{"data.test": str(sst2_small / "eval.tsv"), "export.onnx": "auto",
                         "export.deployment": True, "export.latency_inputs": 8})
    report = run_in_process(cfg)
    workdir = tmp_path / "run"
    stages = json.loads((workdir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("teacher", "distill", "export", "report"))
    on_disk = json.loads((workdir / "report.json").read_text())
    for who in ("teacher", "student"):
        assert set(on_disk[who]["metrics"]) == {"accuracy"}
        assert 0.0 <= on_disk[who]["metrics"]["accuracy"] <= 1.0
    assert on_disk["student"]["params"] < on_disk["teacher"]["params"]
    assert on_disk["code"] == report_lib.code_version()  # which code wrote it
    assert on_disk["data"]["train"] == {"source": str(sst2_small / "train.tsv"), "examples": 160,
                                        "rows": 160, "skipped": {}}
    assert report["retention"]["accuracy"] == pytest.approx(
        on_disk["student"]["metrics"]["accuracy"] / on_disk["teacher"]["metrics"]["accuracy"])
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") is None]
    assert {"stage", "step", "loss", "learning_rate"} <= set(train_rows[0])
    assert any(r.get("split") == "eval" and "accuracy" in r for r in rows)
    assert (workdir / "config.yaml").is_file() and (workdir / "report.md").is_file()

    # The exported student loads in PyTorch and reproduces jaxkd's eval predictions.
    torch = pytest.importorskip("torch")
    from transformers import BertForSequenceClassification, BertTokenizer
    model, info = BertForSequenceClassification.from_pretrained(workdir / "student",
                                                                output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    tok = BertTokenizer.from_pretrained(workdir / "student")
    texts = [line.split("\t")[0] for line in
             (sst2_small / "eval.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        torch_pred = model(**enc).logits.argmax(-1).numpy()
    labels = np.array([int(line.split("\t")[1]) for line in
                       (sst2_small / "eval.tsv").read_text(encoding="utf-8").splitlines()[1:]])
    assert np.mean(torch_pred == labels) == pytest.approx(report["student"]["metrics"]["accuracy"])

    # `python -m jaxkd.predict` on the exported student reproduces the report's accuracy exactly.
    from jaxkd import predict
    out = tmp_path / "pred.jsonl"
    assert predict.main([str(workdir / "student"), str(sst2_small / "eval.tsv"), "--output", str(out),
                         "--max-seq-len", "32", "--quiet"]) == 0
    names = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    predicted = np.array([["negative", "positive"].index(n) for n in names])
    assert np.mean(predicted == labels) == report["student"]["splits"]["test"]["accuracy"]

    # With the onnx extra (a test dependency) the export writes both ONNX files, and the report's
    # deployment table scores each format on the test split as the evaluation did.
    for name in ("model.onnx", "model.int8.onnx"):
        assert (workdir / "student" / name).is_file()
    deployment = on_disk["deployment"]
    assert list(deployment["formats"]) == ["jax_fp32", "jax_bf16", "onnx_fp32", "onnx_int8"]
    assert deployment["split"] == "test" and deployment["latency_inputs"] == 8
    test_scores = on_disk["student"]["splits"]["test"]
    for name in ("jax_fp32", "onnx_fp32"):
        assert deployment["formats"][name]["metrics"]["accuracy"] == pytest.approx(test_scores["accuracy"])
    assert deployment["formats"]["jax_fp32"]["agreement"] == pytest.approx(on_disk["agreement"]["test"])
    assert "## Deployment" in (workdir / "report.md").read_text()

    # Running the same command again skips every finished stage and gives the same report.
    again = run_in_process(cfg)
    assert again["student"]["metrics"] == report["student"]["metrics"]


@pytest.mark.slow
def test_teacher_cache_gives_the_same_student(tmp_path, tiny_teacher, sst2_small):
    common = {"teacher.finetune.steps": 0, "distill.eval_every": None, "distill.steps": 10,
              "data.eval": None}
    run_in_process(tiny_config(tmp_path / "cached", tiny_teacher, sst2_small,
                               **common, **{"distill.teacher_cache": True}))
    run_in_process(tiny_config(tmp_path / "live", tiny_teacher, sst2_small,
                               **common, **{"distill.teacher_cache": False}))
    assert list((tmp_path / "cached" / "cache").glob("teacher_logits-*.npy"))
    assert not list((tmp_path / "live" / "cache").glob("teacher_logits-*.npy"))
    assert_trees_close(student_params(tmp_path / "cached"), student_params(tmp_path / "live"), 1e-5)


def _distill_checkpoints(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints" / "distill").iterdir()
                  if p.name.isdigit())


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_teacher, sst2_small):
    """A run stopped by SIGTERM, started again, killed (-9), and started again ends as one that
    was never stopped."""
    # The subprocesses simulate the same four CPU devices as this one (tests/conftest.py).
    over = {"distill.steps": 120, "distill.eval_every": 60, "checkpoint.every_steps": 10,
            "log.every_steps": 2, "teacher.finetune.steps": 0, "distributed.cpu_devices": 4}
    reference = run_in_process(tiny_config(tmp_path / "ref", tiny_teacher, sst2_small, **over))

    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **over)
    proc = launch(cfg, tmp_path / "cfg.yaml")
    wait_for_distill_step(workdir, proc, 30)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    stopped = _distill_checkpoints(workdir)[-1]
    last_logged = max(json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
                      if json.loads(x).get("stage") == "distill")
    assert 30 <= last_logged <= stopped < 120  # the checkpoint is at the step it stopped on

    proc = launch(cfg, tmp_path / "cfg.yaml")
    wait_for_distill_step(workdir, proc, stopped + 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert stopped < _distill_checkpoints(workdir)[-1] < 120

    proc = launch(cfg, tmp_path / "cfg.yaml")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert assert_resumed(out) > stopped  # from the killed run's checkpoint, not from scratch
    resumed = json.loads((workdir / "report.json").read_text())
    assert resumed["student"]["metrics"] == reference["student"]["metrics"]
    assert resumed["student"]["splits"] == reference["student"]["splits"]
    assert_trees_close(student_params(workdir), student_params(tmp_path / "ref"), 1e-6)


@pytest.mark.slow
def test_a_stage_started_afresh_drops_its_old_metric_rows(tmp_path, tiny_teacher, sst2_small):
    """A run killed before its first checkpoint leaves logged rows; the stage that then starts
    from scratch writes them again instead of adding a second copy."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    stale = [{"stage": "distill", "step": s, "loss": -1.0} for s in (2, 4, 6)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_in_process(tiny_config(workdir, tiny_teacher, sst2_small, **{
        "teacher.finetune.steps": 0, "distill.steps": 6, "log.every_steps": 2}))
    rows = report_lib.read_metrics(workdir)
    keys = [(r["stage"], r["step"], r.get("split")) for r in rows]
    assert len(keys) == len(set(keys)) and ("distill", 6, None) in keys
    assert all(r["loss"] != -1.0 for r in rows if "loss" in r)


def _snapshot(workdir: pathlib.Path) -> dict:
    return {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, message", [
    ({"distill.temprature": 3.0}, "did you mean 'temperature'"),
    ({"data.train": "/no/such/train.tsv"}, "/no/such/train.tsv"),
    ({"student.layers": [0, 9]}, "out of range"),
    ({"distill.temperature": -1.0}, "distill.temperature must be a positive number"),
    ({"distill.alpha": 1.5}, "distill.alpha must be in"),
    ({"data.max_seq_len": 0}, "data.max_seq_len must be a positive integer"),
    ({"teacher.model": "runs/no/such/teacher"}, "no such directory: runs/no/such/teacher"),
    ({"export.onnx": "always"}, "export.onnx must be true, false or auto"),
    ({"export.onx": True}, "did you mean 'onnx'"),
    ({"distill.relation_weight": 1.0, "distill.relation_heads": 3}, "width 32 is not divisible by 3"),
])
def test_bad_input_stops_before_work_and_keeps_outputs(tmp_path, tiny_teacher, sst2_small,
                                                        override, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "report.json").write_text('{"earlier": true}')
    (workdir / "config.yaml").write_text("earlier: run\n")
    before = _snapshot(workdir)
    cfg = tiny_config(workdir, tiny_teacher, sst2_small)
    for dotted, value in override.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    with pytest.raises((ConfigError, FileNotFoundError, ValueError), match=message):
        run_in_process(cfg)
    assert _snapshot(workdir) == before


def test_onnx_without_the_extra_is_refused_before_work_when_asked_for(
        tmp_path, tiny_teacher, sst2_small, monkeypatch):
    """export.onnx true without onnx/onnxruntime stops before any work, saying what to install."""
    from jaxkd import deploy
    monkeypatch.setattr(deploy, "available", lambda: False)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"export.onnx is true but onnx and onnxruntime .*pip install"):
        run_in_process(tiny_config(workdir, tiny_teacher, sst2_small,
                                   **{"export.onnx": True, "teacher.finetune.steps": 0}))
    assert not workdir.exists()


@pytest.mark.slow  # a short run of the pipeline
def test_onnx_auto_without_the_extra_runs_and_measures_the_jax_formats(
        tmp_path, tiny_teacher, sst2_small, monkeypatch):
    """export.onnx auto (the default) needs nothing of the extra: no ONNX files, JAX rows only."""
    from jaxkd import deploy
    monkeypatch.setattr(deploy, "available", lambda: False)
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small,
                      **{"export.onnx": "auto", "export.deployment": True, "export.latency_inputs": 2,
                         "teacher.finetune.steps": 0, "distill.steps": 2, "distill.eval_every": None,
                         "data.eval": None, "data.test": str(sst2_small / "eval.tsv")})
    report = run_in_process(cfg)
    assert not list((workdir / "student").glob("*.onnx"))
    assert list(report["deployment"]["formats"]) == ["jax_fp32", "jax_bf16"]
    assert json.loads((workdir / "stages.json").read_text())["export"]["onnx"] == []


def test_unreadable_test_split_stops_before_anything_is_written(tmp_path, tiny_teacher, sst2_small):
    """Every split is read and checked first: no tokenisation cache, no checkpoint, no report."""
    bad = tmp_path / "test.tsv"
    bad.write_text("text\tlabel\nfine\t1\n", encoding="utf-8")
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **{"data.test": str(bad)})
    with pytest.raises(ValueError, match=r"test.tsv: no column 'sentence' \(task.text\)"):
        run_in_process(cfg)
    assert not workdir.exists()


def test_check_prints_the_plan_and_bad_values_exit_2_in_process(tmp_path, tiny_teacher, sst2_small,
                                                                capsys):
    """What the train.py test below checks, through jaxkd.launch.main in this process."""
    from jaxkd import launch

    cfg = tiny_config(tmp_path / "run", tiny_teacher, sst2_small)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert launch.main(["--config", str(path), "--check"]) == 0
    out, err = capsys.readouterr()
    assert "stage teacher: 6 steps" in out and "stage distill: 24 steps" in out
    assert "data.eval:" in out and "padding" in out
    assert "stage export: the Hugging Face directory (no ONNX: export.onnx false)" in out
    assert "PyTorch was not found" not in out + err
    assert launch.main(["--config", str(path), "--check", "export.onnx=true", "export.int8=false"]) == 0
    assert "stage export: the Hugging Face directory, model.onnx\n" in capsys.readouterr().out
    for override, message in (("distill.temperature=-1", "distill.temperature"),
                              ("distill.alpha=1.5", "distill.alpha"),
                              ("data.max_seq_len=0", "data.max_seq_len")):
        assert launch.main(["--config", str(path), override]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # --check and refused runs write nothing


@pytest.mark.slow  # four train.py processes
def test_cli_check_prints_the_plan_and_bad_values_exit_2(tmp_path, tiny_teacher, sst2_small):
    cfg = tiny_config(tmp_path / "run", tiny_teacher, sst2_small)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = train_env()
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "train.py"), "--config", str(path), *extra], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300)
    checked = run("--check")
    assert checked.returncode == 0, checked.stderr
    assert "stage teacher: 6 steps" in checked.stdout and "stage distill: 24 steps" in checked.stdout
    assert "data.eval:" in checked.stdout and "padding" in checked.stdout
    assert "PyTorch was not found" not in checked.stdout + checked.stderr
    for override, message in (("distill.temperature=-1", "distill.temperature"),
                              ("distill.alpha=1.5", "distill.alpha"),
                              ("data.max_seq_len=0", "data.max_seq_len")):
        start = time.time()
        bad = run(override)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert time.time() - start < 60
    assert not (tmp_path / "run").exists()  # --check and refused runs write nothing


def test_student_with_another_vocabulary_is_refused(tmp_path, tiny_teacher, sst2_small, minilm_dir):
    other = tmp_path / "other"
    small_vocab = TINY_TEACHER.replace(vocab_size=1000)
    hf.save_hf(small_vocab, init_params(small_vocab, jax.random.key(1)), other)
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small,
                      **{"student.init": "pretrained", "student.pretrained": str(other)})
    with pytest.raises(ConfigError, match="must share one tokenizer"):
        run_in_process(cfg)
    assert not workdir.exists()


def test_untrained_teacher_without_finetuning_is_refused(tmp_path, minilm_dir, sst2_small):
    cfg = tiny_config(tmp_path / "run", minilm_dir, sst2_small, **{"teacher.finetune.steps": 0})
    with pytest.raises(ConfigError, match="not a BertForSequenceClassification with 2 labels"):
        run_in_process(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a real run (test_loop.py checks NonFiniteLoss on its own, fast)
def test_nan_loss_stops_with_a_clear_error(tmp_path, tiny_teacher, sst2_small):
    cfg = tiny_config(tmp_path / "run", tiny_teacher, sst2_small,
                      **{"teacher.finetune.steps": 0, "distill.steps": 8, "data.eval": None,
                         "optim.learning_rate": 1e30, "optim.clip_norm": None,
                         "distill.teacher_cache": False})
    with pytest.raises(loop.NonFiniteLoss, match="loss became"):
        run_in_process(cfg)


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path, tiny_teacher, sst2_small):
    """Two processes x two CPU devices run the whole pipeline like one process with four."""
    over = {"teacher.finetune.steps": 4, "distill.steps": 8, "distill.eval_every": 4,
            "distributed.cpu_devices": 4}
    run_in_process(tiny_config(tmp_path / "single", tiny_teacher, sst2_small, **over))

    port = free_port()
    multi = tiny_config(tmp_path / "multi", tiny_teacher, sst2_small,
                        **{**over, "distributed.cpu_devices": 2,
                           "distributed.coordinator_address": f"127.0.0.1:{port}",
                           "distributed.num_processes": 2})
    procs = []
    for pid in range(2):
        cfg = {**multi, "distributed": {**multi["distributed"], "process_id": pid}}
        procs.append(launch(cfg, tmp_path / f"multi{pid}.yaml"))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    a = json.loads((tmp_path / "single" / "report.json").read_text())
    b = json.loads((tmp_path / "multi" / "report.json").read_text())
    for who in ("teacher", "student"):
        assert b[who]["splits"]["eval"] == pytest.approx(a[who]["splits"]["eval"])
    # Why 1e-4: across processes the gradients of the four shards are summed by gloo, within one
    # process by XLA, in another order, so they differ in their last bits. Adam divides each
    # update by sqrt(v), so a last-bit difference in a gradient near zero shows in its update:
    # 1.14e-5 in one of 2,048 values on an AMD EPYC, none on an Intel Xeon. A real fault (a
    # wrong shard, a lost row, a wrong mean) moves parameters by whole updates of lr = 1e-3;
    # 1e-4 is a tenth of one.
    assert_trees_close(student_params(tmp_path / "multi"), student_params(tmp_path / "single"), 1e-4)


def test_compilation_cache_stores_compiled_programs(tmp_path):
    """`compilation_cache` takes effect even in a process that has compiled before."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.jit(lambda x: x * 2)(np.ones(3))  # this process has compiled already
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        trainer.use_compilation_cache(str(tmp_path / "xla"))
        jax.jit(lambda x: x * 3 + 1)(np.ones(5))
        assert any((tmp_path / "xla").iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


@pytest.mark.slow
def test_readme_first_command_runs_from_the_shipped_data(tmp_path):
    """configs/quickstart.yaml needs nothing outside the repository (step counts capped here, and
    the cost of evaluating its 1,672 rows and caching 7,200 rows of teacher logits: a short
    max_seq_len, the teacher run live in the two distillation steps)."""
    env = train_env()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", "configs/quickstart.yaml",
         f"workdir={tmp_path / 'quickstart'}", "teacher.finetune.steps=2", "distill.steps=2",
         "data.max_seq_len=16", "distill.teacher_cache=false",
         "log.plots=false", "log.tensorboard=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "quickstart" / "report.json").read_text())
    assert report["data"]["test"]["examples"] == 872 and report["data"]["eval"]["examples"] == 800
    # The onnx extra is a test dependency: the quick start writes the ONNX files and measures them.
    assert (tmp_path / "quickstart" / "student" / "model.int8.onnx").is_file()
    assert set(report["deployment"]["formats"]) == {"jax_fp32", "jax_bf16", "onnx_fp32", "onnx_int8"}
    assert "PyTorch was not found" not in proc.stdout + proc.stderr


def _relabelled_teacher(tmp_path, tiny_teacher, names) -> pathlib.Path:
    import shutil

    out = tmp_path / "relabelled"
    shutil.copytree(tiny_teacher, out)
    config = json.loads((out / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow  # plans three runs
def test_a_teacher_of_the_task_with_its_labels_in_another_order_is_read_in_the_tasks(
        tmp_path, tiny_teacher, sst2_small):
    """A sentiment checkpoint whose output 0 is POSITIVE teaches SST-2 (0 = negative) with its
    outputs reordered by name; names of another set are refused before work unless
    teacher.labels_by_position says output i is label i."""
    from jaxkd import config as config_lib, plan as plan_lib

    def planned(teacher, **over):
        return plan_lib.prepare(config_lib.from_dict(tiny_config(
            tmp_path / "run", teacher, sst2_small, **{"teacher.finetune.steps": 0, **over})),
            write_cache=False)
    swapped = _relabelled_teacher(tmp_path / "a", tiny_teacher, ["POSITIVE", "NEGATIVE"])
    prepared = planned(swapped)
    assert prepared.teacher_columns.tolist() == [1, 0]
    assert planned(tiny_teacher).teacher_columns is None
    cfg, params = hf.load_hf(swapped)
    ids = np.asarray([[101, 2204, 3185, 102]])
    from jaxkd.model import Model
    before = Model(cfg).apply({"params": params}, ids, np.ones_like(ids)).logits
    reordered = prepared.task.reorder_head(params, prepared.teacher_columns)
    after = Model(cfg).apply({"params": reordered}, ids, np.ones_like(ids)).logits
    np.testing.assert_allclose(np.asarray(after), np.asarray(before)[:, ::-1], rtol=1e-6)

    other = _relabelled_teacher(tmp_path / "b", tiny_teacher, ["bad", "good"])
    with pytest.raises(ConfigError, match=r"its labels \(id2label\) are \['bad', 'good'\].*"
                                          r"teacher.labels_by_position"):
        planned(other)
    assert planned(other, **{"teacher.labels_by_position": True}).teacher_columns is None
