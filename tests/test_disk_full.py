"""A full disk: the run stops with one line naming the directory and what a checkpoint needs,
leaves the checkpoints it had intact, and once there is room the same command finishes with the
student of a run that never stopped. Needs a tmpfs (root on Linux); skipped where it cannot be
mounted."""
import shutil
import subprocess

import pytest

from helpers import assert_trees_close, launch, run_in_process, student_params, tiny_config


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_finishes_the_same_student(tmp_path, small_disk,
                                                                          tiny_teacher, sst2_small):
    over = {"distill.steps": 24, "data.cache_dir": str(tmp_path / "cache")}
    reference = run_in_process(tiny_config(tmp_path / "ref", tiny_teacher, sst2_small, **over))
    workdir = small_disk / "run"
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **over)
    proc = launch(cfg, tmp_path / "cfg.yaml")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"disk full writing {workdir / 'checkpoints'}"), last
    assert "MiB are free" in last and "rerun the same command" in last
    kept = sorted(p.name for p in (workdir / "checkpoints" / "teacher").iterdir())
    assert kept, "the teacher's checkpoints were lost"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = launch(cfg, tmp_path / "cfg.yaml")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert sorted(p.name for p in (workdir / "checkpoints" / "teacher").iterdir()) == kept
    assert_trees_close(student_params(workdir), student_params(tmp_path / "ref"), 1e-6)
    assert reference["student"]["splits"]["eval"]
