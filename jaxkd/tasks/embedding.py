"""Sentence embeddings: the student learns the teacher's embedding of each sentence.

The teacher is a sentence-transformers directory (its pooling, normalisation and window are
read from `modules.json`, `jaxkd.tasks.sbert`) or a plain Hugging Face encoder given
`task.pooling` and `task.normalize`. Training text is unlabelled: the sentences of any file the
readers take (a `sentence` or `text` column, both sentences of an STS file, whose scores are
not read, or raw text: a sentence per line, or documents cut into sentences). The head pools the encoder's last states over the real tokens (no weights of its
own), maps them to the teacher's width with a learned dense `projection` where the two differ,
and normalises. The loss is a weighted sum of the embedding MSE, the cosine distance and the
relation of the in-batch similarity matrices (`jaxkd.tasks.similarity`), plus any intermediate
term; the eval and test splits are scored sentence pairs (STS-B: Spearman and Pearson of the
cosine similarity with the gold scores). Models are exported as sentence-transformers
directories.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd import losses
from jaxkd import model as model_lib
from jaxkd.data import DataConfig, DataError, Encoded, Table
from jaxkd.model import BertConfig, HeadConfig
from jaxkd.tasks import sbert, similarity
from jaxkd.tasks.base import Objective, Task, TaskConfig, refuse_label_settings

TYPE = "sentence_embedding"
TRANSFER = {"data.unlabeled": None,
            "distill.augment": "a masked or word-swapped sentence does not mean what the original "
                               "does, so the teacher's embedding of it teaches nothing true; give "
                               "more sentences as data.unlabeled"}
METRICS = ("spearman", "pearson")


@dataclasses.dataclass(frozen=True)
class Preset:
    text: tuple[str, ...]  # columns of a sentences file: the first one present is read
    pair: tuple[str, str]  # the two sentence columns of a scored pairs file
    score: str
    score_range: tuple[float, float]


PRESETS: dict[str, Preset] = {
    # STS Benchmark files as released (sts-*.csv), or any table with these columns.
    "sts": Preset(("sentence", "text"), ("sentence1", "sentence2"), "score", (0.0, 5.0)),
}


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig(TaskConfig):
    """The `task` section of this kind: the common keys and these."""

    name: str = "sts"
    # Columns of a file of sentences (the first present is read); None: the preset's.
    text: str | tuple[str, ...] | None = None
    # The two sentence columns and the gold score of a scored pairs file (STS); None: the preset's.
    text_pair: tuple[str, str] | None = None
    score: str | None = None
    score_range: tuple[float, float] | None = None
    # How embeddings are computed from the encoder's states. None: the teacher's modules.json
    # (a plain encoder: mean pooling, no normalisation); a value contradicting modules.json is
    # an error.
    pooling: str | tuple[str, ...] | None = None
    normalize: bool | None = None
    # How the student pools; None: as the teacher does. Another pooling changes what the
    # student's embeddings are made of, not their space: the MSE and cosine terms still compare
    # them with the teacher's (through the projection where the widths differ).
    student_pooling: str | tuple[str, ...] | None = None
    # A student whose embedding width differs from the teacher's learns a dense map to it
    # (exported as a sentence-transformers Dense module). false: no map, then only
    # similarity_weight (which compares each model's own similarities) may be set.
    projection: bool = True
    # The loss: each term's weight (see jaxkd.tasks.similarity).
    mse_weight: float = 1.0
    cosine_weight: float = 0.0
    similarity_weight: float = 0.0
    neighbours: int = 10  # k of the recall@k agreement with the teacher's nearest neighbours
    # Raw text files (.txt, .txt.gz) hold a sentence per line; true: a document per line (a
    # general-distillation corpus), cut into sentences by punctuation.
    split_sentences: bool = False

    def __post_init__(self):
        for key in ("text", "pooling", "student_pooling"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
        super().__post_init__()


CONFIG = EmbeddingConfig


# ----------------------------------------------------------------------------- the head


class EmbeddingHead(nn.Module):
    """Pooling over the real tokens (each mode of `head.pooling`, concatenated), the dense
    `projection` where the head has one, then unit length with `head.normalize`: what a
    sentence-transformers model of Transformer, Pooling, (Dense,) (Normalize) computes."""

    encoder: BertConfig
    head: HeadConfig

    @nn.compact
    def __call__(self, x_BxLxH, deterministic: bool, mask_BxL):
        del deterministic  # no dropout after the encoder, as sentence-transformers has none
        dense = (model_lib.dense(self.encoder, self.head.projection, "projection", dtype=jnp.float32)
                 if self.head.projection else None)
        return sbert.sentence_embeddings(x_BxLxH, mask_BxL, self.head.pooling, self.head.normalize,
                                         dense)


def onnx_head(g, encoder: BertConfig, head: HeadConfig, params, hidden, mask):
    """EmbeddingHead as ONNX ops (`HeadSpec.onnx`)."""
    pooled = [sbert.onnx_pool(g, hidden, mask, m) for m in head.pooling]
    out = pooled[0] if len(pooled) == 1 else g.op("Concat", *pooled, axis=-1)
    if head.projection:
        out = g.dense(out, params["projection"], "projection")
    return g.l2_normalize(out, sbert.NORM_EPS) if head.normalize else out


HEAD = model_lib.register_head(model_lib.HeadSpec(
    kind=TYPE, module=EmbeddingHead, hf_suffix="Model", hf_modules={}, num_labels=1,
    reads_mask=True, bare=True, onnx=onnx_head, onnx_output="sentence_embedding"))


def output_width(encoder: BertConfig, head: HeadConfig) -> int:
    """The width of a model's embeddings."""
    return head.projection or len(head.pooling) * encoder.hidden_size


