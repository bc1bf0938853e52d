"""What sentence-embedding distillation computes on arrays (`jaxkd.tasks.embedding` is the
kind): the embedding losses (pure JAX: MSE, cosine distance, the in-batch similarity relation),
the metrics (host NumPy: STS correlations of cosine similarity with gold scores, agreement with
the teacher's neighbours), the STS reader and the raw-text sentence reader.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import math
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd import metrics as metrics_lib
from jaxkd.data import DataConfig, DataError, Table, rawtext
from jaxkd.tasks.base import BadRow, Problems, text_value

Array = jax.Array
DEFAULT_SCORE_RANGE = (0.0, 5.0)
STS_FIELDS = 7  # genre, file, year, id, score, sentence1, sentence2 (the STS Benchmark release)
_EPS = 1e-9
_COS_EPS = 1e-8  # torch's cosine_similarity clamp of each norm


# ----------------------------------------------------------------------------- losses (on device)


def _weighted_mean(values: Array, weights: Array) -> Array:
    weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
    values = jnp.where(weights > 0, values, 0.0)  # a weight-0 row counts for nothing, even if NaN
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), _EPS)


def _pair(student_BxS: Array, teacher_BxT: Array, what: str) -> tuple[Array, Array]:
    s = jnp.asarray(student_BxS, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_BxT, jnp.float32))
    if s.shape != t.shape:
        raise ValueError(f"{what}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ; "
                         f"widths that differ need the head's projection (task.projection)")
    return s, t


def _unit(x: Array) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _COS_EPS)


def embedding_mse(student_BxS: Array, teacher_BxT: Array, weights_B: Array) -> Array:
    """Squared error of each row's student embedding to the teacher's, averaged over the width,
    then the weighted mean over rows. The teacher's side gets no gradient."""
    s, t = _pair(student_BxS, teacher_BxT, "embedding_mse")
    return _weighted_mean(jnp.mean((s - t) ** 2, axis=-1), weights_B)


def cosine_distance(student_BxS: Array, teacher_BxT: Array, weights_B: Array) -> Array:
    """1 - cos(student, teacher) per row, the weighted mean over rows."""
    s, t = _pair(student_BxS, teacher_BxT, "cosine_distance")
    return _weighted_mean(1.0 - jnp.sum(_unit(s) * _unit(t), axis=-1), weights_B)


def cosine_matrix(x_BxD: Array) -> Array:
    """In-batch cosine similarities [B, B]."""
    unit = _unit(jnp.asarray(x_BxD, jnp.float32))
    return unit @ unit.T


def similarity_mse(student_BxS: Array, teacher_BxT: Array, weights_B: Array) -> Array:
    """The relational term: squared difference of the student's and the teacher's in-batch cosine
    similarity matrices, averaged over the pairs of distinct rows i != j, pair (i, j) weighted by
    w_i * w_j (padding rows take no part). Widths may differ: no projection is needed."""
    s = cosine_matrix(student_BxS)
    t = jax.lax.stop_gradient(cosine_matrix(teacher_BxT))
    if s.shape != t.shape:
        raise ValueError(f"similarity_mse: student batch {s.shape[0]} and teacher batch "
                         f"{t.shape[0]} differ")
    w = jnp.asarray(weights_B, jnp.float32)
    pair_w = w[:, None] * w[None, :] * (1.0 - jnp.eye(s.shape[0], dtype=jnp.float32))
    return _weighted_mean((s - t) ** 2, pair_w)


# ----------------------------------------------------------------------------- metrics (host)


def cosine_rows(a_NxD: np.ndarray, b_NxD: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) for each row i (float64)."""
    a, b = np.asarray(a_NxD, np.float64), np.asarray(b_NxD, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine of rows: shapes {a.shape} and {b.shape} differ")
    norms = np.maximum(np.linalg.norm(a, axis=1), _COS_EPS) * np.maximum(np.linalg.norm(b, axis=1), _COS_EPS)
    return np.sum(a * b, axis=1) / norms


def sts_scores(first_NxD: np.ndarray, second_NxD: np.ndarray, gold_N: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlations of the pairs' cosine similarity with the gold scores
    (as fractions; STS papers print them x 100)."""
    sims = cosine_rows(first_NxD, second_NxD)
    gold = np.asarray(gold_N, np.float64)
    return {"spearman": metrics_lib.spearman(sims, gold), "pearson": metrics_lib.pearson(sims, gold)}


