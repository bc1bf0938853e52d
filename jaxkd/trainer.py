"""The pipeline behind train.py: teacher fine-tuning, distillation, evaluation, export.

Each stage writes into the work directory and records itself in `stages.json`
when done, so running the same command again skips finished stages and resumes
an unfinished one from its newest complete checkpoint. Everything that can be
checked is checked in `prepare` before anything is written.
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
from jaxkd import hf, losses, metrics as metrics_lib, report as report_lib, sharding, steps
from jaxkd import student as student_lib
from jaxkd.checkpoint import Checkpointer
from jaxkd.config import Config, ConfigError, dump_config
from jaxkd.model import BertConfig, param_count
from jaxkd.optim import make_optimizer, make_schedule

log = logging.getLogger("jaxkd")


class Preempted(Exception):
    """Raised after a SIGTERM was caught and a checkpoint was written."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------- preparation

@dataclasses.dataclass
class Plan:
    """Everything validated up front: task, data, tokenizer, teacher and student configs."""

    cfg: Config
    task: Any
    tokenizer: Any
    splits: dict[str, Any]  # name -> tokenised examples (train / eval / test, those given)
    teacher_source: str
    teacher_config: BertConfig
    finetune_steps: int | None  # 0: the teacher already classifies this task; None: from epochs
    data_stats: dict[str, dict]  # per split: source, examples, rows skipped by reason


def _teacher_config(cfg: Config, task) -> tuple[BertConfig, bool]:
    """The teacher's config, and whether its checkpoint is already a classifier for this task."""
    try:
        raw = hf.read_hf_config(hf.resolve_dir(cfg.teacher.model))
        teacher_cfg = hf.config_from_hf(raw, num_labels=task.num_labels)
    except FileNotFoundError as e:
        raise ConfigError(f"teacher.model {cfg.teacher.model!r}: {e}") from e
    is_classifier = (any("SequenceClassification" in a for a in raw.get("architectures") or [])
                     and len(raw.get("id2label") or {}) == task.num_labels)
    changes = {"dtype": cfg.precision.compute}
    if cfg.teacher.hidden_dropout is not None:
        changes["hidden_dropout"] = cfg.teacher.hidden_dropout
    return teacher_cfg.replace(**changes), is_classifier


def prepare(cfg: Config) -> Plan:
    """Resolve and validate everything; raises before any output is written."""
    task = data_lib.load_task(cfg.task, cfg.data)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give a split name or a training file")
    tokenizer = hf.load_tokenizer(cfg.teacher.model)
    teacher_cfg, is_classifier = _teacher_config(cfg, task)
    steps = cfg.teacher.finetune.steps
    if steps == 0 and not is_classifier:
        raise ConfigError(
            f"teacher.model {cfg.teacher.model!r} is not a {task.num_labels}-label sequence "
            "classifier, so it cannot teach this task untrained: set teacher.finetune.steps > 0 "
            "(or leave it unset to fine-tune for teacher.finetune.epochs)")
    finetune = steps if steps is not None else (0 if is_classifier else None)
    if len(tokenizer) > teacher_cfg.vocab_size:
        raise ConfigError(f"teacher.model: tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary holds {teacher_cfg.vocab_size}")
    if cfg.data.max_seq_len > teacher_cfg.max_position_embeddings:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the teacher's "
                          f"max_position_embeddings={teacher_cfg.max_position_embeddings}")
    _student_config(cfg, teacher_cfg)  # validates student.* against the teacher
    cache_dir = _cache_dir(cfg)
    splits, data_stats = {}, {}
    for name in ("train", "eval", "test"):
        source = getattr(cfg.data, name)
        if source is not None:
            examples = data_lib.load_split(cfg.data, task, source)
            splits[name] = data_lib.tokenize(examples, tokenizer, cfg.data.max_seq_len, cache_dir)
            data_stats[name] = {"source": source, "examples": len(examples),
                                "skipped": dict(examples.skipped)}
    return Plan(cfg, task, tokenizer, splits, cfg.teacher.model, teacher_cfg, finetune, data_stats)


