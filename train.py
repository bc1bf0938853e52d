"""Distil a BERT teacher into a small student: python train.py --config configs/sst2.yaml [key=value ...]

The logic lives in `jaxkd.launch` (also the installed `jaxkd train`); see --help.
"""
import sys

if __name__ == "__main__":  # imported only here: spawned worker processes re-import this file
    from jaxkd.launch import main

    sys.exit(main(reexec=True))
