"""Small jobs that several modules share, each done in one place.

- `did_you_mean`: the hint after an unknown name ("did you mean 'sst2'?"), from `difflib`.
- `write_atomic`: a file replaced whole or not at all (caches written by several processes).
- `content_hash`: a hex digest of byte strings and arrays (cache keys, parameter digests);
  `path_key`: the content key of a file or a directory (run manifests, tokenized corpora).
- `unique_name` (temporary files), `write_dir_atomic` (a directory replaced whole),
  `write_check` / `check_problem` (a record of a file's arrays, to tell a whole file from a
  damaged one), `first_line` (an error in a log line), `usable_cores`, `count` ("1 row") and
  `quiet_libraries` (what each command sets before a library is imported).

Callers keep their own wording, cutoffs, algorithms and lengths: these helpers only do the
mechanics, so a message or a cache key built through them is byte for byte what it was.
This module imports nothing from jaxkd.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def did_you_mean(name: str, choices: Iterable[str], *, cutoff: float = 0.6,
                 hint: str = " (did you mean {!r}?)", otherwise: str = "") -> str:
    """`hint` formatted with the choice closest to `name`, or `otherwise` when none is close.

    Closest as `difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)` finds it
    (0.6 is difflib's own default). The hint is meant to follow a message directly, so it
    carries its own leading punctuation: " (did you mean 'x'?)" by default, or e.g.
    "; did you mean {!r}?".
    """
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return hint.format(close[0]) if close else otherwise


def count(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1: "1 row", "3 rows" (regular nouns only)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def quiet_libraries() -> None:
    """A command prints its own lines only: no notices from libraries at import or load time.
    Each command calls this first, before anything imports transformers."""
    # transformers announces at import that PyTorch is absent (it is not needed here).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("absl", "jax", "matplotlib", "orbax", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def unique_name() -> str:
    """A name part no other writer uses at once: hosts of a multi-host run often share PIDs."""
    import uuid

    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; every core off Linux): tokenizer
    workers, ONNX Runtime's and torch's threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, cut to `limit` characters, for a log line or a reason (its type's
    name when it has no text)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def write_atomic(path: str | os.PathLike, write: Callable[[pathlib.Path], Any]) -> None:
    """Creates or replaces `path` with what `write(tmp)` writes to a temporary file beside it.

    Readers, and other processes writing the same path at once, see the old file or a whole
    new one, never a part: the temporary file (`<stem>.<unique>.tmp<suffix>`, in the same
    directory, so the same file system) is renamed over `path` only after `write` returns.
    If `write` raises, the temporary file is removed, `path` is left as it was, and the error
    propagates. Parent directories are created. `write` must write to exactly the path it is
    given (the suffix is kept, so `np.save` / `np.savez` add no second one).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{unique_name()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dir_atomic(path: str | os.PathLike, write: Callable[[pathlib.Path], Any]) -> Any:
    """Creates or replaces the directory `path` with what `write(tmp)` writes into a fresh
    temporary directory beside it, and returns what `write` returns.

    `path` is never a partly written directory: the old one is moved aside, the new one renamed
    into place, then the old one removed. If `write` raises, the temporary directory is removed,
    `path` is left as it was, and the error propagates. One writer at a time (a run's workdir
    lock): the leftovers of a call killed midway (`leftovers`) are removed first.
    """
    import shutil

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in leftovers(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = (path.with_name(f"{path.name}.{unique_name()}.{kind}") for kind in ("tmp", "old"))
    tmp.mkdir()
    try:
        out = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return out


def leftovers(path: str | os.PathLike) -> list[pathlib.Path]:
    """What a `write_dir_atomic(path, ...)` killed midway leaves beside `path`: its temporary
    directory (`<name>.<unique>.tmp`) and, killed between its two renames, the old directory
    (`<name>.<unique>.old`, with no `path`)."""
    path = pathlib.Path(path)
    return sorted(p for kind in ("tmp", "old") for p in path.parent.glob(f"{path.name}.*.{kind}"))


def content_hash(chunks: Iterable[bytes | Any], *, algorithm: str = "sha256",
                 digest_size: int | None = None, length: int | None = None,
                 array_layout: bool = True) -> str:
    """Hex digest of `chunks` fed in order to `hashlib.new(algorithm)`.

    A `bytes` chunk is fed as it is. Anything else is an array (NumPy, JAX, or a NumPy
    scalar): `np.asarray(chunk)` is fed as f"{dtype}{shape}" (unless `array_layout` is
    False) followed by its bytes in C order. `digest_size` is passed to variable-size
    algorithms (blake2b); `length` keeps the first that many hex digits. The caller frames
    its parts (separators, a version prefix): the digest depends on exactly these bytes, so
    keys built through it stay the same as long as the chunks do.
    """
    digest = (hashlib.new(algorithm) if digest_size is None
              else hashlib.new(algorithm, digest_size=digest_size))
    for chunk in chunks:
        if isinstance(chunk, bytes):
            digest.update(chunk)
            continue
        arr = np.asarray(chunk)
        if array_layout:
            digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    hexdigest = digest.hexdigest()
    return hexdigest if length is None else hexdigest[:length]


def path_key(path: str | os.PathLike) -> str:
    """Content key of a file, or of a directory's files (relative names, sizes and bytes, in
    sorted order): blake2b-128 hex. A copy under the same name, or a new mtime, keeps it.

    A file's key is remembered in this process while its inode, size, mtime and ctime stay the
    same (ctime cannot be set back), so a large corpus is read once a run. Not for a file
    changed in the last seconds: file times have a coarse clock (a few ms), and two writes of
    the same size within one tick would look alike (git's "racy" index entries)."""
    path = pathlib.Path(path)
    if path.is_file():
        st = path.stat()
        args = (str(path.resolve()), path.name,
                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
            return _file_key.__wrapped__(*args)
        return _file_key(*args)
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return content_hash(_framed(files, path), algorithm="blake2b", digest_size=16)


_RACY_NS = 3_000_000_000  # a file changed this recently is hashed afresh every time


@functools.lru_cache(maxsize=None)
def _file_key(resolved: str, name: str, stat: tuple[int, ...]) -> str:
    return content_hash(_framed([pathlib.Path(resolved)], None, name), algorithm="blake2b",
                        digest_size=16)


def _framed(files: list[pathlib.Path], root: pathlib.Path | None, name: str | None = None):
    """Each file's name (relative to `root`; `name` for a lone file), size, then its bytes."""
    for f in files:
        shown = name if root is None else f.relative_to(root)
        yield f"{shown}\0{f.stat().st_size}\0".encode()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                yield block


# ----------------------------------------------------------------------------- checked files

CHECK_SUFFIX = ".check.json"


def _array_record(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    return {name: {"shape": list(np.shape(arr)), "dtype": str(np.asarray(arr).dtype),
                   "blake2b": content_hash([np.asarray(arr)], algorithm="blake2b", digest_size=16)}
            for name, arr in sorted(arrays.items())}


def check_path(path: str | os.PathLike) -> pathlib.Path:
    """The record beside a checked data file: `<name>.check.json`."""
    path = pathlib.Path(path)
    return path.with_name(path.name + CHECK_SUFFIX)


def write_check(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Records the shape, dtype and checksum of each array of the data file `path`, after the
    data itself is in place (a file without its record is never trusted)."""
    import json

    record = _array_record(arrays)
    write_atomic(check_path(path), lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def check_problem(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> str | None:
    """Why the arrays read from `path` are not what was written there (no record, another
    shape, dtype or checksum), or None when they are."""
    import json

    record_path = check_path(path)
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return f"it has no {record_path.name} (written after the data: the write did not finish)"
    except (OSError, ValueError) as err:
        return f"its record {record_path.name} is unreadable ({err})"
    if record != _array_record(arrays):
        return f"its contents differ from what was written (record {record_path.name})"
    return None
