"""The pipeline behind train.py: teacher fine-tuning, distillation, evaluation, export.

Owns the stages (`stage_teacher`, `stage_distill`, `stage_report`), what they are built from
(the distillation set, the teacher-logit cache, the optimizer, evaluation) and `run`, which
composes them. What will be run is decided in `jaxkd.plan` (`prepare`, before anything is
written); how a stage's steps run, resume and are recorded is `jaxkd.loop`'s. Each stage
writes into the work directory and records itself in `stages.json` when done, so running the
same command again skips finished stages and resumes an unfinished one from its newest
complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from jaxkd import cache as cache_lib
from jaxkd import data as data_lib
from jaxkd import compare
from jaxkd import search as search_lib
from jaxkd import (exported, losses, manifest, report as report_lib, sharding, steps, tasks,
                   util)
from jaxkd import transfer as transfer_lib
from jaxkd.config import Config, DistillConfig, ExportConfig, StudentConfig, TeacherConfig, dump_config
from jaxkd.loop import Runtime, mark_stage, read_stages, restore_best, total_steps, train_loop
from jaxkd.model import ModelConfig, param_count, param_mib, word_embeddings
from jaxkd.optim import OptimConfig, make_optimizer, make_schedule
from jaxkd.tasks import heldout
from jaxkd.lock import RunLock
from jaxkd.plan import (Plan, Split, build_student, cache_dir, prepare, resolve_teacher,
                        teacher_source, transfer_summary)

log = logging.getLogger("jaxkd")


def evaluate(rt: Runtime, task: tasks.Task, model_cfg: ModelConfig, params,
             split: Split) -> tuple[dict, np.ndarray]:
    """The task's scores of the model on `split`, and its outputs."""
    outputs = rt.predict(model_cfg, params, split.encoded, task.outputs_per_token, desc="evaluate")
    return task.scores(outputs, split.encoded, split.examples), outputs


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


def heldout_scores(rt: Runtime, plan: Plan, split: Split, model_cfg: ModelConfig, params,
                   has_head: bool, terms: tuple | None = None) -> dict[str, float]:
    """A held-out task's figures of a model on `split` (`jaxkd.tasks.heldout`): its head's
    figures where its head means something (`has_head`), and with `terms` = (jitted term
    eval, proj_params, placed teacher params) every distillation term and the selection score."""
    return heldout.scores(
        plan.task.eval_batches(split.encoded, rt.data), rt.mesh,
        mlm=(heldout.jitted_mlm_eval(model_cfg), params) if has_head else None,
        terms=None if terms is None else (terms[0], params, *terms[1:]))


def _model_entry(rt: Runtime, model_cfg: ModelConfig, params) -> dict:
    """A report's entry of one model: its size and shape and its speed (`measure_speed`)."""
    return {"params": param_count(params), "layers": model_cfg.encoder.num_layers,
            "hidden_size": model_cfg.encoder.hidden_size, "size_mb": param_mib(params),
            **report_lib.measure_speed(steps.make_logits_fn(model_cfg), params,
                                       rt.data.batch_size, rt.data.max_seq_len)}


# ---------------------------------------------------------------- stages

def _params_record(params) -> dict[str, np.ndarray]:
    """The arrays of a params tree by path, as the exported teacher's check record keys them."""
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _load_exported_teacher(task: tasks.Task, out_dir: pathlib.Path, config: ModelConfig):
    """The fine-tuned teacher's params from its export, checked against the record written
    after it (`params.check.json`; an export without one, from an older jaxkd, is trusted)."""
    params = task.load_model(out_dir, config.head)[1]
    record = out_dir / "params"
    if util.check_path(record).is_file():
        problem = util.check_problem(record, _params_record(params))
        if problem is not None:
            raise ValueError(f"its weights: {problem}")
    return params


