"""How a stage's steps run: the step loop, the training loop around it, and its run-time.

Owns `run_steps`, the one loop that feeds batches to a step function and keeps its metrics
(summed on the device, read to the host one step late); `train_loop`, which runs it to a
stage's step count with checkpoints, evaluation, metric logging and preemption; the batch
iterators a stage trains on (`train_batches`); `Runtime`, the per-run process facts and sinks;
the stage records in `stages.json`; and the exceptions that stop a loop (`Preempted`,
`NonFiniteLoss`). `jaxkd.bench epoch` times `run_steps` on `train_batches`, the loop
`train.py` runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxkd import data as data_lib
from jaxkd import inference, report as report_lib, sharding, util
from jaxkd.checkpoint import Checkpointer, CheckpointError, UNUSABLE
from jaxkd.config import Config, ConfigError
from jaxkd.model import ModelConfig

log = logging.getLogger("jaxkd")


class Preempted(Exception):
    """Raised after a SIGTERM was caught and a checkpoint was written."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class ChangedSettings(ConfigError):
    """A stage's checkpoint was written with another seed, batch size or training set."""


# ---------------------------------------------------------------- run-time

def train_batches(encoded: data_lib.Encoded, data: data_lib.DataConfig, seed: int) -> Callable:
    """position -> this process's training batches of `encoded` from that position (None: the
    start), shaped by `data` (batch size, buckets, length); a set with transfer rows
    (`data.with_transfer`) gives `data.unlabeled_ratio` of each batch to them."""
    geometry = dict(seed=seed, bucket_multiple=data.bucket_multiple, max_seq_len=data.max_seq_len,
                    process_index=jax.process_index(), process_count=jax.process_count())
    if encoded.hard_weights is None:
        return lambda position: data_lib.TrainBatches(encoded, data.batch_size, position=position,
                                                      **geometry)
    per_batch = data_lib.transfer_batch_size(data.batch_size, data.unlabeled_ratio,
                                             jax.process_count())
    return lambda position: data_lib.MixedBatches(encoded, data.batch_size, per_batch,
                                                  position=position, **geometry)


class Runtime:
    """Per-run process facts, mesh, logging sinks, the preemption flag, and the settings every
    stage shares: batch geometry (`data`), checkpointing and logging."""

    def __init__(self, cfg: Config, workdir: pathlib.Path):
        self.data = cfg.data
        self.checkpoint = cfg.checkpoint
        self.log = cfg.log
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh()
        self.sink = report_lib.MetricsSink(workdir, enabled=self.is_main,
                                           tensorboard=cfg.log.tensorboard)
        self.preempt = False
        self._old_handler = None
        self.stage_started = time.perf_counter()

    def __enter__(self):
        def on_term(signum, frame):
            self.preempt = True
        try:
            self._old_handler = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: embedding code handles its own signals
            self._old_handler = None
        return self

    def __exit__(self, *exc):
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        self.sink.close()

    def should_stop(self) -> bool:
        """Whether any process received SIGTERM (agreed on by all processes)."""
        return not sharding.all_processes(not self.preempt)

    def check_stop(self, what: str) -> None:
        """Raise `Preempted` when any process received SIGTERM: for the work between steps
        (the teacher cache, evaluation, export), which a rerun redoes."""
        if self.should_stop():
            raise Preempted(f"{what}: SIGTERM received; stopped (rerun the same command to "
                            "continue: finished stages and saved checkpoints are kept)")

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size or self.data.batch_size

    def predict(self, model_cfg: ModelConfig, params, encoded: data_lib.Encoded, per_token: bool,
                desc: str = "predict") -> np.ndarray:
        """Outputs of the model for every row of `encoded` (see `jaxkd.inference`)."""
        show = self.is_main and self.log.progress
        return inference.predict(
            inference.jit_logits_fn(model_cfg, self.mesh), params, encoded, batch_size=self.eval_batch_size,
            mesh=self.mesh, bucket_multiple=self.data.bucket_multiple,
            max_seq_len=self.data.max_seq_len, per_token=per_token,
            progress=lambda it: report_lib.progress_iter(it, desc, show),
            check_stop=lambda: self.check_stop(desc))


# ---------------------------------------------------------------- stage records

def read_stages(workdir: pathlib.Path) -> dict:
    """The finished stages recorded in `workdir/stages.json` ({} before the first)."""
    path = pathlib.Path(workdir) / "stages.json"
    if not path.is_file():
        return {}
    try:
        stages = json.loads(path.read_text())
        if isinstance(stages, dict):
            return stages
        problem = "not a mapping of stages"
    except (ValueError, UnicodeDecodeError) as e:
        problem = str(e)
    # Only a record: each stage is found again from its checkpoints, and rewritten when done.
    log.warning("%s is unreadable (%s); ignoring it: each stage resumes from its checkpoints",
                path, problem)
    return {}


