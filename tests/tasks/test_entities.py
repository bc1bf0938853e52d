"""Entity-level scores, checked against seqeval (conlleval-compatible mode) and conlleval.pl."""
import warnings

import numpy as np
import pytest

pytest.importorskip("seqeval")
from seqeval.metrics import (accuracy_score, classification_report, f1_score,  # noqa: E402
                             precision_score, recall_score)
from seqeval.metrics.sequence_labeling import get_entities  # noqa: E402

from jaxkd.tasks.entities import SCHEMES, entities, entity_scores  # noqa: E402

TYPES = ("PER", "LOC", "ORG")
TOLERANCE = 1e-12


def seqeval_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """seqeval's chunks with an exclusive end, to compare with `entities`."""
    return [(type_, start, end + 1) for type_, start, end in get_entities(list(tags))]


def seqeval_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """The `entity_scores` layout, computed by seqeval in its default (conlleval) mode."""
    # zero_division=0 gives the same values as seqeval's default "warn", without the warnings.
    with warnings.catch_warnings():
        # Its unused macro average warns (mean of nothing) when no sentence has an entity.
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {name: {"precision": row["precision"], "recall": row["recall"],
                       "f1": row["f1-score"], "support": int(row["support"])}
                for name, row in report.items() if not name.endswith(" avg")}
    return {"precision": precision_score(gold, pred, zero_division=0),
            "recall": recall_score(gold, pred, zero_division=0),
            "f1": f1_score(gold, pred, zero_division=0),
            "per_type": per_type,
            # seqeval divides by zero without tokens; entity_scores documents 0.0 there.
            "token_accuracy": accuracy_score(gold, pred) if any(gold) else 0.0}


