"""report.json's record of the code that wrote it, checked against throwaway git repositories."""
import shutil
import subprocess

import pytest

from jaxkd.report import code_version

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


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


def test_a_clean_checkout_gives_its_commit(repo):
    found = code_version(repo)
    assert found["commit"] == _git(repo, "log", "-1", "--format=%H") and len(found["commit"]) == 40
    assert found["modified"] is False
    (repo / "untracked.txt").write_text("scratch\n")  # untracked files do not change the code
    assert code_version(repo)["modified"] is False


def test_an_edited_tracked_file_marks_it_modified(repo):
    (repo / "tracked.txt").write_text("two\n")
    assert code_version(repo)["modified"] is True


def test_no_commit_outside_a_checkout_or_below_its_top(repo, tmp_path):
    # A package installed somewhere inside another repository must not claim that repository's commit.
    (repo / "site-packages").mkdir()
    assert code_version(repo / "site-packages") == {"version": code_version(repo)["version"],
                                                    "commit": None, "modified": None}
    (tmp_path / "plain").mkdir()
    assert code_version(tmp_path / "plain")["commit"] is None
