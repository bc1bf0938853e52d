"""One writer per workdir: the lock is exclusive, names its holder, and is taken over only when
stale (its process gone on this host, or its lease expired on another)."""
import errno
import json
import multiprocessing
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from jaxkd import lock


def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    with lock.WorkdirLock(tmp_path / "run"):
        with pytest.raises(lock.LockError) as err:
            lock.WorkdirLock(tmp_path / "run").acquire()
        assert f"in use by process {os.getpid()} on host {socket.gethostname()}" in str(err.value)
    assert not (tmp_path / "run" / ".lock").exists()
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed again


def test_release_keeps_a_workdir_that_holds_files(tmp_path):
    with lock.WorkdirLock(tmp_path / "run"):
        (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert (tmp_path / "run" / "config.yaml").is_file()


def _write_holder(workdir, **record):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".lock").write_text(json.dumps({"started": time.time(), **record}))


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, caplog):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    _write_holder(tmp_path, host=socket.gethostname(), pid=dead, lease_until=time.time() + 999)
    with caplog.at_level("WARNING", logger="jaxkd"), lock.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
    assert f"process {dead} is gone" in caplog.text


def test_a_lock_naming_this_process_but_not_held_by_it_is_taken_over(tmp_path, caplog):
    """A restarted container reuses PIDs: the lock its killed run left can name the new run."""
    _write_holder(tmp_path, host=socket.gethostname(), pid=os.getpid(), lease_until=0)
    with caplog.at_level("WARNING", logger="jaxkd"), lock.WorkdirLock(tmp_path):
        with pytest.raises(lock.LockError, match="in use by process"):  # held now: it holds
            lock.WorkdirLock(tmp_path).acquire()
    assert "names this process's PID" in caplog.text


def test_a_takeover_never_moves_a_lock_another_run_just_took(tmp_path, monkeypatch):
    """Two runs judge the same lock stale; the first takes it over and makes its own. The
    second, moving what is there now, finds another record and puts it back."""
    _write_holder(tmp_path, host="elsewhere", pid=1, lease_until=0)
    fresh = {"host": "elsewhere", "pid": 2, "started": time.time(), "lease_until": time.time() + 60}
    judge = lock.stale_reason

    def judged_then_taken_over(holder, now=None, path=None):
        reason = judge(holder, now, path)
        if holder.get("pid") == 1:  # meanwhile the other run took over
            (tmp_path / ".lock").write_text(json.dumps(fresh))
        return reason
    monkeypatch.setattr(lock, "stale_reason", judged_then_taken_over)
    with pytest.raises(lock.LockError, match="in use by process 2 on host elsewhere"):
        lock.WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text()) == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_another_hosts_lock_holds_until_its_lease_expires(tmp_path):
    _write_holder(tmp_path, host="elsewhere", pid=1, lease_until=time.time() + 60)
    with pytest.raises(lock.LockError, match="on host elsewhere"):
        lock.WorkdirLock(tmp_path).acquire()
    _write_holder(tmp_path, host="elsewhere", pid=1, lease_until=time.time() - 1)
    with lock.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["host"] == socket.gethostname()


def test_the_holder_renews_its_lease(tmp_path):
    with lock.WorkdirLock(tmp_path, lease_s=0.3):
        first = json.loads((tmp_path / ".lock").read_text())["lease_until"]
        time.sleep(0.5)
        assert json.loads((tmp_path / ".lock").read_text())["lease_until"] > first


def test_renewals_on_a_full_disk_leave_no_files_behind(tmp_path, monkeypatch):
    """The lease ages while the disk is full (the run goes on), and no renewal leaves its
    temporary file in the workdir."""
    with lock.WorkdirLock(tmp_path, lease_s=0.15):
        write_text, tries = pathlib.Path.write_text, []

        def full(path, text, *args, **kwargs):
            tries.append(path)
            write_text(path, text[:3], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")

        def lease():
            return json.loads((tmp_path / ".lock").read_text())["lease_until"]
        def wait_until(condition):
            deadline = time.time() + 30
            while not condition() and time.time() < deadline:
                time.sleep(0.01)
            return condition()
        monkeypatch.setattr(pathlib.Path, "write_text", full)
        assert wait_until(lambda: len(tries) >= 1)  # from here on, every renewal fails
        before = lease()
        assert wait_until(lambda: len(tries) >= 4)
        monkeypatch.undo()
        assert lease() == before  # renewals were tried, and failed whole
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
        assert wait_until(lambda: lease() > before)  # the renewer lives on once there is room


def _contend(workdir, start, results):
    while time.time() < start:
        pass
    try:
        lock.WorkdirLock(workdir).acquire()  # held until the process exits
        results.put("held")
        time.sleep(1.0)
    except lock.LockError as e:
        results.put(str(e))


@pytest.mark.slow
def test_of_processes_started_together_exactly_one_holds_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 2.0
    procs = [ctx.Process(target=_contend, args=(tmp_path, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert outcomes.count("held") == 1, outcomes
    assert all("is in use by process" in o for o in outcomes if o != "held"), outcomes


@pytest.mark.slow
def test_two_runs_started_together_on_one_workdir(tmp_path, tiny_teacher, sst2_small):
    """One run proceeds; the other exits 2 at once naming the holder, and writes nothing: the
    finished workdir has one row per logged step and every checkpoint whole."""
    from helpers import launch, tiny_config

    workdir = tmp_path / "run"
    # No teacher fine-tuning and no evaluation: the lock is what is checked, not the stages.
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **{"distill.steps": 8,
                                                            "teacher.finetune.steps": 0,
                                                            "data.eval": None})
    procs = [launch(cfg, tmp_path / f"cfg{i}.yaml") for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)]
    assert "is in use by process" in refused and "Traceback" not in refused, refused
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"], r.get("split")) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert not (workdir / ".lock").exists()
