"""What every task kind shares: the `task` config section, the `Task` interface, the on-device
`Objective` (losses and step metrics of a head's logits) and row validation helpers.

A task kind is one module of `jaxkd.tasks` (the list of what it defines: `jaxkd.tasks`' docstring
and docs/tasks.md, "A new task kind"); its `task` section is a `TaskConfig` subclass (CONFIG),
where a key of another kind is an error, and its work is done by a `Task` subclass of this one.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.data import DataConfig, DataError, Encoded, holdout
from jaxkd.model import HeadConfig

log = logging.getLogger(__name__)

Array = jax.Array
_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to learn (YAML section `task`): the keys every kind has. Each kind's module
    subclasses it with its own keys (`<kind>.Config`); `task.type`, else the preset `name`,
    chooses the class (`jaxkd.tasks.config_class`), so a key of another kind is an error."""

    # A preset of the kind (see jaxkd.tasks.KINDS[type].PRESETS) or "custom".
    name: str = "sst2"
    # A key of jaxkd.tasks.KINDS. None: the kind whose preset `name` is, else the default kind.
    type: str | None = None
    metric: str | None = None  # primary metric; None = the preset's

    def __post_init__(self):
        from jaxkd import tasks  # the registry imports this module

        labels = getattr(self, "labels", None)
        if labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in labels))
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise DataError(f"task.labels must be a non-empty list of distinct names, "
                                f"got {list(self.labels)}")
        tasks.check_config(self)

    @classmethod
    def choose(cls, mapping: dict) -> type[TaskConfig]:
        """The class of a `task` mapping: its kind's (used when reading a config)."""
        from jaxkd import tasks

        return tasks.config_class(mapping.get("type"), mapping.get("name", cls.name))

    @classmethod
    def unknown_key(cls, key: str) -> str:
        """Why `key` is not a key of this kind: the kinds that have it, and this kind's keys."""
        from jaxkd import tasks

        return tasks.unknown_key_message(cls, key)


