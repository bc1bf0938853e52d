"""jaxkd.bench.common: the student's teacher layers and the params digest."""
import jax
import numpy as np
import pytest

from jaxkd.bench import common


def test_spread_layers_like_distilbert():
    assert common.spread_layers(6, 3) == (0, 2, 4)
    assert common.spread_layers(12, 4) == (0, 3, 6, 9)
    assert common.spread_layers(12, 6) == (0, 2, 4, 6, 8, 10)
    with pytest.raises(ValueError, match="--student-layers"):
        common.spread_layers(6, 7)


def test_params_digest_changes_with_one_bit():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(4, np.float32)}}
    same = jax.tree.map(np.copy, params)
    assert common.params_digest(params) == common.params_digest(same)
    flipped = jax.tree.map(np.copy, params)
    flipped["b"]["c"].view(np.uint32)[2] ^= 1  # the lowest mantissa bit of one element
    assert common.params_digest(flipped) != common.params_digest(params)
