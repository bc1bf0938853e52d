"""CoNLL column files, as the token-classification kind reads them: token first, tag last, a
blank line between sentences, `-DOCSTART-` lines skipped."""
from __future__ import annotations

from jaxkd.data import DataError
from jaxkd.tasks.base import BadRow, Problems

_DOCSTART = "-DOCSTART-"


def read(path: str, require_labels: bool = True) -> tuple[list, Problems]:
    """(where, words, tags) per sentence of a CoNLL column file: token first, tag last, a blank
    line between sentences, -DOCSTART- lines skipped. A line with one column has no tag: an
    error where labels are required, else a sentence of words alone (tags None)."""
    problems = Problems(str(path))
    sentences: list = []
    words: list[str] = []
    tags: list[str] = []
    start, bad = 0, None

    def close():
        nonlocal words, tags, bad
        where = f"{path} line {start}"
        if bad is not None:
            problems.add(*bad)
        elif words:
            sentences.append((where, words, None if None in tags else tags))
        words, tags, bad = [], [], None

    try:
        with open(path, encoding="utf-8-sig") as f:
            for line_num, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    close()
                    continue
                if fields[0] == _DOCSTART:
                    close()
                    continue
                if not words and bad is None:
                    start = line_num
                if len(fields) < 2 and require_labels:
                    if bad is None:
                        bad = (f"{path} line {line_num}",
                               BadRow("missing tag", f"token {fields[0]!r} has no tag column"))
                    continue
                words.append(fields[0])
                tags.append(fields[-1] if len(fields) > 1 else None)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    close()
    if not sentences and not problems.found:
        raise DataError(f"{path}: the file holds no sentences (expected CoNLL columns: token ... tag)")
    return sentences, problems