# ----------------------------------------------------------------------------- on device


@dataclasses.dataclass(frozen=True)
class EmbeddingObjective(Objective):
    """The embedding terms (each with its weight) on the student's and teacher's embeddings;
    no labels, no temperature."""

    mse_weight: float = 1.0
    cosine_weight: float = 0.0
    similarity_weight: float = 0.0

    hard_metric_names: ClassVar[tuple[str, ...]] = ()

    @property
    def hard_loss_name(self) -> str:
        return "loss/none"  # no labels: never a term

    def hard_loss(self, logits, batch):
        raise ValueError(f"{TYPE} tasks have no labels: a teacher is not fine-tuned on them")

    def distill_loss(self, loss_cfg: losses.LossConfig, student_out, teacher_out, proj_params,
                     batch, student_encoder, teacher_encoder):
        if teacher_out is None:
            raise ValueError(f"{TYPE} tasks learn from the teacher's embeddings alone: the step "
                             f"needs the teacher (live or cached)")
        s, t, w = student_out.logits, teacher_out.logits, batch["weights"]
        terms = []
        for name, weight, fn in (("loss/embedding_mse", self.mse_weight, similarity.embedding_mse),
                                 ("loss/embedding_cosine", self.cosine_weight, similarity.cosine_distance)):
            if weight > 0:
                terms.append((name, weight, fn(s, t, w)))
        if self.similarity_weight > 0:
            terms.append(("loss/similarity", self.similarity_weight, similarity.similarity_mse(s, t, w)))
        total, metrics = losses.weighted_sum(terms)
        if loss_cfg.any_intermediate:
            inter, inter_metrics = losses.intermediate_loss(
                loss_cfg, student_out, teacher_out, proj_params, batch["attention_mask"], w,
                student_encoder, teacher_encoder)
            total = total + inter
            metrics.update(inter_metrics)
        metrics["loss/total"] = total
        return total, metrics

    def metrics(self, logits, batch, teacher_logits=None):
        if teacher_logits is None or logits.shape != teacher_logits.shape:
            return {}
        cos = 1.0 - similarity.cosine_distance(logits, teacher_logits, batch["weights"])
        return {"mean_cosine": cos}


