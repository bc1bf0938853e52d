"""Extractive question answering (SQuAD v1.1): the answer is a span of the context.

Head: start and end scores on every token (`qa_outputs`, `BertForQuestionAnswering`). Question
and context go in as a pair; a context longer than `data.max_seq_len` is cut into windows that
overlap by `data.doc_stride` tokens. Each window is a row with its answer's start and end token
(both 0, the [CLS] token, when the answer is not inside it). An example's answer is the best span
over all its windows, decoded from the `task.n_best` best starts and ends, at most
`task.max_answer_len` tokens, inside the context, and cut from the original context by character
offsets. Exact match and F1 follow the official SQuAD v1.1 evaluation.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import string
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd.data import DataConfig, DataError, Encoded
from jaxkd import model as model_lib
from jaxkd.model import BertConfig, HeadConfig
from jaxkd.tasks.base import BadRow, Objective, Problems, Task, TaskConfig

TYPE = "question_answering"
_NO_TRANSFER = ("masking, replacing or cutting words would move the answer spans, and a question "
                "without its answer span gives no start and end targets")
TRANSFER = {"data.unlabeled": _NO_TRANSFER, "distill.augment": _NO_TRANSFER}
METRICS = ("f1", "exact_match")
_MASKED = -1e9  # finite: a window whose positions are all padding still has a defined softmax
_TOKENIZE_CHUNK = 1_000


@dataclasses.dataclass(frozen=True)
class Preset:
    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    n_best: int = 20
    max_answer_len: int = 30
    hub_dataset: str | None = None


PRESETS: dict[str, Preset] = {"squad": Preset(hub_dataset="squad")}


@dataclasses.dataclass(frozen=True)
class QAConfig(TaskConfig):
    """The `task` section of this kind: the common keys and these."""

    # Columns of JSONL/parquet/Hub rows (SQuAD JSON files need none)
    question: str | None = None  # None = "question"
    context: str | None = None  # None = "context"
    answers: str | None = None  # {"text": [...], "answer_start": [...]}; None = "answers"
    n_best: int | None = None  # best starts and ends searched per window; None = 20
    max_answer_len: int | None = None  # tokens; None = 30


CONFIG = QAConfig


def check(cfg: QAConfig) -> None:
    if cfg.metric is not None and cfg.metric not in METRICS:
        raise DataError(f"unknown task.metric {cfg.metric!r} for {TYPE}"
                        f"{data_lib.nearest(cfg.metric, METRICS)}; known: {', '.join(METRICS)}")
    for key in ("n_best", "max_answer_len"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"task.{key} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- on device


@dataclasses.dataclass(frozen=True)
class SpanObjective(Objective):
    """Start and end positions as two distributions over a window's tokens, padding masked.

    labels [B, 2] (start, end); the hard loss is the mean of the two cross-entropies and the
    KD term the mean of the two temperature KLs, as in DistilBERT's SQuAD distillation.
    """

    def label_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        return (batch_size, 2)

    def view(self, logits, batch):
        logits_Bx2xL = jnp.swapaxes(logits, 1, 2)
        mask_Bx1xL = batch["attention_mask"][:, None, :] > 0
        return jnp.where(mask_Bx1xL, logits_Bx2xL, _MASKED)

    def weights(self, batch) -> jax.Array:
        return jnp.broadcast_to(batch["weights"].astype(jnp.float32)[:, None], batch["labels"].shape)


class SpanHead(nn.Module):
    """BertForQuestionAnswering's head: `qa_outputs` gives start and end scores per token."""

    encoder: BertConfig
    head: HeadConfig

    @nn.compact
    def __call__(self, x_BxLxH, deterministic: bool):
        return model_lib.dense(self.encoder, 2, "qa_outputs", dtype=jnp.float32)(x_BxLxH)


def onnx_head(g, encoder: BertConfig, head: HeadConfig, params, hidden, mask):  # HeadSpec.onnx
    return g.dense(hidden, params["qa_outputs"], "qa_outputs")


HEAD = model_lib.register_head(model_lib.HeadSpec(
    kind="span", module=SpanHead, hf_suffix="ForQuestionAnswering",
    hf_modules={"*": (("qa_outputs", "qa_outputs"),)}, num_labels=2,
    dropout_keys={"distilbert": None}, onnx=onnx_head))


