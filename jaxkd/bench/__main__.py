"""The command line of `python -m jaxkd.bench` and `jaxkd bench`: `parser` and `main`, which
hands each command to its module (`step`, `epoch`, `mfu`, `deploy`); the description is the package's.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

import jaxkd.bench
from jaxkd import hostenv, util
from jaxkd.bench import deploy, epoch, general, mfu, step
from jaxkd.bench.common import DEFAULT_RNG_IMPL, MINILM, RANDOM_BASE, TORCH_STEP_SCRIPT
from jaxkd.bench.epoch import EPOCH_TASKS


def _add_step_flags(p: argparse.ArgumentParser, batch: int | None, seq: int | None,
                    layers: int | None, dtype: str | None, teacher: str | None) -> None:
    p.add_argument("--teacher", default=teacher,
                   help=f"checkpoint directory, pkg:<module> or {RANDOM_BASE} (default {teacher})")
    p.add_argument("--student-layers", type=int, default=layers)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=dtype)
    p.add_argument("--rng-impl", default=DEFAULT_RNG_IMPL,
                   choices=("threefry2x32", "rbg", "unsafe_rbg"), help="PRNG of the dropout keys")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxkd.bench", description=jaxkd.bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="median seconds of one distillation step")
    _add_step_flags(s, 32, 128, 3, "float32", MINILM)
    s.add_argument("--vs-torch", action="store_true", help="alternate with the PyTorch reference")
    s.add_argument("--general", action="store_true",
                   help="general distillation's step on masked rows (DistilBERT's objectives: KD on "
                        "the masked-LM distributions, masked-LM CE, cosine), against its own "
                        "PyTorch reference (jaxkd/bench/torch_general.py)")
    s.add_argument("--rounds", type=int, default=3, help="alternations with --vs-torch")
    s.add_argument("--torch-script", type=pathlib.Path, default=None,
                   help=f"default: {TORCH_STEP_SCRIPT}, or with --general "
                        f"{general.TORCH_SCRIPT.name} beside this module")
    s.add_argument("--torch-dtype", default="float32",
                   choices=("float32", "bfloat16", "float32,bfloat16", "bfloat16,float32"),
                   help="the reference as is (float32) and/or inside torch.autocast('cpu', bfloat16); "
                        "the first one's ratio is printed last")
    s.add_argument("--breakdown", action="store_true",
                   help="also time the teacher forward and the student update separately")
    s.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                   help="after timing, trace two steps into DIR and print the busiest op kinds")
    e = sub.add_parser("epoch", help="one distillation epoch, jaxkd against PyTorch")
    e.add_argument("--task", choices=tuple(EPOCH_TASKS), default="sst2",
                   help="sst2 (sentence classification), conll2003 (NER, a tag per word), "
                        "squad (extractive QA, start and end per window) or sts (sentence "
                        "embeddings from unlabelled sentences, MSE to the teacher's)")
    e.add_argument("--teacher", default=MINILM, help="checkpoint directory or pkg:<module>")
    e.add_argument("--train", type=pathlib.Path, default=None,
                   help="training file; default: the task's under ../shared/data")
    e.add_argument("--limit", type=int, default=None,
                   help="first N examples only (sentences for conll2003, questions for squad)")
    e.add_argument("--student-layers", type=int, default=3)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--max-seq-len", type=int, default=None,
                   help="default: the task's usual length (128; 384 for squad)")
    e.add_argument("--temperature", type=float, default=2.0)
    e.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--rng-impl", default=DEFAULT_RNG_IMPL, choices=("threefry2x32", "rbg", "unsafe_rbg"))
    e.add_argument("--impl", choices=("both", "jaxkd", "torch"), default="both")
    # The spelling `step` uses for the same comparison.
    e.add_argument("--vs-torch", dest="impl", action="store_const", const="both",
                   help="same as --impl both (the default)")
    e.add_argument("--rounds", type=int, default=1, help="alternations with --impl both")
    m = sub.add_parser("mfu", help="achieved FLOP/s of the distillation step, fraction of peak")
    _add_step_flags(m, None, None, None, None, None)
    m.add_argument("--peak-tflops", type=float, default=None, help="peak per chip, overrides the table")
    m.add_argument("--gemm-size", type=int, default=None,
                   help="n of the n^3 GEMM that measures the matmul rate (default 2048 on CPU, 8192 else)")
    d = sub.add_parser("deploy", help="the deployment table of a model directory: JAX, ONNX, "
                                      "int8 (and PyTorch) side by side")
    deploy.add_flags(d)
    return p


def runs_jaxkd_steps(a: argparse.Namespace) -> bool:
    """Whether this command times jaxkd in this process (a --vs-torch parent only starts children)."""
    return ((a.command == "step" and not a.vs_torch) or a.command == "mfu"
            or (a.command == "epoch" and a.impl == "jaxkd"))


def main(argv: Sequence[str] | None = None, *, reexec: bool = False) -> int:
    """`reexec`: this is the process's entry point, free to re-execute itself with huge pages
    for XLA's CPU buffers (jaxkd.hostenv) when it times jaxkd, as train.py does. PyTorch runs
    keep the environment they were given."""
    util.quiet_libraries()
    a = parser().parse_args(argv)
    if reexec and runs_jaxkd_steps(a):
        hostenv.reexec_with_huge_pages()
    if getattr(a, "profile", None) is not None and "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        # XLA's CPU backend names its ops in traces only with this flag; it is read when the
        # backend starts, so it has no effect if this process has already used JAX.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    if a.command == "step":
        if a.general and a.breakdown:
            raise SystemExit("--breakdown times logit KD's parts (the teacher-logit cache); it does "
                             "not apply to --general")
        if a.torch_script is None:
            a.torch_script = general.TORCH_SCRIPT if a.general else TORCH_STEP_SCRIPT
        if a.vs_torch:
            if not a.torch_script.is_file():
                raise FileNotFoundError(f"PyTorch reference {a.torch_script} not found; "
                                        "pass --torch-script")
            step.step_vs_torch(a)
        else:
            step.run_step(step.setup_from_args(a), a.breakdown, a.profile,
                          general.prepare_general if a.general else step.prepare_step)
    elif a.command == "epoch":
        setup = epoch.setup_from_args(a)
        if a.impl == "both":
            epoch.epoch_both(a, setup)
        else:
            epoch.run_epoch(setup, a.impl)
    elif a.command == "deploy":
        deploy.run_deploy(a)
    else:
        mfu.run_mfu(mfu.setup_from_args(a), a.peak_tflops, a.gemm_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
