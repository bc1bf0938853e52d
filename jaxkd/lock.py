"""One writer per work directory: an exclusive lock file, held for a run.

`WorkdirLock(workdir)` creates `workdir/.lock` atomically (a hard link of a complete
temporary file, which fails when the lock exists) holding the holder's host, PID, start time
and lease. A lock is stale, and is taken over with a warning, when its process is gone (same
host), when it names this process's PID without being held by it, or its lease has expired (another host: the holder renews the lease every third of
`LEASE_S` while it runs). Otherwise `LockError` names the holder. On a multi-process run
process 0 holds the lock for all, and every process learns whether it was taken.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import socket
import threading
import time

import jax

from jaxkd import sharding, util

log = logging.getLogger("jaxkd")

LEASE_S = 300.0
NAME = ".lock"
_HELD: set[str] = set()  # lock files this process holds: a record with its PID and no entry here
#                          is a leftover of an earlier process that had the same PID


class LockError(RuntimeError):
    """Another run holds the work directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a holder died while writing its lease: no holder worth naming
        return {}


def stale_reason(holder: dict, now: float | None = None,
                 path: pathlib.Path | None = None) -> str | None:
    """Why the lock described by `holder` (read from `path`) no longer holds (None: it holds)."""
    now = time.time() if now is None else now
    if not holder:
        return "its lock file is unreadable"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid() and path is not None and str(path.absolute()) not in _HELD:
            return (f"it names this process's PID {pid}, left by an earlier process "
                    "(a restarted container reuses PIDs)")
        if not _alive(pid):
            return f"process {holder.get('pid')} is gone"
        return None
    if float(holder.get("lease_until", 0)) < now:
        return f"its lease expired at {time.ctime(float(holder.get('lease_until', 0)))}"
    return None


class WorkdirLock:
    """`with WorkdirLock(workdir):` the run's exclusive hold on `workdir` (created if absent;
    removed again on exit when the run left nothing in it)."""

    def __init__(self, workdir: str | os.PathLike, lease_s: float = LEASE_S):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / NAME
        self.lease_s = lease_s
        self._created_dir = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._held = False

    def _record(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.time(), "lease_until": time.time() + self.lease_s})

    def _try_create(self) -> bool:
        tmp = self.path.with_name(f"{NAME}.{util.unique_name()}.tmp")
        try:
            tmp.write_text(self._record())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        try:
            self.workdir.mkdir(parents=True)
            self._created_dir = True
        except FileExistsError:  # there already (or made by a run starting beside this one)
            pass
        for _ in range(3):
            if self._try_create():
                self._held = True
                _HELD.add(str(self.path.absolute()))
                self._start_renewing()
                return
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            reason = stale_reason(holder, path=self.path)
            if reason is None:
                raise LockError(
                    f"workdir {self.workdir} is in use by process {holder.get('pid')} on host "
                    f"{holder.get('host')} (since {time.ctime(float(holder.get('started', 0)))}); "
                    "wait for that run to finish, or use another workdir")
            # Take over: move the stale file aside, then make sure it was the one judged stale.
            # Of several processes doing this at once, one may have taken over already and
            # made a fresh lock, which a later rename moved: that one goes back.
            aside = self.path.with_name(f"{NAME}.stale.{util.unique_name()}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if _read(aside) != holder:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    log.warning("workdir %s: a lock taken over at the same time as another "
                                "run's could not be put back", self.workdir)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            log.warning("workdir %s: taking over a stale lock (%s)", self.workdir, reason)
        raise LockError(f"workdir {self.workdir}: could not take {self.path}; another run is "
                        "starting there at the same time")

    def _start_renewing(self) -> None:
        def renew():
            while not self._stop.wait(self.lease_s / 3):
                try:
                    record = json.loads(self.path.read_text())
                    record["lease_until"] = time.time() + self.lease_s
                    util.write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(record)))
                except OSError as e:  # a full disk must not kill the run: the lease ages
                    if e.errno != errno.ENOSPC:
                        log.warning("workdir lock: could not renew the lease (%s)", e)
        self._renewer = threading.Thread(target=renew, name="jaxkd-lock", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._held:
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid() \
                    and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            _HELD.discard(str(self.path.absolute()))
            self._held = False
        if self._created_dir:
            try:
                self.workdir.rmdir()  # only when empty: a run refused up front leaves nothing
            except OSError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class RunLock:
    """The lock of a (possibly multi-process) run: process 0 takes `WorkdirLock`, and every
    process raises when it could not (`sharding.on_process0`)."""

    def __init__(self, workdir: str | os.PathLike):
        self.inner = WorkdirLock(workdir) if jax.process_index() == 0 else None

    def __enter__(self):
        sharding.on_process0(lambda: self.inner.acquire(), "taking the workdir's lock")
        return self

    def __exit__(self, *exc):
        if self.inner is not None:
            self.inner.release()