def _neighbours(x_NxD: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest other rows by cosine [N, k] (ties: the lower index first)."""
    unit = np.asarray(x_NxD, np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), _COS_EPS)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbour_recall(student_NxS: np.ndarray, teacher_NxT: np.ndarray, k: int = 10) -> float:
    """Recall@k of the teacher's nearest neighbours: for each sentence, the share of its k nearest
    other sentences under the teacher's embeddings that are among its k nearest under the
    student's, averaged over the sentences. Widths may differ (each model's own space)."""
    n = len(student_NxS)
    if len(teacher_NxT) != n:
        raise ValueError(f"neighbour_recall: {n} student and {len(teacher_NxT)} teacher rows")
    if not 0 < k < n:
        raise ValueError(f"neighbour_recall: k must be in 1..{n - 1} for {n} sentences, got {k}")
    s, t = _neighbours(student_NxS, k), _neighbours(teacher_NxT, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(s, t)]))


def mean_cosine(student_NxD: np.ndarray, teacher_NxD: np.ndarray) -> float:
    """The mean cosine between each sentence's student and teacher embedding; of the same width
    (a student of another width is projected first: `project`)."""
    return float(np.mean(cosine_rows(student_NxD, teacher_NxD)))


# ----------------------------------------------------------------------------- STS data (host)


@dataclasses.dataclass(frozen=True)
class Examples:
    """Validated rows of one split: sentences, their pairs and gold scores (NaN without)."""

    source: str
    texts: list[str]
    pairs: list[str] | None
    scores: np.ndarray  # float32 [N]
    has_labels: bool
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray, source: str) -> Examples:
        """The examples at `indices`, as a split of its own."""
        return Examples(source, [self.texts[i] for i in indices],
                        None if self.pairs is None else [self.pairs[i] for i in indices],
                        self.scores[indices], self.has_labels, {})


def is_sts_release(path: str | pathlib.Path) -> bool:
    """Whether a local file is an STS Benchmark file as released: tab-separated without a
    header, its first line's fifth field a score (`read_sts_release`)."""
    path = pathlib.Path(path)
    if not path.is_file() or path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        return False
    with path.open(encoding="utf-8-sig", newline="") as f:
        first = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), [])
    if len(first) < STS_FIELDS:
        return False
    try:
        float(first[4])
    except ValueError:
        return False
    return True


