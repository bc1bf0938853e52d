"""Run an exported model on a file or stdin: one JSON line of predictions per input row.

    python -m jaxkd.predict MODEL_DIR INPUT [--output OUT.jsonl] [options]

MODEL_DIR is a Hugging Face directory written by jaxkd (the run's `student/` or `teacher/`) or
elsewhere: config.json naming BertForSequenceClassification, BertForTokenClassification or
BertForQuestionAnswering (or another family's) with its id2label, model.safetensors and the
tokenizer files. The task is rebuilt from the head and the label names, so no config is needed.
A directory jaxkd exported also records the run's max_seq_len, doc_stride, text columns and tag
scheme (config.json key `jaxkd`): they are the defaults here; flags given win, and stderr says
which were used (unless --quiet).

INPUT is a file in any format training reads: tsv/txt/csv/jsonl/json/parquet with a text column
(--text, default `sentence`; --text-pair for pairs) for sentence classifiers; CoNLL column
files (.conll/.txt; a token per line, the tag column optional) or jsonl/json/parquet rows with a
list of words (--tokens, default `tokens`) for token classifiers; for question answering SQuAD
v1.1 JSON files, or jsonl/json/parquet rows with `question` and `context` (and `id`), cut into
windows of --max-seq-len tokens overlapping by --doc-stride. A label, tag or answer column may
be missing; one that is there must hold the model's label names (or ids). `-` reads stdin: one
text per line (`text<TAB>pair` with --text-pair, or a pair model that records its pair column),
one whitespace-tokenised sentence per line, or `question<TAB>context`; a blank line gives no
output line but is counted in `line`.

A sentence embedder (a sentence-transformers directory) takes a file of sentences (a
`sentence` or `text` column, or --text), or scored pairs (`sentence1`, `sentence2`), and writes
`{"embedding"}` per sentence, or `{"similarity"}` (the cosine) per pair.

--output OUT.npy writes the model's output rows as one float32 array instead (one row per input
row: logits, or embeddings; a pair's first sentences, then its second ones).

Output, one line per row, led by `line`: the input's 1-based line on stdin, or the row's
1-based number in a file (a data row of tsv/csv, header not counted; a record of
jsonl/json/parquet; a CoNLL sentence; a SQuAD question). Then `{"label", "probs"}`
(classification), `{"score"}` (regression), `{"tokens", "tags", "entities"}` (token
classification) or `{"id", "answer", "score"}` (question answering; on stdin the id is the line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from jaxkd import exported, util
from jaxkd.cli_flags import EXIT_USAGE, UsageError, add_run_flags, check_run_flags, run_main

__all__ = ["EXIT_USAGE", "UsageError", "main", "parser", "run"]


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m jaxkd.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="exported model directory (classifier, token classifier, question "
                        "answering or sentence embedder)")
    p.add_argument("input", metavar="INPUT", help="input file, or - for stdin")
    p.add_argument("--output", "-o", default=None, metavar="OUT.jsonl",
                   help="write the JSON lines here (default stdout); OUT.npy: the output rows "
                        "as an array")
    p.add_argument("--text", default=None,
                   help="text column (sentence classifiers; default the model's, else sentence)")
    p.add_argument("--text-pair", default=None, help="second text column of a pair classifier "
                   "(default the model's)")
    p.add_argument("--tokens", default=None, help="column of word lists in jsonl/json/parquet "
                   "rows (token classifiers; default the model's, else tokens)")
    p.add_argument("--tag-scheme", choices=("iob1", "iob2", "bioes"), default=None,
                   help="how tags form entities (token classifiers; default the model's, else iob2)")
    add_run_flags(p)
    return p


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    check_run_flags(args)
    started = time.perf_counter()
    info = exported.inspect_model(args.model_dir)
    settings = exported.run_settings(info, vars(args), columns=True)
    data_cfg = settings.data_config(format=args.format)
    task = exported.model_task(info, text=args.text, text_pair=args.text_pair, tokens=args.tokens,
                               tag_scheme=args.tag_scheme, data_cfg=data_cfg,
                               defaults=settings.values)
    examples, lines = exported.load_input(task, data_cfg, args.input, stdin=stdin,
                                          format_flag="--format")
    to_npy = args.output is not None and args.output.endswith(".npy")
    if args.output is not None:
        out_dir = pathlib.Path(args.output).parent
        if not out_dir.is_dir():
            raise UsageError(f"--output {args.output}: directory {out_dir} does not exist")
    if to_npy and task.outputs_per_token:
        raise UsageError(f"--output {args.output}: a .npy file holds one output row per input "
                         f"row; this model's outputs are per token: write JSON lines instead")
    if not args.quiet:
        print(f"predict: {settings.describe(task, data_cfg)}", file=sys.stderr)
    predictions, outputs = exported.predict_examples(
        info, task, examples, lines, data_cfg, dtype=args.dtype, with_outputs=True,
        progress=exported.progress_bar("predict", not args.quiet))
    if to_npy:
        np.save(args.output, np.asarray(outputs, np.float32))
    else:
        with _open_output(args.output, stdout) as out:
            for prediction in predictions:
                out.write(json.dumps(_finite(prediction), ensure_ascii=False) + "\n")
    if not args.quiet:
        where = args.output or "stdout"
        print(f"predict: {util.count(len(predictions), 'row')} of {args.input if args.input != '-' else '<stdin>'} "
              f"-> {where} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def _finite(value):
    """JSON has no NaN: a non-finite float (a diverged model) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@contextlib.contextmanager
def _open_output(path: str | None, stdout=None):
    if path is None:
        out = stdout or sys.stdout
        yield out
        out.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            yield f


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    try:
        return run_main(parser(prog), run, argv)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
