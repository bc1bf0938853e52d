"""Sentence and sentence-pair classification and regression (GLUE): one label or score per row.

Head: pooler + classifier on [CLS] (`BertForSequenceClassification`); one output is a
regression (MSE, Pearson/Spearman), more are classes (CE, accuracy/F1/Matthews).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd import metrics as metrics_lib
from jaxkd.data import DataConfig, DataError, Encoded, Table
from jaxkd import layers
from jaxkd import model as model_lib
from jaxkd.model import BertConfig, HeadConfig
from jaxkd.tasks.base import (BadRow, Objective, Problems, Task, TaskConfig, infer_label_names,
                              label_id, label_key, text_value)

TYPE = "sequence_classification"
# Unlabeled and augmented text: the text columns are all a row needs.
TRANSFER = {"data.unlabeled": None, "distill.augment": None}
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclasses.dataclass(frozen=True)
class Preset:
    text: str
    text_pair: str | None
    labels: tuple[str, ...]  # () = regression
    metrics: tuple[str, ...]  # primary first


# Column and label names as the Hub's `glue` dataset has them.
PRESETS: dict[str, Preset] = {
    "cola": Preset("sentence", None, ("unacceptable", "acceptable"), ("matthews",)),
    "sst2": Preset("sentence", None, ("negative", "positive"), ("accuracy",)),
    "mrpc": Preset("sentence1", "sentence2", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "qqp": Preset("question1", "question2", ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": Preset("sentence1", "sentence2", (), ("pearson", "spearman")),
    # The Hub's MNLI has no "validation": name validation_matched (or _mismatched) in data.
    "mnli": Preset("premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                   ("accuracy",)),
    "qnli": Preset("question", "sentence", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": Preset("sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": Preset("sentence1", "sentence2", ("not_entailment", "entailment"), ("accuracy",)),
}


@dataclasses.dataclass(frozen=True)
class SequenceConfig(TaskConfig):
    """The `task` section of this kind: the common keys and these."""

    # Label names; a string label becomes its position here. None = the preset's, or (custom)
    # the sorted distinct values of the training labels. A regression has none.
    labels: tuple[str, ...] | None = None
    text: str | None = None  # text column; None = the preset's
    text_pair: str | None = None  # second text column of a pair task; None = the preset's
    label: str | None = None  # label column; None = the preset's ("label")


CONFIG = SequenceConfig


class SequenceHead(nn.Module):
    """BertForSequenceClassification's head: act(dense([CLS])) -> dropout -> classifier, act the
    head's pooler_activation (tanh for BERT and RoBERTa, gelu for ELECTRA, relu for DistilBERT)."""

    encoder: BertConfig
    head: HeadConfig

    @nn.compact
    def __call__(self, x_BxQxH, deterministic: bool):
        cfg = self.encoder
        act = model_lib.POOLER_ACTIVATIONS[self.head.pooler_activation]
        pooled_BxH = act(model_lib.dense(cfg, cfg.hidden_size, "pooler", dtype=jnp.float32)(x_BxQxH[:, 0]))
        pooled_BxH = layers.Dropout(model_lib.head_dropout(cfg, self.head))(
            pooled_BxH, deterministic=deterministic)
        return model_lib.dense(cfg, self.head.num_labels, "classifier", dtype=jnp.float32)(pooled_BxH)


def onnx_head(g, encoder: BertConfig, head: HeadConfig, params, hidden, mask):
    """SequenceHead as ONNX ops (`HeadSpec.onnx`)."""
    cls = g.op("Gather", hidden, g.ints(0, "cls"), axis=1)  # [B, H]
    pooled = g.activation(g.dense(cls, params["pooler"], "pooler"), head.pooler_activation)
    return g.dense(pooled, params["classifier"], "classifier")


# The classification head of RoBERTa, XLM-R and ELECTRA: dense + activation + out_proj.
_CLASSIFICATION_HEAD = (("pooler", "classifier.dense"), ("classifier", "classifier.out_proj"))
HEAD = model_lib.register_head(model_lib.HeadSpec(
    kind="sequence", module=SequenceHead, hf_suffix="ForSequenceClassification",
    hf_modules={"bert": (("pooler", "bert.pooler.dense"), ("classifier", "classifier")),
                "distilbert": (("pooler", "pre_classifier"), ("classifier", "classifier")),
                "*": _CLASSIFICATION_HEAD},
    reads_cls_only=True, single_output_regression=True,
    dropout_keys={"distilbert": "seq_classif_dropout"}, onnx=onnx_head), default=True)


