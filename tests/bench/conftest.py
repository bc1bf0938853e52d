"""What the benchmark tests share: a tiny saved teacher with a WordPiece vocabulary of a few
words, and tiny SST-2, CoNLL-2003 and SQuAD training files in those words."""
import json

import jax
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxkd.bench.epoch import EPOCH_TASKS
from jaxkd.hf import save_hf
from jaxkd.model import init_params

WORDS = ["good", "bad", "film", "very", "not", "a", "fun", "dull", "plot", "great"]
# Over 1000 ids: the PyTorch reference script draws token ids from 1000 up.
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = [f"[unused{i}]" for i in range(1100 - len(SPECIAL) - len(WORDS))]
TINY = tiny_model_config(vocab_size=1100)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A saved 2-layer checkpoint with a WordPiece vocabulary of the test sentences' words."""
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("teacher")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *WORDS, *FILLER]) + "\n")
    save_hf(TINY, init_params(TINY, jax.random.key(0)), out, tokenizer=BertTokenizer(str(vocab)))
    return out


@pytest.fixture(scope="session")
def tiny_tsv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) + f"\t{i % 2}" for i in range(24)]
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_conll(tmp_path_factory):
    """A CoNLL file of 24 sentences (2-8 known words, random tags), led by a -DOCSTART- line."""
    rng = np.random.default_rng(0)
    tags = EPOCH_TASKS["conll2003"].task.label_names
    sentences = ["\n".join(f"{w} NN O {rng.choice(tags)}" for w in rng.choice(WORDS, rng.integers(2, 9)))
                 for _ in range(24)]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(sentences) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_squad(tmp_path_factory):
    """A SQuAD v1.1 file of 12 questions on 3 contexts of known words, one answer each."""
    rng = np.random.default_rng(0)
    paragraphs = []
    for p in range(3):
        words = list(rng.choice(WORDS, 30))
        context = " ".join(words)
        qas = []
        for q in range(4):
            k = int(rng.integers(0, 28))
            answer = " ".join(words[k:k + 2])
            qas.append({"id": f"{p}-{q}", "question": " ".join(rng.choice(WORDS, 4)),
                        "answers": [{"text": answer, "answer_start": len(" ".join(words[:k])) + (k > 0)}]})
        paragraphs.append({"context": context, "qas": qas})
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path
