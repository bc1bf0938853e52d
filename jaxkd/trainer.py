"""The pipeline behind train.py: teacher fine-tuning, distillation, evaluation, export.

Each stage writes into the work directory and records itself in `stages.json`
when done, so running the same command again skips finished stages and resumes
an unfinished one from its newest complete checkpoint. Everything that can be
checked is checked in `prepare` before anything is written: the task, every split,
the tokenizer, and the teacher and student configs, which are resolved there once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxkd import cache as cache_lib
from jaxkd import data as data_lib
from jaxkd import hf, inference, losses, report as report_lib, sharding, steps, tasks
from jaxkd import student as student_lib
from jaxkd import transfer as transfer_lib
from jaxkd import util
from jaxkd.checkpoint import Checkpointer
from jaxkd.config import (Config, ConfigError, DistillConfig, StudentConfig, TeacherConfig,
                          dump_config)
from jaxkd.model import ModelConfig, param_count, word_embeddings
from jaxkd.optim import OptimConfig, make_optimizer, make_schedule

log = logging.getLogger("jaxkd")


class Preempted(Exception):
    """Raised after a SIGTERM was caught and a checkpoint was written."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------- preparation

@dataclasses.dataclass(frozen=True)
class Split:
    """One split, validated and encoded."""

    source: str
    examples: Any  # the task's Examples
    encoded: data_lib.Encoded


@dataclasses.dataclass
class Plan:
    """Everything validated up front: task, data, tokenizer, teacher and student configs."""

    task: tasks.Task
    tokenizer: Any
    splits: dict[str, Split]  # train / eval / test, those given
    teacher_config: ModelConfig  # with the task's head, the run's dtype and dropout
    student_config: ModelConfig
    finetune_steps: int | None  # 0: the teacher already is a model of this task; None: from epochs
    unlabeled: list[Split] = dataclasses.field(default_factory=list)  # data.unlabeled, in order

    @property
    def data_stats(self) -> dict[str, dict]:
        """Per split: source, examples, rows the model sees, rows skipped by reason."""
        return {name: {"source": s.source, "examples": len(s.examples), "rows": len(s.encoded),
                       "skipped": dict(s.examples.skipped)} for name, s in self.splits.items()}


def _teacher_dir(teacher: TeacherConfig) -> pathlib.Path:
    try:
        return hf.resolve_dir(teacher.model)
    except FileNotFoundError as e:
        raise ConfigError(f"teacher.model {teacher.model!r}: {e}") from e


def _teacher_config(teacher: TeacherConfig, directory: pathlib.Path, task: tasks.Task,
                    dtype: str) -> tuple[ModelConfig, bool]:
    """The teacher's config with the task's head, and whether its checkpoint already is a model
    of this task (the head's architecture and label count)."""
    try:
        raw = hf.read_hf_config(directory)
        encoder = hf.config_from_hf(raw)
    except (FileNotFoundError, hf.CheckpointError) as e:
        raise ConfigError(f"teacher.model {teacher.model!r}: {e}") from e
    is_task_model = (hf.checkpoint_head_kind(raw) == task.head_kind
                     and hf.checkpoint_num_labels(raw) == task.num_labels)
    encoder = encoder.replace(dtype=dtype)
    if teacher.hidden_dropout is not None:
        encoder = encoder.replace(hidden_dropout=teacher.hidden_dropout)
    # The task's head as the teacher's family computes it (its dropout and pooler activation).
    head = hf.head_from_hf(raw, kind=task.head_kind, num_labels=task.num_labels)
    return ModelConfig(encoder, head), is_task_model