def _id2label(task) -> dict[int, str] | None:
    return dict(enumerate(task.label_names)) or None


def _cache_dir(cfg: Config) -> pathlib.Path:
    return pathlib.Path(cfg.data.cache_dir or pathlib.Path(cfg.workdir) / "cache")


def _student_config(cfg: Config, teacher_cfg: BertConfig) -> BertConfig:
    s = cfg.student
    try:
        if s.init == "teacher_layers":
            bad = [i for i in s.layers if not 0 <= i < teacher_cfg.num_layers]
            if bad:
                raise ConfigError(f"student.layers {list(s.layers)}: {bad} out of range; the teacher "
                                  f"has layers 0..{teacher_cfg.num_layers - 1}")
            student_cfg = teacher_cfg.replace(num_layers=len(s.layers))
        elif s.init == "shape":
            student_cfg = teacher_cfg.replace(num_layers=s.num_layers, hidden_size=s.hidden_size,
                                              num_heads=s.num_heads,
                                              intermediate_size=s.intermediate_size)
        else:
            pre = hf.config_from_hf(hf.read_hf_config(hf.resolve_dir(s.pretrained)), num_labels=teacher_cfg.num_labels)
            if pre.vocab_size != teacher_cfg.vocab_size:
                raise ConfigError(
                    f"student.pretrained {s.pretrained!r} has a vocabulary of {pre.vocab_size} tokens "
                    f"but the teacher's has {teacher_cfg.vocab_size}: student and teacher must share "
                    "one tokenizer")
            student_cfg = pre.replace(dtype=teacher_cfg.dtype)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"student: {e}") from e
    changes = {}
    if s.hidden_dropout is not None:
        changes["hidden_dropout"] = s.hidden_dropout
    if s.attention_dropout is not None:
        changes["attention_dropout"] = s.attention_dropout
    return student_cfg.replace(**changes)


def _build_student(cfg: Config, teacher_cfg, teacher_params, rng):
    s = cfg.student
    if s.init == "teacher_layers":
        student_cfg, params = student_lib.student_from_teacher(teacher_cfg, teacher_params, layers=s.layers)
    elif s.init == "shape":
        student_cfg, params = student_lib.student_from_shape(
            teacher_cfg, rng, num_layers=s.num_layers, hidden_size=s.hidden_size,
            num_heads=s.num_heads, intermediate_size=s.intermediate_size)
    else:
        student_cfg, params = student_lib.student_from_pretrained(s.pretrained, teacher_cfg,
                                                                  teacher_cfg.num_labels)
    wanted = _student_config(cfg, teacher_cfg)
    return student_cfg.replace(dtype=wanted.dtype, hidden_dropout=wanted.hidden_dropout,
                               attention_dropout=wanted.attention_dropout), params


# ---------------------------------------------------------------- run-time helpers

class Runtime:
    """Per-run process facts, mesh, logging sinks and the preemption flag."""

    def __init__(self, cfg: Config, workdir: pathlib.Path):
        self.cfg = cfg
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
    tmp = rt.workdir / "stages.json.tmp"
    tmp.write_text(json.dumps(stages, indent=2))
    tmp.replace(rt.workdir / "stages.json")


