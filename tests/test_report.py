"""jaxkd.report: the record of the code that wrote a report (against throwaway git repositories),
build_report's entries and ratios, the Markdown report, and the metric sinks, each against values
computed here."""
import json
import pathlib
import shutil
import subprocess

import pytest

from jaxkd.report import code_version

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "tracked.txt").write_text("one\n")
    _git(root, "add", "tracked.txt")
    _git(root, "commit", "-q", "-m", "first")
    return root


@needs_git
def test_a_clean_checkout_gives_its_commit(repo):
    found = code_version(repo)
    assert found["commit"] == _git(repo, "log", "-1", "--format=%H") and len(found["commit"]) == 40
    assert found["modified"] is False
    (repo / "untracked.txt").write_text("scratch\n")  # untracked files do not change the code
    assert code_version(repo)["modified"] is False


@needs_git
def test_an_edited_tracked_file_marks_it_modified(repo):
    (repo / "tracked.txt").write_text("two\n")
    assert code_version(repo)["modified"] is True


@needs_git
def test_edited_results_and_docs_are_not_code(repo):
    for folder in ("results", "docs"):  # a batch copies each finished report into results/
        (repo / folder).mkdir()
        (repo / folder / "report.json").write_text("{}\n")
        _git(repo, "add", f"{folder}/report.json")
    _git(repo, "commit", "-q", "-m", "results")
    for folder in ("results", "docs"):
        (repo / folder / "report.json").write_text('{"new": 1}\n')
    assert code_version(repo)["modified"] is False
    (repo / "tracked.txt").write_text("two\n")
    assert code_version(repo)["modified"] is True


@needs_git
def test_no_commit_outside_a_checkout_or_below_its_top(repo, tmp_path):
    # A package installed somewhere inside another repository must not claim that repository's commit.
    (repo / "site-packages").mkdir()
    assert code_version(repo / "site-packages") == {"version": code_version(repo)["version"],
                                                    "commit": None, "modified": None}
    (tmp_path / "plain").mkdir()
    assert code_version(tmp_path / "plain")["commit"] is None


# ----------------------------------------------------------------------------- build_report


def _entry(params, latency_ms, throughput, splits, layers, hidden):
    test_or_eval = splits.get("test", splits.get("eval"))
    return {"params": params, "size_mb": params * 4 / 2**20, "layers": layers, "hidden_size": hidden,
            "metrics": dict(test_or_eval), "splits": splits, "latency_ms": latency_ms,
            "throughput": throughput, "speed_seq_len": 128, "device": "cpu"}


@pytest.fixture
def built():
    from jaxkd import config as config_lib
    from jaxkd.report import build_report
    from jaxkd.tasks import sequence, task_config

    cfg = config_lib.from_dict({"task": {"name": "mrpc"}, "seed": 11,
                                "teacher": {"model": "some/teacher"}, "student": {"layers": [0, 2]},
                                "distill": {"temperature": 3.0, "alpha": 0.25}})
    task = sequence.resolve(task_config("mrpc"))
    teacher = _entry(1_000_000, 10.0, 200.0, {"eval": {"accuracy": 0.8, "f1": 0.0},
                                              "test": {"accuracy": 0.8, "f1": 0.0}}, 6, 384)
    student = _entry(250_000, 4.0, 640.0, {"eval": {"accuracy": 0.6, "f1": 0.5},
                                           "test": {"accuracy": 0.7, "f1": 0.5}}, 2, 384)
    agreement = {"eval": 0.9, "test": 0.875}
    return cfg, task, build_report(cfg, task, {"teacher": teacher, "student": student}, agreement)


def test_build_report_derives_its_ratios_from_the_entries(built):
    cfg, task, report = built
    assert (report["task"], report["task_type"]) == ("mrpc", "sequence_classification")
    assert report["metric_names"] == ["accuracy", "f1"] and report["report_split"] == "test"
    # Retention per metric (student over teacher), None where the teacher scored 0.
    assert report["retention"] == {"accuracy": pytest.approx(0.7 / 0.8), "f1": None}
    assert report["agreement"] == {"eval": 0.9, "test": 0.875}
    assert report["speedup"] == pytest.approx(10.0 / 4.0)
    assert report["throughput_ratio"] == pytest.approx(640.0 / 200.0)
    assert report["compression"] == pytest.approx(4.0)
    assert report["teacher"]["model"] == "some/teacher" and report["student"]["init"] == cfg.student.init
    assert report["student"]["splits"]["eval"] == {"accuracy": 0.6, "f1": 0.5}
    assert report["distill"]["temperature"] == 3.0 and report["distill"]["alpha"] == 0.25
    assert report["student_config"]["layers"] == [0, 2]
    assert (report["seed"], report["precision"]) == (11, "float32")
    assert report["code"] == code_version()


