"""Score an exported classifier on labelled data: the task metrics, one `name=value` a line,
primary first.

    python -m jaxkd.evaluate MODEL_DIR --config X.yaml [--split test|eval] [key=value ...]
    python -m jaxkd.evaluate MODEL_DIR --task NAME [--type TYPE] --data FILE [options]

With --config the task section and the split's file come from a training config (default the
test split if data.test is set, else data.eval); key=value overrides apply as in train.py.
With --task the task is a preset (sst2, mrpc, conll2003, ...) or `custom` (then --text,
--label, --tokens, --tags, --metric describe it, and the label names default to the model's).

The model's id2label must name the same labels as the task. In another order, the model's
outputs are reordered to the task's; other names are refused, unless --by-position maps output
i to the task's label i (for models exported with generic LABEL_i names).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from jaxkd.predict import (EXIT_USAGE, UsageError, add_run_flags, check_run_flags, fail,
                           inspect_model, load_input, load_model, load_tokenizer, model_outputs,
                           parse, progress_bar)

SPLITS = ("test", "eval")
__all__ = ["EXIT_USAGE", "evaluate_model", "label_order", "main"]


def label_order(task, info, by_position: bool = False) -> np.ndarray | None:
    """Columns of the model's outputs in the task's label order (None: already in it); a
    `UsageError` when model and task do not predict the same thing."""
    from jaxkd.data import DataError

    if task.head_kind != info.head_kind:
        raise UsageError(f"{info.directory} is a {info.architecture} but task {task.name!r} is "
                         f"{task.type}")
    try:
        return task.label_order(info.label_names, info.regression, str(info.directory),
                                by_position)
    except DataError as err:
        raise UsageError(str(err)) from err


def evaluate_model(model_dir, task, data_cfg, source: str, *, by_position: bool = False,
                   dtype: str | None = None, quiet: bool = True) -> dict[str, float]:
    """Task metrics (primary first) of the model in `model_dir` on the labelled `source`."""
    info = inspect_model(model_dir)
    order = label_order(task, info, by_position)
    examples = load_input(task, data_cfg, source, require_labels=True)
    tokenizer = load_tokenizer(info, data_cfg.max_seq_len, words=task.pretokenized)
    model = load_model(info, tokenizer, dtype)
    encoded = task.encode(examples, tokenizer, data_cfg.max_seq_len)
    outputs = model_outputs(model, encoded, per_token=task.outputs_per_token,
                            batch_size=data_cfg.eval_batch_size or data_cfg.batch_size,
                            max_seq_len=data_cfg.max_seq_len,
                            bucket_multiple=data_cfg.bucket_multiple,
                            progress=progress_bar("evaluate", not quiet))
    if order is not None:
        outputs = outputs[:, order]
    if not quiet:
        print(f"evaluate: {len(examples)} examples of {source}", file=sys.stderr)
    return task.scores(outputs, encoded, examples)


# ----------------------------------------------------------------------------- the task


def _with_model_labels(task_cfg, info):
    """A custom task without label names takes the model's (`with_model_labels` of its kind)."""
    from jaxkd import tasks

    return tasks.kind(task_cfg.type, task_cfg.name).with_model_labels(
        task_cfg, info.label_names, info.regression)


def _from_config(args, info):
    from jaxkd import config as config_lib

    try:
        cfg = config_lib.load_config(args.config, args.overrides)
    except config_lib.ConfigError as err:
        raise UsageError(f"config error: {err}") from err
    split = args.split or ("test" if cfg.data.test is not None else "eval")
    source = getattr(cfg.data, split)
    if source is None:
        given = [s for s in SPLITS if getattr(cfg.data, s) is not None]
        raise UsageError(f"{args.config}: data.{split} is not set" +
                         (f"; it sets {', '.join(f'data.{s}' for s in given)} (--split)" if given
                          else "; set data.test or data.eval, or pass --task and --data"))
    changes = {k: getattr(args, k) for k in ("max_seq_len", "bucket_multiple", "format", "doc_stride")
               if getattr(args, k) is not None}
    if args.batch_size is not None:
        changes.update(batch_size=args.batch_size, eval_batch_size=args.batch_size)
    return _with_model_labels(cfg.task, info), dataclasses.replace(cfg.data, **changes), source