def prepare(cfg: Config, write_cache: bool = True) -> Plan:
    """Resolve and validate everything; raises before any output is written. Without
    `write_cache` nothing at all is written (the tokenised splits are not cached)."""
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give a split name or a training file")
    task = tasks.resolve(cfg.task, cfg.data)
    teacher_dir = _teacher_dir(cfg.teacher)
    teacher_cfg, is_task_model = _teacher_config(cfg.teacher, teacher_dir, task, cfg.precision.compute)
    tokenizer = hf.load_tokenizer(teacher_dir, words=task.head_kind == "token")
    steps_ = cfg.teacher.finetune.steps
    if steps_ == 0 and not is_task_model:
        raise ConfigError(
            f"teacher.model {cfg.teacher.model!r} is not a {hf.architecture(teacher_cfg)} with "
            f"{task.num_labels} labels, so it cannot teach this task untrained: set "
            "teacher.finetune.steps > 0 (or leave it unset to fine-tune for teacher.finetune.epochs)")
    finetune = steps_ if steps_ is not None else (0 if is_task_model else None)
    encoder = teacher_cfg.encoder
    if len(tokenizer) > encoder.vocab_size:
        raise ConfigError(f"teacher.model: tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary holds {encoder.vocab_size}")
    if cfg.data.max_seq_len > encoder.max_length:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the {encoder.max_length} "
                          f"positions of the teacher's max_position_embeddings="
                          f"{encoder.max_position_embeddings}")
    student_cfg = student_config(cfg.student, teacher_cfg)
    # Every split is read and validated before anything (even a tokenisation cache) is written.
    loaded = {name: (getattr(cfg.data, name), task.load(cfg.data, getattr(cfg.data, name)))
              for name in ("train", "eval", "test") if getattr(cfg.data, name) is not None}
    unlabeled = [(source, task.load_unlabeled(cfg.data, source)) for source in cfg.data.unlabeled or ()]
    if cfg.distill.augment is not None:
        task.check_augmentable(loaded["train"][1])
    if cfg.data.eval_fraction is not None:
        source, train = loaded["train"]
        kept, held = data_lib.holdout(len(train), cfg.data.eval_fraction, cfg.seed)
        where = f"{source} ({len(held)} of {len(train)} held out, seed {cfg.seed})"
        loaded = {"train": (source, train.subset(kept, train.source)),
                  "eval": (where, train.subset(held, where)),
                  **{name: split for name, split in loaded.items() if name == "test"}}
    cache_dir = _cache_dir(cfg) if write_cache else None
    splits = {name: Split(source, examples,
                          task.encode(examples, tokenizer, cfg.data.max_seq_len, cache_dir))
              for name, (source, examples) in loaded.items()}
    transfer = [Split(source, examples, task.encode(examples, tokenizer, cfg.data.max_seq_len,
                                                    cache_dir))
                for source, examples in unlabeled]
    return Plan(task, tokenizer, splits, teacher_cfg, student_cfg, finetune, transfer)


def transfer_summary(cfg: Config, plan: Plan) -> dict | None:
    """The transfer set (rows only the teacher labels) in numbers, for describe and report.json;
    None without one. An augmented set has exactly `factor` rows per labelled example."""
    augment = cfg.distill.augment
    if not plan.unlabeled and augment is None:
        return None
    unlabeled = [{"source": s.source, "rows": len(s.encoded), "skipped": dict(s.examples.skipped)}
                 for s in plan.unlabeled]
    rows = sum(u["rows"] for u in unlabeled)
    summary = {"unlabeled": unlabeled, "augment": None}
    if augment is not None:
        examples = len(plan.splits["train"].examples)
        summary["augment"] = {**dataclasses.asdict(augment), "examples": examples,
                              "rows": augment.factor * examples}
        rows += augment.factor * examples
    batch = cfg.data.batch_size
    per_batch = data_lib.transfer_batch_size(batch, cfg.data.unlabeled_ratio, jax.process_count())
    return {**summary, "rows": rows, "ratio": cfg.data.unlabeled_ratio,
            "rows_per_batch": per_batch, "labelled_rows_per_batch": batch - per_batch}