def assert_matches_seqeval(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict:
    """Check entities and every score against seqeval; return our scores."""
    for tags in [*gold, *pred]:
        assert entities(tags, scheme) == seqeval_entities(tags), tags
    ours, reference = entity_scores(gold, pred, scheme), seqeval_scores(gold, pred)
    for key in ("precision", "recall", "f1", "token_accuracy"):
        assert ours[key] == pytest.approx(reference[key], abs=TOLERANCE), key
    assert ours["per_type"].keys() == reference["per_type"].keys()
    for type_, row in reference["per_type"].items():
        for key in ("precision", "recall", "f1"):
            assert ours["per_type"][type_][key] == pytest.approx(row[key], abs=TOLERANCE)
        assert ours["per_type"][type_]["support"] == row["support"]
    return ours


@pytest.mark.parametrize("scheme, tags, expected", [
    # A change of type ends the chunk even without a B- tag.
    ("iob2", ["B-PER", "I-PER", "I-LOC", "I-LOC", "O"], [("PER", 0, 2), ("LOC", 2, 4)]),
    # I- after O starts a chunk (sloppy IOB2), as in conlleval.
    ("iob2", ["O", "I-PER", "I-PER", "O", "B-LOC"], [("PER", 1, 3), ("LOC", 4, 5)]),
    ("iob2", ["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
    # IOB1: I- opens chunks, B- only separates adjacent chunks of one type.
    ("iob1", ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"],
     [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5), ("ORG", 5, 6)]),
    # Types may contain hyphens: the prefix ends at the first one.
    ("iob2", ["B-MISC-X", "I-MISC-X", "I-MISC"], [("MISC-X", 0, 2), ("MISC", 2, 3)]),
    ("iob2", [], []),
    ("iob2", ["B-PER"], [("PER", 0, 1)]),
    ("bioes", ["B-PER", "I-PER", "E-PER", "S-LOC", "O", "S-ORG"],
     [("PER", 0, 3), ("LOC", 3, 4), ("ORG", 5, 6)]),
    # conlleval.pl, which has no S-/E-B rules, would merge each of the next two into one chunk.
    ("bioes", ["S-PER", "S-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
    ("bioes", ["B-PER", "E-PER", "B-PER", "E-PER"], [("PER", 0, 2), ("PER", 2, 4)]),
    # Ill-formed BIOES: every E- or S- closes a chunk, I-/E- after E-/S- open a new one.
    ("bioes", ["I-PER", "E-PER", "E-PER", "I-PER", "S-PER", "E-PER"],
     [("PER", 0, 2), ("PER", 2, 3), ("PER", 3, 4), ("PER", 4, 5), ("PER", 5, 6)]),
    ("bioes", ["B-PER", "O", "B-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 2, 4)]),
])
def test_hand_written_entities(scheme, tags, expected):
    assert entities(tags, scheme) == expected
    assert seqeval_entities(tags) == expected


@pytest.mark.parametrize("scheme, gold, pred", [
    ("iob2", [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]],
     [["B-PER", "I-LOC", "O", "I-LOC"], ["B-ORG", "I-ORG", "O"]]),
    ("iob1", [["I-PER", "B-PER", "O", "I-LOC", "I-LOC"]],
     [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]]),
    ("bioes", [["S-PER", "B-LOC", "E-LOC", "O", "B-ORG", "I-ORG", "E-ORG"]],
     [["S-PER", "B-LOC", "I-LOC", "O", "I-ORG", "I-ORG", "E-ORG"]]),
    # Nothing predicted: precision is undefined and reported as 0.0.
    ("iob2", [["B-PER", "O"]], [["O", "O"]]),
])
def test_hand_written_scores(scheme, gold, pred):
    assert_matches_seqeval(gold, pred, scheme)


def test_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-LOC"]]
    scores = entity_scores(gold, pred)
    assert (scores["precision"], scores["recall"]) == (0.5, 2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7, abs=TOLERANCE)
    assert scores["token_accuracy"] == 4 / 6
    assert scores["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }


def random_spans(rng: np.random.Generator, length: int) -> list[tuple[str, int, int]]:
    """Non-overlapping chunks (type, start, end_exclusive), some of them adjacent."""
    spans, position = [], 0
    while True:
        position += int(rng.integers(0, 3))  # a gap of 0 makes adjacent chunks
        if position >= length:
            return spans
        end = min(length, position + int(rng.integers(1, 4)))
        spans.append((TYPES[rng.integers(len(TYPES))], position, end))
        position = end


def render(spans: list[tuple[str, int, int]], length: int, scheme: str) -> list[str]:
    """The well-formed tags of `spans` in `scheme`."""
    tags = ["O"] * length
    prev_type, prev_end = None, None
    for type_, start, end in spans:
        if scheme == "bioes" and end - start == 1:
            tags[start] = f"S-{type_}"
            continue
        inside = [f"I-{type_}"] * (end - start)
        if scheme == "bioes":
            inside[-1] = f"E-{type_}"
        # IOB1 writes B- only where a chunk directly follows one of its own type.
        if scheme != "iob1" or (prev_type, prev_end) == (type_, start):
            inside[0] = f"B-{type_}"
        tags[start:end] = inside
        prev_type, prev_end = type_, end
    return tags


def corrupt(rng: np.random.Generator, tags: list[str], rate: float, scheme: str) -> list[str]:
    """Replace each tag by a random one of the scheme with probability `rate`; often ill-formed."""
    prefixes = "BIES" if scheme == "bioes" else "BI"
    vocabulary = ["O"] + [f"{prefix}-{type_}" for prefix in prefixes for type_ in TYPES]
    return [str(vocabulary[rng.integers(len(vocabulary))]) if rng.random() < rate else tag
            for tag in tags]


def random_corpus(rng: np.random.Generator, scheme: str) -> tuple[list, list]:
    """Gold and predicted sentences: gold mostly well-formed, pred noisier or entirely random."""
    gold, pred = [], []
    for _ in range(int(rng.integers(1, 6))):
        length = int(rng.integers(0, 12))
        clean = render(random_spans(rng, length), length, scheme)
        gold.append(corrupt(rng, clean, 0.1, scheme))
        pred.append(corrupt(rng, clean, 1.0 if rng.random() < 0.2 else 0.3, scheme))
    return gold, pred


@pytest.mark.parametrize("scheme", SCHEMES)
def test_well_formed_tags_round_trip(scheme):
    rng = np.random.default_rng(1)
    for _ in range(200):
        length = int(rng.integers(0, 15))
        spans = random_spans(rng, length)
        assert entities(render(spans, length, scheme), scheme) == spans


@pytest.mark.parametrize("scheme", SCHEMES)
def test_random_sequences_match_seqeval(scheme):
    rng = np.random.default_rng(SCHEMES.index(scheme))
    f1_values = [assert_matches_seqeval(*random_corpus(rng, scheme), scheme)["f1"]
                 for _ in range(150)]
    # Guard against a generator that only makes trivial (all right or all wrong) corpora.
    assert any(0.0 < f1 < 1.0 for f1 in f1_values)


def conlleval_counts(gold: list[list[str]], pred: list[list[str]]) -> tuple[int, int, int]:
    """(correct, gold, predicted) chunk counts from a line-by-line port of conlleval.pl's
    main loop and chunk rules (version 2004-01-26), for B-/I-/O tags."""
    ends = {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O")}
    starts = {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I")}

    def end_of_chunk(prev_tag, tag, prev_type, type_):
        return (prev_tag, tag) in ends or (prev_tag != "O" and prev_type != type_)

    def start_of_chunk(prev_tag, tag, prev_type, type_):
        return (prev_tag, tag) in starts or (tag != "O" and prev_type != type_)

    def split(tag):
        return tuple(tag.split("-", 1)) if "-" in tag else (tag, "")

    correct_chunks = found_correct = found_guessed = 0
    in_correct = False
    last_correct, last_correct_type, last_guessed, last_guessed_type = "O", "", "O", ""
    # conlleval reads a sentence boundary as an "O O" token.
    lines = [pair for g, p in zip(gold, pred) for pair in [*zip(g, p), ("O", "O")]]
    for gold_tag, pred_tag in lines:
        (correct, correct_type), (guessed, guessed_type) = split(gold_tag), split(pred_tag)
        correct_ends = end_of_chunk(last_correct, correct, last_correct_type, correct_type)
        guessed_ends = end_of_chunk(last_guessed, guessed, last_guessed_type, guessed_type)
        if in_correct:
            if correct_ends and guessed_ends and last_guessed_type == last_correct_type:
                in_correct = False
                correct_chunks += 1
            elif correct_ends != guessed_ends or guessed_type != correct_type:
                in_correct = False
        correct_starts = start_of_chunk(last_correct, correct, last_correct_type, correct_type)
        guessed_starts = start_of_chunk(last_guessed, guessed, last_guessed_type, guessed_type)
        if correct_starts and guessed_starts and guessed_type == correct_type:
            in_correct = True
        found_correct += correct_starts
        found_guessed += guessed_starts
        last_correct, last_correct_type = correct, correct_type
        last_guessed, last_guessed_type = guessed, guessed_type
    return correct_chunks + in_correct, found_correct, found_guessed


@pytest.mark.parametrize("scheme", ["iob1", "iob2"])
def test_random_sequences_match_conlleval_pl(scheme):
    rng = np.random.default_rng(10 + SCHEMES.index(scheme))
    for _ in range(150):
        gold, pred = random_corpus(rng, scheme)
        correct, found_gold, found_pred = conlleval_counts(gold, pred)
        scores = entity_scores(gold, pred, scheme)
        assert scores["precision"] == (correct / found_pred if found_pred else 0.0)
        assert scores["recall"] == (correct / found_gold if found_gold else 0.0)


def test_empty_corpus_scores_zero():
    assert entity_scores([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                     "per_type": {}, "token_accuracy": 0.0}


@pytest.mark.parametrize("tag", ["PER", "B", "B-", "X-PER", "o", "BI-PER"])
def test_rejects_tags_without_a_known_prefix(tag):
    with pytest.raises(ValueError, match=f"tag '{tag}'"):
        entities(["O", tag])


@pytest.mark.parametrize("scheme", ["iob1", "iob2"])
@pytest.mark.parametrize("tag", ["E-PER", "S-PER"])
def test_rejects_bioes_prefixes_in_iob_schemes(scheme, tag):
    with pytest.raises(ValueError, match=f"tag '{tag}'.*{scheme}"):
        entities(["B-PER", tag], scheme)


def test_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unknown tagging scheme 'ioe2'"):
        entities([], "ioe2")
    with pytest.raises(ValueError, match="unknown tagging scheme 'IOB2'"):
        entity_scores([], [], "IOB2")


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="gold has 2 sentences but pred has 1"):
        entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 1 has 2 gold tags but 1 predicted"):
        entity_scores([["O"], ["O", "B-PER"]], [["O"], ["O"]])


def test_bad_tag_error_names_the_sentence():
    with pytest.raises(ValueError, match="sentence 1: tag 'PER'"):
        entity_scores([["O"], ["B-PER"]], [["O"], ["PER"]])