def objective(head: HeadConfig) -> Objective:
    return EmbeddingObjective()


# ----------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True)
class EmbeddingTask(Task):
    """A resolved sentence-embedding task: columns, the teacher's embedding settings, the loss."""

    type: ClassVar[str] = TYPE
    head_kind: ClassVar[str] = HEAD.kind
    outputs_per_token: ClassVar[bool] = False
    finetunes: ClassVar[bool] = False
    torch_embeddings: ClassVar[bool] = True

    name: str
    text: tuple[str, ...]
    text_pair: tuple[str, str]
    score: str
    score_range: tuple[float, float]
    pooling: tuple[str, ...] | None  # None until the teacher is read (`for_teacher`)
    normalize: bool | None
    student_pooling: tuple[str, ...] | None  # None: the teacher's
    projection: bool
    weights: tuple[float, float, float]  # mse, cosine, similarity
    neighbours: int
    split_sentences: bool = False
    metrics: tuple[str, ...] = METRICS
    max_seq_len: int | None = None  # data.max_seq_len; None where no data section is given
    label_names: tuple[str, ...] = ()
    lowercase: bool = False
    teacher_dir: pathlib.Path | None = None  # the Hugging Face encoder's own directory
    dense_dir: pathlib.Path | None = None  # the teacher's Dense module, if it has one
    dense_width: int = 0

    @property
    def num_labels(self) -> int:
        return 1

    def id2label(self):
        return None

    def describe_outputs(self) -> str:
        pooling = "+".join(self.pooling or ("mean",))
        return (f"sentence embeddings ({pooling} pooling"
                + (", normalised" if self.normalize else "") + ")")

    def describe_loss(self, distill) -> str:
        names = ("mse", "cosine", "similarity")
        return ", ".join(["loss " + " + ".join(f"{w:g} {n}" for n, w in zip(names, self.weights) if w > 0),
                          *losses.describe_terms(distill)])

    # --- the teacher

    def for_teacher(self, directory: pathlib.Path) -> EmbeddingTask:
        found = sbert.layout(directory, self.pooling, self.normalize)
        if self.max_seq_len and found.max_seq_length and self.max_seq_len > found.max_seq_length:
            raise DataError(f"data.max_seq_len {self.max_seq_len} is beyond the teacher's window of "
                            f"{found.max_seq_length} tokens (max_seq_length, "
                            f"sentence_bert_config.json): it embeds no longer inputs, so set "
                            f"data.max_seq_len <= {found.max_seq_length}")
        return dataclasses.replace(self, pooling=found.pooling, normalize=found.normalize,
                                   lowercase=found.lowercase, teacher_dir=found.encoder_dir,
                                   dense_dir=found.dense_dir, dense_width=found.dense_width)

    def encoder_dir(self, directory: pathlib.Path) -> pathlib.Path:
        return self.teacher_dir or directory

    def is_model_of(self, hf_config: dict) -> bool:
        return True  # any encoder embeds: the teacher is used as it is

    def head(self) -> HeadConfig:
        return HeadConfig(kind=HEAD.kind, num_labels=1, pooling=self.pooling or ("mean",),
                          normalize=bool(self.normalize))

    def model_head(self, family_head: HeadConfig) -> HeadConfig:
        return dataclasses.replace(family_head, pooling=self.pooling or ("mean",),
                                   normalize=bool(self.normalize), projection=self.dense_width)

    def load_model(self, directory: pathlib.Path, head: HeadConfig, rng=None, **options):
        """The encoder from `directory`, and the Dense module's weights as the head's projection
        where the model has one."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        loaded = hf.load_hf(directory, head=dataclasses.replace(head, projection=0), rng=rng,
                            **options)
        config, params = loaded[:2]
        if head.projection:
            if self.dense_dir is None:
                raise DataError(f"{directory}: the head has a projection but the model has no "
                                f"Dense module")
            dense = sbert.read_dense(self.dense_dir, len(head.pooling) * config.encoder.hidden_size)
            config, params = config.replace(projection=head.projection), \
                {**params, "head": {"projection": dense}}
        return (config, params, *loaded[2:])

    def student_model(self, student, teacher):
        """The student pooling as `student_pooling` says, with a projection to the teacher's
        width where the widths differ."""
        if self.student_pooling is not None:
            student = student.replace(pooling=self.student_pooling)
        sbert.check_writable(student.head.pooling)  # it is exported as a Pooling module
        s_width = output_width(student.encoder, dataclasses.replace(student.head, projection=0))
        t_width = output_width(teacher.encoder, teacher.head)
        if s_width == t_width:
            return student.replace(projection=0)
        if self.projection:
            return student.replace(projection=t_width)
        mse, cosine, _ = self.weights
        if mse > 0 or cosine > 0:
            raise DataError(
                f"the student's embeddings are {s_width} wide and the teacher's {t_width}: "
                f"task.mse_weight and task.cosine_weight compare them directly, so they need "
                f"task.projection: true (a learned map to the teacher's width), or use "
                f"task.similarity_weight alone")
        return student.replace(projection=0)

    def objective(self, head: HeadConfig) -> Objective:
        mse, cosine, sim = self.weights
        return EmbeddingObjective(mse_weight=mse, cosine_weight=cosine, similarity_weight=sim)

    def export(self, config, params, out_dir, tokenizer, settings):
        return sbert.save(out_dir, config, params, tokenizer, settings, lowercase=self.lowercase)

    # --- data

    def read(self, data_cfg: DataConfig, source: str) -> Table:
        if data_lib.is_local_path(source) and similarity.is_sts_release(source):
            return similarity.read_sts_release(source)
        return data_lib.read_split(data_cfg, source, None)

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True):
        """A scored pairs file (both sentence columns and the score: every score a number
        inside task.score_range), a file of sentences (the first `task.text` column it has), or
        raw text (.txt, .txt.gz: `similarity.read_raw_text`, task.split_sentences; a .txt that
        is an STS Benchmark release is read as one). Bad rows are a `DataError` naming the file
        and line, or skipped with data.skip_invalid."""
        if (data_lib.is_local_path(source) and similarity.is_raw_text(source)
                and not similarity.is_sts_release(source)):
            return similarity.read_raw_text(source, data_cfg, self.split_sentences)
        table = self.read(data_cfg, source)
        first, second = self.text_pair
        if first in table.columns and second in table.columns:
            label = self.score if self.score in table.columns else None
            return similarity.sts_examples(table, data_cfg, first, second, label, self.score_range)
        column = next((c for c in self.text if c in table.columns), None)
        if column is None:
            raise DataError(f"{table.source}: no sentence column: a {TYPE} split needs one of the "
                            f"columns {list(self.text)} (task.text), or the pair columns "
                            f"{list(self.text_pair)} (task.text_pair); it has {list(table.columns)}")
        return similarity.sts_examples(table, data_cfg, column, None, None, self.score_range)

    def load_unlabeled(self, data_cfg: DataConfig, source: str):
        examples = self.load(data_cfg, source)
        return dataclasses.replace(examples, has_labels=False)

    def check_split(self, name: str, examples) -> None:
        if name in ("eval", "test") and (examples.pairs is None or not examples.has_labels):
            raise DataError(
                f"data.{name} ({examples.source}) is not scored sentence pairs: the eval and test "
                f"splits of a {TYPE} task need the columns {list(self.text_pair)} and "
                f"{self.score!r} (an STS Benchmark file as released is read as such)")

    def encode(self, examples, tokenizer, max_seq_len: int, cache_dir=None) -> Encoded:
        """One row per sentence: the first sentences, then (pairs) the second ones, each
        tokenised alone and truncated to `max_seq_len`."""
        sentences = examples.texts + (examples.pairs or [])
        if self.lowercase:
            sentences = [s.lower() for s in sentences]
        key = data_lib.content_key(f"embedding len{max_seq_len}",
                                   data_lib.tokenizer_fingerprint(tokenizer), sentences)
        arrays = data_lib.cached_arrays(cache_dir, key,
                                        lambda: data_lib.tokenize_rows(tokenizer, sentences, None, max_seq_len))
        return Encoded(labels=np.zeros(len(sentences), np.int32), has_labels=examples.has_labels,
                       **arrays)

    # --- scoring

    def scores(self, outputs: np.ndarray, encoded: Encoded, examples) -> dict[str, float]:
        if examples.pairs is None or not examples.has_labels:
            return {}
        n = len(examples)
        found = similarity.sts_scores(outputs[:n], outputs[n:2 * n], examples.scores)
        return {name: found[name] for name in self.metrics}  # the primary (task.metric) first

    def agreement(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                  examples) -> dict[str, float]:
        """recall@k of the teacher's k nearest neighbours among the split's sentences, and the
        mean cosine of each sentence's two embeddings (NaN where the widths differ)."""
        k = min(self.neighbours, len(student) - 1)
        same = student.shape[1] == teacher.shape[1]
        return {f"recall@{k}": similarity.neighbour_recall(student, teacher, k),
                "mean_cosine": similarity.mean_cosine(student, teacher) if same else float("nan")}

    def predictions(self, outputs: np.ndarray, encoded: Encoded, examples) -> list[dict]:
        n = len(examples)
        if examples.pairs is None:
            return [{"embedding": [round(float(x), 7) for x in row]} for row in outputs[:n]]
        sims = similarity.cosine_rows(outputs[:n], outputs[n:2 * n])
        return [{"similarity": round(float(x), 6)} for x in sims]

    def showcase(self, student, teacher, encoded, examples, count: int = 5) -> list[dict[str, str]]:
        n = len(examples)
        rows = []
        if examples.pairs is None:
            for i in range(min(count, n)):
                rows.append({"text": examples.texts[i], "cosine(teacher, student)": (
                    f"{similarity.cosine_rows(student[i:i + 1], teacher[i:i + 1])[0]:.3f}"
                    if student.shape == teacher.shape else "")})
            return rows
        s_sim = similarity.cosine_rows(student[:n], student[n:2 * n])
        t_sim = similarity.cosine_rows(teacher[:n], teacher[n:2 * n])
        for i in range(min(count, n)):
            rows.append({"text": f"{examples.texts[i]} ||| {examples.pairs[i]}",
                         "gold": f"{examples.scores[i]:.2f}" if examples.has_labels else "",
                         "teacher": f"{t_sim[i]:.3f}", "student": f"{s_sim[i]:.3f}"})
        return rows

    def stdin_record(self, line: str, number: int) -> dict:
        if "\t" in line:
            first, second = line.split("\t", 1)
            return dict(zip(self.text_pair, (first, second)))
        return {self.text[0]: line}

    def label_order(self, model_labels, model_regression, where, by_position=False):
        return None