def test_retention_below_one_is_a_worse_student_for_perplexity_too():
    from jaxkd.report import _retention

    assert _retention(0.8, 0.6, False) == pytest.approx(0.75)
    assert _retention(10.0, 20.0, True) == pytest.approx(0.5)  # the student's perplexity doubled
    assert _retention(0.0, 0.5, False) is None and _retention(10.0, 0.0, True) is None
    assert _retention(None, 0.5, False) is None and _retention(0.5, None, True) is None


def test_report_plot_of_a_run_without_shared_metrics(tmp_path, built):
    """A held-out run whose models have no masked-LM heads has no metric to set side by side:
    the plot shows the latency alone (it drew bars of 0 under the first metric's name)."""
    pytest.importorskip("matplotlib")
    from jaxkd.report import _plots

    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig

    def record(fig, path, *args, **kwargs):
        saved[pathlib.Path(path).name] = fig
        return savefig(fig, path, *args, **kwargs)

    def bars(report):
        saved.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Figure, "savefig", record)
            _plots(report, tmp_path)
        assert (tmp_path / "teacher_vs_student.png").stat().st_size > 0
        return [(ax.get_title(), [p.get_height() for p in ax.patches])
                for ax in saved["teacher_vs_student.png"].axes]

    _, _, report = built
    latency = [report[w]["latency_ms"] for w in ("teacher", "student")]
    headless = {**report, "metric_names": ["mlm_accuracy", "perplexity"],
                "teacher": {**report["teacher"], "metrics": {"mlm_accuracy": None}},
                "student": {**report["student"], "metrics": {}}}
    assert bars(headless) == [("latency, batch 1 (ms)", latency)]
    shared = {**headless, "teacher": {**report["teacher"], "metrics": {"mlm_accuracy": 0.5}},
              "student": {**report["student"], "metrics": {"mlm_accuracy": 0.25}}}
    assert bars(shared) == [(f"mlm_accuracy ({report['report_split']})", [0.5, 0.25]),
                            ("latency, batch 1 (ms)", latency)]


def test_report_split_is_eval_without_a_test_split(built):
    from jaxkd.report import build_report

    cfg, task, report = built
    models = {who: {**report[who], "splits": {"eval": report[who]["splits"]["eval"]}}
              for who in ("teacher", "student")}
    from jaxkd.report import report_markdown

    without_test = build_report(cfg, task, models, {"eval": 0.9})
    assert without_test["report_split"] == "eval"
    assert "No test split" in report_markdown(without_test)  # says its figures read optimistic
    assert "No test split" not in report_markdown(report)


# ----------------------------------------------------------------------------- markdown


def test_markdown_lists_both_models_side_by_side(built):
    from jaxkd.report import report_markdown

    lines = report_markdown(built[2]).splitlines()
    assert lines[0] == "# Distillation report: mrpc"
    assert "Teacher `some/teacher`, student init `teacher_layers`, device cpu." in lines
    assert "| parameters | 1000000 | 250000 |" in lines
    assert f"| size (MiB, fp32) | {1_000_000 * 4 / 2**20:.4f} | {250_000 * 4 / 2**20:.4f} |" in lines
    assert "| layers x hidden | 6 x 384 | 2 x 384 |" in lines
    # Every metric of both splits, eval first, floats to 4 places.
    rows = [line for line in lines if line.startswith("| accuracy (") or line.startswith("| f1 (")]
    assert rows == ["| accuracy (eval) | 0.8000 | 0.6000 |", "| f1 (eval) | 0.0000 | 0.5000 |",
                    "| accuracy (test) | 0.8000 | 0.7000 |", "| f1 (test) | 0.0000 | 0.5000 |"]
    assert "| latency, batch 1 x 128 (ms) | 10.0000 | 4.0000 |" in lines
    assert "| throughput (examples/s) | 200.0000 | 640.0000 |" in lines
    assert f"Retention (test): accuracy {0.7 / 0.8:.4f}, f1 None" in lines
    assert "Agreement with the teacher: eval 0.9000, test 0.8750" in lines
    assert "Speed-up at batch 1: 2.50x; compression 4.00x." in lines
    assert not any(line.startswith("## Examples") for line in lines)


