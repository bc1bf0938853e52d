"""jaxkd.tasks.similarity: the embedding losses against NumPy, the metrics against SciPy and
hand-made cases, and the STS reader on the real STS Benchmark files and on broken ones."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.data import DataConfig, DataError, read_file
from jaxkd.tasks import similarity as embedding


def _rows(seed=0, b=6, s=4, t=4):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(b, s)).astype(np.float32)
    teacher = rng.normal(size=(b, t)).astype(np.float32)
    weights = np.ones(b, np.float32)
    weights[[1, 4]] = [0.0, 2.0]
    return student, teacher, weights


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- losses


def test_embedding_mse_matches_numpy():
    student, teacher, weights = _rows()
    teacher[1] = np.nan  # a weight-0 row (padding) counts for nothing
    per_row = ((student.astype(np.float64) - teacher) ** 2).mean(1)
    keep = weights > 0
    expect = (weights[keep] * per_row[keep]).sum() / weights.sum()
    got = float(embedding.embedding_mse(student, teacher, weights))
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_embeddings_of_other_widths_are_refused_naming_the_projection():
    student, teacher, weights = _rows(s=3, t=5)
    for loss in (embedding.embedding_mse, embedding.cosine_distance):
        with pytest.raises(ValueError, match=rf"{loss.__name__}: student \(6, 3\) and teacher "
                                             r"\(6, 5\) differ; .*task.projection"):
            loss(student, teacher, weights)


def test_cosine_distance_matches_numpy():
    student, teacher, weights = _rows(2)
    per_row = 1.0 - (_unit(student) * _unit(teacher)).sum(1)
    expect = (weights * per_row).sum() / weights.sum()
    np.testing.assert_allclose(float(embedding.cosine_distance(student, teacher, weights)),
                               expect, rtol=1e-5)
    same = float(embedding.cosine_distance(teacher * 3.0, teacher, np.ones(6)))
    assert abs(same) < 1e-6


def test_similarity_mse_matches_numpy_over_distinct_pairs():
    student, teacher, weights = _rows(4, s=3, t=7)  # widths differ: no projection needed
    s, t = _unit(student) @ _unit(student).T, _unit(teacher) @ _unit(teacher).T
    num = den = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                num += weights[i] * weights[j] * (s[i, j] - t[i, j]) ** 2
                den += weights[i] * weights[j]
    got = float(embedding.similarity_mse(student, teacher, weights))
    np.testing.assert_allclose(got, num / den, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(embedding.cosine_matrix(student)), s, atol=1e-6)


def test_losses_send_no_gradient_to_the_teacher():
    student, teacher, weights = _rows()
    for loss in (embedding.embedding_mse, embedding.cosine_distance, embedding.similarity_mse):
        g_teacher = jax.grad(lambda t, loss=loss: loss(jnp.asarray(student), t, weights))(
            jnp.asarray(teacher))
        g_student = jax.grad(lambda s, loss=loss: loss(s, jnp.asarray(teacher), weights))(
            jnp.asarray(student))
        assert not np.any(np.asarray(g_teacher)), loss.__name__
        assert np.any(np.asarray(g_student)) and np.all(np.isfinite(np.asarray(g_student)))
        assert not np.any(np.asarray(g_student)[1]), loss.__name__  # the weight-0 row


# ----------------------------------------------------------------------------- metrics


def test_sts_scores_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    gold = np.round(rng.uniform(0, 5, 40) * 2) / 2  # half-point scores: many ties
    sims = (_unit(first) * _unit(second)).sum(1)
    got = embedding.sts_scores(first, second, gold)
    assert got["spearman"] == pytest.approx(stats.spearmanr(sims, gold).statistic, abs=1e-12)
    assert got["pearson"] == pytest.approx(stats.pearsonr(sims, gold).statistic, abs=1e-12)


def _circle(order):
    angles = np.deg2rad(30.0 * np.asarray(order))
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_neighbour_recall_at_10_on_a_hand_made_circle():
    # 12 sentences at 30-degree steps: each one's 10 nearest others are all but the opposite one.
    teacher = _circle(range(12))
    assert embedding.neighbour_recall(teacher * 5.0, teacher, k=10) == 1.0
    # Swap sentences 0 and 1 in the student: sentences 0, 1, 6 and 7 now leave out another
    # sentence than the teacher does (9 of 10 kept), the other eight keep all 10.
    student = _circle([1, 0] + list(range(2, 12)))
    assert embedding.neighbour_recall(student, teacher, k=10) == pytest.approx((4 * 0.9 + 8) / 12)


def test_neighbour_recall_at_1_across_widths():
    teacher = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]])  # pairs (a, b), (c, d)
    crossed = np.array([[1, 0, 0], [0, 1, 0], [1, 0.1, 0], [0, 1, 0.1]])  # pairs (a, c), (b, d)
    kept = np.array([[1, 0, 0], [1, 0.1, 0], [0, 0, 1], [0, 0.1, 1]])
    assert embedding.neighbour_recall(crossed, teacher, k=1) == 0.0
    assert embedding.neighbour_recall(kept, teacher, k=1) == 1.0
    with pytest.raises(ValueError, match="k must be in 1..3"):
        embedding.neighbour_recall(kept, teacher, k=4)


def test_mean_cosine():
    teacher = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    student = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])  # cosines 1, -1, 1/sqrt(2)
    assert embedding.mean_cosine(student, teacher) == pytest.approx((1 - 1 + 2 ** -0.5) / 3)
    with pytest.raises(ValueError, match="shapes"):
        embedding.mean_cosine(student[:, :1], teacher)


# ----------------------------------------------------------------------------- STS reader


def _examples(table, **kw):
    return embedding.sts_examples(table, kw.pop("data_cfg", DataConfig()), "sentence1",
                                  "sentence2", "score", **kw)


def test_reads_the_sts_benchmark_release(data_dir):
    path = data_dir / "stsb" / "sts-dev.csv"
    examples = _examples(embedding.read_sts_release(path))
    assert len(examples) == 1500 and examples.skipped == {}
    assert examples.texts[0] == "A man with a hard hat is dancing."
    assert examples.pairs[0] == "A man wearing a hard hat is dancing."
    assert examples.scores[:4].tolist() == np.float32([5.0, 4.75, 5.0, 2.4]).tolist()  # kept as float32
    assert len(_examples(embedding.read_sts_release(data_dir / "stsb" / "sts-test.csv"))) == 1379


def _release(tmp_path, *scores_and_rows):
    """An STS release file: a line per item, the item its score, or the whole line if it has tabs."""
    lines = []
    for item in scores_and_rows:
        lines.append(item if "\t" in item else
                     f"main-captions\tMSRvid\t2012test\t0001\t{item}\tA \"quoted sentence.\tAnother one.")
    path = tmp_path / "sts.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_row_without_a_score_names_its_file_and_line(tmp_path):
    path = _release(tmp_path, "4.0", "3.5", "")
    with pytest.raises(DataError, match=rf"{path} line 3: no score in column 'score'\. Fix the row"):
        _examples(embedding.read_sts_release(path))


def test_a_score_outside_the_range_names_its_file_and_line(tmp_path):
    path = _release(tmp_path, "4.0", "5.5", "1.0")
    with pytest.raises(DataError, match=rf"{path} line 2: score 5.5 in column 'score' is outside "
                                        r"task.score_range \[0, 5\]"):
        _examples(embedding.read_sts_release(path))
    with pytest.raises(DataError, match=rf"{path} line 1: score 4 .* outside task.score_range \[0, 1\]"):
        _examples(embedding.read_sts_release(path), score_range=(0, 1))
    assert len(_examples(embedding.read_sts_release(path), score_range=(0, 10))) == 3


def test_bad_rows_are_skipped_and_counted_with_skip_invalid(tmp_path):
    path = _release(tmp_path, "4.0", "x", "9", "a\tb\tc", "2.0")
    with pytest.raises(DataError, match=rf"{path} line 4: 3 tab-separated fields, expected 7"):
        _examples(embedding.read_sts_release(path))
    examples = _examples(embedding.read_sts_release(path), data_cfg=DataConfig(skip_invalid=True))
    assert examples.scores.tolist() == [4.0, 2.0]
    assert examples.texts == ['A "quoted sentence.'] * 2  # quoting off: the text as written
    assert examples.skipped == {"wrong field count": 1, "bad score": 1, "score out of range": 1}


def test_an_sts_release_saved_as_txt_is_read_as_scored_pairs_not_raw_text(tmp_path):
    from jaxkd.tasks import resolve, task_config

    task = resolve(task_config("sts", type="sentence_embedding"), DataConfig())
    path = _release(tmp_path, "4.0", "1.5").rename(tmp_path / "sts-dev.txt")
    examples = task.load(DataConfig(), str(path))
    assert examples.scores.tolist() == [4.0, 1.5] and examples.has_labels
    assert examples.texts == ['A "quoted sentence.'] * 2 and examples.pairs == ["Another one."] * 2
    (tmp_path / "plain.txt").write_text("One sentence.\nAnother\tone.\n", encoding="utf-8")
    plain = task.load(DataConfig(), str(tmp_path / "plain.txt"))
    assert plain.texts == ["One sentence.", "Another\tone."] and not plain.has_labels


def test_rows_of_other_files_and_unscored_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"a": "one", "b": "two", "sim": 0.5}, {"a": "three", "b": "four", "sim": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{path} line 2: no score in column 'sim'"):
        embedding.sts_examples(read_file(path), DataConfig(), "a", "b", "sim", (0, 1))
    unscored = embedding.sts_examples(read_file(path), DataConfig(), "a", None, None)
    assert unscored.texts == ["one", "three"] and unscored.pairs is None
    assert not unscored.has_labels and np.isnan(unscored.scores).all()
    with pytest.raises(DataError, match="task.score_range must be finite with low < high"):
        embedding.sts_examples(read_file(path), DataConfig(), "a", "b", "sim", (1, 0))


# ----------------------------------------------------------------------------- raw text


@pytest.mark.parametrize("document, sentences", [
    ("The cat sat. It was \"happy.\" Then 3 dogs came! Why? (Nobody knew.)",
     ["The cat sat.", "It was \"happy.\"", "Then 3 dogs came!", "Why?", "(Nobody knew.)"]),
    ("A value of 3.5 stays whole. e.g. this too. So does a.b.c here.",
     ["A value of 3.5 stays whole. e.g. this too.", "So does a.b.c here."]),
    ("No final stop", ["No final stop"]),
    ("   ", []),
])
def test_documents_are_cut_into_sentences_at_their_ends(document, sentences):
    assert embedding.split_sentences(document) == sentences


def test_raw_text_is_a_sentence_a_line_or_documents_cut_into_sentences(tmp_path):
    import gzip

    text = "First line. Second sentence!\n\n  \nOnly one here\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    for name in ("a.txt", "a.txt.gz"):
        lines = embedding.read_raw_text(str(tmp_path / name), DataConfig(), split=False)
        assert lines.texts == ["First line. Second sentence!", "Only one here"]
        assert lines.pairs is None and not lines.has_labels and np.isnan(lines.scores).all()
        cut = embedding.read_raw_text(str(tmp_path / name), DataConfig(), split=True)
        assert cut.texts == ["First line.", "Second sentence!", "Only one here"]


def test_raw_text_that_is_not_utf8_is_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\ncaf\xe9 au lait\nlast line\n")
    with pytest.raises(DataError, match=r"bad\.txt.*not UTF-8 at byte offset 13"):
        embedding.read_raw_text(str(path), DataConfig(), split=False)
    kept = embedding.read_raw_text(str(path), DataConfig(skip_invalid=True), split=False)
    assert kept.texts == ["good line", "last line"] and kept.skipped == {"not utf-8": 1}
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.txt: no sentences"):
        embedding.read_raw_text(str(tmp_path / "blank.txt"), DataConfig(), split=False)
