"""Run an exported classifier on a file or stdin: one JSON line of predictions per input row.

    python -m jaxkd.predict MODEL_DIR INPUT [--output OUT.jsonl] [options]

MODEL_DIR is a Hugging Face directory written by jaxkd (the run's `student/` or `teacher/`) or
elsewhere: config.json naming BertForSequenceClassification or BertForTokenClassification and
its id2label, model.safetensors and the tokenizer files. The task is rebuilt from the head and
the label names, so no config is needed.

INPUT is a file in any format training reads: tsv/txt/csv/jsonl/json/parquet with a text column
(--text, default `sentence`; --text-pair for pairs) for sentence classifiers; CoNLL column
files (.conll/.txt; a token per line, the tag column optional) or jsonl/json/parquet rows with a
list of words (--tokens, default `tokens`) for token classifiers. A label or tag column may be
missing; one that is there must hold the model's label names (or ids). `-` reads stdin: one text per line (`text<TAB>pair` with
--text-pair), or one whitespace-tokenised sentence per line; blank lines are skipped.

Output, one line per row: `{"label", "probs"}` (classification), `{"score"}` (regression) or
`{"tokens", "tags", "entities"}` (token classification).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command's inputs, reported (exit code 2) before any work starts."""


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model directory is, read from its config.json alone (no weights loaded)."""

    directory: pathlib.Path
    hf_config: dict
    head: Any  # jaxkd.model.HeadConfig, from the architecture and label count
    label_names: tuple[str, ...]  # id -> name, from id2label
    max_length: int  # the longest input its position table holds
    vocab_size: int

    @property
    def head_kind(self) -> str:
        return self.head.kind

    @property
    def regression(self) -> bool:
        return self.head.regression

    @property
    def architecture(self) -> str:
        from jaxkd import hf
        return hf.architecture(self.hf_config, self.head_kind)


def inspect_model(model_dir: str | os.PathLike) -> ModelInfo:
    """The model directory's head and labels; a `UsageError` if it is not a classifier of a
    supported family."""
    from jaxkd import hf
    from jaxkd.model import HEADS

    text = str(model_dir)
    if text.startswith("pkg:"):
        try:
            directory = hf.resolve_dir(text)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
    else:
        directory = pathlib.Path(text).expanduser()
        if not directory.exists():
            raise UsageError(f"model directory not found: {text}")
        if not directory.is_dir():
            raise UsageError(f"{text} is a file; pass the model directory (config.json, "
                             "model.safetensors and the tokenizer files)")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = hf.read_hf_config(directory)
    except json.JSONDecodeError as err:
        raise UsageError(f"{directory / 'config.json'} is not valid JSON ({err.msg})") from err
    try:
        encoder = hf.config_from_hf(raw)
    except hf.CheckpointError as err:
        raise UsageError(f"{directory}: {err}") from err
    kind = hf.checkpoint_head_kind(raw)
    if kind is None:
        archs = raw.get("architectures") or []
        known = [hf.architecture(raw, k) for k in HEADS]
        raise UsageError(
            f"{directory} is not a model of a task jaxkd knows: config.json names architectures "
            f"{archs}, not {' or '.join(known)}. Pass a fine-tuned model, "
            "e.g. the student/ or teacher/ directory of a jaxkd run")
    return ModelInfo(directory=directory, hf_config=raw, head=hf.head_from_hf(raw, kind),
                     label_names=_label_names(raw, directory), max_length=encoder.max_length,
                     vocab_size=encoder.vocab_size)


def _label_names(raw: dict, directory: pathlib.Path) -> tuple[str, ...]:
    from jaxkd import hf

    id2label = raw.get("id2label")
    if not id2label:
        return tuple(f"LABEL_{i}" for i in range(hf.checkpoint_num_labels(raw)))
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (ValueError, AttributeError) as err:
        raise UsageError(f"{directory / 'config.json'}: id2label must map ids 0..N-1 to names, "
                         f"got {id2label!r}") from err
    if sorted(labels) != list(range(len(labels))):
        raise UsageError(f"{directory / 'config.json'}: id2label must name ids 0..{len(labels) - 1}, "
                         f"got ids {sorted(labels)}")
    return tuple(labels[i] for i in range(len(labels)))


def model_task(info: ModelInfo, *, text: str | None = None, text_pair: str | None = None,
               tokens: str | None = None, tag_scheme: str | None = None, data_cfg=None):
    """The task a model directory solves: its head's task kind over its own label names."""
    from jaxkd import tasks
    from jaxkd.data import DataError

    kind = tasks.kind_of_head(info.head_kind)
    given = {k: v for k, v in (("text", text), ("text_pair", text_pair), ("tokens", tokens),
                               ("tag_scheme", tag_scheme)) if v is not None}
    foreign = [k for k in given if k not in kind.INPUT_FLAGS]
    if foreign:
        owners = [m.MODELS for m in tasks.KINDS.values() if set(foreign) & set(m.INPUT_FLAGS)]
        flags = [f"--{k.replace('_', '-')}" for k in foreign]
        listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise UsageError(f"{listed} {'is' if len(flags) == 1 else 'are'} for {' and '.join(owners)}; "
                         f"{info.directory} is a {info.architecture} ({kind.INPUT_HINT})")
    try:
        return tasks.resolve(kind.exported_config(info.label_names, info.regression, given), data_cfg)
    except DataError as err:
        raise UsageError(f"{info.directory}: {err}") from err


