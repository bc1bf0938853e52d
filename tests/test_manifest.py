"""The run manifest: a rerun of a workdir with settings that change a started stage's result is
refused before any work, naming the keys; `--restart STAGE` redoes that stage and those after."""
import json

import pytest
import yaml

from helpers import assert_trees_close, student_params, tiny_config
from jaxkd import config as config_lib
from jaxkd import launch, manifest


@pytest.mark.parametrize("key, stage", [
    ("teacher.model", "teacher"), ("teacher.finetune.learning_rate", "teacher"),
    ("optim.learning_rate", "distill"), ("optim.warmup_ratio", "teacher"), ("seed", "teacher"), ("data.train", "teacher"),
    ("content.teacher", "teacher"), ("content.data.train", "teacher"), ("code.version", "teacher"),
    ("student.layers", "distill"), ("content.student", "distill"), ("distill.temperature", "distill"),
    ("distill.augment.seed", "distill"), ("data.unlabeled", "distill"),
    ("data.unlabeled_ratio", "distill"), ("data.unlabeled_max_rows", "distill"),
    ("content.data.unlabeled[0]", "distill"),
    ("student.export_as", "distill"), ("data.test", "report"), ("content.data.test", "report"),
    ("log.every_steps", None), ("compilation_cache", None), ("data.eval_batch_size", None),
    ("checkpoint.every_steps", None), ("distributed.cpu_devices", None), ("workdir", None),
])
def test_each_key_belongs_to_the_first_stage_that_reads_it(key, stage):
    assert manifest.stage_of(key) == stage


def _workdir(tmp_path, keys, stages=(), checkpoints=()):
    workdir = tmp_path / "run"
    workdir.mkdir()
    manifest.write(workdir, keys)
    (workdir / "stages.json").write_text(json.dumps({s: {"done": True} for s in stages}))
    for stage in checkpoints:
        (workdir / "checkpoints" / stage / "8").mkdir(parents=True)
    return workdir


def test_a_changed_key_of_a_started_stage_is_refused_with_old_and_new_values(tmp_path):
    old = {"distill.temperature": 2.0, "student.layers": [0, 2], "teacher.model": "t"}
    workdir = _workdir(tmp_path, old, stages=("teacher",), checkpoints=("distill",))
    new = {**old, "distill.temperature": 4.0, "student.layers": [1, 3]}
    with pytest.raises(manifest.ChangedConfig) as err:
        manifest.check(workdir, new)
    text = str(err.value)
    assert "distill.temperature: 2.0 -> 4.0" in text and "student.layers: [0, 2] -> [1, 3]" in text
    assert "--restart distill" in text and "new workdir" in text
    manifest.check(workdir, new, restart_from="distill")  # redone: allowed
    manifest.check(workdir, new, restart_from="teacher")
    with pytest.raises(manifest.ChangedConfig):
        manifest.check(workdir, new, restart_from="export")  # too late to redo distill


def test_a_change_owned_by_a_stage_not_yet_started_is_allowed(tmp_path):
    old = {"distill.temperature": 2.0, "teacher.model": "t"}
    workdir = _workdir(tmp_path, old, checkpoints=("teacher",))  # stopped in the teacher stage
    manifest.check(workdir, {**old, "distill.temperature": 4.0})
    with pytest.raises(manifest.ChangedConfig, match="teacher.model"):
        manifest.check(workdir, {**old, "teacher.model": "u"})


def test_a_teacher_change_is_refused_once_distillation_started_even_without_a_teacher_stage(tmp_path):
    """With teacher.finetune.steps=0 the teacher stage writes nothing; the distill stage that
    read its logits has started, so a new teacher is refused (it would mix two teachers)."""
    old = {"teacher.model": "t", "content.teacher": "aa"}
    workdir = _workdir(tmp_path, old, checkpoints=("distill",))
    with pytest.raises(manifest.ChangedConfig) as err:
        manifest.check(workdir, {"teacher.model": "u", "content.teacher": "bb"})
    assert "content.teacher" in str(err.value) and "(file contents changed)" in str(err.value)
    assert "--restart teacher" in str(err.value)


def test_content_keys_follow_the_bytes_of_the_data_files(tmp_path, sst2_small, tiny_teacher):
    cfg = config_lib.from_dict(tiny_config(tmp_path / "run", tiny_teacher, sst2_small))
    keys = manifest.build(cfg, tiny_teacher)
    assert {"content.teacher", "content.data.train", "content.data.eval"} <= set(keys)
    assert "log.every_steps" not in keys and keys["distill.temperature"] == 2.0
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("train.tsv", "eval.tsv"):
        (copy / name).write_bytes((sst2_small / name).read_bytes())
    lines = (copy / "train.tsv").read_text().splitlines()
    (copy / "train.tsv").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    moved = manifest.build(config_lib.from_dict(tiny_config(tmp_path / "run", tiny_teacher, copy)),
                           tiny_teacher)
    assert moved["content.data.eval"] == keys["content.data.eval"]
    assert moved["content.data.train"] != keys["content.data.train"]