class Task:
    """A resolved task: everything the pipeline asks of a task kind, nothing left to default.

    Subclasses are frozen dataclasses with at least `name`, `label_names` and `metrics`
    (primary first); they implement the methods below.
    """

    type: ClassVar[str]
    head_kind: ClassVar[str]  # a key of jaxkd.model.HEADS (the kind module's HEAD)
    outputs_per_token: ClassVar[bool]  # model outputs [B, L, C] (stored flat [T, C]) vs [B, C]
    pretokenized: ClassVar[bool] = False  # the tokenizer is given words split beforehand
    # The PyTorch reference of `jaxkd.bench epoch`: its transformers padding collator,
    # whether the model gives start and end scores (DistilBERT's SQuAD loss) or logits, and
    # whether it is an embedding recipe instead.
    torch_collator: ClassVar[str] = "DataCollatorWithPadding"
    start_end_outputs: ClassVar[bool] = False
    # The reference trains on the teacher's sentence embeddings, computed once (mean pooling,
    # then unit length), by MSE: sentence-transformers' distillation recipe.
    torch_embeddings: ClassVar[bool] = False
    # Whether a teacher of this kind can be fine-tuned on its labels (a teacher stage).
    finetunes: ClassVar[bool] = True
    # Scored on held-out text by losses (`jaxkd.tasks.heldout`: `eval_batches`, selection by the
    # held-out total) instead of by per-row predictions (`scores`); the teacher runs in every
    # step (no teacher-logit cache).
    heldout: ClassVar[bool] = False
    # Metrics where lower is better (perplexity): their retention is teacher / student, so that
    # below 1 means a worse student for every metric.
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    name: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def head(self) -> HeadConfig:
        return HeadConfig(kind=self.head_kind, num_labels=self.num_labels)

    def describe_outputs(self) -> str:
        """What the model predicts, in words (`train.py --check`)."""
        return f"{self.num_labels} labels"

    def describe_model(self, who: str) -> tuple[str | None, str]:
        """How `train.py --check` names the teacher's or student's model (`who`): the head kind
        whose architecture it is (None: the model config's) and a note in words ("": none)."""
        return None, ""

    def describe_loss(self, distill) -> str:
        """The distillation loss's settings, in words (`train.py --check`, report.json)."""
        return ", ".join([f"T={distill.temperature:g}, alpha={distill.alpha:g}",
                          *losses.describe_terms(distill)])

    def describe_split(self, examples, encoded) -> str:
        """A split's size, in words (`train.py --check`): its examples and the rows they give."""
        counts = self.split_counts(examples, encoded)
        return f"{counts['examples']} examples, {counts['rows']} rows"

    def split_counts(self, examples, encoded) -> dict[str, int]:
        """A split's size as report.json's `data` section gives it: examples read and rows the
        model sees."""
        return {"examples": len(examples), "rows": len(encoded)}

    # --- the teacher, its head and its export (what `jaxkd.plan` and the trainer ask)

    def for_teacher(self, directory: pathlib.Path) -> Task:
        """This task once the teacher's directory is known (a kind that reads settings from it,
        such as a sentence embedder's pooling, returns a resolved copy); by default itself."""
        return self

    def encoder_dir(self, directory: pathlib.Path) -> pathlib.Path:
        """Where the teacher's Hugging Face files (config.json, weights, tokenizer) are."""
        return directory

    def is_model_of(self, hf_config: dict) -> bool:
        """Whether a checkpoint (its config.json) already is a model of this task, so it can
        teach without fine-tuning: its head's kind and label count."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        return (hf.checkpoint_head_kind(hf_config) == self.head_kind
                and hf.checkpoint_num_labels(hf_config) == self.num_labels)

    def teacher_columns(self, hf_config: dict, by_position: bool, where: str) -> np.ndarray | None:
        """The columns of a checkpoint's task head (a model of this task, `is_model_of`) in
        this task's label order (`match_labels`); None when they are in it already, for a task
        without label names (a regression), for a head whose outputs are not the task's labels
        (another count: a masked-LM task taught by a classifier's encoder) or with
        `by_position` (output i is label i)."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        if by_position or not self.label_names:
            return None
        try:
            names = hf.label_names(hf_config)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from err
        if len(names) != len(self.label_names):
            return None
        return self.match_labels(names, f"{where}: its labels (id2label)",
                                 "Set teacher.labels_by_position: true if its output i means the "
                                 "task's label i, or give the task its labels (task.labels)")

    def match_labels(self, model: Sequence[str], whose: str, fix: str) -> np.ndarray | None:
        """Columns of a model's outputs (`model`: its label names by id) in this task's label
        order, matched by name without regard to case; None when they are in it already or when
        the model's names are transformers' placeholders LABEL_i (it names nothing to match:
        output i is label i). A DataError saying `whose` labels they are and `fix` when they
        are another set."""
        model, wanted = [str(n) for n in model], list(self.label_names)
        lower, lower_wanted = [n.lower() for n in model], [n.lower() for n in wanted]
        placeholders = all(n.startswith("LABEL_") and n[6:].isdigit() for n in model)
        if len(model) == len(wanted) and (placeholders or lower == lower_wanted):
            return None
        if sorted(lower) != sorted(lower_wanted) or len(set(lower)) != len(lower):
            raise DataError(f"{whose} are {model} but task {self.name!r} has {wanted}: they must "
                            f"be the same names, in any order. {fix}")
        return np.asarray([lower.index(name) for name in lower_wanted])

    @staticmethod
    def reorder_head(params, columns: np.ndarray | None):
        """`params` with the output layer's columns (the head's `classifier`) taken in the order
        `columns` (`teacher_columns`); unchanged for None."""
        if columns is None:
            return params
        head = params["head"]
        out = dict(head["classifier"])
        out["kernel"], out["bias"] = out["kernel"][..., columns], out["bias"][columns]
        return {**params, "head": {**head, "classifier": out}}

    def load_model(self, directory: pathlib.Path, head: HeadConfig, rng=None, **options):
        """(ModelConfig, params) of the checkpoint in `directory` with `head` (fresh where the
        checkpoint has another kind of head; `rng` seeds it); `options` as `hf.load_hf` takes
        them (dtype, return_report)."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        return hf.load_hf(directory, head=head, rng=rng, **options)

    def student_model(self, student, teacher):
        """The student's `ModelConfig` as this task needs it, given the teacher's; by default
        the one the `student` section describes."""
        return student

    def heldout_heads(self) -> tuple[bool, bool]:
        """For a task scored on held-out text (`heldout`): whether the teacher's head and the
        student's give figures of their own (`jaxkd.tasks.heldout.MODEL_METRICS`)."""
        return True, True

    def report_extras(self) -> dict:
        """Keys of this kind's own for report.json (what its figures rest on)."""
        return {}

    def check_split(self, name: str, examples) -> None:
        """Refuses, before any work, a split (train, eval or test) this task cannot use as such."""

    def model_head(self, family_head: HeadConfig) -> HeadConfig:
        """The teacher's head: this task's head as the teacher's family computes it
        (`family_head`: its dropout and pooler activation), with the task's own settings."""
        return family_head

    def objective(self, head: HeadConfig) -> Objective:
        """How the head's outputs are trained in this task (`jaxkd.tasks.objective` of the head,
        unless the task's settings weigh its terms)."""
        from jaxkd import tasks  # pylint: disable=import-outside-toplevel

        return tasks.objective(head)

    def export(self, config, params, out_dir: pathlib.Path, tokenizer,
               settings: dict) -> pathlib.Path:
        """Write a trained model of this task (`settings`: `jaxkd.exported.export_settings`)."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        return hf.save_hf(config, params, out_dir, tokenizer=tokenizer, id2label=self.id2label(),
                          settings=settings)

    def id2label(self) -> dict[int, str] | None:
        return dict(enumerate(self.label_names)) or None

    def batches(self, encoded, data_cfg: DataConfig, seed: int) -> Callable:
        """position -> this process's training batches of `encoded` from that position (None:
        the start); by default `jaxkd.loop.train_batches`."""
        from jaxkd import loop  # pylint: disable=import-outside-toplevel

        return loop.train_batches(encoded, data_cfg, seed)

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True):
        """Validated examples of one split (a file or a Hub split); `len()` and `.skipped`."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer) -> None:
        """Raise DataError, before any split is tokenized, when the teacher's tokenizer lacks
        something this kind needs; by default nothing is needed beyond encoding text."""

    def encode(self, examples, tokenizer, max_seq_len: int, cache_dir=None) -> Encoded:
        raise NotImplementedError

    def hold_out(self, source: str, examples, fraction: float, seed: int):
        """((kept source, kept examples), (held-out source, held-out examples)): the training
        split cut for data.eval_fraction; by default a seeded `fraction` of its examples."""
        kept, held = holdout(len(examples), fraction, seed)
        where = f"{source} ({len(held)} of {len(examples)} held out, seed {seed})"
        return (source, examples.subset(kept, examples.source)), (where, examples.subset(held, where))

    def load_unlabeled(self, data_cfg: DataConfig, source: str):
        """Examples of transfer text (data.unlabeled): the text columns only, labels ignored.
        Kinds that take no transfer data are refused when the config is read (`TRANSFER`)."""
        raise DataError(f"{self.type} tasks take no data.unlabeled")

    def check_augmentable(self, examples) -> None:
        """Refuses, before any work starts, training examples that distill.augment could not
        vary (the kind's own reasons); by default every set can be."""

    def augmented(self, examples, variants: Callable, source: str):
        """Examples of the variants of `examples`: `variants(texts, pairs, sep=None, keep=None)`
        gives the new (texts, pairs) (`jaxkd.transfer.augmented_set`); only the teacher labels
        them."""
        raise DataError(f"{self.type} tasks take no distill.augment")

    def scores(self, outputs: np.ndarray, encoded: Encoded, examples) -> dict[str, float]:
        """The task metrics (primary first) of a split's outputs (see `jaxkd.inference`)."""
        raise NotImplementedError

    def agreement(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                  examples) -> float | dict[str, float]:
        """How often student and teacher predict the same (NaN where it does not apply); kinds
        with several such figures give them by name."""
        raise NotImplementedError

    def predictions(self, outputs: np.ndarray, encoded: Encoded, examples) -> list[dict]:
        """One JSON-able prediction per example."""
        raise NotImplementedError

    def showcase(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded, examples,
                 count: int = 5) -> list[dict[str, str]]:
        """A few examples with the gold answer and both models' predictions, for report.md."""
        raise NotImplementedError

    def stdin_record(self, line: str, number: int) -> dict:
        """One input row from a line typed on stdin (`number` counts from 1), in the task's own
        column names; a `DataError` naming the line when it does not fit."""
        raise NotImplementedError

    def label_order(self, model_labels: Sequence[str], model_regression: bool, where: str,
                    by_position: bool = False) -> np.ndarray | None:
        """Columns of a model's outputs in this task's label order (None: already in it), matched
        by name as a teacher's are (`match_labels`); `model_labels` is the model's id2label (of
        the directory `where`). A `DataError` when the two do not predict the same thing.
        `by_position`: output i means label i."""
        if model_regression:
            raise DataError(f"{where} is a regression (one output) but task {self.name!r} is a "
                            "classification")
        if by_position:
            if len(model_labels) != len(self.label_names):
                raise DataError(f"--by-position: the model has {len(model_labels)} labels "
                                f"{list(model_labels)} but the task has {len(self.label_names)} "
                                f"{list(self.label_names)}")
            return None
        return self.match_labels(model_labels, f"the model's labels (id2label of {where}/config.json)",
                                 "Give the task's labels (--labels or task.labels), or pass "
                                 "--by-position if output i means the task's label i")


