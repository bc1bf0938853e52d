"""Score an exported model on labelled data: the task metrics, one `name=value` a line, primary
first.

    python -m jaxkd.evaluate MODEL_DIR --config X.yaml [--split test|eval] [key=value ...]
    python -m jaxkd.evaluate MODEL_DIR --task NAME [--type TYPE] --data FILE [options]

With --config the task section and the split's file come from a training config (default the
test split if data.test is set, else data.eval); key=value overrides apply as in train.py, and
the config's data section (max_seq_len, doc_stride, ...) is used, flags winning.
With --task the task is a preset (sst2, mrpc, conll2003, squad, ...) or `custom` (then --text,
--label, --tokens, --tags, --metric describe it, and the label names default to the model's).

Question answering: `--task squad --data dev-v1.1.json` (SQuAD v1.1 JSON, or rows with
question, context and answers) scores F1 and exact match as the official v1.1 script does;
contexts are cut into windows of --max-seq-len tokens overlapping by --doc-stride.

With --task, a directory jaxkd exported gives the defaults it records (config.json key
`jaxkd`): the run's max_seq_len and doc_stride, and for `custom` its columns and tag scheme;
flags given win, and stderr says which were used (unless --quiet). Without them: 128 tokens, a
quarter of that as the stride.

The model's id2label must name the same labels as the task (case aside), as a teacher's must
in training. In another order, the model's outputs are reordered to the task's; transformers'
placeholders (LABEL_i) are read by position; other names are refused, unless --by-position maps
output i to the task's label i.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jaxkd import exported
from jaxkd.cli_flags import EXIT_USAGE, UsageError, add_run_flags, check_run_flags, run_main
from jaxkd.exported import evaluate_model, label_order

SPLITS = ("test", "eval")
__all__ = ["EXIT_USAGE", "evaluate_model", "label_order", "main"]


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
    config = {k: getattr(cfg.data, k) for k in exported.DATA_KEYS}
    settings = exported.run_settings(info, vars(args), config=config)
    extra = {"format": args.format} if args.format is not None else {}
    data_cfg = settings.data_config(cfg.data, **extra)
    return _with_model_labels(cfg.task, info), data_cfg, source, settings


def _from_flags(args, info):
    from jaxkd import tasks

    if args.data is None:
        raise UsageError("--task needs --data FILE (the labelled examples)")
    keys = {k: getattr(args, k) for k in ("type", "text", "text_pair", "label", "tokens", "tags",
                                          "metric", "tag_scheme") if getattr(args, k) is not None}
    kind = tasks.kind_of_head(info.head_kind)
    if args.task == "custom" and "type" not in keys:  # a custom task is of the model's kind
        keys["type"] = kind.TYPE
    settings = exported.run_settings(info, vars(args), columns=args.task == "custom")
    if args.task == "custom" and keys["type"] == kind.TYPE:  # the model's columns as defaults
        keys.update({k: v for k, v in settings.values.items()
                     if k in kind.INPUT_FLAGS and settings.origins[k] == "model"})
    if args.labels is not None:
        keys["labels"] = tuple(x.strip() for x in args.labels.split(","))
    task_cfg = tasks.task_config(name=args.task, **keys)
    data_cfg = settings.data_config(format=args.format)
    return _with_model_labels(task_cfg, info), data_cfg, args.data, settings


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
    info = exported.inspect_model(args.model_dir)
    try:
        task_cfg, data_cfg, source, settings = (_from_config if args.config else _from_flags)(args, info)
        task = tasks.resolve(task_cfg, data_cfg)
    except DataError as err:
        raise UsageError(str(err)) from err
    if not args.quiet:
        print(f"evaluate: {settings.describe(task, data_cfg)}", file=sys.stderr)
        trained = info.settings.get("max_seq_len")
        if trained is not None and trained != data_cfg.max_seq_len:
            print(f"evaluate: note: the model was exported with max_seq_len {trained}",
                  file=sys.stderr)
    scores = evaluate_model(info, task, data_cfg, source, by_position=args.by_position,
                            dtype=args.dtype, quiet=args.quiet,
                            format_flag="data.format" if args.config else "--format")
    for name, value in scores.items():
        print(f"{name}={value:.6f}")
    if not args.quiet:
        print(f"evaluate: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    from jaxkd import tasks

    p = argparse.ArgumentParser(prog=prog or "python -m jaxkd.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="exported model directory (classifier, token classifier or question answering)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("--config", help="training config: its task section and data split")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="with --config: which split (default test if set, else eval)")
    p.add_argument("--task", help="task preset (sst2, mrpc, conll2003, squad, ...) or custom")
    p.add_argument("--type", choices=tuple(tasks.KINDS),
                   default=None, help="task type (default: the preset's; custom: the model's)")
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
    add_run_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_main(parser(prog), run, argv, intermixed=True)


if __name__ == "__main__":
    sys.exit(main())