# ----------------------------------------------------------------------------- resolving


def resolve(cfg: EmbeddingConfig, data_cfg: DataConfig | None = None) -> EmbeddingTask:
    """Fills `cfg` from its preset; the teacher's pooling comes later (`for_teacher`)."""
    preset = PRESETS.get(cfg.name, PRESETS["sts"])
    return EmbeddingTask(
        name=cfg.name, text=cfg.text or preset.text, text_pair=cfg.text_pair or preset.pair,
        score=cfg.score or preset.score,
        score_range=similarity.check_score_range(cfg.score_range or preset.score_range),
        pooling=cfg.pooling, normalize=cfg.normalize, student_pooling=cfg.student_pooling,
        projection=cfg.projection, weights=(cfg.mse_weight, cfg.cosine_weight, cfg.similarity_weight),
        neighbours=cfg.neighbours, split_sentences=cfg.split_sentences, metrics=_metrics(cfg),
        max_seq_len=None if data_cfg is None else data_cfg.max_seq_len)


def _metrics(cfg: EmbeddingConfig) -> tuple[str, ...]:
    primary = cfg.metric or METRICS[0]
    return (primary,) + tuple(m for m in METRICS if m != primary)


def check(cfg: EmbeddingConfig) -> None:
    if cfg.metric is not None and cfg.metric not in METRICS:
        raise DataError(f"unknown task.metric {cfg.metric!r}{data_lib.nearest(cfg.metric, METRICS)}; "
                        f"known: {', '.join(METRICS)}")
    for key in ("pooling", "student_pooling"):
        if getattr(cfg, key) is not None:
            try:
                sbert.Layout(pathlib.Path("."), getattr(cfg, key))  # validates the modes
                if key == "student_pooling" or cfg.student_pooling is None:  # the student's
                    sbert.check_writable(getattr(cfg, key))
            except DataError as e:
                raise DataError(f"task.{key}: {e}") from e
    if cfg.text_pair is not None and len(cfg.text_pair) != 2:
        raise DataError(f"task.text_pair must name two columns, got {list(cfg.text_pair)}")
    if cfg.score_range is not None:
        similarity.check_score_range(cfg.score_range)
    weights = {k: getattr(cfg, k) for k in ("mse_weight", "cosine_weight", "similarity_weight")}
    for key, value in weights.items():
        if not (isinstance(value, (int, float)) and value >= 0):
            raise DataError(f"task.{key} must be a number >= 0, got {value!r}")
    if not any(weights.values()):
        raise DataError("task.mse_weight, task.cosine_weight and task.similarity_weight are all "
                        "0: set at least one (the loss would be empty)")
    if not isinstance(cfg.neighbours, int) or cfg.neighbours < 1:
        raise DataError(f"task.neighbours must be a positive integer, got {cfg.neighbours!r}")


