"""jaxkd.hostenv: when a process re-executes itself with glibc.malloc.hugetlb=1, and that the
re-executed process really gets huge pages for a large malloc (read back from /proc)."""
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxkd import hostenv

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("", None),
])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hostenv.thp_mode(path) == mode
    assert hostenv.thp_mode(tmp_path / "absent") is None


def test_huge_page_environ_adds_the_tunable_after_the_users_own():
    env = hostenv.huge_page_environ({"A": "1"}, "madvise", GLIBC, accelerator=False)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hostenv.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise",
                                    GLIBC, accelerator=False)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, mode, libc, accelerator", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, False),  # the user's opt-out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC, False),  # already re-executed
    ({}, "always", GLIBC, False),  # the kernel gives huge pages unasked
    ({}, "never", GLIBC, False),
    ({}, None, GLIBC, False),
    ({}, "madvise", ("glibc", "2.31"), False),  # before the tunable existed
    ({}, "madvise", ("", ""), False),  # musl and others
    ({}, "madvise", GLIBC, True),  # an accelerator host: not measured there
])
def test_huge_page_environ_leaves_the_process_alone(environ, mode, libc, accelerator):
    assert hostenv.huge_page_environ(environ, mode, libc, accelerator) is None


def test_a_near_miss_tunable_name_is_not_taken_for_it():
    env = hostenv.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=0"}, "madvise",
                                    GLIBC, accelerator=False)
    assert env is not None


def test_describe_names_the_value_this_process_has():
    assert hostenv.describe({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}).startswith(
        "glibc.malloc.hugetlb=1, transparent huge pages ")
    assert hostenv.describe({}).startswith("glibc.malloc.hugetlb=unset")


# The child prints its PID before and after the re-exec (stdout is flushed before it), then
# allocates and touches 128 MiB with malloc, and reports the huge pages of that mapping.
_CHILD = textwrap.dedent("""
    import os, re, sys
    print("pid", os.getpid(), flush=True)
    from jaxkd import hostenv
    hostenv.reexec_with_huge_pages()
    import numpy as np
    a = np.ones(2 ** 24)  # 128 MiB: mmapped by glibc
    start = a.__array_interface__["data"][0]
    huge, inside = 0, False
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= start < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
    print("huge_kb", huge)
""")


def _child_env(environ_extra: dict[str, str]) -> dict[str, str]:
    """This environment without the tunable (unless given), with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(environ_extra, PYTHONPATH=str(ROOT))
    return env


def _run_child(environ_extra: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _CHILD], env=_child_env(environ_extra),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return out.split("\n")


needs_madvise_thp = pytest.mark.skipif(
    sys.platform != "linux" or hostenv.thp_mode() != "madvise"
    or not hostenv.glibc_supports_hugetlb(platform.libc_ver()) or hostenv.has_accelerator_plugin(),
    reason="needs Linux, glibc >= 2.35, transparent huge pages in madvise mode and no "
           "accelerator plugin")


@pytest.mark.slow
@needs_madvise_thp
def test_reexec_keeps_the_pid_and_gives_a_large_malloc_huge_pages():
    lines = _run_child({})
    pids = [line for line in lines if line.startswith("pid ")]
    assert len(pids) == 2 and pids[0] == pids[1], lines  # printed before and after the exec
    assert "tunables glibc.malloc.hugetlb=1" in lines
    huge_kb = int(next(line for line in lines if line.startswith("huge_kb")).split()[1])
    assert huge_kb >= 64 * 1024, lines  # most of the 128 MiB


@pytest.mark.slow
@needs_madvise_thp
def test_the_opt_out_runs_once_without_huge_pages():
    lines = _run_child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert len([line for line in lines if line.startswith("pid ")]) == 1, lines
    assert "huge_kb 0" in lines, lines


@pytest.mark.slow
@needs_madvise_thp
def test_a_program_read_from_stdin_is_not_run_twice():
    out = subprocess.run([sys.executable, "-"], input=_CHILD, env=_child_env({}),
                         capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    assert len([line for line in out if line.startswith("pid ")]) == 1, out
    assert "tunables " in out, out
