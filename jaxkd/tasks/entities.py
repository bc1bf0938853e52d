"""Entity-level (chunk) evaluation of tag sequences, with conlleval's chunk boundaries.

The CoNLL-2000/2003 shared tasks scored named entities with the perl script conlleval, which
decides where a chunk starts and ends from each pair of adjacent tags. `entities` reproduces
those decisions, so scores match published CoNLL-2003 numbers; `entity_scores` adds the
micro and per-type precision, recall and F1 that conlleval prints, plus token accuracy.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

SCHEMES = ("iob1", "iob2", "bioes")

# The chunk prefixes each scheme may use. IOB1 and IOB2 share a tag set (they differ only in
# when B- is written), and BIOES adds E- (last token) and S- (single-token chunk).
_PREFIXES = {"iob1": frozenset("BI"), "iob2": frozenset("BI"), "bioes": frozenset("BIES")}

_KNOWN_PREFIXES = frozenset("BIES")
_OUTSIDE = "O"

# (previous prefix, current prefix) pairs at which conlleval.pl (version 2004-01-26) ends
# or starts a chunk between two tokens of the same type; a change of type is handled
# separately in _chunk_ends/_chunk_starts. conlleval.pl's E- rules serve the IOE schemes.
_CONLLEVAL_ENDS = {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"),
                   ("E", "E"), ("E", "I"), ("E", "O")}
_CONLLEVAL_STARTS = {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"),
                     ("E", "E"), ("E", "I"), ("O", "E")}

# conlleval.pl knows no S- prefix (it would merge "S-X S-X" into one chunk) and keeps
# "E-X B-X" as one chunk, because B- never follows E- in IOE. For BIOES we add the rules of
# the IOBES-extended copies of conlleval, which seqeval also implements: every chunk closes
# after E- or S-, and every B- or S- opens one. Restricted to B, I and O these pairs are
# already conlleval.pl's, so IOB tags are parsed exactly as conlleval.pl parses them.
_BIOES_ENDS = {(last, prefix) for last in "ES" for prefix in "BIOES"} | {("B", "S"), ("I", "S")}
_BIOES_STARTS = {(prefix, first) for prefix in "BIOES" for first in "BS"} | {("S", "I"), ("S", "E")}

_ENDS = _CONLLEVAL_ENDS | _BIOES_ENDS
_STARTS = _CONLLEVAL_STARTS | _BIOES_STARTS


def _check_scheme(scheme: str) -> frozenset[str]:
    """The prefixes `scheme` allows; ValueError for an unknown scheme."""
    try:
        return _PREFIXES[scheme]
    except KeyError:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {SCHEMES}") from None


def _split_tag(tag: str, prefixes: frozenset[str], scheme: str) -> tuple[str, str]:
    """(prefix, type) of one tag; "O" has the empty type, as in conlleval."""
    if tag == _OUTSIDE:
        return _OUTSIDE, ""
    # Split at the first hyphen only, so types may contain hyphens (conlleval.pl keeps only the
    # part up to a second hyphen; the two differ for such types alone).
    prefix, hyphen, type_ = tag.partition("-")
    if not hyphen or not type_ or prefix not in _KNOWN_PREFIXES:
        raise ValueError(f"tag {tag!r} is neither 'O' nor a prefixed entity tag such as 'B-PER'")
    if prefix not in prefixes:
        raise ValueError(f"tag {tag!r} uses prefix {prefix}-, which the {scheme} scheme does not "
                         f"allow (allowed: {', '.join(sorted(prefixes))}); pass scheme='bioes'")
    return prefix, type_


def check_tags(tags: Sequence[str], scheme: str) -> None:
    """Raise ValueError naming the first of `tags` that is not "O" or a tag `scheme` allows."""
    prefixes = _check_scheme(scheme)
    for tag in tags:
        _split_tag(tag, prefixes, scheme)


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """conlleval's endOfChunk: does a chunk end between the previous and current token?"""
    return (prev_prefix, prefix) in _ENDS or (prev_prefix != _OUTSIDE and prev_type != type_)


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """conlleval's startOfChunk: does a chunk start at the current token?"""
    return (prev_prefix, prefix) in _STARTS or (prefix != _OUTSIDE and prev_type != type_)


