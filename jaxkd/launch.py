"""The command line of a training run: `python train.py` and `jaxkd train` both call `main`.

  python train.py --config configs/sst2.yaml [key=value ...] [--check] [--restart STAGE]

Every failure ends in one line on stderr: exit 2 for what the user can fix (the config, the
data, a workdir run with other settings or in use, a corrupt file, a full disk), exit 1 for
anything else; `--verbose` or JAXKD_VERBOSE=1 prints the traceback first.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import threading
import traceback

from jaxkd import hostenv


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def parser() -> argparse.ArgumentParser:
    from jaxkd import config as config_lib

    p = argparse.ArgumentParser(
        prog="train.py", description="Distil a BERT teacher into a small student.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, e.g. distill.temperature=4 data.batch_size=64\n"
               "sections and their keys:\n" + config_lib.section_help())
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, read the data and the teacher's config, print the "
                        "plan and exit without training or writing anything")
    p.add_argument("--restart", metavar="STAGE",
                   help="redo this stage (teacher, distill, baseline, export, report) and every "
                        "stage after it: their checkpoints and outputs in the workdir are removed "
                        "once the config has been validated")
    p.add_argument("--verbose", action="store_true",
                   help="print the traceback of a failure (also: JAXKD_VERBOSE=1)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def failure_line(e: BaseException) -> tuple[str, int]:
    """The one line a failure is reported with, and the exit code."""
    from jaxkd import config as config_lib, lock, loop, sharding
    from jaxkd.data import DataError
    from jaxkd.families.base import CheckpointError

    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or \
                "No space left on device" in str(cause):
            where = getattr(cause, "filename", None)
            if where is None:  # tensorstore names the file inside its message
                named = re.search(r'"(/[^"]+)"', str(cause))
                where = named.group(1) if named else None
            detail = getattr(cause, "strerror", None) or ""
            detail = detail.split(": ", 1)[1] if detail.startswith("No space left on device: ") else ""
            return (f"disk full{f' writing {where}' if where else ''}"
                    f"{f' ({detail})' if detail else ''}: free space (or point "
                    "workdir / data.cache_dir elsewhere) and rerun the same command; the run "
                    "resumes from its newest complete checkpoint", 2)
    kinds = [(config_lib.ConfigError, "config error", 2), (DataError, "data error", 2),
             (CheckpointError, "checkpoint error", 2), (lock.LockError, "error", 2),
             (sharding.OtherProcessFailed, "error", 2), (loop.NonFiniteLoss, "error", 1),
             ((FileNotFoundError, PermissionError, ValueError, KeyError), "error", 2)]
    for kind, prefix, code in kinds:
        if isinstance(e, kind):
            return f"{prefix}: {e}", code
    return (f"internal error: {type(e).__name__}: {e} (rerun with --verbose or JAXKD_VERBOSE=1 "
            "for the traceback)", 1)


def main(argv=None, *, reexec: bool = False) -> int:
    """`reexec`: this is the process's entry point, free to re-execute itself first with huge
    pages for XLA's CPU buffers (jaxkd.hostenv)."""
    if reexec:
        hostenv.reexec_with_huge_pages()
    from jaxkd import util

    util.quiet_libraries()
    from jaxkd import config as config_lib

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # After basicConfig: importing orbax installs a root handler, which would make it a no-op.
    from jaxkd import loop, plan, trainer
    util.quiet_libraries()
    # Some libraries log through the root logger itself (ONNX Runtime's quantiser: a line per
    # tensor). A logger's filter sees only the records made on it, so jaxkd's lines, which
    # reach the root handler by propagation, still show.
    logging.getLogger().addFilter(_warnings_only)
    if reexec and not args.check:  # a run's memory setting, for its log; --check runs nothing
        logging.getLogger("jaxkd").info("host memory: %s", hostenv.describe())
    verbose = args.verbose or os.environ.get("JAXKD_VERBOSE", "") not in ("", "0")
    if not verbose:  # orbax logs each failed background write with its traceback (absl)
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        if args.check:
            print(plan.describe(cfg, plan.prepare(cfg, write_cache=False)))
            return 0
        report = trainer.run(cfg, restart=args.restart)
    except loop.Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    except Exception as e:  # pylint: disable=broad-except
        if verbose:
            traceback.print_exc()
        else:  # threads left behind by a failed save (orbax) must not print after the line
            threading.excepthook = lambda hook_args: None
        line, code = failure_line(e)
        print(line, file=sys.stderr)
        if reexec and not verbose:
            # The process's entry point: end now, before interpreter shutdown runs the
            # callbacks of half-finished background writes, each with its own traceback.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    print("\n".join(summary_lines(report, os.path.join(cfg.workdir, "report.json"))))
    return 0


def summary_lines(report: dict, path: str) -> list[str]:
    """The last lines of a run: where its report is, and the reported split's metrics of the
    teacher, the student and, where it ran, the labels-only baseline (a figure a model does not
    have, having no head, is n/a)."""
    lines = [f"report: {path}"]
    for who in ("teacher", "student", "baseline"):
        if who in report:
            lines.append(who + " " + " ".join(f"{k}={'n/a' if v is None else format(v, '.4f')}"
                                              for k, v in report[who]["metrics"].items()))
    return lines