def stage_teacher(rt: Runtime, plan: Plan, teacher: TeacherConfig, optim_cfg: OptimConfig,
                  seed: int):
    """Fine-tune the teacher when asked; returns its params (config: `plan.teacher_config`)."""
    out_dir = rt.workdir / "teacher"
    ft = teacher.finetune
    config = plan.teacher_config
    if read_stages(rt.workdir).get("teacher", {}).get("done") and plan.finetune_steps != 0:
        try:
            return _load_exported_teacher(plan.task, out_dir, config)
        except Exception as err:  # pylint: disable=broad-except  (missing, truncated, unreadable)
            log.warning("teacher: the exported teacher %s is missing or unreadable (%s); "
                        "exporting it again from its checkpoints in %s", out_dir, util.first_line(err),
                        rt.workdir / "checkpoints" / "teacher")
    _, params = plan.task.load_model(plan.teacher_dir, config.head, jax.random.key(seed))
    params = plan.task.reorder_head(params, plan.teacher_columns)  # outputs in the task's order
    if plan.finetune_steps == 0:
        return params
    train = plan.splits["train"].encoded
    make_batches = plan.task.batches(train, rt.data, seed)
    epoch_steps = make_batches(None).epoch_steps
    total = total_steps(plan.finetune_steps, ft.epochs, epoch_steps)
    tx, schedule = _optimizer(dataclasses.replace(optim_cfg, learning_rate=ft.learning_rate), total)
    state = steps.TrainState.create(params, tx)
    shardings = sharding.tree_shardings(rt.mesh, state)
    state = sharding.place(state, shardings)
    step_fn = sharding.jit_finetune_step(steps.make_finetune_step(config, schedule), rt.mesh, shardings)
    eval_fn = _eval_fn(rt, plan, config)
    state, ckpt = train_loop(rt, "teacher", state=state, step_fn=step_fn, make_batches=make_batches,
                             total_steps=total, epoch_steps=epoch_steps,
                             eval_every=ft.eval_every, eval_fn=eval_fn, seed=seed)
    state, best = restore_best(ckpt, state, rt.checkpoint.keep_best and eval_fn is not None)
    ckpt.close()
    metric = plan.task.metrics[0]
    for note in compare.teacher_readiness(report_lib.eval_curve(rt.workdir, "teacher", metric), metric):
        log.warning("teacher: %s", note)
    params = jax.device_get(state.params)
    if rt.is_main:
        plan.task.export(config, params, out_dir, plan.tokenizer,
                         exported.export_settings(plan.task, rt.data))
        util.write_check(out_dir / "params", _params_record(params))  # after the weights
    mark_stage(rt, "teacher", {"steps": total, "selected_step": best})
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
                         enc: data_lib.Encoded, dtype: str = "float32") -> cache_lib.TeacherLogits:
    """The teacher's outputs on the distillation set `enc` (the training split and any transfer
    rows), from the disk cache (stored as `dtype`) or computed once; the key covers every row
    and the storage dtype, so another transfer set has another cache."""
    per_token = plan.task.outputs_per_token
    key = cache_lib.fingerprint(teacher_params, dataclasses.asdict(plan.teacher_config),
                                (enc.input_ids, enc.token_type_ids, enc.offsets),
                                rt.data.max_seq_len, per_token,
                                # float32 caches keep the keys they had before the option
                                *([] if dtype == "float32" else [dtype]))
    log.info("teacher cache %s: %d training rows", key, len(enc))
    table, hit = cache_lib.load_or_compute(
        cache_dir, key, enc.output_rows(per_token),
        lambda: rt.predict(plan.teacher_config, teacher_params, enc, per_token,
                           desc="teacher cache"),
        write=rt.is_main, dtype=dtype, agree=sharding.all_processes)
    log.info("teacher cache %s (%s)", "hit" if hit else "computed", key)
    return cache_lib.TeacherLogits(table, enc, per_token)


@dataclasses.dataclass(frozen=True)
class StudentRun:
    """What every training of the student shares: the section it is built from, the optimizer
    section, the teacher, the distillation set and where caches live. Each training (a search
    candidate, the distill stage, the labels-only baseline) starts from the same init, seed
    and batch order (`seed` + 1)."""

    student: StudentConfig
    optim: OptimConfig
    teacher_params: Any
    train: data_lib.Encoded
    seed: int
    fsdp: bool
    cache_dir: pathlib.Path