def objective(head: HeadConfig) -> Objective:
    return SpanObjective()


# ----------------------------------------------------------------------------- exported models

INPUT_FLAGS: tuple[str, ...] = ()
MODELS = "question answering models"
INPUT_HINT = "it reads SQuAD files or rows with question and context"


def exported_config(label_names: tuple[str, ...], regression: bool, flags: dict) -> QAConfig:
    """The task an exported span model solves: extractive QA over the default columns."""
    return QAConfig(name="custom", type=TYPE)


def with_model_labels(cfg: QAConfig, label_names: tuple[str, ...], regression: bool) -> QAConfig:
    return cfg  # start and end scores: no labels to take


# ----------------------------------------------------------------------------- the official metric


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised answers."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1, each the maximum over an example's gold answers, as fractions."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} questions")
    em = [max(exact_match(p, g) for g in golds) for p, golds in zip(predictions, gold)]
    f1 = [max(f1_score(p, g) for g in golds) for p, golds in zip(predictions, gold)]
    return {"f1": float(np.mean(f1)), "exact_match": float(np.mean(em))}


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class Examples:
    """Validated questions of one split."""

    source: str
    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]]  # (text, answer_start) per gold answer; [] if unlabeled
    has_labels: bool
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray, source: str) -> Examples:
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Examples(source, pick(self.ids), pick(self.questions), pick(self.contexts),
                        pick(self.answers), self.has_labels, {})