def write_stages(workdir: pathlib.Path, stages: dict) -> None:
    """Replace `workdir/stages.json` with `stages`, whole or not at all."""
    util.write_atomic(pathlib.Path(workdir) / "stages.json",
                      lambda tmp: tmp.write_text(json.dumps(stages, indent=2)))


def mark_stage(rt: Runtime, name: str, info: dict) -> None:
    """Record stage `name` as done, with its wall time and `info` (main process only)."""
    if not rt.is_main:
        return
    stages = read_stages(rt.workdir)
    if stages.get(name, {}).get("done"):  # a rerun that found the stage finished keeps its record
        rt.stage_started = time.perf_counter()
        return
    # Wall time of this process's part of the stage (a resumed stage counts its last part only).
    seconds = time.perf_counter() - rt.stage_started
    stages[name] = {"done": True, "seconds": round(seconds, 1), **info}
    rt.stage_started = time.perf_counter()
    write_stages(rt.workdir, stages)


def total_steps(configured: int | None, epochs: float, epoch_steps: int) -> int:
    """A stage's steps: as configured, else `epochs` epochs of `epoch_steps` (at least one)."""
    return configured if configured is not None else max(1, math.ceil(epochs * epoch_steps))


def _eval_points(total: int, epoch_steps: int, every: int | None) -> set[int]:
    every = every or epoch_steps
    return set(range(every, total, every)) | {total}


# ---------------------------------------------------------------- the step loop

@jax.jit
def _add(a, b):
    return jax.tree.map(lambda x, y: x + y, a, b)