def read_sts_release(path: str | pathlib.Path) -> Table:
    """An STS Benchmark file as released (sts-train/dev/test.csv): tab-separated, no header,
    quoting off (sentences hold unmatched quotes), the first seven fields `genre, file, year, id,
    score, sentence1, sentence2` (later ones, source notes, are ignored). Columns `score`,
    `sentence1`, `sentence2`; a line with fewer fields is malformed (named by `Problems`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (absolute: {path.absolute()})")
    columns: dict[str, list] = {"score": [], "sentence1": [], "sentence2": []}
    lines, malformed = [], []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or row == [""]:
                    continue
                if len(row) < STS_FIELDS:
                    malformed.append((f"{path} line {number}",
                                      f"{len(row)} tab-separated fields, expected {STS_FIELDS} (genre, "
                                      f"file, year, id, score, sentence1, sentence2)"))
                    continue
                columns["score"].append(row[4])
                columns["sentence1"].append(row[5])
                columns["sentence2"].append(row[6])
                lines.append(number)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    return Table(str(path), columns, lines, tuple(malformed))


# Raw text: a sentence (or a document) per line; the suffixes the corpus reader takes as text.
RAW_TEXT_SUFFIXES = tuple(s for s, kind in rawtext.SUFFIXES.items() if kind == "text")
# The end of a sentence: . ! or ?, any closing quotes or brackets, then (not taken) white space
# and what starts a sentence: a capital or a digit, perhaps after an opening quote or bracket.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")


def is_raw_text(source: str) -> bool:
    return str(source).lower().endswith(RAW_TEXT_SUFFIXES)


def split_sentences(document: str) -> list[str]:
    """The sentences of a document by punctuation (approximate: "Mr. Smith" is cut too)."""
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(document)), len(document)]
    return [s for a, b in zip(cuts, cuts[1:]) if (s := document[a:b].strip())]


def read_raw_text(path: str, data_cfg: DataConfig, split: bool) -> Examples:
    """Unlabelled sentences of a raw text file (.txt, .txt.gz; UTF-8, no header): each non-blank
    line a sentence, or with `split` each line a document cut into its sentences
    (`split_sentences`), as general distillation's corpora are laid out. A line that is not
    UTF-8 is a `DataError` naming the file, line and byte offset, or skipped and counted with
    data.skip_invalid."""
    source = rawtext.Source(str(path), "lines")
    rawtext.check_sources([source], data_cfg.skip_invalid)
    counts: collections.Counter = collections.Counter()
    texts = [sentence for document in rawtext.documents(source, data_cfg.skip_invalid, counts)
             for sentence in (split_sentences(document) if split else [document.strip()])]
    if not texts:
        raise DataError(f"{path}: no sentences (every line is blank"
                        f"{' or skipped' if counts else ''})")
    return Examples(str(path), texts, None, np.full(len(texts), np.nan, np.float32), False,
                    dict(counts))


def check_score_range(score_range: Sequence[float]) -> tuple[float, float]:
    """`task.score_range` as (low, high), finite with low < high, or a `DataError`."""
    try:
        low, high = (float(x) for x in score_range)
    except (TypeError, ValueError):
        raise DataError(f"task.score_range must be two numbers [low, high], got {score_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataError(f"task.score_range must be finite with low < high, got {[low, high]}")
    return low, high


def _score(value: Any, column: str, score_range: tuple[float, float]) -> float:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise BadRow("missing score", f"no score in column {column!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRow("bad score", f"score {value!r} in column {column!r} is not a number") from None
    if not math.isfinite(number):
        raise BadRow("missing score", f"no score in column {column!r} ({value!r})")
    low, high = score_range
    if not low <= number <= high:
        raise BadRow("score out of range", f"score {number:g} in column {column!r} is outside "
                     f"task.score_range [{low:g}, {high:g}]")
    return number


def sts_examples(table: Table, data_cfg: DataConfig, text: str, text_pair: str | None,
                 label: str | None, score_range: Sequence[float] = DEFAULT_SCORE_RANGE) -> Examples:
    """Validated rows of a split: every text non-empty, every score (column `label`; None: no
    scores) a number inside `score_range`. A bad row is a `DataError` naming the file and line,
    unless data.skip_invalid (then it is skipped and counted)."""
    low_high = check_score_range(score_range)
    wanted = {"task.text": text, **({"task.text_pair": text_pair} if text_pair else {}),
              **({"task.label": label} if label else {})}
    data_lib.check_columns(table, wanted)
    if len(table) == 0 and not table.malformed:
        raise DataError(f"{table.source}: the split is empty (no data rows)")
    problems = Problems(table.source, table.malformed)
    texts, pairs, scores = [], [], []
    for i, value in enumerate(table.columns[text]):
        try:
            row = (text_value(value, text),
                   text_value(table.columns[text_pair][i], text_pair) if text_pair else None,
                   _score(table.columns[label][i], label, low_high) if label else math.nan)
        except BadRow as bad:
            problems.add(table.where(i), bad)
            continue
        texts.append(row[0])
        pairs.append(row[1])
        scores.append(row[2])
    skipped = problems.settle(data_cfg, len(texts))
    return Examples(table.source, texts, pairs if text_pair else None,
                    np.asarray(scores, np.float32), label is not None, skipped)
