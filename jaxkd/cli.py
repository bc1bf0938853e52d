"""The `jaxkd` command: one entry point for the repository's tools.

    jaxkd train --config configs/sst2.yaml [key=value ...]   distil (train.py)
    jaxkd predict MODEL_DIR INPUT [--output OUT.jsonl]       run an exported model
    jaxkd evaluate MODEL_DIR --config X.yaml | --task NAME --data FILE   its task metrics
    jaxkd export MODEL_DIR --onnx [--int8] [--output DIR]    ONNX files of a model directory
    jaxkd bench step|epoch|mfu ...                           benchmarks (jaxkd.bench)

`jaxkd COMMAND --help` describes each.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from jaxkd import util

EXIT_USAGE = 2


def _train(argv: list[str], reexec: bool) -> int:
    from jaxkd import launch
    return launch.main(argv, reexec=reexec)


def _predict(argv: list[str], reexec: bool) -> int:
    from jaxkd import predict
    return predict.main(argv, prog="jaxkd predict")


def _evaluate(argv: list[str], reexec: bool) -> int:
    from jaxkd import evaluate
    return evaluate.main(argv, prog="jaxkd evaluate")


def _export(argv: list[str], reexec: bool) -> int:
    from jaxkd import export
    return export.main(argv, prog="jaxkd export")


def _bench(argv: list[str], reexec: bool) -> int:
    from jaxkd.bench.__main__ import main
    return main(argv, reexec=reexec)


# Each command gets its arguments, and whether it may re-execute the process (jaxkd.hostenv):
# only when `jaxkd` itself is the program, never when main() is called with an argv.
COMMANDS: dict[str, tuple[Callable[[list[str], bool], int], str]] = {
    "train": (_train, "distil a teacher into a student (train.py)"),
    "predict": (_predict, "predictions or embeddings of an exported model, one JSON line per row (or .npy)"),
    "evaluate": (_evaluate, "task metrics of an exported model on labelled (or STS-scored) data"),
    "export": (_export, "ONNX (fp32, int8) files of a model directory"),
    "bench": (_bench, "benchmarks: step, epoch, mfu (jaxkd.bench)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jaxkd COMMAND [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "jaxkd COMMAND --help describes each."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    util.quiet_libraries()
    reexec = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `jaxkd --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if command in ("-V", "--version"):
        from jaxkd import __version__
        print(f"jaxkd {__version__}")
        return 0
    if command not in COMMANDS:
        hint = util.did_you_mean(command, COMMANDS)
        print(f"jaxkd: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = COMMANDS[command][0](rest, reexec)
    except SystemExit as stop:  # argparse inside a command: --help (0) or a usage error (2)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