def train_student(rt: Runtime, plan: Plan, run_: StudentRun, distill: DistillConfig, stage: str, *,
                  total: int | None = None, evaluate_during: bool = True):
    """Train the student with `distill`'s loss as stage `stage` (its checkpoints, metric rows
    and resume); `total`: steps (default: distill.steps or epochs). Returns (params, the
    stage's record: steps and selected step, the trained loss projections)."""
    teacher_cfg = plan.teacher_config
    student_cfg, params = build_student(run_.student, teacher_cfg, run_.teacher_params,
                                        jax.random.key(run_.seed + 1), plan.task)
    make_batches = plan.task.batches(run_.train, rt.data, run_.seed + 1)
    epoch_steps = make_batches(None).epoch_steps
    if total is None:
        total = 0 if distill.steps == 0 else total_steps(distill.steps, distill.epochs, epoch_steps)
    tx, schedule = _optimizer(run_.optim, total)
    proj = losses.init_projections(distill, student_cfg.encoder, teacher_cfg.encoder,
                                   jax.random.key(run_.seed + 2))
    state = steps.TrainState.create(params, tx, proj_params=proj)
    state_shardings = sharding.tree_shardings(rt.mesh, state, run_.fsdp)
    state = sharding.place(state, state_shardings)
    best = None
    if total > 0:
        source = teacher_source(distill, plan.task)
        prepare_batch = lambda b: b  # noqa: E731
        if source == "cached":
            prepare_batch = teacher_logits_cache(rt, plan, run_.teacher_params, run_.cache_dir,
                                                 run_.train, distill.teacher_cache_dtype).attach
        teacher_shardings = sharding.tree_shardings(rt.mesh, run_.teacher_params, run_.fsdp)
        placed_teacher = (sharding.place(run_.teacher_params, teacher_shardings)
                          if source == "live" else None)
        jitted = sharding.jit_distill_step(
            steps.make_distill_step(student_cfg, teacher_cfg, distill, schedule, teacher=source,
                                    objective=plan.task.objective(student_cfg.head)),
            rt.mesh, state_shardings, teacher_shardings if source == "live" else None)
        step_fn = lambda state, batch, rng: jitted(state, placed_teacher, batch, rng)  # noqa: E731
        eval_fn = _eval_fn(rt, plan, student_cfg) if evaluate_during else None
        if plan.task.heldout and eval_fn is not None:
            term_eval = jax.jit(heldout.make_terms_eval(student_cfg, teacher_cfg, distill,
                                                        plan.task.objective(student_cfg.head)))
            eval_fn = lambda state: heldout_scores(  # noqa: E731
                rt, plan, plan.splits["eval"], student_cfg, state.params, plan.task.heldout_heads()[1],
                (term_eval, state.proj_params, placed_teacher))
        state, ckpt = train_loop(rt, stage, state=state, step_fn=step_fn,
                                 make_batches=make_batches, total_steps=total,
                                 epoch_steps=epoch_steps, eval_every=distill.eval_every,
                                 eval_fn=eval_fn, seed=run_.seed + 1, prepare_batch=prepare_batch,
                                 seed_offset=1)
        state, best = restore_best(ckpt, state, rt.checkpoint.keep_best and eval_fn is not None)
        ckpt.close()
    return (jax.device_get(state.params), {"steps": total, "selected_step": best},
            jax.device_get(state.proj_params))


