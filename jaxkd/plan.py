"""What a run will do, decided before anything is written: the plan and its description.

Owns `prepare` (the task, every split, the tokenizer and the teacher's and student's configs,
resolved and validated once), the `Plan` it returns, `describe` (the plan in words, what
`train.py --check` prints), the transfer set's summary, where the teacher's logits come from
(`teacher_source`), where caches live (`cache_dir`), and the student: its config from the
`student` section (`student_config`) and, once the teacher's params exist, its config and
initial params together (`build_student`). Nothing here trains or writes, except the
tokenisation cache that `prepare(write_cache=True)` fills.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from jaxkd import data as data_lib
from jaxkd import deploy, hf, losses, steps, tasks
from jaxkd import student as student_lib
from jaxkd.deploy import graph as deploy_graph
from jaxkd.config import Config, ConfigError, DistillConfig, StudentConfig, TeacherConfig
from jaxkd.loop import total_steps
from jaxkd.model import ModelConfig, init_params


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
    teacher_dir: pathlib.Path | None = None  # teacher.model resolved once: the directory read
    # The checkpoint's head outputs in the task's label order (`Task.teacher_columns`; None: as is)
    teacher_columns: Any = None

    @property
    def report_split(self) -> str:
        """The split the report quotes: test where there is one, else eval."""
        return "test" if "test" in self.splits else "eval"

    @property
    def data_stats(self) -> dict[str, dict]:
        """Per split: source, its size (`Task.split_counts`: examples and the rows the model
        sees, or what the kind counts), rows skipped by reason."""
        return {name: {"source": s.source, **self.task.split_counts(s.examples, s.encoded),
                       "skipped": dict(s.examples.skipped)} for name, s in self.splits.items()}


def resolve_teacher(teacher: TeacherConfig) -> pathlib.Path:
    """The directory `teacher.model` names (a local directory, or the Hub cache's copy)."""
    try:
        return hf.resolve_dir(teacher.model)
    except FileNotFoundError as e:
        raise ConfigError(f"teacher.model {teacher.model!r}: {e}") from e


def _teacher_config(teacher: TeacherConfig, directory: pathlib.Path, task: tasks.Task,
                    dtype: str) -> tuple[ModelConfig, bool, Any]:
    """The teacher's config with the task's head, whether its checkpoint already is a model of
    this task (the head's architecture and label count), and its head's columns in the task's
    label order (`Task.teacher_columns`)."""
    try:
        raw = hf.read_hf_config(directory)
        encoder = hf.config_from_hf(raw)
        hf.check_tied_decoder(directory, task.head_kind)
    except (FileNotFoundError, hf.CheckpointError) as e:
        raise ConfigError(f"teacher.model {teacher.model!r}: {e}") from e
    is_task_model = task.is_model_of(raw)
    try:
        columns = task.teacher_columns(raw, teacher.labels_by_position,
                                       f"teacher.model {teacher.model!r}") if is_task_model else None
    except data_lib.DataError as e:
        raise ConfigError(str(e)) from e
    encoder = encoder.replace(dtype=dtype)
    if teacher.hidden_dropout is not None:
        encoder = encoder.replace(hidden_dropout=teacher.hidden_dropout)
    # The task's head as the teacher's family computes it (its dropout and pooler activation).
    head = task.model_head(hf.head_from_hf(raw, kind=task.head_kind, num_labels=task.num_labels))
    return ModelConfig(encoder, head), is_task_model, columns


def prepare(cfg: Config, write_cache: bool = True,
            teacher_dir: pathlib.Path | None = None) -> Plan:
    """Resolve and validate everything; raises before any output is written. Without
    `write_cache` nothing at all is written (the tokenised splits already in the cache are read,
    the rest tokenised in memory; a general corpus, tokenised to disk, must be there already).
    `teacher_dir`: `resolve_teacher(cfg.teacher)`, when the caller has it already."""
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give a split name or a training file")
    teacher_dir = teacher_dir or resolve_teacher(cfg.teacher)
    try:
        task = tasks.resolve(cfg.task, cfg.data).for_teacher(teacher_dir)
    except data_lib.DataError as e:
        raise ConfigError(f"teacher.model {cfg.teacher.model!r}: {e}") from e
    teacher_dir = task.encoder_dir(teacher_dir)  # its Hugging Face files
    teacher_cfg, is_task_model, columns = _teacher_config(cfg.teacher, teacher_dir, task,
                                                          cfg.precision.compute)
    tokenizer = hf.load_tokenizer(teacher_dir, words=task.pretokenized)
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
    student_cfg = student_config(cfg.student, teacher_cfg, task)
    if cfg.export.onnx is True:  # asked for outright: refused now, not after training
        if not deploy.available():
            raise ConfigError(f"export.onnx is true but onnx and onnxruntime are not installed: "
                              f"{deploy.EXTRA_HINT}, or set export.onnx: auto (written when they are)")
        try:
            deploy_graph.check(student_cfg)
        except deploy_graph.UnsupportedError as e:
            raise ConfigError(f"export.onnx: {e}; set export.onnx: false") from e
    if cfg.distill.any_intermediate:  # the layer map the distill stage will build, checked now
        try:
            losses.layer_map(cfg.distill.layer_map, student_cfg.encoder.num_layers,
                             teacher_cfg.encoder.num_layers)
            losses.relation_layer(cfg.distill.relation_layer, teacher_cfg.encoder.num_layers)
            losses.check_relation_heads(cfg.distill, student_cfg.encoder.hidden_size,
                                        teacher_cfg.encoder.hidden_size,
                                        teacher_cfg.encoder.num_heads)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    # Every split is read and validated before anything (even a tokenisation cache) is written.
    loaded = {name: (getattr(cfg.data, name), task.load(cfg.data, getattr(cfg.data, name)))
              for name in ("train", "eval", "test") if getattr(cfg.data, name) is not None}
    for name, (_, examples) in loaded.items():
        task.check_split(name, examples)
    if cfg.distill.search is not None and "eval" not in loaded and cfg.data.eval_fraction is None:
        raise ConfigError("distill.search chooses temperature and alpha on the eval split, and "
                          "there is none: set data.eval or data.eval_fraction (never the test "
                          "split: it is what the report states)")
    unlabeled = [(source, task.load_unlabeled(cfg.data, source)) for source in cfg.data.unlabeled or ()]
    if cfg.data.unlabeled_max_rows is not None:
        unlabeled = _capped(unlabeled, cfg.data.unlabeled_max_rows)
    if cfg.distill.augment is not None:
        task.check_augmentable(loaded["train"][1])
    if cfg.data.eval_fraction is not None:
        kept, held = task.hold_out(*loaded["train"], cfg.data.eval_fraction, cfg.seed)
        try:
            task.check_split("eval", held[1])
        except data_lib.DataError as e:
            raise ConfigError(f"data.eval_fraction holds out part of data.train as the eval "
                              f"split, which this task cannot use: {e}; set data.eval") from e
        loaded = {"train": kept, "eval": held,
                  **{name: split for name, split in loaded.items() if name == "test"}}
    task.check_tokenizer(tokenizer)
    token_cache = cache_dir(cfg) if write_cache else data_lib.ReadOnlyDir(cache_dir(cfg))
    splits = {name: Split(source, examples,
                          task.encode(examples, tokenizer, cfg.data.max_seq_len, token_cache))
              for name, (source, examples) in loaded.items()}
    transfer = [Split(source, examples, task.encode(examples, tokenizer, cfg.data.max_seq_len,
                                                    token_cache))
                for source, examples in unlabeled]
    plan = Plan(task, tokenizer, splits, teacher_cfg, student_cfg, finetune, transfer,
                teacher_dir=teacher_dir, teacher_columns=columns)
    _check_transfer_fills_a_batch(cfg, plan)
    return plan


def _check_transfer_fills_a_batch(cfg: Config, plan: Plan) -> None:
    """With transfer rows, each batch holds `rows_per_batch` of them and the rest labelled rows:
    both sets must fill their share of one batch (refused now, not when distillation starts)."""
    summary = transfer_summary(cfg, plan)
    if summary is None:
        return
    labelled = len(plan.splits["train"].encoded)
    for name, have, need, fix in (
            ("transfer", summary["rows"], summary["rows_per_batch"],
             "give more unlabelled text, raise data.unlabeled_max_rows or lower data.unlabeled_ratio"),
            ("labelled", labelled, summary["labelled_rows_per_batch"],
             "lower data.batch_size or raise data.unlabeled_ratio")):
        if have < need:
            raise ConfigError(f"{have} {name} rows do not fill the {need} {name} rows of one batch "
                              f"of {cfg.data.batch_size} (data.unlabeled_ratio "
                              f"{cfg.data.unlabeled_ratio:g}): {fix}")


def _capped(unlabeled: list[tuple[str, Any]], limit: int) -> list[tuple[str, Any]]:
    """data.unlabeled's (source, examples) with at most `limit` rows in all
    (`data_lib.sample_rows`); a source left with none is dropped, one cut is named "(k of n
    rows)". The examples keep the counts of rows skipped when the source was read."""
    kept = data_lib.sample_rows([len(examples) for _, examples in unlabeled], limit)
    out = []
    for (source, examples), rows in zip(unlabeled, kept):
        if len(rows) == len(examples):
            out.append((source, examples))
        elif len(rows):
            where = f"{source} ({len(rows)} of {len(examples)} rows)"
            out.append((where, dataclasses.replace(examples.subset(rows, where),
                                                   skipped=examples.skipped)))
    return out


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
        teacher_stage = f"{total_steps(plan.finetune_steps, ft.epochs, epoch_steps)} steps"
    distill = cfg.distill
    total = 0 if distill.steps == 0 else total_steps(distill.steps, distill.epochs,
                                                      distill_epoch_steps)
    source = teacher_source(distill, plan.task)
    source = "cached (logits on disk)" if source == "cached" else source
    grid = [] if distill.search is None else distill.search.candidates(distill.temperature, distill.alpha)
    pairs = ", ".join(f"{c['temperature']:g}/{c['alpha']:g}" for c in grid)
    lines = [f"task: {plan.task.name} ({plan.task.type}), {plan.task.describe_outputs()}, "
             f"metrics {', '.join(plan.task.metrics)}"]
    for name, split in plan.splits.items():
        lines.append(f"data.{name}: {split.source}: {plan.task.describe_split(split.examples, split.encoded)}, "
                     f"skipped {dict(split.examples.skipped) or 'none'}")
    for who, mc in (("teacher", t), ("student", s)):
        enc = mc.encoder
        kind, note = plan.task.describe_model(who)
        lines.append(f"{who}: {hf.architecture(mc, kind)}{f' ({note})' if note else ''}, "
                     f"{enc.num_layers} layers x {enc.hidden_size} "
                     f"hidden, {enc.num_heads} heads, {enc.dtype}"
                     + ("" if enc.type_vocab_size or not t.encoder.type_vocab_size else
                        ", no token types (the teacher's type 0 folded into positions)"))
    lines += [f"stage teacher: {teacher_stage} (batch {data.batch_size}, {epoch_steps} steps per epoch)",
              f"stage distill: {total} steps, teacher {source}, {plan.task.describe_loss(distill)}"
              + ("" if transfer is None else f", {distill_epoch_steps} steps per epoch (one pass "
                 f"over the labelled rows)"),
              *_describe_transfer(transfer),
              *([] if distill.search is None else [
                  f"  search: {len(grid)} candidates (temperature/alpha: {pairs}), "
                  f"{distill.search.steps} steps each, chosen on the eval split"]),
              f"stage baseline: {total} steps on the labels alone (the same init, seed and batches)"
              if distill.baseline else "stage baseline: off (distill.baseline)",
              f"stage export: {_describe_export(cfg.export)}",
              "stage report" + (f": with the deployment table ({cfg.export.latency_inputs} inputs "
                                f"at batch 1, throughput at batch {cfg.export.throughput_batch})"
                                if cfg.export.deployment else ""),
              f"batches: {len(pad.shapes)} shapes {[length for _, length in pad.shapes]} "
              f"(lengths up to {data.max_seq_len}), padding {100 * pad.pad_fraction:.1f}% of tokens",
              f"workdir: {cfg.workdir}"]
    return "\n".join(lines)


def _describe_export(export) -> str:
    if not export.writes_onnx():
        why = "export.onnx false" if export.onnx is False else \
            f"export.onnx auto and the onnx extra not installed: {deploy.EXTRA_HINT}"
        return f"the Hugging Face directory (no ONNX: {why})"
    return "the Hugging Face directory, model.onnx" + (", model.int8.onnx" if export.int8 else "")


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


def teacher_source(distill: DistillConfig, task: tasks.Task | None = None) -> str:
    """Where the distillation step gets the teacher's logits, for a run: the step's own default
    (`steps.default_teacher_source`: "none" for labels only, else "live"), turned into
    "cached" (computed once, on disk) when only logit terms are on and the cache is enabled;
    "live" when intermediate terms need the teacher's layers or the cache is off; "none" for
    labels only.
    """
    source = steps.default_teacher_source(distill)
    if task is not None and task.heldout:  # scored by losses: the teacher runs in every step
        return "live"
    if source == "live" and distill.teacher_cache and not distill.any_intermediate:
        return "cached"
    return source


def cache_dir(cfg: Config) -> pathlib.Path:
    """Where the tokenisation, teacher-logit and augmentation caches live."""
    return pathlib.Path(cfg.data.cache_dir or pathlib.Path(cfg.workdir) / "cache")


def student_config(s: StudentConfig, teacher_cfg: ModelConfig,
                   task: tasks.Task | None = None) -> ModelConfig:
    """The student's config from the `student` section and the teacher's (validated), as
    `task` needs it (`Task.student_model`)."""
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
            hf.check_tied_decoder(s.pretrained, teacher_cfg.head.kind)
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
    student_cfg = student_cfg.replace(**changes)
    if task is None:
        return student_cfg
    try:
        return task.student_model(student_cfg, teacher_cfg)
    except data_lib.DataError as e:
        raise ConfigError(f"student: {e}") from e


def build_student(s: StudentConfig, teacher_cfg: ModelConfig, teacher_params,
                  rng: jax.Array, task: tasks.Task | None = None) -> tuple[ModelConfig, Any]:
    """The student's config (`student_config`, as the plan holds it) and its initial params, of
    the shape that config describes: the teacher's layers, a fresh shape, or a pretrained
    checkpoint, as the `student` section says; head weights the teacher does not have (a
    projection to its width) are fresh."""
    config = student_config(s, teacher_cfg, task)
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
    return config, _with_fresh_head(config, params, jax.random.fold_in(rng, 1))


def _with_fresh_head(config: ModelConfig, params, rng: jax.Array):
    """`params` with the head modules `config` has and `params` lacks (or holds in other
    shapes, such as a projection from a narrower pooling) freshly initialised, and none it does
    not have."""
    shapes = jax.eval_shape(lambda: init_params(config, rng))
    wanted = shapes.get("head", {})
    have = params.get("head", {})

    kept = {name for name in wanted if name in have and
            jax.tree.map(np.shape, have[name]) == jax.tree.map(np.shape, wanted[name])}
    if kept == set(wanted) == set(have):
        return params
    fresh = init_params(config, rng)["head"]
    head = {name: have[name] if name in kept else fresh[name] for name in wanted}
    out = {k: v for k, v in params.items() if k != "head"}
    return {**out, "head": head} if head else out
