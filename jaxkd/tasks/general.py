"""General (task-agnostic) distillation: a small encoder learns from a big one on raw text, the
DistilBERT, TinyBERT and MiniLM-v2 way, before any task exists.

The training text is a corpus (`jaxkd.data.corpus`: plain-text, JSONL or Parquet files),
tokenised once into memory-mapped shards and packed into rows of exactly `data.max_seq_len`
tokens; each batch is masked on the host from (seed, step, row) (`jaxkd.data.masking`), so a
resumed or multi-process run draws the same masks. The objectives, each with its own weight:
  task.mlm_weight   the student's masked-LM cross-entropy on the masked positions
  task.kd_weight    KD on the teacher's masked-LM distribution there (distill.temperature, T^2)
  distill.*_weight  the intermediate terms: MiniLM-v2 relations (`relation_weight`), the
                    last hidden states' cosine (`cosine_weight`), TinyBERT's hidden-state and
                    attention terms, MiniLM-v1's
Masked-LM logits exist only at the masked positions (the head gathers them first,
`jaxkd.tasks.masked_lm`). A teacher without a masked-LM head teaches with the terms that need
none; asking for kd_weight with one is refused before any work.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd import losses, util
from jaxkd.data import DataConfig, DataError
from jaxkd.data import corpus as corpus_lib
from jaxkd.data import rawtext
from jaxkd.data.masked import MaskedBatches, MaskedEvalBatches, Vocabulary
from jaxkd.data.masking import MaskingConfig, token_counts
from jaxkd.data.corpus import PackedRows, word_starts
from jaxkd.model import HeadConfig
from jaxkd.tasks import embedding, masked_lm
from jaxkd.tasks.base import Objective, Task, TaskConfig, refuse_label_settings

TYPE = "general"
HEAD = masked_lm.HEAD
TRANSFER = {"data.unlabeled": "the training text is already unlabelled: add it to data.train "
                              "(a list of files)",
            "distill.augment": "general distillation masks its own text; there is nothing to "
                               "augment"}
# Held-out figures: the selection score first. The checkpoint with the highest held-out score
# (minus the held-out total) is kept whichever task.metric heads the report.
METRICS = ("heldout_score", "mlm_accuracy", "perplexity")
DOCUMENTS = ("lines", "paragraphs")
EVAL_MASK_SEED = 0  # held-out masks: the same for every run, so runs compare on equal terms
# What works without a masked-LM head on the teacher (kd_weight needs one).
HEADLESS = (*(f"distill.{key}" for key in losses.TERMS), "task.mlm_weight (the student's own head)")


@dataclasses.dataclass(frozen=True)
class Preset:
    documents: str  # how a plain-text file holds documents: one a line, or blank-line separated


PRESETS: dict[str, Preset] = {
    "text": Preset("lines"),
    "paragraphs": Preset("paragraphs"),
}


@dataclasses.dataclass(frozen=True)
class GeneralConfig(TaskConfig):
    """The `task` section of general distillation: the common keys and these."""

    name: str = "text"
    # Plain-text files: one document a line, or paragraphs separated by blank lines; None: the
    # preset's. JSONL and Parquet files read `text_column`.
    documents: str | None = None
    text_column: str = "text"
    # The masked-LM objectives' weights (the intermediate terms are distill.*_weight).
    mlm_weight: float = 0.0
    kd_weight: float = 0.0
    # Masking: the share of tokens predicted, of those [MASK] and random, whole words, and
    # DistilBERT's frequency smoothing (targets weighted by count^-smoothing; null: uniform).
    mask_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    whole_word: bool = False
    mlm_smoothing: float | None = None

    def masking(self) -> MaskingConfig:
        return MaskingConfig(probability=self.mask_probability, mask_fraction=self.mask_fraction,
                             random_fraction=self.random_fraction, whole_word=self.whole_word,
                             smoothing=self.mlm_smoothing)


CONFIG = GeneralConfig


def check(cfg: GeneralConfig) -> None:
    if cfg.metric is not None and cfg.metric not in METRICS:
        raise DataError(f"unknown task.metric {cfg.metric!r}{data_lib.nearest(cfg.metric, METRICS)}; "
                        f"known: {', '.join(METRICS)}")
    if cfg.documents is not None and cfg.documents not in DOCUMENTS:
        raise DataError(f"task.documents {cfg.documents!r} is unknown"
                        f"{data_lib.nearest(cfg.documents, DOCUMENTS)}; use one of "
                        f"{', '.join(DOCUMENTS)}")
    for key in ("mlm_weight", "kd_weight"):
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise DataError(f"task.{key} must be a number >= 0, got {value!r}")
    cfg.masking()  # validates the masking keys


def check_run(cfg: GeneralConfig, distill, teacher) -> None:
    """What the kind needs of the other sections: some objective, no teacher fine-tuning, no
    labels-only baseline or search."""
    if not (cfg.mlm_weight or cfg.kd_weight or distill.any_intermediate):
        raise DataError(f"{TYPE} distillation has no objective: set task.mlm_weight, "
                        f"task.kd_weight or a distill.*_weight (relation_weight for MiniLM-v2, "
                        f"cosine_weight for DistilBERT's cosine)")
    refuse_label_settings(TYPE, distill, teacher)


# ----------------------------------------------------------------------------- on device


@dataclasses.dataclass(frozen=True)
class GeneralObjective(Objective):
    """The masked-LM objectives on logits at the masked positions ([B, P, V], labels [B, P] with
    -1 in unused slots), plus the intermediate terms in use."""

    per_token: bool = True
    mlm_weight: float = 0.0
    kd_weight: float = 0.0
    hard_metric_names: ClassVar[tuple[str, ...]] = ("mlm_accuracy",)

    @property
    def hard_loss_name(self) -> str:
        return "loss/mlm"

    def hard_loss(self, logits, batch):
        return losses.ce_loss(logits, batch["labels"], self.weights(batch))

    def distill_loss(self, loss_cfg: losses.LossConfig, student_out, teacher_out, proj_params,
                     batch, student_encoder, teacher_encoder):
        weights = self.weights(batch)
        terms = []
        if self.mlm_weight > 0:
            terms.append(("loss/mlm", self.mlm_weight, self.hard_loss(student_out.logits, batch)))
        if self.kd_weight > 0:
            terms.append(("loss/kd", self.kd_weight, losses.kd_loss(
                student_out.logits, teacher_out.logits, weights, loss_cfg.temperature)))
        loss, metrics = losses.weighted_sum(terms)
        if loss_cfg.any_intermediate:
            inter, inter_metrics = losses.intermediate_loss(
                loss_cfg, student_out, teacher_out, proj_params, batch["attention_mask"],
                batch["weights"], student_encoder, teacher_encoder)
            loss = loss + inter
            metrics.update(inter_metrics)
        metrics["loss/total"] = loss
        return loss, metrics

    def metrics(self, logits, batch, teacher_logits=None):
        """The student's masked-LM accuracy on the targets (meaningful where its head trains)."""
        weights = self.weights(batch)
        right = jnp.argmax(logits, axis=-1) == batch["labels"]
        return {"mlm_accuracy": jnp.sum(weights * right) / jnp.maximum(jnp.sum(weights), 1e-9)}