@dataclasses.dataclass
class StepMetrics:
    """The metrics of the steps `run_steps` has run: the newest step's (`last`, on the device),
    their sum since the window was last read (`window_sum` over `window_steps` steps, summed on
    the device), and the step whose metrics wait to be read and checked on the host (`pending`).

    `check(host_metrics, step)` looks at one step's metrics on the host and raises to stop
    (`NonFiniteLoss`); it returns the step's loss.
    """

    check: Callable[[dict, int], float]
    last: Any = None
    window_sum: Any = None
    window_steps: int = 0
    pending: tuple[int, Any] | None = None

    def add(self, step: int, metrics: Any) -> None:
        """Step `step` (counted from 1) was dispatched with `metrics`; check the one before it,
        whose values are ready by now, while this one runs."""
        self.last = metrics
        self.window_sum = metrics if self.window_sum is None else _add(self.window_sum, metrics)
        self.window_steps += 1
        if self.pending is not None:  # pull step n-1 while step n runs
            self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Check the step still waiting to be checked, if any."""
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self.check(jax.device_get(metrics), step)

    def sync(self, step: int) -> float:
        """Wait for the newest step (`step`) and check it now; returns its loss."""
        self.pending = None
        return self.check(jax.device_get(self.last), step)

    def read_window(self) -> tuple[dict[str, float], int]:
        """Means over the window's steps (host floats) with the newest step's learning rate (a
        rate, not a mean), and how many steps they average; the window starts again."""
        steps = self.window_steps
        means = {k: float(v) / steps for k, v in jax.device_get(self.window_sum).items()}
        means["learning_rate"] = float(jax.device_get(self.last).get("learning_rate", float("nan")))
        self.window_sum, self.window_steps = None, 0
        return means, steps


def finite_loss(metrics: dict, step: int) -> float:
    """The default check of `run_steps`: the step's loss, which must be finite."""
    loss = float(metrics["loss/total"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {loss} at step {step}")
    return loss


def run_steps(step_fn: Callable, state, batches: Iterator, *, rng: jax.Array, mesh, stop: int,
              start: int = 0, prepare_batch: Callable = lambda b: b,
              check: Callable[[dict, int], float] = finite_loss,
              after_step: Callable | None = None):
    """Run `state, metrics = step_fn(state, batch, rng)` for steps `start`..`stop - 1`.

    Each batch is `prepare_batch(next(batches))` made global on `mesh`; step i's dropout key is
    `fold_in(rng, i)`, a pure function of the seed and the step, so a run resumed at `start`
    draws the same bits as an uninterrupted one. Every step's metrics are summed on the device
    (`StepMetrics`) and checked on the host (`check`) one step late, while the next step runs;
    the last step is checked before this returns. `after_step(done, state, metrics)` runs after
    each step (`done`: the steps run so far, this one included, as a checkpoint counts them)
    and may `metrics.sync(done)`, read the window or raise to stop. Returns (state, metrics).
    """
    metrics = StepMetrics(check)
    for step in range(start, stop):
        batch = prepare_batch(next(batches))
        state, step_metrics = step_fn(state, sharding.global_batch(batch, mesh),
                                      jax.random.fold_in(rng, step))
        metrics.add(step + 1, step_metrics)
        if after_step is not None:
            after_step(step + 1, state, metrics)
    metrics.flush()
    return state, metrics


# ---------------------------------------------------------------- the training loop

def _groups(position: dict | None) -> dict[str, dict]:
    """The row groups of a data position (`TrainBatches`: labelled; `MixedBatches`: both)."""
    if not position:
        return {}
    if "labelled" in position:
        return {k: position[k] for k in ("labelled", "transfer") if position.get(k)}
    return {"labelled": position}


def changed_settings(meta: dict, fresh_position: dict, seed: int, seed_offset: int = 0) -> list[str]:
    """The settings a checkpoint's `meta` was written with that differ from this run's, as
    "key: old -> new" (config keys where one is known): the seed (`seed`: the stage's seed less
    `seed_offset`, what the stage adds to the config's), the batch size, the training rows.
    `fresh_position`: the position of this run's batches at the start."""
    out = []
    saved_seed = meta.get("seed")
    if saved_seed is not None and int(saved_seed) != seed:
        out.append(f"seed: {int(saved_seed) - seed_offset} -> {seed - seed_offset}")
    old, new = _groups(meta.get("data")), _groups(fresh_position)
    if old and new:
        size = lambda groups: sum(int(g.get("batch_size", 0)) for g in groups.values())  # noqa: E731
        transfer = lambda groups: int(groups.get("transfer", {}).get("batch_size", 0))  # noqa: E731
        if size(old) != size(new):
            out.append(f"data.batch_size: {size(old)} -> {size(new)}")
        elif transfer(old) != transfer(new):
            out.append(f"data.unlabeled_ratio: {transfer(old)} -> {transfer(new)} transfer rows "
                       "per batch")
        for group, keys in (("labelled", "data.train"),
                            ("transfer", "data.unlabeled or distill.augment")):
            a = int(old.get(group, {}).get("num_examples", 0))
            b = int(new.get(group, {}).get("num_examples", 0))
            if a != b:
                out.append(f"{group} training rows ({keys}): {a} -> {b}")
    return out


def train_loop(rt: Runtime, stage: str, *, state, step_fn: Callable, make_batches: Callable,
               total_steps: int, epoch_steps: int, eval_every: int | None, eval_fn: Callable | None,
               seed: int, prepare_batch: Callable = lambda b: b, seed_offset: int = 0):
    """Run `step_fn(state, batch, rng)` to `total_steps` (`run_steps`), resuming from the
    stage's newest complete checkpoint (`Checkpointer.restore_first_usable`: an incomplete or
    corrupt one is moved aside with a warning; none usable starts the stage again).

    Returns (state, checkpointer). `make_batches(position)` builds the data iterator at a
    saved position (None: the start). `seed_offset`: what the stage adds to the config's `seed`
    (for messages). Logged metrics are means over the steps since the previous log line,
    summed on the device. A checkpoint written with another seed, batch size or training set
    is refused (`ChangedSettings`), one of another model's shape too (`CheckpointError`).
    """
    ckpt_cfg = rt.checkpoint
    ckpt = Checkpointer(rt.workdir / "checkpoints" / stage, keep=ckpt_cfg.keep,
                        keep_best=ckpt_cfg.keep_best and eval_fn is not None, stage=stage)
    start, position, latest = 0, None, None
    saved = sorted(ckpt.all_steps(), reverse=True)
    found = ckpt.restore_first_usable(saved, state) if saved else None
    if found is not None:
        latest, restored, meta = found
        changed = changed_settings(meta, make_batches(None).position, seed, seed_offset)
        if changed:
            raise ChangedSettings(
                f"{stage}: checkpoint {ckpt.step_dir(latest)} was written with other settings "
                f"({'; '.join(changed)}); use a new workdir, or --restart {stage} to run the "
                "stage again with these")
        state = restored
        start, position = int(meta["batches"]), meta["data"]
        log.info("%s: resuming at step %d from %s", stage, start, ckpt.directory)
    elif saved:
        log.warning("%s: no usable checkpoint in %s (each was moved to %s); starting the stage "
                    "from scratch", stage, ckpt.directory, ckpt.directory / UNUSABLE)
    rt.sink.truncate(stage, start)  # rows after the restored step (all, from scratch) go
    batches = make_batches(position)
    evals = _eval_points(total_steps, epoch_steps, eval_every)
    bar = report_lib.progress(stage, total_steps, start, enabled=rt.is_main and rt.log.progress)
    examples = rt.data.batch_size
    t_start = time.perf_counter()

    def check(step_metrics, step):
        loss = float(step_metrics["loss/total"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"{stage}: the loss became {loss} at step {step}; stopping. The newest good "
                f"checkpoint in {ckpt.directory} is left intact (step {ckpt.latest_step()}). Lower "
                "optim.learning_rate, check the data, or use precision.compute=float32.")
        return loss

    def save(step, state, eval_metric=None, eval_pending=False):
        meta = {"batches": step, "data": batches.position, "seed": seed, "stage": stage}
        if eval_pending:  # stopped during this step's evaluation: a resume runs it first
            meta["eval_pending"] = True
        ckpt.save(step, state, meta, eval_metric=eval_metric)

    def evaluate(done: int, state) -> float:
        scores = eval_fn(state)
        rt.sink.write({"stage": stage, "step": done, "split": "eval", **scores})
        return scores[next(iter(scores))]

    if found is not None and meta.get("eval_pending") and eval_fn is not None:
        log.info("%s: evaluating step %d, interrupted before the stop", stage, start)
        eval_metric = evaluate(start, state)
        ckpt.delete(start)  # saved again with its metric: a candidate for the best, as unstopped
        save(start, state, eval_metric)

    def after_step(done: int, state, metrics: StepMetrics) -> None:
        log_now = done % rt.log.every_steps == 0 or done == total_steps
        if log_now or done in evals or done % ckpt_cfg.every_steps == 0:
            loss = metrics.sync(done)
            rate = examples * (done - start) / max(time.perf_counter() - t_start, 1e-9)
            if log_now:
                means, averaged = metrics.read_window()
                rt.sink.write({**means, "stage": stage, "step": done, "loss": means["loss/total"],
                               "examples_per_second": rate, "steps_averaged": averaged})
            bar.update(done, loss, rate)
        eval_metric = None
        if done in evals and eval_fn is not None:
            try:
                eval_metric = evaluate(done, state)
            except Preempted:  # keep the steps trained since the last checkpoint
                metrics.flush()
                save(done, state, eval_pending=True)
                ckpt.wait()
                raise Preempted(f"{stage}: SIGTERM received during the evaluation of step {done}; "
                                f"checkpoint saved at step {done}, evaluated when the run resumes") from None
        if eval_metric is not None or done % ckpt_cfg.every_steps == 0 or done == total_steps:
            save(done, state, eval_metric)
        if rt.should_stop():
            metrics.flush()
            if ckpt.latest_step() != done:
                save(done, state)
            ckpt.wait()
            raise Preempted(f"{stage}: SIGTERM received; checkpoint saved at step {done}")

    try:
        state, _ = run_steps(step_fn, state, batches, rng=jax.random.key(seed), mesh=rt.mesh,
                             start=start, stop=total_steps, prepare_batch=prepare_batch,
                             check=check, after_step=after_step)
        if latest is not None and latest >= total_steps:
            log.info("%s: already at step %d", stage, latest)
    finally:
        ckpt.wait()
        bar.close()
    return state, ckpt


def restore_best(ckpt: Checkpointer, state, use_best: bool):
    """The state at the best evaluated checkpoint (`use_best`) or else the newest, and its step
    (None: no checkpoint, `state` as given). Each candidate is proven complete first; an
    incomplete or corrupt best gives way to the newest complete one (with a warning), and none
    usable is a `CheckpointError`."""
    newest_first = sorted(ckpt.all_steps(), reverse=True)
    if not newest_first:
        return state, None
    best = ckpt.best_step() if use_best else None
    wanted = newest_first[0] if best is None else best
    candidates = [wanted] + [s for s in newest_first if s != wanted]
    found = ckpt.restore_first_usable(candidates, state)
    if found is None:
        raise CheckpointError(
            f"no usable checkpoint left in {ckpt.directory} (each was moved to "
            f"{ckpt.directory / UNUSABLE}); delete {ckpt.directory} and rerun to train the "
            f"{ckpt.stage} stage again")
    step, restored, _ = found
    if step != wanted:
        log.warning("%s: using the checkpoint of step %d instead of step %d", ckpt.stage, step,
                    wanted)
    return restored, step