def test_markdown_examples_escape_pipes_and_cut_long_cells(built):
    from jaxkd.report import report_markdown

    long_text = "word " * 60  # 300 characters
    report = {**built[2], "examples": [{"text": "a | b\nc", "gold": 1, "student": long_text}]}
    lines = report_markdown(report).splitlines()
    start = lines.index("## Examples (test)")
    assert lines[start + 2:start + 4] == ["| text | gold | student |", "|---|---|---|"]
    cells = lines[start + 4].split(" | ")
    assert cells[0] == "| a \\| b c" and cells[1] == "1"
    student_cell = cells[2].removesuffix(" |")
    assert len(student_cell) == 160 and student_cell == long_text[:159] + "…"


def test_write_report_writes_the_json_and_the_markdown(built, tmp_path):
    import json

    from jaxkd.report import report_markdown, write_report

    write_report(built[2], tmp_path, plots=False)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(built[2]))
    assert (tmp_path / "report.md").read_text() == report_markdown(built[2])
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- sinks


def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_sink_appends_one_json_row_per_write_and_truncates_a_stage(tmp_path):
    from jaxkd.report import MetricsSink

    sink = MetricsSink(tmp_path, tensorboard=False)
    written = [{"stage": "teacher", "step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    written += [{"stage": "distill", "step": s, "loss": 2.0 / s} for s in (2, 4, 6)]
    written.append({"stage": "distill", "split": "eval", "step": 6, "accuracy": 0.5})
    for row in written:
        sink.write(row)
    assert _rows(tmp_path / "metrics.jsonl") == written
    # A resumed distillation from step 4: its later rows go, the other stage's stay.
    sink.truncate("distill", 4)
    assert _rows(tmp_path / "metrics.jsonl") == [r for r in written
                                                 if r["stage"] == "teacher" or r["step"] <= 4]
    sink.close()
    # Appending continues the file (a resumed run).
    again = MetricsSink(tmp_path, tensorboard=False)
    again.write({"stage": "distill", "step": 6, "loss": 0.1})
    assert _rows(tmp_path / "metrics.jsonl")[-1] == {"stage": "distill", "step": 6, "loss": 0.1}


def test_a_cut_short_last_metrics_row_is_dropped_and_a_bad_row_elsewhere_named(tmp_path):
    from jaxkd.report import MetricsSink, read_metrics

    rows = [{"stage": "distill", "step": s, "loss": 1.0} for s in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "disti')
    assert read_metrics(tmp_path) == rows
    # A resumed stage rewrites the file whole: the broken tail is gone, nothing else lost.
    MetricsSink(tmp_path, tensorboard=False).truncate("distill", 1)
    assert _rows(path) == rows[:1]
    path.write_text('{"stage": "disti\n' + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not a JSON object"):
        read_metrics(tmp_path)


def test_disabled_sink_writes_nothing(tmp_path):
    from jaxkd.report import MetricsSink

    sink = MetricsSink(tmp_path, enabled=False)
    sink.write({"stage": "distill", "step": 1, "loss": 0.5})
    sink.truncate("distill", 0)
    sink.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    from jaxkd.report import MetricsSink

    sink = MetricsSink(tmp_path, tensorboard=True)
    sink.write({"stage": "distill", "step": 1, "loss": 0.5, "accuracy": float("nan"), "note": "x"})
    sink.close()
    assert _rows(tmp_path / "metrics.jsonl")[0]["loss"] == 0.5
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_progress_iter_yields_every_item_in_a_log_file(monkeypatch):
    from jaxkd import report

    monkeypatch.setattr(report, "_interactive", lambda: False)
    assert list(report.progress_iter(range(5), "eval", enabled=True)) == list(range(5))
    assert list(report.progress_iter(iter("abc"), "eval", enabled=False)) == ["a", "b", "c"]
