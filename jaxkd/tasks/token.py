"""Token classification (named entities, CoNLL-2003): a tag per word.

Head: a classifier on every token (`BertForTokenClassification`). A word's label sits on its
first sub-token and the others are masked (-1), unless `task.label_all_subtokens`; the word's
prediction is read from its first sub-token. A sentence longer than `data.max_seq_len` is cut
into consecutive windows of whole words, so every word is predicted exactly once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd.data import DataConfig, DataError, Encoded
from jaxkd import layers
from jaxkd import model as model_lib
from jaxkd.model import BertConfig, HeadConfig
from jaxkd.tasks import conll
from jaxkd.tasks import entities as entities_lib
from jaxkd.tasks.base import (BadRow, Objective, Problems, Task, TaskConfig, infer_label_names,
                              is_int, label_id, label_key)

TYPE = "token_classification"
METRICS = ("f1", "precision", "recall", "accuracy")  # entity-level micro P/R/F1, token accuracy
# The KD term of a token task is read on the first sub-token of each word, found from the tags.
# Augmented sentences keep their words' positions and tags (only O words change), so they carry
# those positions; untagged text has none.
TRANSFER = {"data.unlabeled": "untagged text gives no word positions for the word-level KD term "
                              "(use distill.augment, which keeps the labelled words' positions)",
            "distill.augment": None}
_WORD_SEP = "\x1f"  # joins a sentence's words for jaxkd.transfer (a word may hold spaces)
_TOKENIZE_CHUNK = 2_000  # sentences per tokenizer call


@dataclasses.dataclass(frozen=True)
class Preset:
    labels: tuple[str, ...]
    tokens: str = "tokens"
    tags: str = "tags"
    scheme: str = "iob2"
    hub_dataset: str | None = None


PRESETS: dict[str, Preset] = {
    # Label order of the Hub's conll2003 dataset, so its integer tags read correctly.
    "conll2003": Preset(("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC",
                         "I-MISC"), tags="ner_tags", hub_dataset="conll2003"),
}


@dataclasses.dataclass(frozen=True)
class TokenConfig(TaskConfig):
    """The `task` section of this kind: the common keys and these."""

    # Tag names; a tag given as an integer is an id into them. None = the preset's, or (custom)
    # the sorted distinct tags of the training rows.
    labels: tuple[str, ...] | None = None
    # Columns of JSONL/parquet/Hub rows (CoNLL files need none)
    tokens: str | None = None  # list of words; None = the preset's ("tokens")
    tags: str | None = None  # list of tags (names, or ids into task.labels); None = "tags"/the preset's
    label_all_subtokens: bool = False  # label every sub-token of a word, not only the first
    tag_scheme: str | None = None  # iob1 | iob2 | bioes; None = the preset's (iob2)


CONFIG = TokenConfig


class TokenHead(nn.Module):
    """BertForTokenClassification's head: dropout -> classifier on every token."""

    encoder: BertConfig
    head: HeadConfig

    @nn.compact
    def __call__(self, x_BxLxH, deterministic: bool):
        x_BxLxH = layers.Dropout(model_lib.head_dropout(self.encoder, self.head))(
            x_BxLxH, deterministic=deterministic)
        return model_lib.dense(self.encoder, self.head.num_labels, "classifier",
                               dtype=jnp.float32)(x_BxLxH)


def onnx_head(g, encoder: BertConfig, head: HeadConfig, params, hidden, mask):
    """TokenHead as ONNX ops (`HeadSpec.onnx`)."""
    return g.dense(hidden, params["classifier"], "classifier")


HEAD = model_lib.register_head(model_lib.HeadSpec(
    kind="token", module=TokenHead, hf_suffix="ForTokenClassification",
    hf_modules={"*": (("classifier", "classifier"),)},
    dropout_keys={"distilbert": None},  # DistilBERT's token head uses its `dropout`
    onnx=onnx_head))


def objective(head: HeadConfig) -> Objective:
    return Objective(per_token=True)


# ----------------------------------------------------------------------------- exported models

INPUT_FLAGS = ("tokens", "tag_scheme")
MODELS = "token classifiers"
INPUT_HINT = "use --tokens for rows of words"


def exported_config(label_names: tuple[str, ...], regression: bool, flags: dict) -> TokenConfig:
    """The task an exported token classifier solves: its own tags, the word column and tag
    scheme `flags` name."""
    return TokenConfig(name="custom", type=TYPE, labels=label_names, tokens=flags.get("tokens"),
                       tag_scheme=flags.get("tag_scheme"))