@dataclasses.dataclass(frozen=True)
class QATask(Task):
    type: ClassVar[str] = TYPE
    head_kind: ClassVar[str] = HEAD.kind
    outputs_per_token: ClassVar[bool] = True
    start_end_outputs: ClassVar[bool] = True

    name: str
    metrics: tuple[str, ...]
    question: str
    context: str
    answers: str
    n_best: int
    max_answer_len: int
    hub_dataset: str | None
    doc_stride: int = 32  # data.doc_stride: tokens shared by neighbouring windows
    label_names: tuple[str, ...] = ("start", "end")

    def stdin_record(self, line: str, number: int) -> dict:
        if "\t" not in line:
            raise DataError(f"<stdin> line {number}: expected question<TAB>context")
        question, context = line.split("\t", 1)
        return {"id": str(number), self.question: question, self.context: context}

    def label_order(self, model_labels, model_regression: bool, where: str,
                    by_position: bool = False):
        return None  # start and end scores: nothing to match by name

    def head(self) -> HeadConfig:
        return HeadConfig(kind="span", num_labels=2)

    def id2label(self) -> dict[int, str] | None:
        return None

    # ------------------------------------------------------------------ reading

    def _rows(self, data_cfg: DataConfig, source: str, require_labels: bool):
        """(where, id, question, context, answers) per question, and the problems found so far."""
        if data_lib.is_local_path(source) and _is_squad_json(source, data_cfg):
            return _read_squad_json(source)
        table = data_lib.read_split(data_cfg, source, self.hub_dataset)
        wanted = {"task.question": self.question, "task.context": self.context}
        if require_labels:
            wanted["task.answers"] = self.answers
        data_lib.check_columns(table, wanted)
        ids = table.columns.get("id") or [str(i) for i in range(len(table))]
        answers = table.columns.get(self.answers) or [None] * len(table)
        rows = [(f"{table.where(i)} (question {ids[i]})", str(ids[i]), table.columns[self.question][i],
                 table.columns[self.context][i], answers[i]) for i in range(len(table))]
        return rows, Problems(table.source, table.malformed)

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True) -> Examples:
        """Reads and validates one split: SQuAD JSON (data -> paragraphs -> qas), or rows with
        question, context and answers ({"text": [...], "answer_start": [...]}).

        An empty question or context, a question without answers (where labels are required),
        answers in neither layout, or an answer_start that does not point at its text raise a
        `DataError` naming the file and the question id, unless `data.skip_invalid`, which skips
        and counts them. Answers are `{"text": [...], "answer_start": [...]}` (the Hub's layout)
        or a list of `{"text", "answer_start"}` (SQuAD JSON's).
        """
        rows, problems = self._rows(data_cfg, source, require_labels)
        kept = collections.defaultdict(list)
        for where, qid, question, context, found in rows:
            try:
                answers = _answer_pairs(qid, found)
                _check(qid, question, context, answers, require_labels)
            except BadRow as bad:
                problems.add(where, bad)
                continue
            for key, value in (("ids", qid), ("questions", question), ("contexts", context),
                               ("answers", answers)):
                kept[key].append(value)
        skipped = problems.settle(data_cfg, len(kept["ids"]))
        has_labels = any(kept["answers"])
        return Examples(source=problems.source, has_labels=has_labels, skipped=skipped, **kept)

    # ------------------------------------------------------------------ encoding

    def encode(self, examples: Examples, tokenizer, max_seq_len: int, cache_dir=None) -> Encoded:
        """Windows of question and context part as the tokenizer pairs them ([CLS] question [SEP]
        context [SEP] for BERT), with start/end labels per window.

        extras: `example_index` [N] (the question of each window) and `context_offsets` [T, 2]
        (character offsets of context tokens in their context; -1 for the other tokens).
        """
        doc_stride = self.doc_stride
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("question answering needs a fast tokenizer (offset mappings)")
        _check_stride(doc_stride, max_seq_len)
        key = data_lib.content_key(
            f"qa len{max_seq_len} stride{doc_stride}", data_lib.tokenizer_fingerprint(tokenizer),
            examples.questions, examples.contexts,
            [f"{answers[0][0]}\x01{answers[0][1]}" if answers else "" for answers in examples.answers])
        arrays = data_lib.cached_arrays(
            cache_dir, key, lambda: _windows(examples, tokenizer, max_seq_len, doc_stride))
        extras = {"example_index": arrays.pop("example_index"),
                  "context_offsets": arrays.pop("context_offsets")}
        return Encoded(has_labels=examples.has_labels, extras=extras, **arrays)

    # ------------------------------------------------------------------ outputs

    def answers_of(self, outputs_Tx2: np.ndarray, encoded: Encoded,
                   examples: Examples) -> tuple[list[str], np.ndarray]:
        """The best answer text of every question over its windows, and its score (start + end)."""
        best_text = [""] * len(examples)
        best_score = np.full(len(examples), -np.inf)
        offsets, rows_of = encoded.offsets, encoded.extras["example_index"]
        char = encoded.extras["context_offsets"]
        for row, example in enumerate(rows_of):
            a, b = offsets[row], offsets[row + 1]
            span = _best_span(outputs_Tx2[a:b, 0], outputs_Tx2[a:b, 1], char[a:b, 0] >= 0,
                              self.n_best, self.max_answer_len)
            if span is not None and span[2] > best_score[example]:
                i, j, score = span
                best_score[example] = score
                best_text[example] = examples.contexts[example][char[a + i, 0]:char[a + j, 1]]
        return best_text, best_score

    def scores(self, outputs: np.ndarray, encoded: Encoded, examples: Examples) -> dict[str, float]:
        predicted, _ = self.answers_of(outputs, encoded, examples)
        found = squad_scores(predicted, [[text for text, _ in a] for a in examples.answers])
        return {name: found[name] for name in self.metrics}

    def agreement(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                  examples: Examples) -> float:
        """Fraction of questions where student and teacher give the same answer text."""
        s, _ = self.answers_of(student, encoded, examples)
        t, _ = self.answers_of(teacher, encoded, examples)
        return float(np.mean([a == b for a, b in zip(s, t)]))

    def predictions(self, outputs: np.ndarray, encoded: Encoded, examples: Examples) -> list[dict]:
        texts, scores = self.answers_of(outputs, encoded, examples)
        return [{"id": qid, "answer": text, "score": float(score) if np.isfinite(score) else None}
                for qid, text, score in zip(examples.ids, texts, scores)]

    def showcase(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                 examples: Examples, count: int = 5) -> list[dict]:
        s, _ = self.answers_of(student, encoded, examples)
        t, _ = self.answers_of(teacher, encoded, examples)
        return [{"question": examples.questions[i],
                 "gold": " | ".join(dict.fromkeys(a for a, _ in examples.answers[i])),
                 "teacher": t[i], "student": s[i]} for i in range(min(count, len(examples)))]