def check_run(cfg: EmbeddingConfig, distill, teacher) -> None:
    """What the kind needs of the other sections: the teacher's outputs in every step, and no
    teacher fine-tuning (there are no labels)."""
    if distill.alpha == 0:
        raise DataError(f"{TYPE} tasks learn from the teacher's embeddings alone: distill.alpha "
                        f"must be > 0 (it is not otherwise read: the terms are weighed by "
                        f"task.mse_weight, task.cosine_weight and task.similarity_weight)")
    refuse_label_settings(TYPE, distill, teacher)


def directory_head(directory: pathlib.Path, hf_config: dict) -> HeadConfig | None:
    """The head of a model directory of this kind (a sentence-transformers directory), as its
    family computes it; None for any other directory."""
    if not sbert.is_sentence_transformers_dir(directory):
        return None
    from jaxkd import hf  # pylint: disable=import-outside-toplevel

    found = sbert.read_modules(directory)
    family = hf.head_from_hf(hf_config, kind=HEAD.kind)
    return dataclasses.replace(family, pooling=found.pooling, normalize=found.normalize,
                               projection=found.dense_width)


def exported_config(label_names, regression, flags: dict) -> EmbeddingConfig:
    """The task an exported sentence embedder is scored on (STS pairs, `sentence1` /
    `sentence2` / `score` unless `flags` name others)."""
    keys: dict[str, Any] = {}
    text, pair = flags.get("text"), flags.get("text_pair")
    if isinstance(pair, (list, tuple)):  # the settings a run recorded
        keys["text_pair"] = tuple(pair)
    elif text and pair:  # --text A --text-pair B: the pair columns
        keys["text_pair"] = (text, pair)
    if isinstance(text, (list, tuple)):
        keys["text"] = tuple(text)
    elif text and not pair:
        keys["text"] = (text,)
    return EmbeddingConfig(name="sts", type=TYPE, **keys)


def with_model_labels(cfg: EmbeddingConfig, label_names, regression: bool) -> EmbeddingConfig:
    """An embedder has no labels to take from the model: the task as it is."""
    return cfg


INPUT_FLAGS = ("text", "text_pair")
MODELS = "sentence embedders"
INPUT_HINT = "use --text / --text-pair"