def objective(head: HeadConfig) -> Objective:
    return Objective(regression=head.regression)


# ----------------------------------------------------------------------------- exported models

# The predict/evaluate flags (TaskConfig keys) this kind reads, who they are for, and which to use.
INPUT_FLAGS = ("text", "text_pair")
MODELS = "sentence classifiers"
INPUT_HINT = "use --text / --text-pair"


def exported_config(label_names: tuple[str, ...], regression: bool, flags: dict) -> SequenceConfig:
    """The task an exported model of this kind solves: its own labels (a regression: Pearson's
    r), the text columns `flags` name (default `sentence`)."""
    keys: dict[str, Any] = {"text": flags.get("text") or "sentence",
                            "text_pair": flags.get("text_pair")}
    if regression:
        keys["metric"] = "pearson"
    else:
        keys["labels"] = label_names
    return SequenceConfig(name="custom", type=TYPE, **keys)


def with_model_labels(cfg: SequenceConfig, label_names: tuple[str, ...],
                      regression: bool) -> SequenceConfig:
    """A custom task without label names takes the model's; on a regression model, without a
    metric, it is scored by Pearson's r."""
    if cfg.name != "custom" or cfg.labels is not None:
        return cfg
    if regression:
        return cfg if cfg.metric else dataclasses.replace(cfg, metric="pearson")
    if cfg.metric in REGRESSION_METRICS:
        return cfg  # a regression task: the head check reports the mismatch
    return dataclasses.replace(cfg, labels=label_names)


@dataclasses.dataclass(frozen=True)
class Examples:
    """Validated rows of one split."""

    source: str
    texts: list[str]
    pairs: list[str] | None  # second texts of a pair task
    labels: np.ndarray  # int32 ids, or float32 for regression; -1 / NaN when has_labels is False
    has_labels: bool
    skipped: dict[str, int]  # reason -> count of rows left out (only with data.skip_invalid)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray, source: str) -> Examples:
        """The examples at `indices`, as a split of its own."""
        return Examples(source=source, texts=[self.texts[i] for i in indices],
                        pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
                        labels=self.labels[indices], has_labels=self.has_labels, skipped={})