def with_model_labels(cfg: TokenConfig, label_names: tuple[str, ...], regression: bool) -> TokenConfig:
    """A custom task without tag names takes the model's."""
    if cfg.name != "custom" or cfg.labels is not None:
        return cfg
    return dataclasses.replace(cfg, labels=label_names)


def check(cfg: TokenConfig) -> None:
    if cfg.metric is not None and cfg.metric not in METRICS:
        raise DataError(f"unknown task.metric {cfg.metric!r} for {TYPE}"
                        f"{data_lib.nearest(cfg.metric, METRICS)}; known: {', '.join(METRICS)}")
    if cfg.tag_scheme is not None and cfg.tag_scheme not in entities_lib.SCHEMES:
        raise DataError(f"task.tag_scheme {cfg.tag_scheme!r} is unknown"
                        f"{data_lib.nearest(cfg.tag_scheme, entities_lib.SCHEMES)}; use one of "
                        f"{', '.join(entities_lib.SCHEMES)}")


def check_augment(augment) -> None:
    if augment.ngram_prob > 0:
        raise DataError(f"distill.augment.ngram_prob must be 0 for {TYPE} tasks: an n-gram of a "
                        f"sentence cuts its entities apart and moves its words' tags (got "
                        f"{augment.ngram_prob:g}; set distill.augment.ngram_prob: 0)")


@dataclasses.dataclass(frozen=True)
class Examples:
    """Validated sentences of one split: words, and tag ids back to back."""

    source: str
    words: list[list[str]]
    tags: np.ndarray  # int32 [W]: every word's tag id, sentence after sentence; -1 unlabeled
    has_labels: bool
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.words)

    @property
    def word_offsets(self) -> np.ndarray:
        return data_lib.offsets_of(np.fromiter(map(len, self.words), np.int64, len(self.words)))

    def subset(self, indices: np.ndarray, source: str) -> Examples:
        """The sentences at `indices`, as a split of its own."""
        offsets = self.word_offsets
        tags = [self.tags[offsets[i]:offsets[i + 1]] for i in indices]
        return Examples(source=source, words=[self.words[i] for i in indices],
                        tags=np.concatenate(tags) if tags else self.tags[:0],
                        has_labels=self.has_labels, skipped={})