def entities(tags: Sequence[str], scheme: str = "iob2") -> list[tuple[str, int, int]]:
    """The entity chunks (type, start, end_exclusive) of one sentence, in order.

    Chunks are cut where conlleval cuts them, which is lenient about ill-formed tags: an I-X
    after O, after another type or (BIOES) after E-/S- starts a new chunk, and a change of
    type inside a chunk ends it. Because conlleval's rules need no knowledge of the scheme,
    iob1 and iob2 parse identically (IOB1 files and sloppy IOB2 predictions both work). The
    scheme still matters in two ways: its name is validated, and E-/S- tags are accepted only
    with scheme="bioes", so that a BIOES-tagged file scored as IOB fails loudly instead of
    being scored with rules nobody chose. BIOES adds the usual E-/S- boundary rules (shared
    with seqeval) that the original conlleval.pl lacks; see _BIOES_ENDS.

    Raises ValueError for an unknown scheme or for a tag that is neither "O" nor
    "<prefix>-<type>" with a prefix the scheme allows.
    """
    prefixes = _check_scheme(scheme)
    chunks = []
    prev_prefix, prev_type = _OUTSIDE, ""
    start = 0
    # A trailing "O" closes a chunk that runs to the end of the sentence.
    for position, tag in enumerate([*tags, _OUTSIDE]):
        prefix, type_ = _split_tag(tag, prefixes, scheme)
        if _chunk_ends(prev_prefix, prefix, prev_type, type_):
            chunks.append((prev_type, start, position))
        if _chunk_starts(prev_prefix, prefix, prev_type, type_):
            start = position
        prev_prefix, prev_type = prefix, type_
    return chunks


def _precision_recall_f1(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts, 0.0 where a ratio is undefined (zero_division=0)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                  scheme: str = "iob2") -> dict:
    """Exact-match entity scores of predicted against gold tags, computed as conlleval does.

    A predicted chunk counts as correct only if a gold chunk has the same type, start and end.
    Returns micro-averaged "precision", "recall" and "f1" over all chunks; "per_type", mapping
    each type found in gold or pred (sorted) to {"precision", "recall", "f1", "support"} with
    support the number of gold chunks; and "token_accuracy", the fraction of tokens whose tag
    equals the gold tag. Undefined ratios, including token accuracy with no tokens, are 0.0.

    Raises ValueError when gold and pred differ in the number of sentences or in the length
    of a sentence (naming its index), or for a tag `entities` rejects.
    """
    _check_scheme(scheme)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    gold_counts: Counter[str] = Counter()
    pred_counts: Counter[str] = Counter()
    correct_counts: Counter[str] = Counter()
    tokens = correct_tokens = 0
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index} has {len(gold_tags)} gold tags "
                             f"but {len(pred_tags)} predicted tags")
        try:
            gold_chunks = set(entities(gold_tags, scheme))
            pred_chunks = set(entities(pred_tags, scheme))
        except ValueError as error:
            raise ValueError(f"sentence {index}: {error}") from error
        gold_counts.update(type_ for type_, _, _ in gold_chunks)
        pred_counts.update(type_ for type_, _, _ in pred_chunks)
        correct_counts.update(type_ for type_, _, _ in gold_chunks & pred_chunks)
        tokens += len(gold_tags)
        correct_tokens += sum(g == p for g, p in zip(gold_tags, pred_tags))

    per_type = {}
    for type_ in sorted(gold_counts.keys() | pred_counts.keys()):
        precision, recall, f1 = _precision_recall_f1(
            correct_counts[type_], pred_counts[type_], gold_counts[type_])
        per_type[type_] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": gold_counts[type_]}
    precision, recall, f1 = _precision_recall_f1(
        sum(correct_counts.values()), sum(pred_counts.values()), sum(gold_counts.values()))
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type,
            "token_accuracy": correct_tokens / tokens if tokens else 0.0}
