"""Distil a BERT teacher into a small student: python train.py --config configs/sst2.yaml [key=value ...]"""
import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    from jaxkd import config as config_lib

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, e.g. distill.temperature=4 data.batch_size=64\n"
               "sections and their keys:\n" + config_lib.section_help())
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "matplotlib", "orbax"):  # their INFO lines drown the progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        if cfg.distributed.cpu_devices:
            import jax
            jax.config.update("jax_num_cpu_devices", cfg.distributed.cpu_devices)
        from jaxkd import trainer
        report = trainer.run(cfg)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except trainer.Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    print(f"report: {os.path.join(cfg.workdir, 'report.json')}")
    s, t = report["student"]["metrics"], report["teacher"]["metrics"]
    print("teacher " + " ".join(f"{k}={v:.4f}" for k, v in t.items()))
    print("student " + " ".join(f"{k}={v:.4f}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