def objective(head: HeadConfig) -> Objective:
    """A masked-LM head's objective with no weights set (the task's weighs its terms)."""
    return GeneralObjective()


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class CorpusFiles:
    """A split's text files, checked (`jaxkd.data.corpus.check_sources`); `skipped` counts the
    invalid lines tokenization skipped (data.skip_invalid)."""

    sources: tuple[rawtext.Source, ...]
    skip_invalid: bool
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # data.eval_fraction: which part of the packed rows this split is ("kept" or "held", the
    # last `fraction` of them: `PackedRows.split`); None: all of them.
    part: str | None = None
    fraction: float = 0.0

    def __len__(self) -> int:
        return len(self.sources)


@dataclasses.dataclass(frozen=True)
class MaskedCorpus:
    """A split as training reads it: packed rows of exactly `max_seq_len` tokens, and what
    masking needs of the tokenizer."""

    rows: PackedRows
    vocab: Vocabulary

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """Every row's length ([N], one shared value: no memory per row)."""
        return np.broadcast_to(np.int64(self.rows.seq_len), (len(self.rows),))


# ----------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True)
class GeneralTask(Task):
    type: ClassVar[str] = TYPE
    head_kind: ClassVar[str] = HEAD.kind
    outputs_per_token: ClassVar[bool] = True
    finetunes: ClassVar[bool] = False

    name: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    documents: str
    text_column: str
    mlm_weight: float
    kd_weight: float
    masking: MaskingConfig
    teacher_has_head: bool | None = None  # known once the teacher is (`for_teacher`)

    heldout: ClassVar[bool] = True
    lower_is_better: ClassVar[tuple[str, ...]] = ("perplexity",)

    @property
    def num_labels(self) -> int:
        return 1

    @property
    def trains_head(self) -> bool:
        """Whether the student's masked-LM head learns (else it is left out of the export)."""
        return bool(self.mlm_weight or self.kd_weight)

    def heldout_heads(self) -> tuple[bool, bool]:
        return bool(self.teacher_has_head), self.trains_head

    def report_extras(self) -> dict:
        return {"teacher_has_masked_lm_head": self.teacher_has_head,
                "student_trains_masked_lm_head": self.trains_head}

    def id2label(self):
        return None

    def describe_outputs(self) -> str:
        return "masked-LM predictions"

    def describe_split(self, examples: CorpusFiles, encoded: MaskedCorpus) -> str:
        files = len(examples.sources)
        return (f"{util.count(files, 'text file')}, {len(encoded)} packed rows of "
                f"{encoded.rows.seq_len} tokens")

    def split_counts(self, examples: CorpusFiles, encoded: MaskedCorpus) -> dict[str, int]:
        """Files, documents, packed rows and the text tokens in them ([CLS] and [SEP] of each
        row left out). The documents are those of the files; a split that is part of their rows
        (data.eval_fraction) gives them as `corpus_documents`."""
        rows = encoded.rows
        documents = "documents" if examples.part is None else "corpus_documents"
        return {"files": len(examples.sources), documents: rows.corpus.documents,
                "rows": len(rows), "tokens": len(rows) * rows.window}

    def describe_model(self, who: str) -> tuple[str | None, str]:
        """The bare encoder for a teacher without a masked-LM head, and for a student whose head
        no objective trains (it is exported without one)."""
        if who == "teacher" and self.teacher_has_head is False:
            return embedding.HEAD.kind, "no masked-LM head in the checkpoint"
        if who == "student" and not self.trains_head:
            return embedding.HEAD.kind, "no objective trains a masked-LM head; exported without one"
        return None, ""

    def describe_loss(self, distill) -> str:
        parts = [f"mlm {self.mlm_weight:g}"] if self.mlm_weight else []
        if self.kd_weight:
            parts.append(f"masked-LM KD {self.kd_weight:g} at T={distill.temperature:g}")
        return ", ".join(parts + losses.describe_terms(distill))

    def is_model_of(self, hf_config: dict) -> bool:
        """Any encoder teaches as it is: general distillation never fine-tunes its teacher."""
        return True

    def for_teacher(self, directory: pathlib.Path) -> GeneralTask:
        """This task knowing whether the teacher has a masked-LM head; task.kd_weight with a
        teacher without one is refused, naming what works without it."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        has_head = hf.checkpoint_has_head(directory, HEAD.kind)
        if self.kd_weight and not has_head:
            raise DataError(f"{directory} has no masked-LM head (it is not a *ForMaskedLM "
                            f"checkpoint), so task.kd_weight (KD on the teacher's masked-LM "
                            f"distribution) cannot be computed; set it to 0 and use what works "
                            f"without a head: {', '.join(HEADLESS)}")
        return dataclasses.replace(self, teacher_has_head=has_head)

    def objective(self, head: HeadConfig) -> Objective:
        return GeneralObjective(mlm_weight=self.mlm_weight, kd_weight=self.kd_weight)

    def export(self, config, params, out_dir: pathlib.Path, tokenizer, settings: dict):
        """A `*ForMaskedLM` directory when the student's head learned, else the bare encoder
        (`*Model`): either loads in transformers and as `student.init: pretrained`."""
        from jaxkd import hf  # pylint: disable=import-outside-toplevel

        if not self.trains_head:
            config = dataclasses.replace(config, head=HeadConfig(kind=embedding.HEAD.kind,
                                                                 num_labels=1))
            params = {"encoder": params["encoder"]}
        return hf.save_hf(config, params, out_dir, tokenizer=tokenizer, settings=settings)

    # --- data

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True) -> CorpusFiles:
        """The text files of a split (data.train may list several), checked before any work."""
        sources = rawtext.sources(_paths(source), self.documents, self.text_column)
        rawtext.check_sources(sources, data_cfg.skip_invalid)
        return CorpusFiles(sources, data_cfg.skip_invalid)

    def hold_out(self, source: str, examples: CorpusFiles, fraction: float, seed: int):
        """The last `fraction` of the packed rows as held-out text (`PackedRows.split`: one
        contiguous stretch, not seeded rows, so held-out documents are not also trained on)."""
        where = f"{source} (the last {fraction:g} of its packed rows held out)"
        return ((source, dataclasses.replace(examples, part="kept", fraction=fraction)),
                (where, dataclasses.replace(examples, part="held", fraction=fraction,
                                            skipped=collections.Counter())))

    def check_tokenizer(self, tokenizer) -> None:
        """Packing needs [CLS] and [SEP], masking [MASK]; whole-word masking a tokenizer model
        whose word starts it can read (`word_starts`)."""
        missing = [name for name in ("cls_token", "sep_token", "mask_token")
                   if getattr(tokenizer, f"{name}_id", None) is None]
        if missing:
            raise DataError(f"general distillation packs rows as [CLS] text [SEP] and masks with "
                            f"[MASK]; the teacher's tokenizer has no {', '.join(missing)}: use a "
                            f"BERT-family tokenizer that defines them")
        if self.masking.whole_word:
            try:
                word_starts(tokenizer)
            except DataError as e:
                raise DataError(f"task.whole_word: {e}; set task.whole_word: false") from e

    def encode(self, examples: CorpusFiles, tokenizer, max_seq_len: int,
               cache_dir=None) -> MaskedCorpus:
        """The split tokenized once into shards under `cache_dir/corpus` (resumed if it was
        interrupted) and packed into rows of `max_seq_len`; from a `data_lib.ReadOnlyDir`
        only a corpus tokenized already."""
        directory, writable = data_lib.cache_location(cache_dir)
        if writable:
            tokenized = corpus_lib.tokenize(examples.sources, tokenizer, directory / "corpus",
                                            skip_invalid=examples.skip_invalid,
                                            progress=jax.process_index() == 0)
        else:
            tokenized = None if directory is None else corpus_lib.finished(
                examples.sources, tokenizer, directory / "corpus", skip_invalid=examples.skip_invalid)
            if tokenized is None:
                raise DataError(
                    f"{', '.join(s.path for s in examples.sources)} is not tokenized yet, and a "
                    "plan that writes nothing (train.py --check) cannot tokenize it: run "
                    "train.py itself (tokenizing is its first step, resumable; the files were "
                    "checked already), then --check describes the whole run")
        examples.skipped.update(tokenized.manifest.get("skipped", {}))
        rows = PackedRows.of(tokenized, tokenizer, max_seq_len)
        if len(rows) == 0:
            raise DataError(f"{', '.join(s.path for s in examples.sources)}: {tokenized.tokens} "
                            f"tokens do not fill one row of {max_seq_len}")
        if examples.part is not None:
            rows = rows.split(examples.fraction)[examples.part == "held"]
        size = len(tokenizer)
        # Smoothing weighs by the training rows' token counts (held-out text is scored at the
        # default masks, `eval_batches`, and needs none).
        smoothing = self.masking.smoothing is not None and examples.part != "held"
        vocab = Vocabulary(
            mask_id=tokenizer.mask_token_id, special_ids=tuple(tokenizer.all_special_ids), size=size,
            word_starts=word_starts(tokenizer)[:size] if self.masking.whole_word else None,
            counts=token_counts(rows.token_chunks(), size) if smoothing else None)
        return MaskedCorpus(rows, vocab)

    def batches(self, encoded: MaskedCorpus, data_cfg: DataConfig, seed: int):
        geometry = dict(cfg=self.masking, vocab=encoded.vocab, seed=seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
        return lambda position: MaskedBatches(encoded.rows, data_cfg.batch_size, position=position,
                                              **geometry)

    def eval_batches(self, encoded: MaskedCorpus, data_cfg: DataConfig) -> MaskedEvalBatches:
        """Every held-out row once, masked from `EVAL_MASK_SEED` by BERT's default masking
        (`MaskingConfig()`), whatever the run trains with: runs compare on the same masks."""
        return MaskedEvalBatches(encoded.rows, data_cfg.eval_batch_size or data_cfg.batch_size,
                                 cfg=MaskingConfig(), vocab=encoded.vocab, seed=EVAL_MASK_SEED,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())


def _paths(source: str | list | tuple) -> list[str]:
    """A split's files: one path, a list, or several joined by commas."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    return [part.strip() for part in str(source).split(",") if part.strip()]