# ----------------------------------------------------------------------------- on device


@dataclasses.dataclass(frozen=True)
class Objective:
    """How a head's logits are trained and scored inside a step.

    regression: one output per row, squared error (labels float). per_token: labels [B, L] with -1
    on tokens that carry no label; every loss and metric is a mean over labelled tokens, each
    weighted by its row's weight.
    """

    regression: bool = False
    per_token: bool = False

    def view(self, logits: Array, batch) -> Array:
        """The logits as the losses read them: classes on the last axis, labels on the others."""
        return logits

    def label_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        """The shape of a batch's `labels`: [B], or [B, L] per token."""
        return (batch_size, seq_len) if self.per_token else (batch_size,)

    def weights(self, batch) -> Array:
        """Weight of each loss term: [B] rows, or [B, L] labelled tokens."""
        weights = batch["weights"].astype(jnp.float32)
        if self.per_token:
            return weights[:, None] * (batch["labels"] >= 0)
        return weights

    def hard_weights(self, batch) -> Array:
        """Weight of each hard-label loss term, shaped as `weights`: 0 on transfer rows (their
        `hard_weights` is 0: only the teacher labels them)."""
        weights = self.weights(batch)
        hard_B = batch["hard_weights"].astype(jnp.float32)
        return weights * hard_B.reshape(hard_B.shape + (1,) * (weights.ndim - 1))

    # Step metrics that are means over the labelled rows (hard_weights), as the hard loss is.
    hard_metric_names: ClassVar[tuple[str, ...]] = ("accuracy",)

    @property
    def hard_loss_name(self) -> str:
        return "loss/mse" if self.regression else "loss/ce"

    def hard_loss(self, logits: Array, batch) -> Array:
        """The hard-label loss alone (teacher fine-tuning)."""
        if self.regression:
            return losses.mse_loss(logits, batch["labels"], self.hard_weights(batch))
        return losses.ce_loss(self.view(logits, batch), batch["labels"], self.hard_weights(batch))

    def distill_loss(self, loss_cfg: losses.LossConfig, student_out, teacher_out, proj_params,
                     batch, student_encoder, teacher_encoder) -> tuple[Array, dict[str, Array]]:
        """The distillation loss of one batch and its terms (`loss/total` among them): KD on the
        teacher's logits plus the hard-label term (`losses.total_loss`), read as `view` lays the
        logits out, plus the intermediate terms in use. `teacher_out` is None without a teacher
        (labels only)."""
        viewed_t = None if teacher_out is None else teacher_out.replace(
            logits=self.view(teacher_out.logits, batch))
        return losses.total_loss(
            loss_cfg, student_out.replace(logits=self.view(student_out.logits, batch)), viewed_t,
            proj_params, batch["labels"], batch["attention_mask"], batch["weights"],
            student_encoder, teacher_encoder, regression=self.regression,
            label_weights=self.weights(batch), hard_label_weights=self.hard_weights(batch))

    def metrics(self, logits: Array, batch, teacher_logits: Array | None = None) -> dict[str, Array]:
        """Accuracy against the labels (labelled rows), agreement with the teacher (every row);
        classification only."""
        if self.regression:
            return {}
        weights = self.weights(batch)
        pred = jnp.argmax(self.view(logits, batch), axis=-1)
        out = {"accuracy": _weighted_mean(pred == batch["labels"], self.hard_weights(batch))}
        if teacher_logits is not None:
            teacher_pred = jnp.argmax(self.view(teacher_logits, batch), axis=-1)
            out["agreement"] = _weighted_mean(pred == teacher_pred, weights)
        return out