def describe(cfg: Config, plan: Plan) -> str:
    """The plan in words: task, splits, models, stages with their steps, batch shapes."""
    data = cfg.data
    train = plan.splits["train"].encoded
    epoch_steps = len(train) // data.batch_size
    transfer = transfer_summary(cfg, plan)
    # With transfer rows a distillation epoch is still one pass over the labelled rows, which
    # then fill only part of each batch.
    distill_epoch_steps = epoch_steps if transfer is None else \
        len(train) // transfer["labelled_rows_per_batch"]
    pad = data_lib.padding_stats(train, data.batch_size, bucket_multiple=data.bucket_multiple,
                                 max_seq_len=data.max_seq_len, seed=cfg.seed)
    t, s = plan.teacher_config, plan.student_config
    ft = cfg.teacher.finetune
    if plan.finetune_steps == 0:
        teacher_stage = "skipped (the checkpoint already is a model of this task)"
    else:
        teacher_stage = f"{_total_steps(plan.finetune_steps, ft.epochs, epoch_steps)} steps"
    distill = cfg.distill
    total = 0 if distill.steps == 0 else _total_steps(distill.steps, distill.epochs,
                                                      distill_epoch_steps)
    source = teacher_source(distill)
    source = "cached (logits on disk)" if source == "cached" else source
    lines = [f"task: {plan.task.name} ({plan.task.type}), {plan.task.num_labels} labels, "
             f"metrics {', '.join(plan.task.metrics)}"]
    for name, split in plan.splits.items():
        lines.append(f"data.{name}: {split.source}: {len(split.examples)} examples, "
                     f"{len(split.encoded)} rows, skipped {dict(split.examples.skipped) or 'none'}")
    for who, mc in (("teacher", t), ("student", s)):
        enc = mc.encoder
        lines.append(f"{who}: {hf.architecture(mc)}, {enc.num_layers} layers x {enc.hidden_size} "
                     f"hidden, {enc.num_heads} heads, {enc.dtype}"
                     + ("" if enc.type_vocab_size or not t.encoder.type_vocab_size else
                        ", no token types (the teacher's type 0 folded into positions)"))
    lines += [f"stage teacher: {teacher_stage} (batch {data.batch_size}, {epoch_steps} steps per epoch)",
              f"stage distill: {total} steps, teacher {source}, T={distill.temperature:g}, "
              f"alpha={distill.alpha:g}"
              + ("" if transfer is None else f", {distill_epoch_steps} steps per epoch (one pass "
                 f"over the labelled rows)"),
              *_describe_transfer(transfer),
              "stage export, report",
              f"batches: {len(pad.shapes)} shapes {[length for _, length in pad.shapes]} "
              f"(lengths up to {data.max_seq_len}), padding {100 * pad.pad_fraction:.1f}% of tokens",
              f"workdir: {cfg.workdir}"]
    return "\n".join(lines)


def _describe_transfer(transfer: dict | None) -> list[str]:
    if transfer is None:
        return []
    batch = transfer["rows_per_batch"] + transfer["labelled_rows_per_batch"]
    lines = [f"transfer: {transfer['rows']} rows labelled by the teacher only (KD term, hard-label "
             f"weight 0), {transfer['rows_per_batch']} of every {batch} rows per batch "
             f"(data.unlabeled_ratio {transfer['ratio']:g})"]
    for u in transfer["unlabeled"]:
        lines.append(f"  data.unlabeled: {u['source']}: {u['rows']} rows, skipped {u['skipped'] or 'none'}")
    a = transfer["augment"]
    if a is not None:
        lines.append(f"  distill.augment: {a['factor']} x {a['examples']} labelled examples = "
                     f"{a['rows']} rows (mask_prob {a['mask_prob']:g}, replace_prob "
                     f"{a['replace_prob']:g} of {a['neighbours']} neighbours, ngram_prob "
                     f"{a['ngram_prob']:g}, seed {a['seed']})")
    return lines


def teacher_source(distill: DistillConfig) -> str:
    """Where the distillation step gets the teacher's logits: the one place that decides.

    "cached" (computed once, on disk) when only logit terms are on and the cache is enabled;
    "live" when intermediate terms need the teacher's layers or the cache is off; "none" for
    labels only.
    """
    source = steps.default_teacher_source(distill)
    if source == "live" and distill.teacher_cache and not distill.any_intermediate:
        return "cached"
    return source


def _cache_dir(cfg: Config) -> pathlib.Path:
    return pathlib.Path(cfg.data.cache_dir or pathlib.Path(cfg.workdir) / "cache")


