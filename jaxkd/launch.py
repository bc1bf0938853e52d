"""The command line of a training run: `python train.py` and `jaxkd train` both call `main`.

  python train.py --config configs/sst2.yaml [key=value ...] [--check]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxkd import hostenv


def _quiet_libraries() -> None:
    """A run prints its own lines only: no notices from libraries at import or load time."""
    # transformers announces at import that PyTorch is absent (it is not needed here).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("absl", "jax", "matplotlib", "orbax", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def main(argv=None, *, reexec: bool = False) -> int:
    """`reexec`: this is the process's entry point, free to re-execute itself first with huge
    pages for XLA's CPU buffers (jaxkd.hostenv)."""
    if reexec:
        hostenv.reexec_with_huge_pages()
    _quiet_libraries()
    from jaxkd import config as config_lib
    from jaxkd.data import DataError

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # After basicConfig: importing orbax installs a root handler, which would make it a no-op.
    from jaxkd import loop, plan, trainer
    _quiet_libraries()
    if reexec:
        logging.getLogger("jaxkd").info("host memory: %s", hostenv.describe())
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        if args.check:
            print(plan.describe(cfg, plan.prepare(cfg, write_cache=False)))
            return 0
        report = trainer.run(cfg)
    except (config_lib.ConfigError, DataError) as e:
        print(f"config error: {e}" if isinstance(e, config_lib.ConfigError) else f"data error: {e}",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    print(f"report: {os.path.join(cfg.workdir, 'report.json')}")
    s, t = report["student"]["metrics"], report["teacher"]["metrics"]
    print("teacher " + " ".join(f"{k}={v:.4f}" for k, v in t.items()))
    print("student " + " ".join(f"{k}={v:.4f}" for k, v in s.items()))
    return 0
