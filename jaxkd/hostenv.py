"""Huge pages for XLA's large CPU buffers: the process re-executes itself once with glibc's tunable.

XLA's CPU runtime takes a training step's large temporaries from malloc every step: the
gradient of a 30522 x 384 word embedding alone is 47 MB. glibc serves blocks above 32 MB with a
fresh mmap and unmaps them on free, so each step faults those pages in again, 4 KiB at a time,
and the kernel zeroes each one. glibc >= 2.35 can advise transparent huge pages for such blocks
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`); with the kernel's THP mode "madvise", the usual one,
only advised memory gets them. The distillation step on SST-2's short batches then ran about a
quarter faster on a 2-core CPU (docs/performance.md). glibc reads tunables only at start-up,
so the entry points (`train.py`, `jaxkd train`, `python -m jaxkd.bench`) re-execute themselves
with it before they use JAX; the process keeps its PID, arguments and other environment.

Left alone: a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb (`...=0` turns this off), a
THP mode other than "madvise" ("always" needs no advice, "never" takes none), libcs other than
glibc >= 2.35, and hosts with an accelerator plugin installed (measured on CPU only).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
# jax's GPU and TPU plugins; with one installed the host is left as it is.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def thp_mode(path: pathlib.Path = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def glibc_supports_hugetlb(libc: tuple[str, str]) -> bool:
    name, version = libc
    try:
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def tunable_value(environ: Mapping[str, str]) -> str | None:
    """glibc.malloc.hugetlb's value in GLIBC_TUNABLES (name=value pairs joined by ":"), or None."""
    for tunable in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = tunable.partition("=")
        if name == TUNABLE:
            return value
    return None


def huge_page_environ(environ: Mapping[str, str], mode: str | None, libc: tuple[str, str],
                      accelerator: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the tunable would change nothing."""
    if (mode != "madvise" or accelerator or not glibc_supports_hugetlb(libc)
            or tunable_value(environ) is not None):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def has_accelerator_plugin() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """One line for a run's log: the tunable as this process has it, and the kernel's THP mode."""
    value = tunable_value(environ)
    value = "unset" if value is None else value
    return f"{TUNABLE}={value}, transparent huge pages {thp_mode() or 'unknown'}"


def reexec_with_huge_pages() -> None:
    """Re-execute this process with glibc.malloc.hugetlb=1 when that helps; else return.

    Call it first thing in a program's entry point, before JAX starts a backend: nothing done
    before it survives the exec.
    """
    # A program read from stdin ("-") or typed at the prompt ("") cannot be run again.
    if sys.platform != "linux" or sys.argv[0] in ("", "-"):
        return
    env = huge_page_environ(os.environ, thp_mode(), platform.libc_ver(), has_accelerator_plugin())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own flags (-m, -X, -u ...) as they were given.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