def source_files(source: str) -> list[pathlib.Path]:
    """The files of a split (`_paths`) that exist, for the run's manifest."""
    return [pathlib.Path(p) for p in _paths(source) if pathlib.Path(p).exists()]


def resolve(cfg: GeneralConfig, data_cfg: DataConfig | None = None) -> GeneralTask:
    preset = PRESETS.get(cfg.name, PRESETS["text"])
    primary = cfg.metric or METRICS[0]
    return GeneralTask(name=cfg.name, label_names=("token",),
                       metrics=(primary,) + tuple(m for m in METRICS if m != primary),
                       documents=cfg.documents or preset.documents, text_column=cfg.text_column,
                       mlm_weight=float(cfg.mlm_weight), kd_weight=float(cfg.kd_weight),
                       masking=cfg.masking())


def exported_config(label_names, regression, flags: dict) -> GeneralConfig:
    raise DataError("a masked language model is scored by its general distillation run "
                    "(report.json), not by jaxkd predict or evaluate; fine-tune it on a task "
                    "first (student.init: pretrained)")


def with_model_labels(cfg: GeneralConfig, label_names, regression: bool) -> GeneralConfig:
    return cfg


INPUT_FLAGS = ("text",)
MODELS = "masked language models"
INPUT_HINT = "use --text"