@dataclasses.dataclass(frozen=True)
class TokenTask(Task):
    type: ClassVar[str] = TYPE
    head_kind: ClassVar[str] = HEAD.kind
    outputs_per_token: ClassVar[bool] = True
    pretokenized: ClassVar[bool] = True
    torch_collator: ClassVar[str] = "DataCollatorForTokenClassification"  # pads labels with -100

    name: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    tokens: str
    tags: str
    scheme: str
    label_all_subtokens: bool
    hub_dataset: str | None

    # ------------------------------------------------------------------ reading

    def stdin_record(self, line: str, number: int) -> dict:
        return {self.tokens: line.split()}

    def _is_conll(self, data_cfg: DataConfig, source: str) -> bool:
        if not data_lib.is_local_path(source):
            return False
        if data_cfg.format is not None:
            return data_cfg.format == "conll"
        # .txt is tab-separated text for sentence tasks, CoNLL columns here.
        return data_lib.file_format(source) == "conll" or source.lower().endswith(".txt")

    def load(self, data_cfg: DataConfig, source: str, require_labels: bool = True) -> Examples:
        """Reads and validates one split: CoNLL columns, or rows with lists of tokens and tags.

        A token line without a tag, a tag outside the label set, or token and tag lists of
        different lengths raise a `DataError` naming the file and line (row), unless
        `data.skip_invalid`, which skips the sentence and counts it.
        """
        if self._is_conll(data_cfg, source):
            sentences, problems = conll.read(source, require_labels)
        else:
            sentences, problems = self._read_rows(data_cfg, source, require_labels)
        words, tags = [], []
        has_labels = require_labels or any(t is not None for _, _, t in sentences)
        for where, sentence_words, sentence_tags in sentences:
            try:
                ids = self._tag_ids(sentence_words, sentence_tags, has_labels)
            except BadRow as bad:
                problems.add(where, bad)
                continue
            words.append(sentence_words)
            tags.extend(ids)
        skipped = problems.settle(data_cfg, len(words))
        return Examples(source=problems.source, words=words, tags=np.asarray(tags, np.int32),
                        has_labels=has_labels, skipped=skipped)

    def _tag_ids(self, words: list[str], tags: list | None, has_labels: bool) -> list[int]:
        if not has_labels:
            return [-1] * len(words)
        if tags is None:
            raise BadRow("missing tags", "the sentence has no tags")
        if len(tags) != len(words):
            raise BadRow("length mismatch", f"{len(words)} tokens but {len(tags)} tags")
        ids = []
        for k, tag in enumerate(tags):
            key = label_key(tag)
            found = None if key is None else label_id(key, self.label_names)
            if found is None:
                raise BadRow("bad tag", f"tag {tag!r} of token {k} ({words[k]!r}) is not one of "
                             f"{list(self.label_names)} (task.labels)")
            ids.append(found)
        return ids

    def _read_rows(self, data_cfg: DataConfig, source: str, require_labels: bool):
        table = data_lib.read_split(data_cfg, source, self.hub_dataset)
        wanted = {"task.tokens": self.tokens}
        if require_labels:
            wanted["task.tags"] = self.tags
        data_lib.check_columns(table, wanted)
        problems = Problems(table.source, table.malformed)
        tag_column = table.columns.get(self.tags)
        sentences = []
        for i, words in enumerate(table.columns[self.tokens]):
            where = table.where(i)
            if not isinstance(words, (list, tuple)) or not words or not all(
                    isinstance(w, str) and w.strip() for w in words):
                problems.add(where, BadRow("bad tokens", f"column {self.tokens!r} must hold a "
                                           f"non-empty list of non-empty strings, got {words!r}"))
                continue
            tags = None if tag_column is None else tag_column[i]
            if tags is not None and not isinstance(tags, (list, tuple)):
                problems.add(where, BadRow("bad tags", f"column {self.tags!r} must hold a list, "
                                           f"got {tags!r}"))
                continue
            sentences.append((where, list(words), None if tags is None else list(tags)))
        if not sentences and not problems.found:
            raise DataError(f"{table.source}: the split is empty (no data rows)")
        return sentences, problems

    def check_augmentable(self, examples: Examples) -> None:
        """distill.augment varies only words tagged O, and joins a sentence's words with
        `_WORD_SEP` for jaxkd.transfer: the labels need an O, and no word may hold the separator."""
        if "O" not in self.label_names:
            raise DataError(f"distill.augment changes only words tagged 'O', and the labels "
                            f"{list(self.label_names)} have no 'O' (task.labels); remove "
                            f"distill.augment")
        for i, words in enumerate(examples.words):
            if any(_WORD_SEP in word for word in words):
                raise DataError(f"{examples.source}: sentence {i + 1} holds a word with the control "
                                f"character {_WORD_SEP!r}, which distill.augment uses between "
                                f"words; remove it from the data or remove distill.augment")

    def augmented(self, examples: Examples, variants, source: str) -> Examples:
        """`factor` variants of every sentence in which only words tagged O are masked or
        replaced, word for word (`check_augment` refuses n-grams): each variant keeps its
        sentence's tags, so its first sub-tokens carry the word-level KD term as the
        sentence's do. The tags only place that term; the hard-label weight of these rows is 0
        (`jaxkd.data.with_transfer`), so only the teacher labels them."""
        self.check_augmentable(examples)
        outside = self.label_names.index("O")
        offsets = examples.word_offsets
        keep = [examples.tags[a:b] != outside for a, b in zip(offsets[:-1], offsets[1:])]
        texts, _ = variants([_WORD_SEP.join(words) for words in examples.words], None,
                            sep=_WORD_SEP, keep=keep)
        words = [text.split(_WORD_SEP) for text in texts]
        factor = len(words) // max(len(examples), 1)
        tags = np.concatenate([np.tile(examples.tags[a:b], factor) for a, b in
                               zip(offsets[:-1], offsets[1:])] or [examples.tags[:0]])
        return Examples(source=source, words=words, tags=tags.astype(np.int32), has_labels=True,
                        skipped={})

    # ------------------------------------------------------------------ encoding

    def encode(self, examples: Examples, tokenizer, max_seq_len: int, cache_dir=None) -> Encoded:
        """Windows of whole words, [CLS] sub-tokens [SEP] (the family's specials), with per-token
        labels. The tokenizer must have been loaded for pre-split words (`hf.load_tokenizer(...,
        words=True)`: RoBERTa's adds the space each word follows).

        extras: `word_index` [T] (the split-wide index of the word whose first sub-token this is,
        else -1) and `row_sentence` [N] (the sentence each window belongs to).
        """
        key = data_lib.content_key(
            f"token len{max_seq_len} all{self.label_all_subtokens}",
            data_lib.tokenizer_fingerprint(tokenizer),
            ["\x01".join(words) for words in examples.words], examples.tags)
        arrays = data_lib.cached_arrays(
            cache_dir, key, lambda: _windows(examples, tokenizer, max_seq_len,
                                             self.label_all_subtokens))
        extras = {"word_index": arrays.pop("word_index"), "row_sentence": arrays.pop("row_sentence")}
        return Encoded(has_labels=examples.has_labels, labels_per_token=True, extras=extras, **arrays)

    # ------------------------------------------------------------------ outputs

    def word_predictions(self, outputs_TxC: np.ndarray, encoded: Encoded, examples: Examples) -> np.ndarray:
        """Tag id of every word: argmax at its first sub-token. A word the tokenizer turned into
        no sub-tokens at all gets "O" (or tag 0)."""
        fallback = self.label_names.index("O") if "O" in self.label_names else 0
        pred_W = np.full(len(examples.tags), fallback, np.int32)
        index_T = encoded.extras["word_index"]
        first = index_T >= 0
        pred_W[index_T[first]] = np.argmax(outputs_TxC[first], axis=-1)
        return pred_W

    def _sentences(self, ids_W: np.ndarray, examples: Examples) -> list[list[str]]:
        names = np.asarray(self.label_names, dtype=object)
        offsets = examples.word_offsets
        return [list(names[ids_W[a:b]]) for a, b in zip(offsets[:-1], offsets[1:])]

    def scores(self, outputs: np.ndarray, encoded: Encoded, examples: Examples) -> dict[str, float]:
        pred = self._sentences(self.word_predictions(outputs, encoded, examples), examples)
        gold = self._sentences(examples.tags, examples)
        found = entities_lib.entity_scores(gold, pred, scheme=self.scheme)
        out = {"f1": found["f1"], "precision": found["precision"], "recall": found["recall"],
               "accuracy": found["token_accuracy"]}
        ordered = {name: out[name] for name in self.metrics}
        ordered.update({f"f1/{kind}": v["f1"] for kind, v in sorted(found["per_type"].items())})
        return ordered

    def agreement(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                  examples: Examples) -> float:
        """Fraction of words with the same predicted tag."""
        return float(np.mean(self.word_predictions(student, encoded, examples)
                             == self.word_predictions(teacher, encoded, examples)))

    def showcase(self, student: np.ndarray, teacher: np.ndarray, encoded: Encoded,
                 examples: Examples, count: int = 5) -> list[dict[str, str]]:
        picked = range(min(count, len(examples)))
        gold = self._sentences(examples.tags, examples) if examples.has_labels else None
        s = self._sentences(self.word_predictions(student, encoded, examples), examples)
        t = self._sentences(self.word_predictions(teacher, encoded, examples), examples)
        return [{"text": " ".join(examples.words[i]),
                 "gold": _entity_text(examples.words[i], gold[i], self.scheme) if gold else "",
                 "teacher": _entity_text(examples.words[i], t[i], self.scheme),
                 "student": _entity_text(examples.words[i], s[i], self.scheme)} for i in picked]

    def predictions(self, outputs: np.ndarray, encoded: Encoded, examples: Examples) -> list[dict]:
        tags = self._sentences(self.word_predictions(outputs, encoded, examples), examples)
        out = []
        for words, sentence_tags in zip(examples.words, tags):
            found = entities_lib.entities(sentence_tags, self.scheme)
            out.append({"tokens": words, "tags": sentence_tags,
                        "entities": [{"type": kind, "start": a, "end": b, "text": " ".join(words[a:b])}
                                     for kind, a, b in found]})
        return out