def student_config(s: StudentConfig, teacher_cfg: ModelConfig) -> ModelConfig:
    """The student's config from the `student` section and the teacher's (validated)."""
    teacher = teacher_cfg.encoder
    try:
        if s.init == "teacher_layers":
            bad = [i for i in s.layers if not 0 <= i < teacher.num_layers]
            if bad:
                raise ConfigError(f"student.layers {list(s.layers)}: {bad} out of range; the teacher "
                                  f"has layers 0..{teacher.num_layers - 1}")
            student_cfg = teacher_cfg.replace(num_layers=len(s.layers))
        elif s.init == "shape":
            student_cfg = teacher_cfg.replace(num_layers=s.num_layers, hidden_size=s.hidden_size,
                                              num_heads=s.num_heads,
                                              intermediate_size=s.intermediate_size)
        else:
            pre_raw = hf.read_hf_config(hf.resolve_dir(s.pretrained))
            pre = hf.config_from_hf(pre_raw)
            if pre.vocab_size != teacher.vocab_size:
                raise ConfigError(
                    f"student.pretrained {s.pretrained!r} has a vocabulary of {pre.vocab_size} tokens "
                    f"but the teacher's has {teacher.vocab_size}: student and teacher must share "
                    "one tokenizer")
            # The teacher's head in the student's family (its pooler activation).
            head = dataclasses.replace(teacher_cfg.head, pooler_activation=hf.head_from_hf(
                pre_raw, teacher_cfg.head.kind).pooler_activation)
            student_cfg = ModelConfig(pre.replace(dtype=teacher.dtype), head)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"student: {e}") from e
    if s.export_as == "distilbert":
        try:
            student_cfg = student_lib.distilbert_config(student_cfg)
        except ValueError as e:
            raise ConfigError(f"student.export_as: {e}") from e
    changes = {}
    if s.hidden_dropout is not None:
        changes["hidden_dropout"] = s.hidden_dropout
    if s.attention_dropout is not None:
        changes["attention_dropout"] = s.attention_dropout
    return student_cfg.replace(**changes)


def _student_params(s: StudentConfig, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                    teacher_params, rng):
    """The student's initial params, of the shape `student_cfg` (from the plan) describes."""
    distilbert = s.export_as == "distilbert"
    if s.init == "teacher_layers":
        build = student_lib.distilbert_from_teacher if distilbert else student_lib.student_from_teacher
        _, params = build(teacher_cfg, teacher_params, layers=s.layers)
    elif s.init == "shape":
        _, params = student_lib.student_from_shape(
            student_lib.distilbert_config(teacher_cfg) if distilbert else teacher_cfg, rng,
            num_layers=s.num_layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
            intermediate_size=s.intermediate_size)
    else:
        _, params = student_lib.student_from_pretrained(s.pretrained, teacher_cfg, rng=rng)
    return params


# ---------------------------------------------------------------- run-time helpers

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
        if jax.process_count() == 1:
            return self.preempt
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([self.preempt], np.int32))
        return bool(np.any(flags))

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
            progress=lambda it: report_lib.progress_iter(it, desc, show))

    def batches(self, encoded: data_lib.Encoded, seed: int) -> Callable:
        """position -> this process's training batches of `encoded` from that position; a set
        with transfer rows (`data.with_transfer`) gives `data.unlabeled_ratio` of each batch
        to them."""
        geometry = dict(seed=seed, bucket_multiple=self.data.bucket_multiple,
                        max_seq_len=self.data.max_seq_len, process_index=jax.process_index(),
                        process_count=jax.process_count())
        if encoded.hard_weights is None:
            return lambda position: data_lib.TrainBatches(encoded, self.data.batch_size,
                                                          position=position, **geometry)
        per_batch = data_lib.transfer_batch_size(self.data.batch_size, self.data.unlabeled_ratio,
                                                 jax.process_count())
        return lambda position: data_lib.MixedBatches(encoded, self.data.batch_size, per_batch,
                                                      position=position, **geometry)


def evaluate(rt: Runtime, task: tasks.Task, model_cfg: ModelConfig, params,
             split: Split) -> tuple[dict, np.ndarray]:
    outputs = rt.predict(model_cfg, params, split.encoded, task.outputs_per_token, desc="evaluate")
    return task.scores(outputs, split.encoded, split.examples), outputs


