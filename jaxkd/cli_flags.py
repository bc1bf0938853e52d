"""The command-line flags `jaxkd.predict` and `jaxkd.evaluate` share, how the commands report a
usage problem (`error: ...` on stderr, exit code 2), with the libraries' notices kept out of
their output (`util.quiet_libraries`).

Apart from `jaxkd.exported` (the library, which raises `UsageError`) so that the library has
no argparse or printing in it, and so that neither command imports the other.
"""
from __future__ import annotations

import argparse
import sys

from jaxkd import util
from jaxkd.data import FORMATS
from jaxkd.exported import DEFAULTS, UsageError

EXIT_USAGE = 2


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Window, batching, format and precision flags. All default to None: the run takes the
    model's settings (config.json's `jaxkd` key), else the built-in defaults named here."""
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per row, [CLS] and [SEP] included; question answering: the "
                        "length of each context window (default: the model's, as it was "
                        f"trained, else {DEFAULTS['max_seq_len']})")
    p.add_argument("--doc-stride", type=int, default=None,
                   help="question answering: tokens shared by neighbouring context windows "
                        "(default: the model's when --max-seq-len is its length, else a "
                        "quarter of --max-seq-len)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--bucket-multiple", type=int, default=None,
                   help=f"batch lengths are multiples of this (default {DEFAULTS['bucket_multiple']})")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="input format (default: by the file's suffix)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default float32)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar, settings or summary on stderr")


def parse(p: argparse.ArgumentParser, argv, intermixed: bool = False) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code argparse chose (--help: 0, a bad flag: 2)."""
    try:
        return p.parse_intermixed_args(argv) if intermixed else p.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE


def check_run_flags(args: argparse.Namespace) -> None:
    for flag in ("max_seq_len", "batch_size", "bucket_multiple", "doc_stride"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.max_seq_len is not None and args.max_seq_len < 3:
        raise UsageError(f"--max-seq-len must be >= 3 ([CLS] token [SEP]), got {args.max_seq_len}")


def run_main(p: argparse.ArgumentParser, run, argv, intermixed: bool = False) -> int:
    """A command's main(): parse `argv`, then `run(args)`; a `UsageError` becomes `error: ...`
    on stderr and exit code 2, as does a bad flag (argparse's own exit codes pass through)."""
    util.quiet_libraries()
    args = parse(p, argv, intermixed=intermixed)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except UsageError as err:
        return fail(str(err))


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


__all__ = ["EXIT_USAGE", "UsageError", "add_run_flags", "check_run_flags", "fail", "parse"]