def stage_distill(rt: Runtime, plan: Plan, run_: StudentRun, distill: DistillConfig):
    """Distil the student (config: `plan.student_config`), with the temperature and alpha that
    `distill.search` chooses on the eval split where it is set; returns its params and the
    trained loss projections."""
    record = {}
    if distill.search is not None and distill.steps != 0:
        if teacher_source(distill, plan.task) == "cached":  # built once, before any is timed
            teacher_logits_cache(rt, plan, run_.teacher_params, run_.cache_dir, run_.train,
                                 distill.teacher_cache_dtype)

        def candidate(i: int, setting: dict) -> tuple[dict, float]:
            started = time.perf_counter()
            params, _, _ = train_student(rt, plan, run_, dataclasses.replace(distill, search=None, **setting),
                                      search_lib.stage_name(i), total=distill.search.steps,
                                      evaluate_during=False)
            scores = evaluate(rt, plan.task, plan.student_config, params, plan.splits["eval"])[0]
            log.info("search %d (%s): eval %s", i, setting, scores)
            return scores, time.perf_counter() - started
        record["search"] = search_lib.run(distill.search, temperature=distill.temperature,
                                          alpha=distill.alpha, metric=plan.task.metrics[0],
                                          workdir=rt.workdir, train=candidate, write=rt.is_main)
        log.info("search: chose %s", record["search"]["setting"])
        distill = dataclasses.replace(distill, search=None, **record["search"]["setting"])
    started = time.perf_counter()
    params, info, proj = train_student(rt, plan, run_, distill, "distill")
    if record:  # the chosen setting's full run, timed as the candidates are (this process's part)
        record["search"]["full_run_seconds"] = round(time.perf_counter() - started, 1)
    mark_stage(rt, "distill", {**info, "rows": len(run_.train), **record})
    return params, proj


def stage_baseline(rt: Runtime, plan: Plan, run_: StudentRun, distill: DistillConfig):
    """The labels-only baseline (`distill.baseline`): the same student, init, steps, seed and
    batches as the distill stage, trained on the hard labels alone; its params (None when off)."""
    if not distill.baseline:
        return None
    params, info, _ = train_student(rt, plan, run_, distill.labels_only(), "baseline")
    mark_stage(rt, "baseline", info)
    return params


def export_onnx(export: ExportConfig, model_cfg: ModelConfig, params,
                directory: pathlib.Path) -> list[pathlib.Path]:
    """The ONNX files `export` asks for, written into `directory`; with export.onnx auto, a model
    the graph cannot express is one warning line and no files (export.onnx true refused it in
    the plan)."""
    if not export.writes_onnx():
        return []
    from jaxkd.deploy import export as deploy_export, graph  # pylint: disable=import-outside-toplevel

    try:
        written = deploy_export.write(model_cfg, params, directory, int8=export.int8)
    except graph.UnsupportedError as err:
        log.warning("export: no ONNX files (export.onnx auto): %s", err)
        return []
    return written


def deployment_table(rt: Runtime, plan: Plan, export: ExportConfig, student_params,
                     teacher_outputs: np.ndarray | None, split: str) -> dict | None:
    """The report's deployment table (`jaxkd.deploy.table`) of the student on `split`: JAX fp32
    and bf16 from its params, and the ONNX files the export stage wrote. One process measures
    one model copy; a multi-process run leaves the table out (one line says so)."""
    if not export.deployment:
        return None
    if jax.process_count() > 1:
        log.info("report: no deployment table in a %d-process run (measure the exported student "
                 "with python -m jaxkd.bench deploy on one host)", jax.process_count())
        return None
    from jaxkd.deploy import export as deploy_export, table  # pylint: disable=import-outside-toplevel

    formats = [table.jax_format(name, plan.student_config, student_params, dtype)
               for name, dtype in (("jax_fp32", "float32"), ("jax_bf16", "bfloat16"))]
    for name, file in (("onnx_fp32", deploy_export.ONNX_FILE), ("onnx_int8", deploy_export.INT8_FILE)):
        if (rt.workdir / "student" / file).is_file():
            formats.append(table.onnx_format(name, rt.workdir / "student" / file))
    chosen = plan.splits[split]
    log.info("report: deployment table of %s on %s", ", ".join(f.name for f in formats), split)
    return table.measure(formats, task=plan.task, encoded=chosen.encoded, examples=chosen.examples,
                         split=split, reference=teacher_outputs, reference_name="teacher",
                         latency_inputs=export.latency_inputs,
                         throughput_batch=export.throughput_batch,
                         bucket_multiple=rt.data.bucket_multiple, max_seq_len=rt.data.max_seq_len)


