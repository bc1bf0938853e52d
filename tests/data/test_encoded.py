"""Tests for jaxkd.data.encoded: the token cache (content_key, cached_arrays) as a task uses it."""
import numpy as np

from jaxkd import data


# ----------------------------------------------------------------------------- the token cache


class _CountingTokenizer:
    """Whitespace tokenizer that counts its calls: [CLS]=1, a word = 10 + its length, [SEP]=2."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's

    def __init__(self):
        self.calls = 0

    def get_vocab(self):
        return {"[CLS]": 1, "[SEP]": 2}

    def __call__(self, texts, pairs, truncation, max_length, **_):
        self.calls += 1
        assert truncation == "longest_first"
        ids, types = [], []
        for text in texts:
            a = [1] + [10 + len(w) for w in text.split()][:max_length - 2] + [2]
            ids.append(a)
            types.append([0] * len(a))
        return {"input_ids": ids, "token_type_ids": types}


def test_tokenize_cache_is_reused_and_keyed_by_max_len(tmp_path, sst2_task, write_file):
    examples = sst2_task.load(data.DataConfig(), write_file(tmp_path / "t.tsv", "sentence\tlabel\na bb ccc\t1\nd\t0\n"))
    tok = _CountingTokenizer()
    first = sst2_task.encode(examples, tok, 8, tmp_path / "cache")
    second = sst2_task.encode(examples, tok, 8, tmp_path / "cache")
    assert tok.calls == 1
    np.testing.assert_array_equal(first.input_ids, second.input_ids)
    np.testing.assert_array_equal(second.input_ids, [1, 11, 12, 13, 2, 1, 11, 2])
    assert second.lengths.tolist() == [5, 3] and second.labels.tolist() == [1, 0]
    sst2_task.encode(examples, tok, 4, tmp_path / "cache")
    assert tok.calls == 2
    assert sst2_task.encode(examples, tok, 4, tmp_path / "cache").lengths.tolist() == [4, 3]