def _best_span(start_L: np.ndarray, end_L: np.ndarray, in_context_L: np.ndarray, n_best: int,
               max_len: int) -> tuple[int, int, float] | None:
    """(start, end, score) of the best valid span of one window, from its n-best starts and ends."""
    starts = np.argsort(start_L)[::-1][:n_best]
    ends = np.argsort(end_L)[::-1][:n_best]
    best = None
    for i in starts:
        if not in_context_L[i]:
            continue
        for j in ends:
            if not in_context_L[j] or j < i or j - i + 1 > max_len:
                continue
            score = float(start_L[i] + end_L[j])
            if best is None or score > best[2]:
                best = (int(i), int(j), score)
    return best


def _windows(examples: Examples, tokenizer, max_seq_len: int, doc_stride: int) -> dict[str, np.ndarray]:
    _check_question_room(examples, tokenizer, max_seq_len, doc_stride)
    ids, types, lengths, labels, example_index, char = [], [], [], [], [], []
    with_types = data_lib.gives_token_types(tokenizer)
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        out = tokenizer(examples.questions[start:stop], examples.contexts[start:stop],
                        truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_token_type_ids=with_types, return_attention_mask=False)
        for w, window_ids in enumerate(out["input_ids"]):
            example = start + int(out["overflow_to_sample_mapping"][w])
            sequence = out.sequence_ids(w)
            offsets = [(a, b) if sequence[k] == 1 else (-1, -1)
                       for k, (a, b) in enumerate(out["offset_mapping"][w])]
            ids.append(window_ids)
            types.append(out["token_type_ids"][w] if with_types else [0] * len(window_ids))
            lengths.append(len(window_ids))
            char.extend(offsets)
            example_index.append(example)
            labels.append(_positions(offsets, examples.answers[example]))
    flat_ids, _ = data_lib.flatten(ids, np.int32)
    flat_types, _ = data_lib.flatten(types, np.int8)
    return {"input_ids": flat_ids, "token_type_ids": flat_types,
            "offsets": data_lib.offsets_of(np.asarray(lengths, np.int64)),
            "labels": np.asarray(labels, np.int32).reshape(-1, 2),
            "example_index": np.asarray(example_index, np.int64),
            "context_offsets": np.asarray(char, np.int32).reshape(-1, 2)}


def _positions(offsets: list[tuple[int, int]], answers: list[tuple[str, int]]) -> tuple[int, int]:
    """Start and end token of the first gold answer in this window; (0, 0) ([CLS]) if it is not
    wholly inside the window's part of the context."""
    if not answers:
        return (0, 0)
    text, start_char = answers[0]
    end_char = start_char + len(text)
    context = [k for k, (a, _) in enumerate(offsets) if a >= 0]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return (0, 0)
    first = next(k for k in context if offsets[k][1] > start_char)
    last = next(k for k in reversed(context) if offsets[k][0] < end_char)
    return (first, last)


def _check_stride(doc_stride: int, max_seq_len: int) -> None:
    # Each window moves forward by the tokens it does not share; a stride near the window's
    # context length would barely move it.
    if doc_stride >= max_seq_len // 2:
        raise DataError(f"data.doc_stride {doc_stride} must be under half of data.max_seq_len "
                        f"({max_seq_len})")