def _weighted_mean(values: Array, weights: Array) -> Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(weights * values.astype(jnp.float32)) / jnp.maximum(jnp.sum(weights), _EPS)


# ----------------------------------------------------------------------------- host helpers


def refuse_label_settings(type_: str, distill, teacher) -> None:
    """For kinds without labels: refuse teacher fine-tuning, the labels-only baseline and the
    temperature and alpha search (a kind's `check_run`)."""
    if teacher.finetune.steps:
        raise DataError(f"{type_} tasks have no labels to fine-tune a teacher on: the teacher is "
                        f"used as it is; remove teacher.finetune.steps")
    for key in ("baseline", "search"):
        if getattr(distill, key):
            raise DataError(f"{type_} tasks have no labels: distill.{key} (a labels-only student, "
                            f"the KD term's temperature and alpha) does not apply; remove it")


class BadRow(Exception):
    """A row that fails validation; `kind` counts it in `skipped`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class Problems:
    """Bad rows of one split: an error naming the first, or (data.skip_invalid) a count."""

    def __init__(self, source: str, malformed: Sequence[tuple[str, str]] = (),
                 malformed_kind: str = "wrong field count"):
        self.source = source
        self.found = list(malformed)
        self.skipped = collections.Counter({malformed_kind: len(malformed)} if malformed else {})

    def add(self, where: str, bad: BadRow) -> None:
        self.skipped[bad.kind] += 1
        self.found.append((where, str(bad)))

    def settle(self, data_cfg: DataConfig, kept: int) -> dict[str, int]:
        """Raise for bad rows unless they are to be skipped; the skip counts by reason."""
        if self.found and not data_cfg.skip_invalid:
            where, reason = self.found[0]
            raise DataError(f"{where}: {reason}. Fix the row, or set data.skip_invalid: true to skip "
                            f"and count such rows ({len(self.found)} bad rows in all).")
        if self.found:
            log.warning("%s: skipped %d invalid rows (%s); first: %s: %s", self.source,
                        len(self.found), dict(self.skipped), *self.found[0])
        if not kept:
            raise DataError(f"{self.source}: no valid rows left (all {len(self.found)} were invalid)")
        return dict(self.skipped)


def text_value(value: Any, column: str) -> str:
    """A row's text of `column`, or a `BadRow`: null, not a string, or blank."""
    if value is None:
        raise BadRow("empty text", f"null text in column {column!r}")
    if not isinstance(value, str):
        raise BadRow("bad text", f"text in column {column!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow("empty text", f"empty text in column {column!r}")
    return value


def label_key(value: Any) -> str | None:
    """Label value -> the string it is matched by; None when missing."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(value)
    key = str(value).strip()
    return key or None


def is_int(key: str) -> bool:
    return key.lstrip("-").isdigit()


def label_id(key: str, names: Sequence[str]) -> int | None:
    """A label's id: its position among `names`, or an integer id in range where the names are
    not integers themselves (labels 1 and 2 named "1" and "2": a 0 is no label, not "1");
    None otherwise."""
    if key in names:
        return list(names).index(key)
    if is_int(key) and 0 <= int(key) < len(names) and not all(is_int(n) for n in names):
        return int(key)
    return None


def infer_label_names(values: Iterable[Any]) -> tuple[str, ...]:
    """Distinct label values, sorted (numerically when all are integers)."""
    keys = {k for k in map(label_key, values) if k is not None}
    if not keys:
        raise DataError("cannot infer task.labels: the training labels are all empty")
    if all(is_int(k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))