def _from_flags(args, info):
    from jaxkd import tasks
    from jaxkd.data import DataConfig

    if args.data is None:
        raise UsageError("--task needs --data FILE (the labelled examples)")
    keys = {k: getattr(args, k) for k in ("type", "text", "text_pair", "label", "tokens", "tags",
                                          "metric", "tag_scheme") if getattr(args, k) is not None}
    if args.task == "custom" and "type" not in keys:  # a custom task is of the model's kind
        keys["type"] = tasks.kind_of_head(info.head_kind).TYPE
    if args.labels is not None:
        keys["labels"] = tuple(x.strip() for x in args.labels.split(","))
    task_cfg = tasks.task_config(name=args.task, **keys)
    data_cfg = DataConfig(max_seq_len=args.max_seq_len or 128, batch_size=args.batch_size or 32,
                          bucket_multiple=args.bucket_multiple or 8, format=args.format,
                          doc_stride=args.doc_stride)
    return _with_model_labels(task_cfg, info), data_cfg, args.data


def run(args: argparse.Namespace) -> int:
    from jaxkd import tasks
    from jaxkd.data import DataError

    check_run_flags(args)
    if (args.config is None) == (args.task is None):
        raise UsageError("give either --config X.yaml or --task NAME --data FILE")
    task_only = ("data", "type", "text", "text_pair", "label", "tokens", "tags", "labels",
                 "metric", "tag_scheme")
    if args.config is not None:
        used = [k for k in task_only if getattr(args, k) is not None]
        if used:
            raise UsageError(f"--{used[0].replace('_', '-')} goes with --task; with --config set "
                             f"it in the config (or as a key=value override)")
    elif args.split is not None or args.overrides:
        raise UsageError("--split and key=value overrides go with --config")
    started = time.perf_counter()
    info = inspect_model(args.model_dir)
    try:
        task_cfg, data_cfg, source = (_from_config if args.config else _from_flags)(args, info)
        task = tasks.resolve(task_cfg, data_cfg)
    except DataError as err:
        raise UsageError(str(err)) from err
    scores = evaluate_model(info.directory, task, data_cfg, source, by_position=args.by_position,
                            dtype=args.dtype, quiet=args.quiet)
    for name, value in scores.items():
        print(f"{name}={value:.6f}")
    if not args.quiet:
        print(f"evaluate: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    from jaxkd import tasks

    p = argparse.ArgumentParser(prog=prog or "python -m jaxkd.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported classifier directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("--config", help="training config: its task section and data split")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="with --config: which split (default test if set, else eval)")
    p.add_argument("--task", help="task preset (sst2, mrpc, conll2003, ...) or custom")
    p.add_argument("--type", choices=tuple(tasks.KINDS),
                   default=None, help="task type (default: the preset's, else sequence)")
    p.add_argument("--data", metavar="FILE", help="with --task: the labelled examples")
    p.add_argument("--text", help="text column")
    p.add_argument("--text-pair", help="second text column")
    p.add_argument("--label", help="label column (default label)")
    p.add_argument("--tokens", help="word-list column of token rows (default tokens)")
    p.add_argument("--tags", help="tag-list column of token rows (default tags)")
    p.add_argument("--labels", help="label names, comma-separated (custom: default the model's)")
    p.add_argument("--metric", help="primary metric")
    p.add_argument("--tag-scheme", choices=("iob1", "iob2", "bioes"), default=None)
    p.add_argument("--by-position", action="store_true",
                   help="map model output i to the task's label i, whatever id2label says")
    add_run_flags(p, defaults=False)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parse(parser(prog), argv, intermixed=True)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except UsageError as err:
        return fail(str(err))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