@dataclasses.dataclass
class LoadedModel:
    info: ModelInfo
    config: Any  # jaxkd.model.ModelConfig
    params: Any
    tokenizer: Any


def load_tokenizer(info: ModelInfo, max_seq_len: int, words: bool = False):
    """The directory's tokenizer, checked against the model's vocabulary and positions; `words`:
    it will be given words split beforehand (`Task.pretokenized`)."""
    from jaxkd import hf

    if max_seq_len > info.max_length:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the {info.max_length} positions of "
                         f"the model's max_position_embeddings")
    try:
        tokenizer = hf.load_tokenizer(info.directory, words=words)
    except FileNotFoundError as err:
        raise UsageError(f"{info.directory} has no usable tokenizer files: {err}") from err
    if len(tokenizer) > info.vocab_size:
        raise UsageError(f"{info.directory}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"model's vocabulary holds {info.vocab_size}")
    return tokenizer


def load_model(info: ModelInfo, tokenizer, dtype: str | None = None) -> LoadedModel:
    """The weights, refusing a checkpoint whose classifier would have to be made up."""
    from jaxkd import hf

    try:
        cfg, params, report = hf.load_hf(info.directory, dtype=dtype, return_report=True)
    except (FileNotFoundError, hf.CheckpointError) as err:
        raise UsageError(f"{info.directory}: {err}") from err
    if report.fresh:
        raise UsageError(f"{info.directory}: the weights lack the trained {', '.join(report.fresh)} "
                         f"of a {info.architecture}; predictions would be random")
    return LoadedModel(info, cfg, params, tokenizer)


# ----------------------------------------------------------------------------- running


def progress_bar(desc: str, enabled: bool) -> Callable:
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, file=sys.stderr, leave=False, disable=not enabled,
                           unit="batch")