@dataclasses.dataclass(frozen=True)
class SequenceTask(Task):
    """A resolved sentence(-pair) task: columns, labels and metrics."""

    type: ClassVar[str] = TYPE
    head_kind: ClassVar[str] = HEAD.kind
    outputs_per_token: ClassVar[bool] = False

    name: str
    text: str
    text_pair: str | None
    label: str
    label_names: tuple[str, ...]  # id -> name (id2label at export); () for regression
    metrics: tuple[str, ...]  # primary first
    hub_dataset: str = "glue"

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    def stdin_record(self, line: str, number: int) -> dict:
        if self.text_pair is None:
            return {self.text: line}
        if "\t" not in line:
            raise DataError(f"<stdin> line {number}: expected text<TAB>pair (--text-pair is set)")
        first, second = line.split("\t", 1)
        return {self.text: first, self.text_pair: second}

    def label_order(self, model_labels, model_regression: bool, where: str,
                    by_position: bool = False):
        if self.is_regression != model_regression:
            what = "a regression (one output)" if model_regression else \
                f"a classifier over {len(model_labels)} labels"
            task_what = "a regression" if self.is_regression else "a classification"
            raise DataError(f"{where} is {what} but task {self.name!r} is {task_what}")
        if self.is_regression:
            return None
        return super().label_order(model_labels, model_regression, where, by_position)

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    def read(self, data_cfg: DataConfig, source: str) -> Table:
        # The Hub's glue dataset has one config per task, named as the preset.
        return data_lib.read_split(data_cfg, source, self.hub_dataset,
                                   self.name if self.name in PRESETS else None)

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True) -> Examples:
        """Reads and validates one split (a local file or a Hub split name).

        Every row is checked before anything else runs: an empty or null text, a missing label or
        a label outside `label_names` raises a `DataError` naming the file and line, unless
        `data.skip_invalid`, which skips such rows and counts them in `Examples.skipped`. With
        `require_labels=False` (test splits) a missing or all -1 label column gives unlabeled
        examples.
        """
        table = self.read(data_cfg, source)
        wanted = {"task.text": self.text}
        if self.text_pair is not None:
            wanted["task.text_pair"] = self.text_pair
        if require_labels or self.label in table.columns:
            wanted["task.label"] = self.label
        data_lib.check_columns(table, wanted)
        if len(table) == 0 and not table.malformed:
            raise DataError(f"{table.source}: the split is empty (no data rows)")
        label_column = table.columns.get(self.label)
        has_labels = require_labels or not _unlabeled(label_column)
        problems = Problems(table.source, table.malformed)
        texts, pairs, labels = [], [], []
        pair_column = table.columns.get(self.text_pair) if self.text_pair else None
        for i, text in enumerate(table.columns[self.text]):
            try:
                row = (text_value(text, self.text),
                       text_value(pair_column[i], self.text_pair) if pair_column is not None else None,
                       self._label(label_column[i]) if has_labels else None)
            except BadRow as bad:
                problems.add(table.where(i), bad)
                continue
            texts.append(row[0])
            pairs.append(row[1])
            labels.append(row[2])
        skipped = problems.settle(data_cfg, len(texts))
        return Examples(source=table.source, texts=texts,
                        pairs=pairs if pair_column is not None else None,
                        labels=self._label_array(labels, has_labels), has_labels=has_labels,
                        skipped=skipped)

    def load_unlabeled(self, data_cfg: DataConfig, source: str) -> Examples:
        """Transfer text of one file or Hub split: the text columns, validated as `load` does;
        a label column, if any, is not read."""
        table = self.read(data_cfg, source)
        wanted = {"task.text": self.text}
        if self.text_pair is not None:
            wanted["task.text_pair"] = self.text_pair
        data_lib.check_columns(table, wanted)
        if len(table) == 0 and not table.malformed:
            raise DataError(f"{table.source}: the split is empty (no data rows)")
        problems = Problems(table.source, table.malformed)
        pair_column = table.columns.get(self.text_pair) if self.text_pair else None
        texts, pairs = [], []
        for i, text in enumerate(table.columns[self.text]):
            try:
                row = (text_value(text, self.text),
                       text_value(pair_column[i], self.text_pair) if pair_column is not None else None)
            except BadRow as bad:
                problems.add(table.where(i), bad)
                continue
            texts.append(row[0])
            pairs.append(row[1])
        skipped = problems.settle(data_cfg, len(texts))
        return self._unlabeled(table.source, texts, pairs if pair_column is not None else None,
                               skipped)

    def augmented(self, examples: Examples, variants, source: str) -> Examples:
        texts, pairs = variants(examples.texts, examples.pairs)
        return self._unlabeled(source, texts, pairs, {})

    def _unlabeled(self, source: str, texts: list[str], pairs: list[str] | None,
                   skipped: dict[str, int]) -> Examples:
        return Examples(source=source, texts=texts, pairs=pairs,
                        labels=self._label_array(texts, has_labels=False), has_labels=False,
                        skipped=skipped)

    def _label(self, value: Any) -> float | int:
        key = label_key(value)
        if key is None:
            raise BadRow("missing label", f"missing label in column {self.label!r}")
        if self.is_regression:
            try:
                number = float(key)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise BadRow("bad label", f"label {value!r} in column {self.label!r} is not a finite number")
            return number
        found = label_id(key, self.label_names)
        if found is None:
            raise BadRow("bad label", f"label {value!r} in column {self.label!r} is not one of "
                         f"{list(self.label_names)} nor an id 0..{self.num_labels - 1} (task.labels)")
        return found

    def _label_array(self, labels: list, has_labels: bool) -> np.ndarray:
        dtype = np.float32 if self.is_regression else np.int32
        if has_labels:
            return np.asarray(labels, dtype)
        return np.full(len(labels), np.nan if self.is_regression else -1, dtype)

    def encode(self, examples: Examples, tokenizer, max_seq_len: int, cache_dir=None) -> Encoded:
        """Token ids of every example as the tokenizer pairs them ([CLS] a [SEP] (b [SEP]) for
        BERT, <s> a </s> (</s> b </s>) for RoBERTa), truncated longest-first.

        Cached in `cache_dir` under a hash of the texts, the tokenizer and max_seq_len.
        """
        key = data_lib.content_key(f"sequence len{max_seq_len}",
                                   data_lib.tokenizer_fingerprint(tokenizer), examples.texts,
                                   examples.pairs or [])
        arrays = data_lib.cached_arrays(
            cache_dir, key, lambda: data_lib.tokenize_rows(tokenizer, examples.texts, examples.pairs,
                                                     max_seq_len))
        return Encoded(labels=examples.labels, has_labels=examples.has_labels, **arrays)

    def scores(self, outputs: np.ndarray, encoded: Encoded, examples) -> dict[str, float]:
        return metrics_lib.compute(self.metrics, outputs, np.asarray(encoded.labels))

    def agreement(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                  examples) -> float:
        return metrics_lib.agreement(student, teacher)

    def predictions(self, outputs: np.ndarray, encoded: Encoded, examples) -> list[dict]:
        if self.is_regression:
            return [{"score": float(x)} for x in outputs[:, 0]]
        probs = _softmax(outputs)
        return [{"label": self.label_names[int(p.argmax())], "probs": [round(float(x), 6) for x in p]}
                for p in probs]


    def showcase(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded, examples,
                 count: int = 5) -> list[dict[str, str]]:
        def name(outputs, i):
            return f"{outputs[i, 0]:.3f}" if self.is_regression else self.label_names[int(outputs[i].argmax())]

        rows = []
        for i in range(min(count, len(examples))):
            text = examples.texts[i] + (f" ||| {examples.pairs[i]}" if examples.pairs else "")
            gold = (f"{examples.labels[i]:.3f}" if self.is_regression else
                    self.label_names[examples.labels[i]] if examples.has_labels else "")
            rows.append({"text": text, "gold": gold, "teacher": name(teacher, i),
                         "student": name(student, i)})
        return rows


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)