def _read_stages(workdir: pathlib.Path) -> dict:
    path = workdir / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark_stage(rt: Runtime, name: str, info: dict) -> None:
    if not rt.is_main:
        return
    stages = _read_stages(rt.workdir)
    if stages.get(name, {}).get("done"):  # a rerun that found the stage finished keeps its record
        rt.stage_started = time.perf_counter()
        return
    # Wall time of this process's part of the stage (a resumed stage counts its last part only).
    seconds = time.perf_counter() - rt.stage_started
    stages[name] = {"done": True, "seconds": round(seconds, 1), **info}
    rt.stage_started = time.perf_counter()
    util.write_atomic(rt.workdir / "stages.json",
                      lambda tmp: tmp.write_text(json.dumps(stages, indent=2)))


def _total_steps(configured: int | None, epochs: float, epoch_steps: int) -> int:
    return configured if configured is not None else max(1, math.ceil(epochs * epoch_steps))


def _eval_points(total: int, epoch_steps: int, every: int | None) -> set[int]:
    every = every or epoch_steps
    return set(range(every, total, every)) | {total}


# ---------------------------------------------------------------- the training loop

def train_loop(rt: Runtime, stage: str, *, state, step_fn: Callable, make_batches: Callable,
               total_steps: int, epoch_steps: int, eval_every: int | None, eval_fn: Callable | None,
               seed: int, prepare_batch: Callable = lambda b: b):
    """Run `step_fn(state, batch, rng)` to `total_steps`, resuming from the stage's checkpoints.

    Returns (state, checkpointer). `make_batches(position)` builds the data iterator at a
    saved position (None: the start). Dropout randomness is a pure function of the seed
    and the step, so a resumed run draws the same bits as an uninterrupted one. Logged
    metrics are means over the steps since the previous log line, summed on the device.
    """
    ckpt_cfg = rt.checkpoint
    ckpt = Checkpointer(rt.workdir / "checkpoints" / stage, keep=ckpt_cfg.keep,
                        keep_best=ckpt_cfg.keep_best and eval_fn is not None)
    start, position = 0, None
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        start, position = int(meta["batches"]), meta["data"]
        rt.sink.truncate(stage, start)
        log.info("%s: resuming at step %d from %s", stage, start, ckpt.directory)
    batches = make_batches(position)
    evals = _eval_points(total_steps, epoch_steps, eval_every)
    base_rng = jax.random.key(seed)
    bar = report_lib.progress(stage, total_steps, start, enabled=rt.is_main and rt.log.progress)
    examples = rt.data.batch_size
    t_start, pending = time.perf_counter(), None
    window_sum, window_steps = None, 0

    def check(step_metrics, step):
        loss = float(step_metrics["loss/total"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"{stage}: the loss became {loss} at step {step}; stopping. The newest good "
                f"checkpoint in {ckpt.directory} is left intact (step {ckpt.latest_step()}). Lower "
                "optim.learning_rate, check the data, or use precision.compute=float32.")
        return loss

    def save(step, eval_metric=None):
        meta = {"batches": step, "data": batches.position, "seed": seed, "stage": stage}
        ckpt.save(step, state, meta, eval_metric=eval_metric)

    try:
        for step in range(start, total_steps):
            batch = prepare_batch(next(batches))
            rng = jax.random.fold_in(base_rng, step)
            state, step_metrics = step_fn(state, sharding.global_batch(batch, rt.mesh), rng)
            window_sum = step_metrics if window_sum is None else _add(window_sum, step_metrics)
            window_steps += 1
            if pending is not None:  # pull step n-1 while step n runs
                check(jax.device_get(pending[1]), pending[0])
            pending = (step + 1, step_metrics)
            done = step + 1
            log_now = done % rt.log.every_steps == 0 or done == total_steps
            if log_now or done in evals or done % ckpt_cfg.every_steps == 0:
                loss = check(jax.device_get(step_metrics), done)
                pending = None
                rate = examples * (done - start) / max(time.perf_counter() - t_start, 1e-9)
                if log_now:
                    means = {k: float(v) / window_steps for k, v in jax.device_get(window_sum).items()}
                    # The learning rate is the rate at this step, not a mean.
                    means["learning_rate"] = float(jax.device_get(step_metrics).get(
                        "learning_rate", float("nan")))
                    rt.sink.write({**means, "stage": stage, "step": done, "loss": means["loss/total"],
                                   "examples_per_second": rate, "steps_averaged": window_steps})
                    window_sum, window_steps = None, 0
                bar.update(done, loss, rate)
            eval_metric = None
            if done in evals and eval_fn is not None:
                scores = eval_fn(state)
                eval_metric = scores[next(iter(scores))]
                rt.sink.write({"stage": stage, "step": done, "split": "eval", **scores})
            if eval_metric is not None or done % ckpt_cfg.every_steps == 0 or done == total_steps:
                save(done, eval_metric)
            if rt.should_stop():
                if pending is not None:
                    check(jax.device_get(pending[1]), pending[0])
                if ckpt.latest_step() != done:
                    save(done)
                ckpt.wait()
                raise Preempted(f"{stage}: SIGTERM received; checkpoint saved at step {done}")
        if latest is not None and latest >= total_steps:
            log.info("%s: already at step %d", stage, latest)
    finally:
        ckpt.wait()
        bar.close()
    return state, ckpt


@jax.jit
def _add(a, b):
    return jax.tree.map(lambda x, y: x + y, a, b)


def _restore_best(ckpt: Checkpointer, state, use_best: bool):
    step = ckpt.best_step() if use_best else None
    step = ckpt.latest_step() if step is None else step
    if step is None:
        return state, None
    restored, _ = ckpt.restore(step, state)
    return restored, step


def _optimizer(optim_cfg: OptimConfig, total_batches: int):
    """The optimizer and its schedule; schedules count optimizer updates, not micro-batches."""
    updates = max(1, total_batches // optim_cfg.accumulate_steps)
    return make_optimizer(optim_cfg, updates), make_schedule(optim_cfg, updates)


def _eval_fn(rt: Runtime, plan: Plan, model_cfg: ModelConfig):
    if "eval" not in plan.splits:
        return None

    def scores(state):
        return evaluate(rt, plan.task, model_cfg, state.params, plan.splits["eval"])[0]
    return scores


# ---------------------------------------------------------------- stages

def stage_teacher(rt: Runtime, plan: Plan, teacher: TeacherConfig, optim_cfg: OptimConfig,
                  seed: int):
    """Fine-tune the teacher when asked; returns its params (config: `plan.teacher_config`)."""
    out_dir = rt.workdir / "teacher"
    ft = teacher.finetune
    config = plan.teacher_config
    if _read_stages(rt.workdir).get("teacher", {}).get("done") and plan.finetune_steps != 0:
        return hf.load_hf(out_dir, head=config.head)[1]
    _, params = hf.load_hf(teacher.model, head=config.head, rng=jax.random.key(seed))
    if plan.finetune_steps == 0:
        return params
    train = plan.splits["train"].encoded
    make_batches = rt.batches(train, seed)
    epoch_steps = make_batches(None).epoch_steps
    total = _total_steps(plan.finetune_steps, ft.epochs, epoch_steps)
    tx, schedule = _optimizer(dataclasses.replace(optim_cfg, learning_rate=ft.learning_rate), total)
    state = steps.TrainState.create(params, tx)
    shardings = sharding.tree_shardings(rt.mesh, state)
    state = sharding.place(state, shardings)
    step_fn = sharding.jit_finetune_step(steps.make_finetune_step(config, schedule), rt.mesh, shardings)
    eval_fn = _eval_fn(rt, plan, config)
    state, ckpt = train_loop(rt, "teacher", state=state, step_fn=step_fn, make_batches=make_batches,
                             total_steps=total, epoch_steps=epoch_steps,
                             eval_every=ft.eval_every, eval_fn=eval_fn, seed=seed)
    state, best = _restore_best(ckpt, state, rt.checkpoint.keep_best and eval_fn is not None)
    ckpt.close()
    params = jax.device_get(state.params)
    if rt.is_main:
        hf.save_hf(config, params, out_dir, tokenizer=plan.tokenizer, id2label=plan.task.id2label())
    _mark_stage(rt, "teacher", {"steps": total, "selected_step": best})
    return params


def distillation_set(rt: Runtime, plan: Plan, augment: transfer_lib.AugmentConfig | None,
                     teacher_params, cache_dir) -> data_lib.Encoded:
    """The rows the student is distilled on: the training split, then the transfer rows
    (data.unlabeled, then distill.augment's variants of the training examples, built from the
    teacher's vocabulary and word embeddings) with hard-label weight 0."""
    train = plan.splits["train"]
    transfer = [split.encoded for split in plan.unlabeled]
    if augment is not None:
        def variants(texts, pairs, sep=None, keep=None):
            return transfer_lib.augmented_set(cache_dir, texts, pairs, augment, plan.tokenizer,
                                              lambda: word_embeddings(teacher_params), sep, keep)
        examples = plan.task.augmented(train.examples, variants, f"{train.source} (augmented)")
        log.info("distill.augment: %d rows from %d examples", len(examples), len(train.examples))
        transfer.append(plan.task.encode(examples, plan.tokenizer, rt.data.max_seq_len, cache_dir))
    return data_lib.with_transfer(train.encoded, transfer)


def teacher_logits_cache(rt: Runtime, plan: Plan, teacher_params, cache_dir,
                         enc: data_lib.Encoded) -> cache_lib.TeacherLogits:
    """The teacher's outputs on the distillation set `enc` (the training split and any transfer
    rows), from the disk cache or computed once; the key covers every row, so another transfer
    set has another cache."""
    per_token = plan.task.outputs_per_token
    key = cache_lib.fingerprint(teacher_params, dataclasses.asdict(plan.teacher_config),
                                (enc.input_ids, enc.token_type_ids, enc.offsets),
                                rt.data.max_seq_len, per_token)
    log.info("teacher cache %s: %d training rows", key, len(enc))
    table, hit = cache_lib.load_or_compute(
        cache_dir, key, int(enc.offsets[-1]) if per_token else len(enc),
        lambda: rt.predict(plan.teacher_config, teacher_params, enc, per_token,
                           desc="teacher cache"),
        write=rt.is_main)
    log.info("teacher cache %s (%s)", "hit" if hit else "computed", key)
    return cache_lib.TeacherLogits(table, enc, per_token)


def stage_distill(rt: Runtime, plan: Plan, distill: DistillConfig, student: StudentConfig,
                  optim_cfg: OptimConfig, teacher_params, *, seed: int, fsdp: bool,
                  cache_dir: pathlib.Path):
    """Distil the student; returns its params (config: `plan.student_config`)."""
    teacher_cfg, student_cfg = plan.teacher_config, plan.student_config
    params = _student_params(student, student_cfg, teacher_cfg, teacher_params,
                             jax.random.key(seed + 1))
    train = distillation_set(rt, plan, distill.augment, teacher_params, cache_dir)
    make_batches = rt.batches(train, seed + 1)
    epoch_steps = make_batches(None).epoch_steps
    total = 0 if distill.steps == 0 else _total_steps(distill.steps, distill.epochs, epoch_steps)
    tx, schedule = _optimizer(optim_cfg, total)
    proj = losses.init_projections(distill, student_cfg.encoder, teacher_cfg.encoder,
                                   jax.random.key(seed + 2))
    state = steps.TrainState.create(params, tx, proj_params=proj)
    state_shardings = sharding.tree_shardings(rt.mesh, state, fsdp)
    state = sharding.place(state, state_shardings)
    best = None
    if total > 0:
        source = teacher_source(distill)
        prepare_batch = lambda b: b  # noqa: E731
        if source == "cached":
            prepare_batch = teacher_logits_cache(rt, plan, teacher_params, cache_dir, train).attach
        teacher_shardings = sharding.tree_shardings(rt.mesh, teacher_params, fsdp)
        placed_teacher = sharding.place(teacher_params, teacher_shardings) if source == "live" else None
        jitted = sharding.jit_distill_step(
            steps.make_distill_step(student_cfg, teacher_cfg, distill, schedule, teacher=source),
            rt.mesh, state_shardings, teacher_shardings if source == "live" else None)
        step_fn = lambda state, batch, rng: jitted(state, placed_teacher, batch, rng)  # noqa: E731
        eval_fn = _eval_fn(rt, plan, student_cfg)
        state, ckpt = train_loop(rt, "distill", state=state, step_fn=step_fn,
                                 make_batches=make_batches, total_steps=total,
                                 epoch_steps=epoch_steps, eval_every=distill.eval_every,
                                 eval_fn=eval_fn, seed=seed + 1, prepare_batch=prepare_batch)
        state, best = _restore_best(ckpt, state, rt.checkpoint.keep_best and eval_fn is not None)
        ckpt.close()
    _mark_stage(rt, "distill", {"steps": total, "selected_step": best, "rows": len(train)})
    return jax.device_get(state.params)


def stage_report(rt: Runtime, plan: Plan, cfg: Config, teacher_params, student_params) -> dict:
    task = plan.task
    models, outputs = {}, {}
    for name, model_cfg, params in (("teacher", plan.teacher_config, teacher_params),
                                    ("student", plan.student_config, student_params)):
        entry = {"params": param_count(params), "layers": model_cfg.encoder.num_layers,
                 "hidden_size": model_cfg.encoder.hidden_size,
                 "size_mb": sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) / 2**20,
                 "metrics": {}, "splits": {}}
        for split in ("eval", "test"):
            if split in plan.splits:
                scores, outputs[(name, split)] = evaluate(rt, task, model_cfg, params,
                                                          plan.splits[split])
                entry["splits"][split] = scores
        report_split = "test" if "test" in plan.splits else "eval"
        entry["metrics"] = entry["splits"].get(report_split, {})
        entry.update(report_lib.measure_speed(steps.make_logits_fn(model_cfg), params,
                                              rt.data.batch_size, rt.data.max_seq_len))
        models[name] = entry
    agreement = {split: task.agreement(outputs[("student", split)], outputs[("teacher", split)],
                                       plan.splits[split].encoded, plan.splits[split].examples)
                 for split in ("eval", "test") if ("teacher", split) in outputs}
    report = report_lib.build_report(cfg, task, models, agreement)
    shown = "test" if "test" in plan.splits else "eval"
    if ("teacher", shown) in outputs:
        split = plan.splits[shown]
        report["examples"] = task.showcase(outputs[("student", shown)], outputs[("teacher", shown)],
                                           split.encoded, split.examples)
    report["stages"] = _read_stages(rt.workdir)
    report["data"] = plan.data_stats
    report["transfer"] = transfer_summary(cfg, plan)
    if rt.is_main:
        report_lib.write_report(report, rt.workdir, plots=rt.log.plots)
    return report


def use_compilation_cache(directory: str) -> None:
    """Store and look up compiled programs in `directory` from the next compilation on."""
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

    path = os.path.expanduser(directory)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX decides once per process whether a cache is in use; a process that compiled
        # before (an embedding program, a test session) must be told to look again.
        compilation_cache.reset_cache()


def run(cfg: Config) -> dict:
    """The whole pipeline for one config; returns the report."""
    if cfg.compilation_cache:
        use_compilation_cache(cfg.compilation_cache)
    dist = cfg.distributed
    if dist.initialize or dist.coordinator_address is not None:
        sharding.init_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)
    plan = prepare(cfg)
    workdir = pathlib.Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(cfg, workdir / "config.yaml")
    with Runtime(cfg, workdir) as rt:
        teacher_params = stage_teacher(rt, plan, cfg.teacher, cfg.optim, cfg.seed)
        student_params = stage_distill(rt, plan, cfg.distill, cfg.student, cfg.optim, teacher_params,
                                       seed=cfg.seed, fsdp=dist.fsdp, cache_dir=_cache_dir(cfg))
        export_dir = workdir / "student"
        if rt.is_main:
            hf.save_hf(plan.student_config, student_params, export_dir, tokenizer=plan.tokenizer,
                       id2label=plan.task.id2label())
        _mark_stage(rt, "export", {"dir": str(export_dir)})
        report = stage_report(rt, plan, cfg, teacher_params, student_params)
        _mark_stage(rt, "report", {})
    return report
