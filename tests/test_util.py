"""Tests for jaxkd.util: did-you-mean hints against difflib, atomic writes that fail midway, and
digests (the helper's and its callers') against hashlib computed here."""
import difflib
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import util

# ----------------------------------------------------------------------------- did_you_mean

NAMES = ["sst-2", "sst2", "mrcp", "conll", "zzz", "", "cosin", "temprature", "Linear"]
CHOICES = [("sst2", "mrpc", "stsb", "cola", "conll2003"), ("linear", "cosine", "constant"),
           ("temperature", "alpha", "steps"), ()]


@pytest.mark.parametrize("cutoff", [0.4, 0.5, 0.6])
@pytest.mark.parametrize("choices", CHOICES)
def test_did_you_mean_takes_difflibs_closest_choice(choices, cutoff):
    for name in NAMES:
        close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
        want = f" (did you mean {close[0]!r}?)" if close else ""
        assert util.did_you_mean(name, choices, cutoff=cutoff) == want, name
        want = f"; did you mean {close[0]!r}?" if close else "; none"
        assert util.did_you_mean(name, iter(choices), cutoff=cutoff, hint="; did you mean {!r}?",
                                 otherwise="; none") == want, name


def test_did_you_mean_defaults_to_difflibs_cutoff():
    # 'mrcp' / 'mrpc' score 0.75; 'ab' / 'abcd' 0.67; 'sst' / 'stsb2' 0.5: found at 0.6 or not.
    assert util.did_you_mean("mrcp", ["mrpc"]) == " (did you mean 'mrpc'?)"
    assert util.did_you_mean("ab", ["abcd"]) == " (did you mean 'abcd'?)"
    assert util.did_you_mean("sst", ["stsb2"]) == ""
    assert util.did_you_mean("sst", ["stsb2"], cutoff=0.5) == " (did you mean 'stsb2'?)"


def test_callers_keep_their_wording():
    from jaxkd import config, data, losses, optim  # pylint: disable=import-outside-toplevel

    assert data.nearest("sst-2", ["sst2", "mrpc"]) == " (did you mean 'sst2'?)"
    assert data.nearest("qqq", ["sst2"]) == ""
    assert config._suggest("temprature", ["temperature", "alpha"]) == "; did you mean 'temperature'?"
    assert config._suggest("zzz", ["b", "a"]) == "; valid keys: a, b"
    with pytest.raises(ValueError, match=r"optim.schedule 'cosin' is unknown: use one of linear, "
                                         r"cosine, constant; did you mean 'cosine'\?$"):
        optim.OptimConfig(schedule="cosin")
    with pytest.raises(ValueError, match=r"pairs; did you mean 'uniform'\?$"):
        losses.LossConfig(layer_map="unifrom")
    with pytest.raises(ValueError, match=r"pairs$"):
        losses.LossConfig(layer_map="zzzzzzz")


def test_cli_hint(capsys):
    from jaxkd import cli  # pylint: disable=import-outside-toplevel

    assert cli.main(["trian"]) == cli.EXIT_USAGE
    assert "jaxkd: unknown command 'trian' (did you mean 'train'?)\n" in capsys.readouterr().err


# ----------------------------------------------------------------------------- write_atomic