def stage_report(rt: Runtime, plan: Plan, cfg: Config, teacher_params, student_params,
                 baseline_params=None) -> dict:
    task = plan.task
    models, outputs = {}, {}
    for name, model_cfg, params in (("teacher", plan.teacher_config, teacher_params),
                                    ("student", plan.student_config, student_params)):
        entry = {**_model_entry(rt, model_cfg, params), "metrics": {}, "splits": {}}
        for split in ("eval", "test"):
            if split in plan.splits:
                scores, outputs[(name, split)] = evaluate(rt, task, model_cfg, params,
                                                          plan.splits[split])
                entry["splits"][split] = scores
        entry["metrics"] = entry["splits"].get(plan.report_split, {})
        models[name] = entry
    agreement = {split: task.agreement(outputs[("student", split)], outputs[("teacher", split)],
                                       plan.splits[split].encoded, plan.splits[split].examples)
                 for split in ("eval", "test") if ("teacher", split) in outputs}
    stages = read_stages(rt.workdir)
    chosen = stages.get("distill", {}).get("search", {}).get("setting")
    if chosen:  # the report describes the distillation that ran: the search's choice
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **chosen))
    report = report_lib.build_report(cfg, task, models, agreement,
                                     distill_steps=stages.get("distill", {}).get("steps"))
    baseline = None if baseline_params is None else {
        split: evaluate(rt, task, plan.student_config, baseline_params, plan.splits[split])[0]
        for split in ("eval", "test") if split in plan.splits}
    metric = task.metrics[0]
    report.update(compare.report_sections(
        metric=metric, student=models["student"]["splits"], teacher=models["teacher"]["splits"],
        baseline=baseline, teacher_curve=report_lib.eval_curve(rt.workdir, "teacher", metric),
        stages=stages))
    for note in [report.get("kd_verdict"), *report.get("teacher_readiness", [])]:
        if note:
            log.info("report: %s", note)
    shown = plan.report_split
    if ("teacher", shown) in outputs:
        split = plan.splits[shown]
        report["examples"] = task.showcase(outputs[("student", shown)], outputs[("teacher", shown)],
                                           split.encoded, split.examples)
    if rt.is_main:
        deployment = deployment_table(rt, plan, cfg.export, student_params,
                                      outputs.get(("teacher", shown)), shown)
        if deployment is not None:
            report["deployment"] = deployment
    report["stages"] = stages
    report["data"] = plan.data_stats
    report["transfer"] = transfer_summary(cfg, plan)
    if rt.is_main:
        report_lib.write_report(report, rt.workdir, plots=rt.log.plots)
    return report


def stage_report_heldout(rt: Runtime, plan: Plan, cfg: Config, teacher_params, student_params,
                         proj_params) -> dict:
    """The report of a task scored on held-out text: per split, each model's head's figures
    (`heldout.MODEL_METRICS`) where its head means something, the student's held-out
    distillation terms, sizes and speed."""
    models, terms = {}, {}
    teacher_head, student_head = plan.task.heldout_heads()
    term_eval = jax.jit(heldout.make_terms_eval(plan.student_config, plan.teacher_config,
                                                cfg.distill, plan.task.objective(plan.student_config.head)))
    for name, model_cfg, params, has_head in (
            ("teacher", plan.teacher_config, teacher_params, teacher_head),
            ("student", plan.student_config, student_params, student_head)):
        entry = {**_model_entry(rt, model_cfg, params), "splits": {}}
        for split in ("eval", "test"):
            if split in plan.splits:
                extra = (term_eval, proj_params, teacher_params) if name == "student" else None
                scores = heldout_scores(rt, plan, plan.splits[split], model_cfg, params, has_head,
                                        extra)
                if extra is not None:
                    terms[split] = {k: v for k, v in scores.items() if k.startswith("loss/")}
                entry["splits"][split] = {k: v for k, v in scores.items()
                                          if k in heldout.MODEL_METRICS}
        entry["metrics"] = entry["splits"].get(plan.report_split, {})
        models[name] = entry
    for split in models["student"]["splits"]:  # a model without a head has no figures of its own
        for name in heldout.MODEL_METRICS:
            if any(name in models[who]["splits"][split] for who in models):
                for who in models:
                    models[who]["splits"][split].setdefault(name, None)
    stages = read_stages(rt.workdir)
    report = report_lib.build_report(cfg, plan.task, models, {},
                                     distill_steps=stages.get("distill", {}).get("steps"))
    report.update(heldout=terms, stages=stages, data=plan.data_stats, **plan.task.report_extras())
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


