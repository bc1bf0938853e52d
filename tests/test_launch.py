"""train.py's command line: bad config files are one clear line and exit 2, before any work."""
import pytest

from jaxkd import launch


@pytest.mark.parametrize("text, expected", [
    ("task:\n  name: sst2\ndata: [1, 2\n", "line 4, column 1: expected ',' or ']'"),
    ("task: {name: sst2\n", "line 2, column 1"),
    ('task: !!python/object/apply:os.system ["echo hi"]\n',
     "line 1, column 7: could not determine a constructor for the tag"),
])
def test_unreadable_yaml_is_one_line_and_exit_2(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert launch.main(["--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {path}, ") and expected in err[0], err
    assert "Traceback" not in "\n".join(err)


def test_a_tag_is_refused_as_not_plain_data(tmp_path, capsys):
    path = tmp_path / "tag.yaml"
    path.write_text("seed: !!python/name:os.getcwd ''\n")
    assert launch.main(["--config", str(path)]) == 2
    assert "a config holds plain data only" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_logs_its_progress_lines(tmp_path):
    """train.py's INFO lines reach stderr: logging is configured before a library (orbax) can
    install a root handler that would turn basicConfig into a no-op. A library's INFO lines on
    the root logger (ONNX Runtime's quantiser logs one per tensor) do not; its warnings do."""
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    probe = ("import logging, sys\nfrom jaxkd import launch\n"
             "code = launch.main(['--config', 'configs/tiny.yaml', '--check'])\n"
             "logging.getLogger('jaxkd').info('probe line')\n"
             "logging.info('root info line')\nlogging.warning('root warning line')\n"
             "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "jaxkd: probe line" in done.stderr
    assert "root: root warning line" in done.stderr
    assert "root info line" not in done.stderr
    # train.py itself (the entry point, which re-executes with huge pages and logs the setting
    # for a run): --check runs nothing, so it says nothing of host memory.
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--check"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stage distill" in done.stdout and "host memory" not in done.stderr


def test_check_refuses_a_layer_map_the_distill_stage_could_not_build(tmp_path, capsys, minilm_dir):
    """An 8-layer student with a hidden-state term and the uniform map of a 6-layer teacher is
    refused by --check itself, not after the teacher stage."""
    code = launch.main(["--config", "configs/tiny.yaml", "--check", f"workdir={tmp_path / 'run'}",
                        "student.init=shape", "student.num_layers=8", "distill.hidden_weight=1"])
    assert code == 2
    assert "distill.layer_map 'uniform' needs a student with at most as many layers" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _wrapped_disk_full():
    try:
        raise OSError(28, "No space left on device", "/runs/x/checkpoints/distill/8/state")
    except OSError as inner:
        try:
            raise RuntimeError("orbax: save failed") from inner
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize("error, line, code", [
    (_wrapped_disk_full(), "disk full writing /runs/x/checkpoints/distill/8/state: free space", 2),
    (ValueError('RESOURCE_EXHAUSTED: Failed writing: "/w/ckpt/6/d/da66": No space left on device'),
     "disk full writing /w/ckpt/6/d/da66: free space", 2),
    (ValueError("No space left on device"), "disk full: free space", 2),
    (FileNotFoundError("no such file: a.tsv"), "error: no such file: a.tsv", 2),
    (ZeroDivisionError("division by zero"),
     "internal error: ZeroDivisionError: division by zero (rerun with --verbose", 1),
])
def test_every_failure_is_one_line_with_its_exit_code(error, line, code):
    got, got_code = launch.failure_line(error)
    assert got.startswith(line) and "\n" not in got and got_code == code, got


def test_verbose_prints_the_traceback_before_the_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [1\n")
    assert launch.main(["--config", str(path), "--check"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("JAXKD_VERBOSE", "1")
    assert launch.main(["--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("config error: ")


def test_an_unknown_restart_stage_is_refused_before_any_work(tmp_path, capsys, minilm_dir):
    code = launch.main(["--config", "configs/tiny.yaml", f"workdir={tmp_path / 'run'}",
                        "--restart", "distil"])
    assert code == 2
    assert "--restart 'distil': unknown stage (did you mean 'distill'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_restart_help_names_every_stage():
    from jaxkd import manifest

    text = " ".join(launch.parser().format_help().split())
    assert f"redo this stage ({', '.join(manifest.STAGES)})" in text


def test_the_last_lines_give_teacher_student_and_baseline():
    """A run ends on its report's path and the reported split's metrics of each model it scored:
    the labels-only baseline too when it ran, n/a for a figure a model does not have."""
    report = {"teacher": {"metrics": {"accuracy": 0.83945, "f1": None}},
              "student": {"metrics": {"accuracy": 0.81537, "f1": 0.8}},
              "baseline": {"metrics": {"accuracy": 0.81193, "f1": 0.79}}}
    assert launch.summary_lines(report, "runs/x/report.json") == [
        "report: runs/x/report.json",
        "teacher accuracy=0.8395 f1=n/a",
        "student accuracy=0.8154 f1=0.8000",
        "baseline accuracy=0.8119 f1=0.7900"]
    del report["baseline"]
    assert launch.summary_lines(report, "r.json")[-1] == "student accuracy=0.8154 f1=0.8000"