def test_write_atomic_creates_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    util.write_atomic(path, lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"
    util.write_atomic(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_write_dir_atomic_replaces_a_directory_whole_or_not_at_all(tmp_path):
    path = tmp_path / "student"

    def files(*names):
        def write(out: pathlib.Path):
            for name in names:
                (out / name).write_text(name)
            return len(names)
        return write
    assert util.write_dir_atomic(path, files("config.json", "model.safetensors")) == 2
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    util.write_dir_atomic(path, files("config.json"))  # no file of the old one left over
    assert [p.name for p in path.iterdir()] == ["config.json"]

    def half_then_fail(out: pathlib.Path):
        (out / "config.json").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        util.write_dir_atomic(path, half_then_fail)
    assert (path / "config.json").read_text() == "config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]

    # A call killed midway leaves its temporary directory, or (between its two renames) the old
    # directory and no `path`: the next call removes them; a name only like them stays.
    for name in ("student.123-abc.tmp", "student.456-def.old", "students.1-a.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("x")
    assert [p.name for p in util.leftovers(path)] == ["student.123-abc.tmp", "student.456-def.old"]
    util.write_dir_atomic(path, files("config.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "students.1-a.tmp"]


def test_write_atomic_failing_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "stages.json"
    path.write_text("old, whole")
    seen = []

    def half_then_fail(tmp: pathlib.Path) -> None:
        with tmp.open("w") as f:
            f.write("new, ha")
            f.flush()
            seen.append(tmp)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        util.write_atomic(path, half_then_fail)
    assert path.read_text() == "old, whole"
    assert seen[0].parent == tmp_path and seen[0] != path
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"]  # the temporary file is gone

    def interrupted(tmp: pathlib.Path) -> None:
        tmp.write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        util.write_atomic(path, interrupted)
    assert path.read_text() == "old, whole" and [p.name for p in tmp_path.iterdir()] == ["stages.json"]


def test_write_atomic_with_numpy_writes_exactly_the_path(tmp_path):
    # np.save / np.savez add .npy / .npz unless the name has it: the temporary name keeps the suffix.
    util.write_atomic(tmp_path / "t.npy", lambda tmp: np.save(tmp, np.arange(3)))
    util.write_atomic(tmp_path / "t.npz", lambda tmp: np.savez(tmp, a=np.arange(2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npz"]
    assert np.load(tmp_path / "t.npy").tolist() == [0, 1, 2]
    with np.load(tmp_path / "t.npz") as f:
        assert f["a"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- content_hash


def test_content_hash_is_hashlib_over_the_chunks():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    want = hashlib.sha256(b"head" + b"int32(2, 3)" + a.tobytes() + b"tail").hexdigest()
    assert util.content_hash([b"head", a, b"tail"]) == want
    assert util.content_hash([b"head", a, b"tail"], length=10) == want[:10]
    assert util.content_hash([a], array_layout=False) == hashlib.sha256(a.tobytes()).hexdigest()
    want = hashlib.blake2b(b"float32()" + np.float32(1.5).tobytes(), digest_size=16).hexdigest()
    assert util.content_hash([np.float32(1.5)], algorithm="blake2b", digest_size=16) == want
    assert util.content_hash([], algorithm="sha1") == hashlib.sha1().hexdigest()


def test_content_hash_sees_values_not_memory_layout():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = a[:, ::2]
    assert util.content_hash([strided]) == util.content_hash([strided.copy()])
    assert util.content_hash([jnp.asarray(a)]) == util.content_hash([a])
    assert util.content_hash([a]) != util.content_hash([a.astype(np.float64)])
    assert util.content_hash([a]) != util.content_hash([a.reshape(4, 3)])


def test_content_key_stays_the_token_cache_key():
    from jaxkd import data  # pylint: disable=import-outside-toplevel

    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)[:, 1:]
    digest = hashlib.sha256(b"v2")
    for chunk in (b"\x00part\x00", b"sequence len64", b"\x00part\x00", b"a\x00" b"7\x00",
                  b"\x00part\x00", b"int32(2, 2)", np.ascontiguousarray(ids).tobytes()):
        digest.update(chunk)
    assert data.content_key("sequence len64", ["a", 7], ids) == digest.hexdigest()[:24]
    # Written by the code before jaxkd.util: a user's cached tokens keep their file names.
    assert data.content_key("sequence len64", ["a", 7], ids) == "55271bdcae09901e09c856b1"
    assert data.content_key() == "fb04dcb6970e4c3d1873de51"


def test_teacher_cache_fingerprint_and_params_digest_stay_the_same():
    from jaxkd import cache  # pylint: disable=import-outside-toplevel
    from jaxkd.bench import common as bench_common  # pylint: disable=import-outside-toplevel

    w, scalar = np.ones((2, 2), np.float32), np.float32(1.5)
    h = hashlib.blake2b(digest_size=16)  # leaves in key order: s, w, then the JSON-able ones
    h.update(b"float32(1,)" + scalar.tobytes())  # a 0-d leaf was always hashed as shape (1,)
    h.update(b"float32(2, 2)" + w.tobytes())
    h.update(json.dumps(1).encode() + json.dumps(64).encode())
    key = cache.fingerprint({"w": w, "s": scalar}, [{"a": 1}], 64)
    assert key == h.hexdigest()
    assert key == "d5864a91e588009f57448da44197d0d3"  # written by the code before jaxkd.util

    params = {"a": np.arange(6).reshape(2, 3)[:, ::2], "b": jnp.ones(3)}
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    assert bench_common.params_digest(params) == h.hexdigest()[:12]


def test_first_line_of_an_error_is_cut_to_its_limit_or_names_its_type():
    assert util.first_line(ValueError("bad row\nmore detail")) == "bad row"
    assert util.first_line(KeyError()) == "KeyError"
    long = util.first_line(OSError("x" * 300))
    assert len(long) == 200 and long.endswith("...")


def test_count_says_one_row_and_many_rows():
    assert [util.count(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
    assert util.count(1, "text file") == "1 text file"


def test_path_key_refuses_a_path_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        util.path_key(tmp_path / "missing.txt")


def test_path_key_reads_a_settled_file_once_and_a_fresh_one_every_time(tmp_path, monkeypatch):
    """A file's key is remembered while its inode, size and times stay the same, except for a
    file changed in the last seconds: file times tick coarsely, so two same-size writes within
    one tick would share them."""
    reads = []
    framed = util._framed
    monkeypatch.setattr(util, "_framed", lambda *a: reads.append(a) or framed(*a))
    path = tmp_path / "corpus.txt"
    path.write_text("abc\n")
    first = util.path_key(path)
    assert util.path_key(path) == first and len(reads) == 2  # fresh: read each time
    path.write_text("abd\n")  # same size, maybe the same tick
    assert util.path_key(path) != first and len(reads) == 3

    monkeypatch.setattr(util, "_RACY_NS", 0)  # as if the file had settled
    util._file_key.cache_clear()
    settled = util.path_key(path)
    assert util.path_key(path) == settled and len(reads) == 4  # remembered
    time.sleep(0.05)  # past the file clock's tick (a few ms), which the racy rule covers
    path.write_text("abe\n")  # a new ctime: read again
    assert util.path_key(path) != settled and len(reads) == 5