def _entity_text(words: list[str], tags: list[str], scheme: str) -> str:
    return "; ".join(f"{kind}: {' '.join(words[a:b])}"
                     for kind, a, b in entities_lib.entities(tags, scheme)) or "-"


def _windows(examples: Examples, tokenizer, max_seq_len: int,
             label_all_subtokens: bool) -> dict[str, np.ndarray]:
    # The family's own specials around each window ([CLS] ... [SEP], <s> ... </s>).
    prefix, suffix = data_lib.special_tokens_around(tokenizer)
    room = max_seq_len - len(prefix) - len(suffix)
    ids: list[int] = []
    labels: list[int] = []
    word_index: list[int] = []
    lengths: list[int] = []
    row_sentence: list[int] = []
    word_base = 0
    tags = examples.tags
    for start in range(0, len(examples.words), _TOKENIZE_CHUNK):
        chunk = examples.words[start:start + _TOKENIZE_CHUNK]
        out = tokenizer(chunk, is_split_into_words=True, add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False)
        for k, words in enumerate(chunk):
            pieces = _word_pieces(out["input_ids"][k], out.word_ids(k), len(words))
            sentence = start + k
            window: list[tuple[int, list[int]]] = []
            used = 0
            for w, piece in enumerate(pieces):
                piece = piece[:room]  # a single word longer than a window keeps its first pieces
                if window and used + len(piece) > room:
                    _emit(window, word_base, tags, prefix, suffix, label_all_subtokens, ids,
                          labels, word_index, lengths)
                    row_sentence.append(sentence)
                    window, used = [], 0
                window.append((w, piece))
                used += len(piece)
            if window:  # every sentence has a word, so its last window is never empty
                _emit(window, word_base, tags, prefix, suffix, label_all_subtokens, ids, labels,
                      word_index, lengths)
                row_sentence.append(sentence)
            word_base += len(words)
    return {"input_ids": np.asarray(ids, np.int32), "token_type_ids": np.zeros(len(ids), np.int8),
            "offsets": data_lib.offsets_of(np.asarray(lengths, np.int64)),
            "labels": np.asarray(labels, np.int32), "word_index": np.asarray(word_index, np.int64),
            "row_sentence": np.asarray(row_sentence, np.int64)}