def test_a_general_corpus_of_several_files_is_keyed_by_every_file(tmp_path, tiny_teacher):
    """data.train joining files with commas (a general corpus): editing any one of them changes
    the key, so a started run refuses it instead of resuming on other text."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name} first line\nsecond line\n")
    cfg = config_lib.from_dict({"workdir": str(tmp_path / "run"), "task": {"type": "general"},
                                "data": {"train": f"{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}"},
                                "teacher": {"model": str(tiny_teacher)},
                                "distill": {"relation_weight": 1.0}})
    before = manifest.build(cfg, tiny_teacher)["content.data.train"]
    (tmp_path / "b.txt").write_text("b.txt first line\nanother line\n")
    assert manifest.build(cfg, tiny_teacher)["content.data.train"] != before


def test_restart_removes_the_stage_and_those_after_it_and_nothing_before(tmp_path):
    workdir = _workdir(tmp_path, {}, stages=("teacher", "distill", "export", "report"),
                       checkpoints=("teacher", "distill"))
    for path in ("teacher/config.json", "student/config.json", "report.json", "report.md",
                 "student.1-a.tmp/model.safetensors", "student.2-b.old/model.safetensors"):
        (workdir / path).parent.mkdir(exist_ok=True)
        (workdir / path).write_text("{}")
    rows = [{"stage": "teacher", "step": 4}, {"stage": "distill", "step": 4}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest.restart(workdir, "distill")
    assert (workdir / "teacher" / "config.json").is_file()
    assert (workdir / "checkpoints" / "teacher" / "8").is_dir()
    assert not (workdir / "checkpoints" / "distill").exists()
    assert not (workdir / "student").exists() and not (workdir / "report.json").exists()
    assert not list(workdir.glob("student.*"))  # an export killed midway left these
    assert list(json.loads((workdir / "stages.json").read_text())) == ["teacher"]
    assert [json.loads(x)["stage"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] \
        == ["teacher"]
    with pytest.raises(config_lib.ConfigError, match="did you mean 'distill'"):
        manifest.restart(workdir, "distil")


def _train(cfg, path, *extra):
    """train.py's main, in this process, on `cfg` written to `path`."""
    path.write_text(yaml.safe_dump(cfg))
    return launch.main(["--config", str(path), *extra])


@pytest.mark.slow
def test_a_rerun_with_changed_settings_is_refused_and_loses_nothing(tmp_path, sst2_small,
                                                                     tiny_teacher, capsys, caplog):
    """A finished run rerun with a new temperature: exit 2 before any work, the message names the
    key with both values, config.yaml and report.json are left as they were; a logging change
    is free; --restart distill then redoes distillation with the new temperature."""
    workdir = tmp_path / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **{"distill.steps": 8, "distill.eval_every": 4})
    path = tmp_path / "cfg.yaml"
    assert _train(cfg, path) == 0
    kept = {name: (workdir / name).read_bytes() for name in ("config.yaml", "report.json",
                                                             "stages.json", "manifest.json")}
    teacher_files = sorted(p.name for p in (workdir / "checkpoints" / "teacher").iterdir())
    capsys.readouterr()

    hotter = {**cfg, "distill": {**cfg["distill"], "temperature": 4.0}}
    assert _train(hotter, path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: workdir "), err
    assert "distill.temperature: 2.0 -> 4.0" in err[0] and "--restart distill" in err[0]
    assert {name: (workdir / name).read_bytes() for name in kept} == kept

    quieter = {**cfg, "log": {**cfg["log"], "every_steps": 2}}
    assert _train(quieter, path) == 0

    assert _train(hotter, path, "--restart", "distill") == 0
    report = json.loads((workdir / "report.json").read_text())
    assert report["distill"]["temperature"] == 4.0
    assert sorted(p.name for p in (workdir / "checkpoints" / "teacher").iterdir()) == teacher_files
    assert json.loads((workdir / "manifest.json").read_text())["keys"]["distill.temperature"] == 4.0
    # An unreadable stage record is only a record: the stages are found from their checkpoints.
    before = student_params(workdir)
    (workdir / "stages.json").write_text('{"teacher": {"done": tr')
    assert _train(hotter, path) == 0
    assert "stages.json is unreadable" in caplog.text
    assert_trees_close(student_params(workdir), before, 0)
    assert json.loads((workdir / "stages.json").read_text())["distill"]["done"]