def _unlabeled(label_column: list | None) -> bool:
    # Hub test splits keep the column but fill it with -1.
    return label_column is None or all(label_key(v) in (None, "-1") for v in label_column)


# ----------------------------------------------------------------------------- resolving


def resolve(cfg: SequenceConfig, data_cfg: DataConfig | None = None,
            label_values: Iterable[Any] | None = None) -> SequenceTask:
    """Fills `cfg` from its preset. A custom classification task without `labels` infers them
    from the training labels: `label_values`, or read from `data_cfg.train`."""
    if cfg.name == "custom":
        if cfg.text is None:
            raise DataError("task.name 'custom' needs task.text (the name of the text column)")
        metric = cfg.metric or "accuracy"
        preset = Preset(cfg.text, cfg.text_pair, (), (metric,))
        regression = metric in REGRESSION_METRICS
    else:
        preset = PRESETS[cfg.name]
        regression = not preset.labels
    if regression:
        if cfg.labels is not None:
            raise DataError(f"task {cfg.name!r} is a regression (metric pearson/spearman): "
                            f"remove task.labels")
        names: tuple[str, ...] = ()
    elif cfg.labels is not None:
        names = cfg.labels
    elif preset.labels:
        names = preset.labels
    else:
        if label_values is None:
            label_values = _training_labels(cfg, data_cfg)
        names = infer_label_names(label_values)
    if not regression and len(names) < 2:
        where = "task.labels" if cfg.labels is not None else f"the training labels of {cfg.name!r}"
        raise DataError(f"a classification needs at least 2 labels; {where} give {list(names)} "
                        "(one output would be read as a regression)")
    metrics = _metrics(cfg, preset, regression, len(names))
    return SequenceTask(name=cfg.name, text=cfg.text or preset.text,
                        text_pair=cfg.text_pair or preset.text_pair, label=cfg.label or "label",
                        label_names=names, metrics=metrics)


def _training_labels(cfg: SequenceConfig, data_cfg: DataConfig | None) -> list:
    if data_cfg is None or data_cfg.train is None:
        raise DataError("task.name 'custom' needs task.labels (the label names), "
                        "or data.train to infer them from")
    draft = SequenceTask(name=cfg.name, text=cfg.text, text_pair=cfg.text_pair,
                         label=cfg.label or "label", label_names=(), metrics=())
    table = draft.read(data_cfg, data_cfg.train)
    data_lib.check_columns(table, {"task.label": draft.label})
    return table.columns[draft.label]


def check(cfg: SequenceConfig) -> None:
    if cfg.metric is not None and cfg.metric not in METRICS:
        raise DataError(f"unknown task.metric {cfg.metric!r}{data_lib.nearest(cfg.metric, METRICS)}; "
                        f"known: {', '.join(METRICS)}")


def _metrics(cfg: SequenceConfig, preset: Preset, regression: bool, num_labels: int) -> tuple[str, ...]:
    primary = cfg.metric or preset.metrics[0]
    metrics = (primary,) + tuple(m for m in preset.metrics if m != primary)
    for metric in metrics:
        if (metric in REGRESSION_METRICS) != regression:
            kind = "regression" if regression else "classification"
            raise DataError(f"task.metric {metric!r} does not fit the {kind} task {cfg.name!r}")
        if metric == "f1" and num_labels != 2:
            raise DataError(f"task.metric 'f1' (of the positive class) needs 2 labels, "
                            f"task {cfg.name!r} has {num_labels}")
    return metrics
