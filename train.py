"""Distil a BERT teacher into a small student: python train.py --config configs/sst2.yaml [key=value ...]

The logic lives in `jaxkd.launch` (also the installed `jaxkd train`); see --help.
"""
import sys

from jaxkd.launch import main

if __name__ == "__main__":
    sys.exit(main(reexec=True))
