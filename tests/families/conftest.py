"""Fixtures of the family tests."""
import numpy as np
import pytest

PAIR_WORDS = "the a cat dog sat ran on in mat park big small red old new house tree river".split()


def _pairs(rng, n):
    rows = []
    for _ in range(n):
        a = " ".join(rng.choice(PAIR_WORDS, rng.integers(3, 9)))
        b = " ".join(rng.choice(PAIR_WORDS, rng.integers(2, 7)))
        rows.append(f"{a}\t{b}\t{int(a.split()[0] == b.split()[0])}")
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """A tiny sentence-pair task in MRPC's columns: train.tsv (64 pairs) and eval.tsv (24)."""
    out = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("eval", 24)):
        (out / f"{name}.tsv").write_text("\n".join(["sentence1\tsentence2\tlabel", *_pairs(rng, n)]) + "\n")
    return out