def _check_question_room(examples: Examples, tokenizer, max_seq_len: int, doc_stride: int) -> None:
    """Every question must leave a window more context tokens than the stride: the context part
    moves on by (room - stride) tokens per window, and the tokenizer fails outright (no question
    id) when that is not positive. The question itself is never cut."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    longest = max_seq_len - specials - doc_stride - 1
    lengths = [len(ids) for ids in tokenizer(examples.questions, add_special_tokens=False)["input_ids"]]
    too_long = [(qid, n) for qid, n in zip(examples.ids, lengths) if n > longest]
    if too_long:
        qid, n = max(too_long, key=lambda found: found[1])
        raise DataError(
            f"{examples.source}: {len(too_long)} question(s) leave a window no room for its context "
            f"(the longest, question {qid}, has {n} tokens): with data.max_seq_len {max_seq_len}, "
            f"data.doc_stride {doc_stride} and {specials} special tokens a question may have at "
            f"most {longest} tokens. Raise data.max_seq_len, lower data.doc_stride, or remove "
            f"the question")


def _check(qid: str, question: Any, context: Any, answers: list, require_labels: bool) -> None:
    if not isinstance(question, str) or not question.strip():
        raise BadRow("empty question", f"question {qid}: the question is empty")
    if not isinstance(context, str) or not context.strip():
        raise BadRow("empty context", f"question {qid}: the context is empty")
    if require_labels and not answers:
        raise BadRow("no answer", f"question {qid}: a question to learn from needs an answer")
    for text, start in answers:
        if not isinstance(text, str) or not text:
            raise BadRow("bad answer", f"question {qid}: an answer's text must be a non-empty "
                         f"string, got {text!r}")
        # bool is an int; a negative start would slice from the end of the context.
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise BadRow("bad answer", f"question {qid}: answer_start must be a character index "
                         f">= 0, got {start!r}")
        if context[start:start + len(text)] != text:
            raise BadRow("answer mismatch", f"question {qid}: answer_start {start!r} does not point "
                         f"at {text!r} in its context (it finds {context[start:start + len(text)]!r})")


def _answer_pairs(qid: str, found: Any) -> list[tuple[Any, Any]]:
    """(text, answer_start) pairs from the Hub's `{"text": [...], "answer_start": [...]}` or
    SQuAD JSON's `[{"text": ..., "answer_start": ...}, ...]`; no answers (None, {}, []) is []."""
    if not found:
        return []
    if isinstance(found, dict) and set(found) >= {"text", "answer_start"}:
        texts, starts = found["text"], found["answer_start"]
        if isinstance(texts, (list, tuple)) and isinstance(starts, (list, tuple)) \
                and len(texts) == len(starts):
            return list(zip(texts, starts))
        raise BadRow("bad answer", f"question {qid}: answers needs lists 'text' and "
                     f"'answer_start' of the same length, got {found!r}")
    if isinstance(found, (list, tuple)) and all(
            isinstance(a, dict) and set(a) >= {"text", "answer_start"} for a in found):
        return [(a["text"], a["answer_start"]) for a in found]
    raise BadRow("bad answer", f"question {qid}: answers must be {{'text': [...], 'answer_start': "
                 f"[...]}} or a list of {{'text': ..., 'answer_start': ...}}, got {found!r}")


def _is_squad_json(path: str, data_cfg: DataConfig) -> bool:
    fmt = data_cfg.format or data_lib.file_format(path)
    if fmt != "json":
        return False
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096)
    return head.lstrip().startswith("{") and '"data"' in head


def _read_squad_json(path: str):
    with open(path, encoding="utf-8-sig") as f:
        try:
            articles = json.load(f)["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a SQuAD file (data -> paragraphs -> qas): {err}") from err
    rows = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                rows.append((f"{path} (question {qa.get('id')})", str(qa.get("id")),
                             qa.get("question"), context, qa.get("answers")))
    if not rows:
        raise DataError(f"{pathlib.Path(path)}: the file holds no questions")
    return rows, Problems(str(path))


# ----------------------------------------------------------------------------- resolving


def resolve(cfg: QAConfig, data_cfg: DataConfig | None = None) -> QATask:
    preset = PRESETS.get(cfg.name) or Preset()
    if data_cfg is not None:
        _check_stride(data_cfg.window_stride, data_cfg.max_seq_len)
    primary = cfg.metric or METRICS[0]
    return QATask(name=cfg.name, metrics=(primary,) + tuple(m for m in METRICS if m != primary),
                  question=cfg.question or preset.question, context=cfg.context or preset.context,
                  answers=cfg.answers or preset.answers, n_best=cfg.n_best or preset.n_best,
                  max_answer_len=cfg.max_answer_len or preset.max_answer_len,
                  hub_dataset=preset.hub_dataset,
                  doc_stride=(data_cfg or DataConfig()).window_stride)
