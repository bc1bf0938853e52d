"""The results tables of docs/results.md are generated from the committed report.json files."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_results_tables_match_reports():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_fails_when_a_report_changes(tmp_path):
    import json
    import shutil
    reports = sorted((ROOT / "results").glob("*/report.json"))
    assert reports, "no committed report.json to check the tables against"
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)

    def check():
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "--check",
                               "--results", str(results)], capture_output=True, text=True)
    unchanged = check()
    assert unchanged.returncode == 0, unchanged.stderr  # the copy itself passes
    edited = results / reports[0].parent.name / "report.json"
    data = json.loads(edited.read_text())
    metric = data["metric_names"][0]
    data["student"]["metrics"][metric] += 0.01
    edited.write_text(json.dumps(data))
    proc = check()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the results tables are out of date" in proc.stderr
