"""`bench epoch`: one distillation epoch over a task's training file end to end, jaxkd against
the PyTorch loop of `jaxkd.bench.torch_ref`, each in a fresh process (`--impl both`).

The jaxkd side runs what `train.py`'s distill stage runs: the batches of `jaxkd.loop.train_batches`
through `jaxkd.loop.run_steps`, the teacher's logits from an on-disk cache. Both sides update with
AdamW at PyTorch's defaults (`common.adamw`: no gradient clipping, a constant rate), so they do
the same work; `train.py`'s default also clips the global norm, one more pass over the gradients.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxkd import cache as cache_lib
from jaxkd import data as data_lib
from jaxkd import hf, inference, loop, sharding, steps, tasks, util
from jaxkd.bench.common import (CONLL_TRAIN, DEFAULT_RNG_IMPL, RANDOM_BASE, REPO, RESULT, SQUAD_TRAIN,
                                SST2_TRAIN, STS_TRAIN, adamw, load_teacher, memory_line,
                                run_child, spread_layers)
from jaxkd.bench.torch_ref import torch_epoch
from jaxkd.losses import LossConfig
from jaxkd.model import ModelConfig
from jaxkd.student import student_from_teacher


@dataclasses.dataclass(frozen=True)
class EpochTask:
    """A task `epoch` runs: jaxkd's resolved task, its default --train file and that file's layout."""

    config: tasks.TaskConfig
    train: pathlib.Path
    layout: str  # what --train must hold, for the error when it is missing
    max_seq_len: int = 128  # the task's usual window

    @property
    def task(self) -> tasks.Task:
        return tasks.resolve(self.config)


EPOCH_TASKS = {
    "sst2": EpochTask(tasks.task_config(name="sst2"), SST2_TRAIN,
                      "a TSV with columns sentence and label"),
    "conll2003": EpochTask(
        tasks.task_config(name="conll2003"), CONLL_TRAIN,
        "CoNLL columns (token ... tag, a blank line between sentences)"),
    # Windows of 384 tokens sharing 128 (a third, see EpochSetup), as transformers' SQuAD
    # example trains them.
    "squad": EpochTask(
        tasks.task_config(name="squad"), SQUAD_TRAIN,
        "SQuAD v1.1 JSON (data -> paragraphs -> qas)", max_seq_len=384),
    # Sentence-embedding distillation on unlabelled sentences (an STS file's pairs, scores
    # not read), sentence-transformers' MSE recipe.
    "sts": EpochTask(tasks.task_config(name="sts"), STS_TRAIN,
                     "an STS Benchmark file (or a TSV with a sentence column)"),
}


@dataclasses.dataclass(frozen=True)
class EpochSetup:
    """One distillation epoch over a task's labelled training file (EPOCH_TASKS)."""

    teacher: str  # a checkpoint with its tokenizer
    train: str
    limit: int | None  # first N examples only (sentences for conll2003, questions for squad)
    task: str = "sst2"
    student_layers: int = 3
    batch: int = 32
    max_seq_len: int = 128
    bucket_multiple: int = 8
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the hard-label CE
    dtype: str = "float32"
    rng_impl: str = DEFAULT_RNG_IMPL
    seed: int = 0

    def __post_init__(self):
        if self.task not in EPOCH_TASKS:
            raise ValueError(f"--task must be one of {', '.join(EPOCH_TASKS)}, got {self.task!r}")
        if self.teacher == RANDOM_BASE:
            raise ValueError(f"epoch needs a teacher checkpoint with a tokenizer, not {RANDOM_BASE}")
        if not pathlib.Path(self.train).is_file():
            spec = EPOCH_TASKS[self.task]
            raise FileNotFoundError(f"--train {self.train} not found; pass {spec.layout} "
                                    f"(e.g. ../{spec.train.relative_to(REPO.parent)})")
        if self.limit is not None and self.limit < self.batch:
            raise ValueError(f"--limit {self.limit} is below one batch of {self.batch}")

    @property
    def resolved_task(self) -> tasks.Task:
        # QA windows share a third of their tokens with the next (128 of 384).
        return tasks.resolve(EPOCH_TASKS[self.task].config, data_lib.DataConfig(
            train=self.train, max_seq_len=self.max_seq_len, doc_stride=self.max_seq_len // 3))

    @property
    def teacher_task(self) -> tasks.Task:
        """The task with what it reads from the teacher's directory (a sentence embedder's
        pooling)."""
        return self.resolved_task.for_teacher(hf.resolve_dir(self.teacher))

    @property
    def per_token(self) -> bool:
        return self.resolved_task.outputs_per_token


def read_examples(setup: EpochSetup):
    examples = setup.resolved_task.load(data_lib.DataConfig(train=setup.train), setup.train)
    n = len(examples) if setup.limit is None else min(setup.limit, len(examples))
    return examples.subset(np.arange(n), examples.source)


def fill_teacher_logits(teacher_cfg: ModelConfig, teacher_params: Any, encoded: data_lib.Encoded,
                        setup: EpochSetup, mesh) -> np.ndarray:
    """The teacher's logits for every training example (what the trainer's cache stores):
    [N, C], or [T, C] per token for a token task."""
    return inference.predict(inference.jit_logits_fn(teacher_cfg, mesh), teacher_params, encoded, batch_size=setup.batch, mesh=mesh,
                             bucket_multiple=setup.bucket_multiple, max_seq_len=setup.max_seq_len,
                             per_token=setup.per_token)


def teacher_cache(teacher_cfg: ModelConfig, teacher_params: Any, encoded: data_lib.Encoded,
                  setup: EpochSetup, mesh, out: dict[str, float]) -> cache_lib.TeacherLogits:
    """Fill an on-disk teacher cache, then read it back as a warm run would; both timed in `out`."""
    # The cache holds a row per example, or per token (back to back) for a token task.
    rows = encoded.output_rows(setup.per_token)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        cache_lib.load_or_compute(cache_dir, "bench", rows, lambda: fill_teacher_logits(
            teacher_cfg, teacher_params, encoded, setup, mesh))
        out["cache_fill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        table, hit = cache_lib.load_or_compute(cache_dir, "bench", rows, lambda: None)
        # np.array reads the memory map whole before the directory goes.
        cached = cache_lib.TeacherLogits(np.array(table), encoded, per_token=setup.per_token)
        out["cache_read_s"] = time.perf_counter() - t0
        assert hit
    return cached


def jaxkd_epoch(setup: EpochSetup) -> dict[str, float]:
    """Seconds of data (read + tokenise), teacher-cache fill and read, and the epoch's steps.

    The epoch is the distill stage's loop (`jaxkd.loop.run_steps` on `jaxkd.loop.train_batches`,
    the teacher's logits attached from the cache). Model loading is outside every timer (as on
    the PyTorch side); each bucket shape compiles inside the epoch when its first batch comes,
    as a fresh training run pays it.
    """
    task = setup.teacher_task
    teacher_dir = task.encoder_dir(hf.resolve_dir(setup.teacher))
    teacher_cfg, teacher_params = load_teacher(str(teacher_dir), setup.dtype, head=task.head())
    tokenizer = hf.load_tokenizer(teacher_dir)
    student_cfg, params = student_from_teacher(
        teacher_cfg, teacher_params, spread_layers(teacher_cfg.encoder.num_layers, setup.student_layers))
    mesh = sharding.make_mesh()
    state = steps.TrainState.create(params, adamw())
    state_sh, teacher_sh = sharding.tree_shardings(mesh, state), sharding.tree_shardings(mesh, teacher_params)
    state, teacher_params = sharding.place(state, state_sh), sharding.place(teacher_params, teacher_sh)
    loss_cfg = LossConfig(temperature=setup.temperature, alpha=1.0 - setup.alpha)
    step = sharding.jit_distill_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, teacher="cached",
                                objective=task.objective(student_cfg.head)),
        mesh, state_sh, None)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    encoded = task.encode(read_examples(setup), tokenizer, setup.max_seq_len)
    out["data_s"] = time.perf_counter() - t0
    cached = teacher_cache(teacher_cfg, teacher_params, encoded, setup, mesh, out)
    geometry = data_lib.DataConfig(batch_size=setup.batch, bucket_multiple=setup.bucket_multiple,
                                   max_seq_len=setup.max_seq_len)
    batches = loop.train_batches(encoded, geometry, setup.seed)(None)
    t0 = time.perf_counter()
    loop.run_steps(lambda state, batch, rng: step(state, None, batch, rng), state, batches,
                   rng=jax.random.key(setup.seed, impl=setup.rng_impl), mesh=mesh,
                   stop=batches.epoch_steps, prepare_batch=cached.attach)
    out["epoch_s"] = time.perf_counter() - t0
    out.update(examples=batches.epoch_steps * setup.batch, steps=batches.epoch_steps,
               shapes=len(_epoch_lengths(encoded, setup)))
    out["warm_s"] = out["data_s"] + out["cache_read_s"] + out["epoch_s"]
    out["cold_s"] = out["data_s"] + out["cache_fill_s"] + out["epoch_s"]
    return out


def _epoch_lengths(encoded: data_lib.Encoded, setup: EpochSetup) -> tuple[int, ...]:
    """The bucket lengths the first epoch's batches use."""
    stats = data_lib.padding_stats(encoded, setup.batch, bucket_multiple=setup.bucket_multiple,
                                   max_seq_len=setup.max_seq_len, seed=setup.seed, epoch=0)
    return tuple(length for _, length in stats.shapes)


def _describe_epoch(name: str, r: dict[str, float]) -> str:
    parts = " ".join(f"{k}={v:.2f}" for k, v in r.items() if k.endswith("_s"))
    return (f"{name}: {r['examples']:.0f} examples in {r['steps']:.0f} steps, warm {r['warm_s']:.1f} s "
            f"({r['examples'] / r['warm_s']:.1f} ex/s), cold {r['cold_s']:.1f} s "
            f"({r['examples'] / r['cold_s']:.1f} ex/s) [{parts}]")


def run_epoch(setup: EpochSetup, impl: str) -> float:
    result = jaxkd_epoch(setup) if impl == "jaxkd" else torch_epoch(setup)
    print(_describe_epoch(impl, result))
    print(memory_line())
    print(RESULT + json.dumps(result))
    print(f"{result['warm_s']:.3f}")
    return result["warm_s"]


def epoch_both(a: argparse.Namespace, setup: EpochSetup) -> float:
    """Alternate jaxkd and PyTorch epochs in fresh processes; ratio of median warm wall times."""
    flags = _epoch_argv(setup)
    results: dict[str, list[dict]] = {"jaxkd": [], "torch": []}
    for r in range(a.rounds):
        for impl in results:
            out = run_child([sys.executable, "-m", "jaxkd.bench", "epoch", "--impl", impl, *flags], impl)
            line = next(l for l in out.splitlines() if l.startswith(RESULT))
            results[impl].append(json.loads(line[len(RESULT):]))
            mem = next(l for l in out.splitlines() if l.startswith("peak host memory"))
            print(f"round {r + 1} " + _describe_epoch(impl, results[impl][-1]) + f"; {mem}", flush=True)
    med = {impl: {k: statistics.median(x[k] for x in rs) for k in ("warm_s", "cold_s")}
           for impl, rs in results.items()}
    n = results["jaxkd"][0]["examples"]
    for impl, m in med.items():
        print(f"median {impl}: warm {m['warm_s']:.1f} s ({n / m['warm_s']:.1f} ex/s), "
              f"cold {m['cold_s']:.1f} s ({n / m['cold_s']:.1f} ex/s)")
    print(f"cold ratio jaxkd/PyTorch {med['jaxkd']['cold_s'] / med['torch']['cold_s']:.3f}; "
          f"task {setup.task}; teacher: "
          + ("fresh classifier head (speed only, not fine-tuned); " if setup.resolved_task.finetunes
             else "used as it is; ")
          + f"{util.usable_cores()} threads each")
    ratio = med["jaxkd"]["warm_s"] / med["torch"]["warm_s"]
    print(f"{ratio:.3f}")
    return ratio


def _epoch_argv(s: EpochSetup) -> list[str]:
    """The flags that give a child process this setup."""
    return ["--task", s.task, "--teacher", s.teacher, "--train", str(s.train), "--batch", str(s.batch),
            "--student-layers", str(s.student_layers), "--max-seq-len", str(s.max_seq_len),
            "--temperature", str(s.temperature), "--alpha", str(s.alpha), "--dtype", s.dtype,
            "--rng-impl", s.rng_impl, *(["--limit", str(s.limit)] if s.limit else [])]


def setup_from_args(a: argparse.Namespace) -> EpochSetup:
    train = a.train if a.train is not None else EPOCH_TASKS[a.task].train
    return EpochSetup(teacher=a.teacher, train=str(train), limit=a.limit, task=a.task,
                      student_layers=a.student_layers, batch=a.batch,
                      max_seq_len=a.max_seq_len or EPOCH_TASKS[a.task].max_seq_len,
                      temperature=a.temperature, alpha=a.alpha, dtype=a.dtype, rng_impl=a.rng_impl)