def _begin(cfg: Config, workdir: pathlib.Path, restart: str | None) -> Plan:
    """Everything before the first stage, in the one order that loses nothing: the manifest
    compared with the workdir's (refused before any work), the plan validated, then the
    restarted stages' files removed and the manifest and config.yaml written (process 0)."""
    teacher_dir = resolve_teacher(cfg.teacher)
    keys = manifest.build(cfg, teacher_dir)
    if restart is not None:
        manifest.check_stage(restart)
    sharding.on_process0(lambda: manifest.check(workdir, keys, restart), "the manifest check")
    plan = prepare(cfg, teacher_dir=teacher_dir)

    def record():
        if restart is not None:
            manifest.restart(workdir, restart)
        manifest.write(workdir, keys)
        dump_config(cfg, workdir / "config.yaml")
    sharding.on_process0(record, "recording the run")
    return plan


def _finished_report(workdir: pathlib.Path) -> dict | None:
    """The report of a run whose report stage is recorded done, else None."""
    if not read_stages(workdir).get("report", {}).get("done"):
        return None
    try:
        return json.loads((workdir / "report.json").read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: made again


def run(cfg: Config, restart: str | None = None) -> dict:
    """The whole pipeline for one config; returns the report. `restart`: a stage to redo, with
    every stage after it (`jaxkd.manifest.restart`)."""
    if cfg.compilation_cache:
        use_compilation_cache(cfg.compilation_cache)
    dist = cfg.distributed
    sharding.apply_distributed(dist)
    workdir = pathlib.Path(cfg.workdir)
    with RunLock(workdir):
        plan = _begin(cfg, workdir, restart)
        with Runtime(cfg, workdir) as rt:
            teacher_params = stage_teacher(rt, plan, cfg.teacher, cfg.optim, cfg.seed)
            rt.check_stop("teacher")
            cache = cache_dir(cfg)
            run_ = StudentRun(cfg.student, cfg.optim, teacher_params,
                              distillation_set(rt, plan, cfg.distill.augment, teacher_params, cache),
                              cfg.seed, dist.fsdp, cache)
            student_params, proj_params = stage_distill(rt, plan, run_, cfg.distill)
            rt.check_stop("distill")
            baseline_params = stage_baseline(rt, plan, run_, cfg.distill)
            export_dir = workdir / "student"
            onnx_files = []
            if rt.is_main:
                def write_export(out: pathlib.Path) -> list[pathlib.Path]:
                    plan.task.export(plan.student_config, student_params, out, plan.tokenizer,
                                     exported.export_settings(plan.task, rt.data))
                    return export_onnx(cfg.export, plan.student_config, student_params, out)
                onnx_files = util.write_dir_atomic(export_dir, write_export)
                log.info("export: %s%s", export_dir,
                         "".join(f", {export_dir / p.name}" for p in onnx_files))
            mark_stage(rt, "export", {"dir": str(export_dir), "onnx": [p.name for p in onnx_files]})
            rt.check_stop("export")
            report = _finished_report(workdir)
            if report is not None:  # its measurements kept: --restart report measures again
                log.info("report: done already (%s)", workdir / "report.json")
            elif plan.task.heldout:
                report = stage_report_heldout(rt, plan, cfg, teacher_params, student_params,
                                              proj_params)
            else:
                report = stage_report(rt, plan, cfg, teacher_params, student_params,
                                      baseline_params)
            mark_stage(rt, "report", {})
    return report
