"""`bench step`: one distillation step at fixed shapes, its median seconds and the params'
digest after it; the teacher forward and the student update apart (`--breakdown`); a trace of
it (`--profile`); and the step alternated with the PyTorch reference (`--vs-torch`).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxkd import hf, sharding, steps, util
from jaxkd.bench.common import (StepSetup, adamw, last_float, load_teacher, memory_line,
                                params_digest, random_batch, run_child, seconds, spread_layers,
                                step_keys)
from jaxkd.bench.torch_ref import torch_step_cmd
from jaxkd.losses import LossConfig
from jaxkd.model import ModelConfig
from jaxkd.student import student_from_teacher


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
    on_cache = dataclasses.replace(p, batch=cached, step=cached_step, teacher_params=None)
    student_t = time_step(on_cache, setup)
    p.state = on_cache.state  # the step donated the state it was given: p's old buffers are gone
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


def run_step(setup: StepSetup, breakdown: bool, profile: pathlib.Path | None = None,
             prepare: Callable[[StepSetup], Prepared] = prepare_step) -> float:
    """Time the step `prepare` builds (default: logit KD; `jaxkd.bench.general`'s for general
    distillation) and print its line, digest, memory and median."""
    t0 = time.perf_counter()
    p = prepare(setup)
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


def step_vs_torch(a: argparse.Namespace) -> float:
    """Alternate jaxkd and PyTorch runs (fresh processes) and print the ratio of medians: to
    each PyTorch dtype asked for, the first of them printed last."""
    if a.warmup < 1:  # jaxkd's first step compiles; PyTorch's reference always runs one untimed
        raise SystemExit("--vs-torch needs --warmup >= 1: jaxkd's first step compiles, and a "
                         "timed compile is no step time")
    shapes = ["--student-layers", str(a.student_layers), "--batch", str(a.batch), "--seq", str(a.seq),
              "--steps", str(a.steps), "--warmup", str(a.warmup), "--temperature", str(a.temperature)]
    if not a.general:  # general distillation's terms have their own weights
        shapes += ["--alpha", str(a.alpha)]
    contenders = {"jaxkd": [sys.executable, "-m", "jaxkd.bench", "step", "--teacher", a.teacher, *shapes,
                            "--dtype", a.dtype, "--rng-impl", a.rng_impl,
                            *(["--breakdown"] if a.breakdown else []),
                            *(["--general"] if a.general else [])]}
    torch_args = ["--teacher", str(hf.resolve_dir(a.teacher)), *shapes, "--threads", str(util.usable_cores())]
    torch_dtypes = a.torch_dtype.split(",")
    for dtype in torch_dtypes:
        contenders[f"torch-{dtype}"] = torch_step_cmd(a.torch_script, torch_args, dtype)
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(a.rounds):
        for name, cmd in contenders.items():
            out = run_child(cmd, name)
            results[name].append(last_float(out, name))
            print(f"round {r + 1} {name}: {results[name][-1]:.4f} s/step | "
                  + " | ".join(out.strip().splitlines()[:-1]), flush=True)
    medians = {name: statistics.median(times) for name, times in results.items()}
    print("median of rounds: " + ", ".join(f"{name} {m:.4f} s" for name, m in medians.items())
          + f" ({util.usable_cores()} threads each)")
    ratios = {dtype: medians["jaxkd"] / medians[f"torch-{dtype}"] for dtype in torch_dtypes}
    print(f"jaxkd {a.dtype} / PyTorch: " + ", ".join(f"{r:.3f} against {d}" for d, r in ratios.items()))
    print(memory_line() + " (this parent process)")
    print(f"{ratios[torch_dtypes[0]]:.3f}")
    return ratios[torch_dtypes[0]]


def setup_from_args(a: argparse.Namespace) -> StepSetup:
    return StepSetup(teacher=a.teacher, student_layers=a.student_layers, batch=a.batch, seq=a.seq,
                     steps=a.steps, warmup=a.warmup, temperature=a.temperature, alpha=a.alpha,
                     dtype=a.dtype, rng_impl=a.rng_impl)