def _word_pieces(token_ids: Sequence[int], word_ids: Sequence[int | None], num_words: int) -> list[list[int]]:
    pieces: list[list[int]] = [[] for _ in range(num_words)]
    for token, word in zip(token_ids, word_ids):
        if word is not None:
            pieces[word].append(token)
    return pieces


def _emit(window, word_base, tags, prefix, suffix, label_all_subtokens, ids, labels, word_index,
          lengths) -> None:
    """Append one row: prefix the window's pieces suffix ([CLS] ... [SEP]); labels and word
    indices per token."""
    ids.extend(prefix)
    labels.extend([-1] * len(prefix))
    word_index.extend([-1] * len(prefix))
    for w, piece in window:
        tag = int(tags[word_base + w])
        for j, token in enumerate(piece):
            ids.append(token)
            labels.append(tag if j == 0 or label_all_subtokens else -1)
            word_index.append(word_base + w if j == 0 else -1)
    ids.extend(suffix)
    labels.extend([-1] * len(suffix))
    word_index.extend([-1] * len(suffix))
    lengths.append(len(prefix) + len(suffix) + sum(len(piece) for _, piece in window))


# ----------------------------------------------------------------------------- resolving


def resolve(cfg: TokenConfig, data_cfg: DataConfig | None = None,
            tag_values: Iterable[Any] | None = None) -> TokenTask:
    preset = PRESETS.get(cfg.name) or Preset(labels=())
    if cfg.labels is not None:
        names = cfg.labels
    elif preset.labels:
        names = preset.labels
    else:
        names = _infer_tags(cfg, data_cfg, preset, tag_values)
    scheme = cfg.tag_scheme or preset.scheme
    try:
        entities_lib.check_tags(names, scheme)
    except ValueError as e:
        where = "task.labels" if cfg.labels is not None else "the training tags"
        raise DataError(f"{where} cannot be scored as entities: {e} (task.tag_scheme {scheme!r}: "
                        "iob1, iob2 or bioes)") from e
    primary = cfg.metric or METRICS[0]
    metrics = (primary,) + tuple(m for m in METRICS if m != primary)
    return TokenTask(name=cfg.name, label_names=names, metrics=metrics,
                     tokens=cfg.tokens or preset.tokens, tags=cfg.tags or preset.tags,
                     scheme=scheme, label_all_subtokens=cfg.label_all_subtokens,
                     hub_dataset=preset.hub_dataset)


def _infer_tags(cfg: TaskConfig, data_cfg: DataConfig | None, preset: Preset,
                tag_values: Iterable[Any] | None) -> tuple[str, ...]:
    """Distinct training tags, "O" first (the fallback tag), then sorted."""
    if tag_values is None:
        if data_cfg is None or data_cfg.train is None:
            raise DataError("task.name 'custom' needs task.labels (the tag names), or data.train "
                            "to infer them from")
        draft = TokenTask(name=cfg.name, label_names=(), metrics=METRICS,
                          tokens=cfg.tokens or preset.tokens, tags=cfg.tags or preset.tags,
                          scheme="iob2", label_all_subtokens=False, hub_dataset=None)
        if draft._is_conll(data_cfg, data_cfg.train):
            sentences, _ = conll.read(data_cfg.train)
        else:
            sentences, _ = draft._read_rows(data_cfg, data_cfg.train, require_labels=True)
        tag_values = [t for _, _, tags in sentences for t in (tags or [])]
    names = infer_label_names(tag_values)
    if any(is_int(n) for n in names):
        raise DataError("the training tags are integer ids: give their names in task.labels")
    return tuple(sorted(names, key=lambda n: (n != "O", n)))