def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def predict(rt: Runtime, logits_fn: Callable, params, encoded, batch_size: int,
            desc: str = "predict") -> np.ndarray:
    """Logits for every example of a split, in example order."""
    from tqdm import tqdm

    cfg = rt.cfg
    batches = data_lib.eval_batches(encoded, batch_size, bucket_multiple=cfg.data.bucket_multiple,
                                    max_seq_len=cfg.data.max_seq_len,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    # Dispatch every batch before reading any result back: the host prepares batch n+1
    # while the device computes batch n.
    pending = []
    for local in tqdm(batches, desc=desc, leave=False,
                      disable=not (rt.is_main and cfg.log.progress)):
        batch = sharding.global_batch(local, rt.mesh)
        pending.append((logits_fn(params, batch), batch["index"]))
    out = None
    for logits, index in pending:
        logits, index = _host(logits), _host(index)
        if out is None:
            out = np.zeros((len(encoded), logits.shape[-1]), np.float32)
        keep = index >= 0
        out[index[keep]] = logits[keep]
    return out


def evaluate(rt: Runtime, logits_fn, params, encoded, task) -> tuple[dict, np.ndarray]:
    bs = rt.cfg.data.eval_batch_size or rt.cfg.data.batch_size
    logits = predict(rt, logits_fn, params, encoded, bs)
    labels = np.asarray(encoded.labels)
    return metrics_lib.compute(task.metrics, logits, labels), logits


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
    and the step, so a resumed run draws the same bits as an uninterrupted one.
    """
    ckpt_cfg = rt.cfg.checkpoint
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
    bar = report_lib.progress(stage, total_steps, start, enabled=rt.is_main and rt.cfg.log.progress)
    examples = rt.cfg.data.batch_size
    t_start, pending = time.perf_counter(), None

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
            if pending is not None:  # pull step n-1 while step n runs
                check(jax.device_get(pending[1]), pending[0])
            pending = (step + 1, step_metrics)
            done = step + 1
            log_now = done % rt.cfg.log.every_steps == 0 or done == total_steps
            if log_now or done in evals or done % ckpt_cfg.every_steps == 0:
                host = jax.device_get(step_metrics)
                loss = check(host, done)
                pending = None
                rate = examples * (done - start) / max(time.perf_counter() - t_start, 1e-9)
                if log_now:
                    row = {k: float(v) for k, v in host.items()}
                    row.update(stage=stage, step=done, loss=loss, examples_per_second=rate,
                               learning_rate=float(host.get("learning_rate", float("nan"))))
                    rt.sink.write(row)
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


def _restore_best(ckpt: Checkpointer, state, use_best: bool):
    step = ckpt.best_step() if use_best else None
    step = ckpt.latest_step() if step is None else step
    if step is None:
        return state, None
    restored, _ = ckpt.restore(step, state)
    return restored, step


# ---------------------------------------------------------------- stages

def _batches_factory(rt: Runtime, encoded, seed: int):
    cfg = rt.cfg

    def make(position):
        return data_lib.train_batches(encoded, cfg.data.batch_size, seed=seed,
                                      bucket_multiple=cfg.data.bucket_multiple,
                                      max_seq_len=cfg.data.max_seq_len, position=position,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    return make


def _epoch_steps(rt: Runtime, encoded) -> int:
    return _batches_factory(rt, encoded, 0)(None).epoch_steps


def stage_teacher(rt: Runtime, plan: Plan):
    """Fine-tune the teacher when asked; returns (config, params, source directory or id)."""
    cfg, stages = rt.cfg, _read_stages(rt.workdir)
    out_dir = rt.workdir / "teacher"
    ft = cfg.teacher.finetune
    if stages.get("teacher", {}).get("done") and plan.finetune_steps != 0:
        config, params = hf.load_hf(out_dir, num_labels=plan.task.num_labels)
        return config.replace(dtype=plan.teacher_config.dtype), params, str(out_dir)
    config, params = hf.load_hf(plan.teacher_source, num_labels=plan.task.num_labels,
                                rng=jax.random.key(cfg.seed))
    config = config.replace(dtype=plan.teacher_config.dtype,
                            hidden_dropout=plan.teacher_config.hidden_dropout)
    if plan.finetune_steps == 0:
        return config, params, plan.teacher_source
    train = plan.splits["train"]
    epoch_steps = _epoch_steps(rt, train)
    total = _total_steps(plan.finetune_steps, ft.epochs, epoch_steps)
    optim_cfg = dataclasses.replace(cfg.optim, learning_rate=ft.learning_rate)
    tx, schedule = _optimizer(optim_cfg, total)
    state = steps.TrainState.create(params, tx)
    shardings = sharding.tree_shardings(rt.mesh, state)
    state = sharding.place(state, shardings)
    step_fn = sharding.jit_finetune_step(steps.make_finetune_step(config, schedule), rt.mesh, shardings)
    eval_fn = _eval_fn(rt, config, plan)
    state, ckpt = train_loop(rt, "teacher", state=state, step_fn=step_fn,
                             make_batches=_batches_factory(rt, train, cfg.seed),
                             total_steps=total, epoch_steps=epoch_steps,
                             eval_every=ft.eval_every, eval_fn=eval_fn, seed=cfg.seed)
    state, best = _restore_best(ckpt, state, cfg.checkpoint.keep_best and eval_fn is not None)
    ckpt.close()
    params = jax.device_get(state.params)
    if rt.is_main:
        hf.save_hf(config, params, out_dir, tokenizer=plan.tokenizer, id2label=_id2label(plan.task))
    _mark_stage(rt, "teacher", {"steps": total, "selected_step": best})
    return config, params, str(out_dir)


def _optimizer(optim_cfg, total_batches: int):
    """The optimizer and its schedule; schedules count optimizer updates, not micro-batches."""
    updates = max(1, total_batches // optim_cfg.accumulate_steps)
    return make_optimizer(optim_cfg, updates), make_schedule(optim_cfg, updates)


def _logits_fn(rt: Runtime, config: BertConfig):
    """Jitted (params, batch) -> logits with the batch sharded over the mesh."""
    return jax.jit(steps.make_teacher_logits_fn(config),
                   in_shardings=(None, sharding.batch_sharding(rt.mesh)))


def _eval_fn(rt: Runtime, config: BertConfig, plan: Plan):
    if "eval" not in plan.splits:
        return None
    logits_fn = _logits_fn(rt, config)

    def run(state):
        scores, _ = evaluate(rt, logits_fn, state.params, plan.splits["eval"], plan.task)
        return scores
    return run


def teacher_logits_cache(rt: Runtime, plan: Plan, teacher_cfg, teacher_params) -> np.ndarray:
    train = plan.splits["train"]
    key = cache_lib.fingerprint(teacher_params, dataclasses.asdict(teacher_cfg), (train.input_ids, train.token_type_ids, train.offsets),
                                rt.cfg.data.max_seq_len)
    logits_fn = _logits_fn(rt, teacher_cfg)
    bs = rt.cfg.data.eval_batch_size or rt.cfg.data.batch_size
    log.info("teacher cache %s: %d training examples", key, len(train))
    logits, hit = cache_lib.load_or_compute(
        _cache_dir(rt.cfg), key, len(train),
        lambda: predict(rt, logits_fn, teacher_params, train, bs, desc="teacher cache"),
        write=rt.is_main)
    log.info("teacher cache %s (%s)", "hit" if hit else "computed", key)
    return logits


def stage_distill(rt: Runtime, plan: Plan, teacher_cfg, teacher_params):
    cfg = rt.cfg
    d = cfg.distill
    student_cfg, params = _build_student(cfg, teacher_cfg, teacher_params,
                                         jax.random.key(cfg.seed + 1))
    loss_cfg = d.loss_config(regression=plan.task.is_regression)
    train = plan.splits["train"]
    epoch_steps = _epoch_steps(rt, train)
    total = _total_steps(d.steps, d.epochs, epoch_steps)
    tx, schedule = _optimizer(cfg.optim, total)
    proj = losses.init_projections(loss_cfg, student_cfg, teacher_cfg, jax.random.key(cfg.seed + 2))
    fsdp = cfg.distributed.fsdp
    state = steps.TrainState.create(params, tx, proj_params=proj)
    state_shardings = sharding.tree_shardings(rt.mesh, state, fsdp)
    state = sharding.place(state, state_shardings)
    teacher_shardings = sharding.tree_shardings(rt.mesh, teacher_params, fsdp)
    teacher_params = sharding.place(teacher_params, teacher_shardings)
    prepare_batch = lambda b: b  # noqa: E731
    needs_teacher_logits = loss_cfg.alpha > 0 and not loss_cfg.any_intermediate
    if d.teacher_cache and needs_teacher_logits and d.steps != 0:
        table = teacher_logits_cache(rt, plan, teacher_cfg, teacher_params)
        prepare_batch = lambda b: cache_lib.attach(b, table)  # noqa: E731
    jitted = sharding.jit_distill_step(
        steps.make_distill_step(student_cfg, teacher_cfg, loss_cfg, schedule), rt.mesh,
        state_shardings, teacher_shardings)
    step_fn = lambda state, batch, rng: jitted(state, teacher_params, batch, rng)  # noqa: E731
    eval_fn = _eval_fn(rt, student_cfg, plan)
    if total > 0 and d.steps != 0:
        state, ckpt = train_loop(rt, "distill", state=state, step_fn=step_fn,
                                 make_batches=_batches_factory(rt, train, cfg.seed + 1),
                                 total_steps=total, epoch_steps=epoch_steps,
                                 eval_every=d.eval_every, eval_fn=eval_fn, seed=cfg.seed + 1,
                                 prepare_batch=prepare_batch)
        state, best = _restore_best(ckpt, state, cfg.checkpoint.keep_best and eval_fn is not None)
        ckpt.close()
    else:
        best, total = None, 0
    _mark_stage(rt, "distill", {"steps": total, "selected_step": best})
    return student_cfg, jax.device_get(state.params)


def stage_report(rt: Runtime, plan: Plan, teacher_cfg, teacher_params, student_cfg,
                 student_params) -> dict:
    models = {}
    logits = {}
    for name, mcfg, mparams in (("teacher", teacher_cfg, teacher_params),
                                ("student", student_cfg, student_params)):
        fn = _logits_fn(rt, mcfg)
        entry = {"params": param_count(mparams), "layers": mcfg.num_layers,
                 "hidden_size": mcfg.hidden_size,
                 "size_mb": sum(np.asarray(x).nbytes for x in jax.tree.leaves(mparams)) / 2**20,
                 "metrics": {}, "splits": {}}
        for split in ("eval", "test"):
            if split in plan.splits:
                scores, split_logits = evaluate(rt, fn, mparams, plan.splits[split], plan.task)
                entry["splits"][split] = scores
                logits[(name, split)] = split_logits
        report_split = "test" if "test" in plan.splits else "eval"
        entry["metrics"] = entry["splits"].get(report_split, {})
        entry.update(report_lib.measure_speed(steps.make_teacher_logits_fn(mcfg), mparams,
                                              rt.cfg.data.batch_size, rt.cfg.data.max_seq_len))
        models[name] = entry
    report = report_lib.build_report(rt.cfg, plan.task, models, logits)
    report["stages"] = _read_stages(rt.workdir)
    report["data"] = plan.data_stats
    if rt.is_main:
        report_lib.write_report(report, rt.workdir, plots=rt.cfg.log.plots)
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
    d = cfg.distributed
    if d.initialize or d.coordinator_address is not None:
        sharding.init_distributed(d.coordinator_address, d.num_processes, d.process_id)
    plan = prepare(cfg)
    workdir = pathlib.Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(cfg, workdir / "config.yaml")
    with Runtime(cfg, workdir) as rt:
        teacher_cfg, teacher_params, _ = stage_teacher(rt, plan)
        student_cfg, student_params = stage_distill(rt, plan, teacher_cfg, teacher_params)
        export_dir = workdir / "student"
        if rt.is_main:
            hf.save_hf(student_cfg, student_params, export_dir, tokenizer=plan.tokenizer,
                       id2label=_id2label(plan.task))
        _mark_stage(rt, "export", {"dir": str(export_dir)})
        report = stage_report(rt, plan, teacher_cfg, teacher_params, student_cfg, student_params)
        _mark_stage(rt, "report", {})
    return report
