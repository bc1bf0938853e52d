"""The teacher-output cache and the token cache: hits, and files that are not what was written
(truncated, overwritten, without their record) recomputed with a warning naming them."""
import logging

import numpy as np
import pytest

from jaxkd import cache, util
from jaxkd.data import ReadOnlyDir, cached_arrays


def _logits(rows=6, classes=3, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, classes)).astype(np.float32)


class Calls:
    def __init__(self, value):
        self.value, self.count = value, 0

    def __call__(self):
        self.count += 1
        return self.value


def test_second_read_is_a_hit_with_the_same_values(tmp_path):
    compute = Calls(_logits())
    first, hit1 = cache.load_or_compute(tmp_path, "k", 6, compute)
    second, hit2 = cache.load_or_compute(tmp_path, "k", 6, compute)
    assert (hit1, hit2, compute.count) == (False, True, 1)
    np.testing.assert_array_equal(second, compute.value)
    assert util.check_path(cache.cache_path(tmp_path, "k")).is_file()


def test_a_cache_is_used_only_where_every_process_can_use_it(tmp_path):
    """Computing is a collective: a file one process cannot read (not written yet there, or on
    another disk) makes every process compute, never some compute while others read."""
    compute = Calls(_logits())
    asked = []

    def agree(flag):
        asked.append(flag)
        return len(asked) > 1  # another process could not use it; then the write went well
    cache.load_or_compute(tmp_path, "k", 6, compute)
    again, hit = cache.load_or_compute(tmp_path, "k", 6, compute, agree=agree)
    assert not hit and compute.count == 2 and asked == [True, True]  # its finding, the barrier
    assert cache.load_or_compute(tmp_path, "k", 6, compute, agree=bool)[1]


def test_a_failed_write_is_raised_on_every_process(tmp_path, monkeypatch):
    """The process that writes the cache fails (a full disk): it raises its error, and the
    others, told at the barrier, raise too instead of waiting in the next collective."""
    def full(path, write):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(util, "write_atomic", full)
    asked = []

    def agree(flag):  # process 0's findings: no file; then its write failed
        asked.append(flag)
        return all(asked)
    with pytest.raises(OSError, match="No space left"):
        cache.load_or_compute(tmp_path, "k", 6, Calls(_logits()), agree=agree)
    assert asked == [False, False]
    with pytest.raises(OSError, match="the process writing it failed"):  # another process
        cache.load_or_compute(tmp_path, "k", 6, Calls(_logits()), write=False,
                              agree=lambda flag: False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "no_record", "rows"])
def test_a_damaged_teacher_cache_is_recomputed_and_named(tmp_path, caplog, damage):
    compute = Calls(_logits())
    cache.load_or_compute(tmp_path, "k", 6, compute)
    path = cache.cache_path(tmp_path, "k")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage in ("garbage", "nan"):  # a valid .npy of the right shape and dtype
        fill = np.full((6, 3), np.nan, np.float32) if damage == "nan" else _logits(seed=1)
        np.save(path, fill)
    elif damage == "no_record":
        util.check_path(path).unlink()
    else:
        np.save(path, _logits(rows=5))
        util.write_check(path, {"logits": _logits(rows=5)})
    with caplog.at_level(logging.WARNING, logger="jaxkd.cache"):
        logits, hit = cache.load_or_compute(tmp_path, "k", 6, compute)
    assert not hit and compute.count == 2
    np.testing.assert_array_equal(logits, compute.value)
    assert str(path) in caplog.text and "not used" in caplog.text
    again, hit = cache.load_or_compute(tmp_path, "k", 6, compute)  # rewritten whole
    assert hit and compute.count == 2


def test_non_finite_teacher_outputs_are_an_error_and_never_written(tmp_path):
    bad = _logits()
    bad[4, 1] = np.inf
    with pytest.raises(cache.NonFiniteTeacher, match=r"1 of 6 rows \(first: row 4\)"):
        cache.load_or_compute(tmp_path, "k", 6, Calls(bad))
    assert not cache.cache_path(tmp_path, "k").exists()


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "no_record"])
def test_a_damaged_token_cache_is_tokenised_again(tmp_path, caplog, damage):
    arrays = {"ids": np.arange(10, dtype=np.int32), "offsets": np.array([0, 4, 10], np.int64)}
    compute = Calls(arrays)
    cached_arrays(tmp_path, "k", compute)
    path = tmp_path / "tokens-k.npz"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "overwrite":
        np.savez(path, ids=np.zeros(10, np.int32), offsets=arrays["offsets"])
    else:
        util.check_path(path).unlink()
    with caplog.at_level(logging.WARNING, logger="jaxkd.data.encoded"):
        out = cached_arrays(tmp_path, "k", compute)
    assert compute.count == 2 and str(path) in caplog.text
    for name, value in arrays.items():
        np.testing.assert_array_equal(out[name], value)
    cached_arrays(tmp_path, "k", compute)
    assert compute.count == 2


def test_a_float16_cache_stores_the_outputs_rounded_and_reads_them_back(tmp_path):
    compute = Calls(_logits() * 100)
    stored, hit = cache.load_or_compute(tmp_path, "k", 6, compute, dtype="float16")
    on_disk = np.load(cache.cache_path(tmp_path, "k"))
    assert not hit and on_disk.dtype == np.float16
    np.testing.assert_array_equal(on_disk, compute.value.astype(np.float16))
    np.testing.assert_array_equal(stored, on_disk)  # a miss gives what a hit will
    again, hit = cache.load_or_compute(tmp_path, "k", 6, compute, dtype="float16")
    assert hit and compute.count == 1
    np.testing.assert_array_equal(again, on_disk)


def test_a_cache_of_another_dtype_under_the_key_is_recomputed(tmp_path, caplog):
    compute = Calls(_logits())
    cache.load_or_compute(tmp_path, "k", 6, compute)
    with caplog.at_level(logging.WARNING, logger="jaxkd.cache"):
        out, hit = cache.load_or_compute(tmp_path, "k", 6, compute, dtype="float16")
    assert not hit and out.dtype == np.float16 and "float32, not float16" in caplog.text


def test_outputs_beyond_float16_are_an_error_that_says_to_store_float32(tmp_path):
    big = _logits()
    big[2, 0] = 7e4  # finite in float32, infinite in float16
    with pytest.raises(cache.NonFiniteTeacher,
                       match=r"row 2\) once rounded to float16.*teacher_cache_dtype: float32"):
        cache.load_or_compute(tmp_path, "k", 6, Calls(big), dtype="float16")
    assert not cache.cache_path(tmp_path, "k").exists()
    with pytest.raises(ValueError, match="float64"):
        cache.load_or_compute(tmp_path, "k", 6, Calls(big), dtype="float64")


def test_a_read_only_cache_is_read_but_never_written(tmp_path):
    arrays = {"ids": np.arange(6, dtype=np.int32)}
    compute = Calls(arrays)
    out = cached_arrays(ReadOnlyDir(tmp_path / "none"), "k", compute)  # missing: computed
    assert compute.count == 1 and not (tmp_path / "none").exists()
    np.testing.assert_array_equal(out["ids"], arrays["ids"])
    cached_arrays(tmp_path, "k", compute)  # written by a run
    before = sorted(tmp_path.iterdir())
    out = cached_arrays(ReadOnlyDir(tmp_path), "k", compute)
    assert compute.count == 2 and sorted(tmp_path.iterdir()) == before
    np.testing.assert_array_equal(out["ids"], arrays["ids"])
    cached_arrays(ReadOnlyDir(tmp_path), "other", compute)
    assert compute.count == 3 and sorted(tmp_path.iterdir()) == before