def model_outputs(model: LoadedModel, encoded, *, per_token: bool, batch_size: int,
                  max_seq_len: int, bucket_multiple: int, progress: Callable | None = None,
                  mesh=None):
    """Outputs ([N, C], or flat [T, C] for token heads) of every row of `encoded`, through the
    one prediction path (`jaxkd.inference.predict`), on all local devices."""
    import jax

    from jaxkd import inference, sharding

    mesh = sharding.make_mesh() if mesh is None else mesh
    devices = mesh.size
    # Every device gets rows; no batch is larger than the input needs.
    rows = max(1, min(batch_size, len(encoded)))
    batch_size = -(-rows // devices) * devices
    logits_fn = inference.jit_logits_fn(model.config, mesh)
    params = jax.device_put(model.params, sharding.replicated(mesh))
    return inference.predict(logits_fn, params, encoded, batch_size=batch_size, mesh=mesh,
                             bucket_multiple=bucket_multiple, max_seq_len=max_seq_len,
                             per_token=per_token, progress=progress)


# ----------------------------------------------------------------------------- input


def _stdin_records(task, lines: Sequence[str]) -> list[dict | None]:
    """One record per stdin line (None for a blank one): the task's own column names."""
    from jaxkd.data import DataError

    records: list[dict | None] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            records.append(None)
            continue
        try:
            records.append(task.stdin_record(line, number))
        except DataError as err:
            raise UsageError(str(err)) from err
    return records


def _write_jsonl(path: pathlib.Path, records: Sequence[dict | None]) -> None:
    # A blank line for a blank input line keeps line numbers in messages those of the input.
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write("" if record is None else json.dumps(record, ensure_ascii=False))
            f.write("\n")


def load_input(task, data_cfg, source: str, *, stdin=None, require_labels: bool = False):
    """The task's validated examples of a file, or of stdin when `source` is `-`."""
    from jaxkd.data import DataError

    with tempfile.TemporaryDirectory(prefix="jaxkd-predict-") as tmp:
        shown, path = source, source
        if source == "-":
            records = _stdin_records(task, (stdin or sys.stdin).read().splitlines())
            if not any(records):
                raise UsageError("<stdin> holds no input lines")
            shown, path = "<stdin>", str(pathlib.Path(tmp) / "stdin.jsonl")
            _write_jsonl(pathlib.Path(path), records)
            data_cfg = dataclasses.replace(data_cfg, format="jsonl")
        else:
            if not os.path.isfile(source):
                raise UsageError(f"input file not found: {source}")
        try:
            return task.load(data_cfg, path, require_labels=require_labels)
        except (DataError, FileNotFoundError) as err:
            raise UsageError(str(err).replace(path, shown)) from err


# ----------------------------------------------------------------------------- command line


def add_run_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Batching and precision flags shared by predict and evaluate."""
    p.add_argument("--max-seq-len", type=int, default=128 if defaults else None,
                   help="tokens per row, [CLS] and [SEP] included" + (" (default 128)" if defaults else ""))
    p.add_argument("--batch-size", type=int, default=32 if defaults else None,
                   help="rows per batch" + (" (default 32)" if defaults else ""))
    p.add_argument("--bucket-multiple", type=int, default=8 if defaults else None,
                   help="batch lengths are multiples of this" + (" (default 8)" if defaults else ""))
    p.add_argument("--doc-stride", type=int, default=None,
                   help="question answering: tokens shared by neighbouring context windows "
                        "(default: a quarter of --max-seq-len)")
    p.add_argument("--format", choices=("tsv", "csv", "jsonl", "json", "parquet", "conll"),
                   default=None, help="input format (default: by the file's suffix)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default float32)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary on stderr")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m jaxkd.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported classifier directory")
    p.add_argument("input", metavar="INPUT", help="input file, or - for stdin")
    p.add_argument("--output", "-o", default=None, metavar="OUT.jsonl",
                   help="write the JSON lines here (default stdout)")
    p.add_argument("--text", default=None, help="text column (sentence classifiers; default sentence)")
    p.add_argument("--text-pair", default=None, help="second text column of a pair classifier")
    p.add_argument("--tokens", default=None,
                   help="column of word lists in jsonl/json/parquet rows (token classifiers; default tokens)")
    p.add_argument("--tag-scheme", choices=("iob1", "iob2", "bioes"), default=None,
                   help="how tags form entities (token classifiers; default iob2)")
    add_run_flags(p)
    return p


def parse(p: argparse.ArgumentParser, argv, intermixed: bool = False) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code argparse chose (--help: 0, a bad flag: 2)."""
    try:
        return p.parse_intermixed_args(argv) if intermixed else p.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE


def check_run_flags(args: argparse.Namespace) -> None:
    for flag in ("max_seq_len", "batch_size", "bucket_multiple"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.max_seq_len is not None and args.max_seq_len < 3:
        raise UsageError(f"--max-seq-len must be >= 3 ([CLS] token [SEP]), got {args.max_seq_len}")


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from jaxkd.data import DataConfig

    check_run_flags(args)
    started = time.perf_counter()
    info = inspect_model(args.model_dir)
    data_cfg = DataConfig(batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                          bucket_multiple=args.bucket_multiple, format=args.format,
                          doc_stride=args.doc_stride)
    task = model_task(info, text=args.text, text_pair=args.text_pair, tokens=args.tokens,
                      tag_scheme=args.tag_scheme, data_cfg=data_cfg)
    examples = load_input(task, data_cfg, args.input, stdin=stdin)
    if args.output is not None:
        out_dir = pathlib.Path(args.output).parent
        if not out_dir.is_dir():
            raise UsageError(f"--output {args.output}: directory {out_dir} does not exist")
    tokenizer = load_tokenizer(info, args.max_seq_len, words=task.pretokenized)
    model = load_model(info, tokenizer, args.dtype)
    encoded = task.encode(examples, tokenizer, args.max_seq_len)
    outputs = model_outputs(model, encoded, per_token=task.outputs_per_token,
                            batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                            bucket_multiple=args.bucket_multiple,
                            progress=progress_bar("predict", not args.quiet))
    predictions = task.predictions(outputs, encoded, examples)
    with _open_output(args.output, stdout) as out:
        for prediction in predictions:
            out.write(json.dumps(_finite(prediction), ensure_ascii=False) + "\n")
    if not args.quiet:
        where = args.output or "stdout"
        print(f"predict: {len(predictions)} rows of {args.input if args.input != '-' else '<stdin>'} "
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


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parse(parser(prog), argv)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except UsageError as err:
        return fail(str(err))
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
