"""Transfer data: text beyond the labelled set that the teacher labels and the student learns
from through the KD term alone (hard-label weight 0).

Two sources, both of the task's text columns: `data.unlabeled` (files or Hub splits, read by the
task) and `distill.augment`, variants of every labelled example as in Tang et al. (2019,
"Distilling task-specific knowledge from BERT into simple neural networks"), with TinyBERT's
embedding neighbours in place of their part-of-speech replacement. Per word of a text (split on
whitespace): with probability `mask_prob` the word becomes the tokenizer's mask token, else with
`replace_prob` one of its `neighbours` nearest whole words in the teacher's word-embedding space
(cosine); then, with probability `ngram_prob`, the text becomes a random n-gram of its words
(n uniform in 1..5, capped by the word count). Each side of a pair is augmented on its own.
A word that is not one whole-word vocabulary entry (it splits into sub-words) can be masked but
not replaced. Token classification keeps word boundaries: its words come joined with a
separator of their own (`sep`), only words tagged O are masked or replaced (`keep` marks the
others), and n-grams are refused when the config is read (they would cut entities apart), so
word i of a variant stands where word i of its sentence stood and keeps its tag position.

Deterministic: example i draws from `numpy.random.default_rng((seed, i))`, so a variant depends
on the seed and the example alone (not on order or process count). The set is built once and
kept in `data.cache_dir` (`augmented_set`), keyed by the texts, the settings and the teacher's
vocabulary and word embeddings.

Memory, for 20 x SST-2 (1.35 M rows of ~10 words, ~13 tokens): the texts as Python strings
~0.2 GB per side while the set is built (the disk cache stores them as UTF-8 bytes, ~70 MB);
the tokenised rows int32 ids + int8 types + int64 offsets ~ 1.35 M x (13 x 5 + 8) B ~ 0.1 GB;
the teacher's cached logits 1.35 M x C x 4 B (~11 MB for 2 classes), memory-mapped. The
neighbour search holds one [1024, V] block of similarities at a time (~125 MB for a 30 k
vocabulary). `scripts/transfer_memory.py` measures the peak: 0.95 GiB resident for the whole
process (imports included) building, tokenising and batching a synthetic 1.41 M-row set
(67,349 sentences of 4..20 words, 20 variants each; 16.8 M tokens, 102 MiB of arrays).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxkd import data as data_lib
from jaxkd.data import DataError

NGRAM_MAX = 5  # Tang et al.: n uniform in 1..5
_SEARCH_BLOCK = 1024  # query words per similarity block in the neighbour search


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmented transfer set (YAML `distill.augment`); each text gets `factor` variants."""

    factor: int = 20  # variants per labelled example
    mask_prob: float = 0.1  # per word: replaced by the mask token
    replace_prob: float = 0.1  # per word: replaced by one of its nearest whole words
    neighbours: int = 15  # k of the nearest-neighbour replacement (TinyBERT: 15)
    ngram_prob: float = 0.25  # per variant: the text becomes a random n-gram of its words
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.factor, int) or self.factor < 1:
            raise DataError(f"distill.augment.factor must be a positive integer, got {self.factor!r}")
        if not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise DataError(f"distill.augment.neighbours must be a positive integer, "
                            f"got {self.neighbours!r}")
        for key in ("mask_prob", "replace_prob", "ngram_prob"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise DataError(f"distill.augment.{key} must be a probability in [0, 1], got {value}")
        if self.mask_prob + self.replace_prob > 1.0:
            raise DataError(f"distill.augment.mask_prob + replace_prob must be at most 1 (each word is "
                            f"masked, replaced or kept), got {self.mask_prob + self.replace_prob:g}")


# ----------------------------------------------------------------------------- the vocabulary


def whole_words(tokenizer) -> tuple[np.ndarray, list[str]]:
    """Vocabulary ids that are whole words, and their text: an entry whose text, tokenised as a
    word on its own, gives exactly that id. Sub-word pieces (`##ing`), special tokens and
    reserved entries (`[unused0]`) fail that test and are left out."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = set(tokenizer.all_special_ids)
    candidates = [(i, tokenizer.convert_tokens_to_string([token]).strip())
                  for token, i in vocab if i not in specials]
    candidates = [(i, text) for i, text in candidates if text and not any(c.isspace() for c in text)]
    encoded = tokenizer([text for _, text in candidates], add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    kept = [(i, text) for (i, text), ids in zip(candidates, encoded) if ids == [i]]
    return np.asarray([i for i, _ in kept], np.int64), [text for _, text in kept]


def nearest_neighbours(embeddings_VxE: np.ndarray, vocab_ids: np.ndarray, query_ids: np.ndarray,
                       k: int) -> np.ndarray:
    """[Q, k] ids from `vocab_ids` nearest each query id by cosine similarity of the embedding
    rows, nearest first, the query itself excluded."""
    unit = embeddings_VxE / np.maximum(np.linalg.norm(embeddings_VxE, axis=1, keepdims=True), 1e-12)
    vocab_VxE = unit[vocab_ids].astype(np.float32)
    k = min(k, len(vocab_ids) - 1)
    out = np.empty((len(query_ids), k), np.int64)
    for start in range(0, len(query_ids), _SEARCH_BLOCK):
        queries = query_ids[start:start + _SEARCH_BLOCK]
        sims_QxV = unit[queries].astype(np.float32) @ vocab_VxE.T
        sims_QxV[vocab_ids[None, :] == queries[:, None]] = -np.inf  # a word is not its own neighbour
        top = np.argpartition(-sims_QxV, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims_QxV, top, axis=1), axis=1, kind="stable")
        out[start:start + len(queries)] = vocab_ids[np.take_along_axis(top, order, axis=1)]
    return out


@dataclasses.dataclass(frozen=True)
class WordTable:
    """What augmentation needs of the teacher: the mask token, and each replaceable word's
    nearest whole words (as text)."""

    mask_token: str
    neighbours: dict[str, tuple[str, ...]]


def word_table(tokenizer, embeddings_VxE: np.ndarray, texts: Sequence[str], k: int,
               sep: str | None = None) -> WordTable:
    """Neighbours of the whole words that occur in `texts` (split on `sep`, None: whitespace): a
    word is looked up as the tokenizer sees it on its own (`Good` -> `good` for an uncased
    vocabulary)."""
    if tokenizer.mask_token is None:
        raise DataError("distill.augment masks words with the tokenizer's mask token, and the "
                        "teacher's tokenizer has none")
    vocab_ids, vocab_texts = whole_words(tokenizer)
    text_of = dict(zip(vocab_ids.tolist(), vocab_texts))
    words = sorted({word for text in texts for word in text.split(sep) if word})
    ids = tokenizer(words, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"] if words else []
    found = {word: token[0] for word, token in zip(words, ids)
             if len(token) == 1 and token[0] in text_of}
    query = np.asarray(sorted(set(found.values())), np.int64)
    near = nearest_neighbours(embeddings_VxE, vocab_ids, query, k) if len(query) else query
    near_of = {int(q): tuple(text_of[int(n)] for n in row) for q, row in zip(query, near)}
    return WordTable(tokenizer.mask_token, {word: near_of[i] for word, i in found.items()})


# ----------------------------------------------------------------------------- augmentation


def augment_words(words: Sequence[str], rng: np.random.Generator, cfg: AugmentConfig,
                  table: WordTable, keep: Sequence[bool] | None = None) -> list[str]:
    """One variant of a word sequence: whole words masked or replaced, then maybe an n-gram.
    Words marked in `keep` stay as they are (they still take their draw, so `keep` changes no
    other word's fate). Never empty for a non-empty input."""
    draws = rng.random(len(words))
    out = []
    for i, (word, u) in enumerate(zip(words, draws)):
        near = table.neighbours.get(word, ())
        if u < cfg.mask_prob:
            new = table.mask_token
        elif u < cfg.mask_prob + cfg.replace_prob and near:
            new = near[rng.integers(len(near))]  # drawn for a kept word too: same stream
        else:
            new = word
        out.append(word if keep is not None and keep[i] else new)
    if out and rng.random() < cfg.ngram_prob:
        n = min(int(rng.integers(1, NGRAM_MAX + 1)), len(out))
        start = int(rng.integers(len(out) - n + 1))
        out = out[start:start + n]
    return out


def augment_example(index: int, sides: Sequence[str], cfg: AugmentConfig, table: WordTable,
                    sep: str | None = None, keep: Sequence[bool] | None = None) -> list[tuple[str, ...]]:
    """`cfg.factor` variants of example `index` (one text, or a pair: each side on its own);
    words split on `sep` (None: whitespace) and joined with it (a space for None); `keep` marks
    the words of a single text that stay as they are."""
    rng = np.random.default_rng((cfg.seed, index))
    join = " " if sep is None else sep
    return [tuple(join.join(augment_words(side.split(sep), rng, cfg, table, keep)) for side in sides)
            for _ in range(cfg.factor)]


def augment_texts(texts: Sequence[str], pairs: Sequence[str] | None, cfg: AugmentConfig,
                  table: WordTable, sep: str | None = None,
                  keep: Sequence[Sequence[bool]] | None = None) -> tuple[list[str], list[str] | None]:
    """Variants of every example, example after example: (texts, pairs or None). `keep[i]`:
    the words of text i that stay as they are (single texts only)."""
    if keep is not None and pairs is not None:
        raise ValueError("keep marks words of single texts, not of pairs")
    out_texts: list[str] = []
    out_pairs: list[str] | None = None if pairs is None else []
    for i, text in enumerate(texts):
        sides = (text,) if pairs is None else (text, pairs[i])
        for variant in augment_example(i, sides, cfg, table, sep, None if keep is None else keep[i]):
            out_texts.append(variant[0])
            if out_pairs is not None:
                out_pairs.append(variant[1])
    return out_texts, out_pairs


def _pack(strings: Sequence[str]) -> dict[str, np.ndarray]:
    """Strings as UTF-8 bytes back to back and their offsets: compact on disk and in memory."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return {"bytes": np.frombuffer(b"".join(encoded), np.uint8), "offsets": data_lib.offsets_of(lengths)}


def _unpack(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def augmented_set(cache_dir, texts: Sequence[str], pairs: Sequence[str] | None,
                  cfg: AugmentConfig, tokenizer, embeddings: Callable[[], np.ndarray],
                  sep: str | None = None, keep: Sequence[Sequence[bool]] | None = None,
                  ) -> tuple[list[str], list[str] | None]:
    """The augmented texts (and pairs) of `texts`, from `cache_dir` or built and stored there.
    `embeddings()` gives the teacher's word-embedding matrix [V, E] (read only when needed for
    the key and the build). `sep` and `keep` as for `augment_texts` (pre-split words)."""
    matrix = np.asarray(embeddings(), np.float32)
    # Keyed as before for plain texts, so their sets stay cached across this extension.
    words = [] if sep is None else [f"sep {sep!r}"]
    if keep is not None:  # word boundaries come from the texts, so the flags can run together
        words.append(np.concatenate([np.asarray(k, bool) for k in keep] or [np.zeros(0, bool)]))
    key = data_lib.content_key("augment", repr(dataclasses.astuple(cfg)),
                               data_lib.tokenizer_fingerprint(tokenizer), matrix, list(texts),
                               list(pairs or []), *words)

    def build() -> dict[str, np.ndarray]:
        table = word_table(tokenizer, matrix, list(texts) + list(pairs or []), cfg.neighbours, sep)
        out_texts, out_pairs = augment_texts(texts, pairs, cfg, table, sep, keep)
        arrays = {f"text_{k}": v for k, v in _pack(out_texts).items()}
        if out_pairs is not None:
            arrays.update({f"pair_{k}": v for k, v in _pack(out_pairs).items()})
        return arrays

    arrays = data_lib.cached_arrays(cache_dir, key, build)
    out_texts = _unpack(arrays["text_bytes"], arrays["text_offsets"])
    out_pairs = _unpack(arrays["pair_bytes"], arrays["pair_offsets"]) if "pair_bytes" in arrays else None
    return out_texts, out_pairs
