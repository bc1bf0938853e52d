"""Write a model directory's deployment formats.

    python -m jaxkd.export MODEL_DIR --onnx [--int8] [--output DIR]
    jaxkd export MODEL_DIR --onnx [--int8] [--output DIR]

MODEL_DIR is any model directory jaxkd reads (a run's `student/` or `teacher/`, a Hugging Face
classifier, token classifier or question-answering model of a supported family, a
sentence-transformers directory). --onnx writes `model.onnx` (fp32; inputs `input_ids`,
`attention_mask` and, where the model has token types, `token_type_ids`, int64 [batch_size,
sequence_length]; its outputs equal jaxkd's within 1e-4), --int8 also `model.int8.onnx` (ONNX
Runtime's dynamic int8 quantisation of the matmuls against weights). They go into MODEL_DIR,
or into DIR with MODEL_DIR's other files (config, tokenizer; not its weights), so that
`jaxkd predict DIR/model.onnx INPUT` runs it. Needs the onnx extra: pip install -e '.[onnx]'.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxkd.cli_flags import EXIT_USAGE, UsageError, run_main

__all__ = ["EXIT_USAGE", "main", "parser"]


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m jaxkd.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory jaxkd reads")
    p.add_argument("--onnx", action="store_true", help="write model.onnx (fp32)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (needs --onnx)")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="write into DIR, with the model's config and tokenizer (default MODEL_DIR)")
    return p


def run(args: argparse.Namespace) -> int:
    from jaxkd import deploy
    from jaxkd.deploy import export, graph

    if not args.onnx:
        raise UsageError("nothing to write: pass --onnx (and --int8 for the int8 model too)")
    try:
        deploy.require()
    except ImportError as err:
        raise UsageError(str(err)) from err
    try:
        written = export.export_directory(args.model_dir, args.output, int8=args.int8)
    except graph.UnsupportedError as err:
        raise UsageError(f"{args.model_dir}: {err}") from err
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_main(parser(prog), run, argv)


if __name__ == "__main__":
    sys.exit(main())
