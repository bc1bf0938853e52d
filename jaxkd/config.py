"""Run configuration: typed, frozen dataclasses read from YAML plus dotted overrides.

Every section is a frozen dataclass; a module receives only its own section. An
unknown key, a wrong type or an impossible value raises `ConfigError` naming the
key (and the nearest valid key) before any work starts.
"""
from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any

import yaml

from jaxkd import util
from jaxkd.cache import STORAGE as CACHE_STORAGE
from jaxkd.data import DataConfig, nearest
from jaxkd.losses import LossConfig
from jaxkd.optim import OptimConfig
from jaxkd.search import SearchConfig
from jaxkd.student import EXPORT_AS
from jaxkd.tasks import KINDS, TaskConfig, check_run, check_transfer, task_config
from jaxkd.transfer import AugmentConfig


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Teacher fine-tuning on the task; skipped when steps is 0."""

    # None: fine-tune for `epochs`, unless the checkpoint already is a model of the task (its
    # architecture has the task's head, in its family, with as many labels); 0: never fine-tune.
    steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 5e-5
    eval_every: int | None = None  # None: once per epoch and at the end

    def __post_init__(self):
        _check(self.steps is None or self.steps >= 0, "teacher.finetune.steps", "must be >= 0")
        _check(self.epochs > 0, "teacher.finetune.epochs", "must be > 0")
        _check(self.learning_rate > 0, "teacher.finetune.learning_rate", "must be > 0")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    model: str = "bert-base-uncased"  # Hugging Face Hub id or local directory
    finetune: FinetuneConfig = FinetuneConfig()
    hidden_dropout: float | None = None  # None: the checkpoint's config
    # A checkpoint of the task whose id2label names are not the task's: output i is label i.
    labels_by_position: bool = False


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """How the student is initialised: teacher_layers | shape | pretrained."""

    init: str = "teacher_layers"
    layers: tuple[int, ...] = (0, 2, 4)  # init=teacher_layers: which teacher layers to copy
    num_layers: int = 4  # init=shape
    hidden_size: int = 312
    num_heads: int = 12
    intermediate_size: int = 1200
    pretrained: str | None = None  # init=pretrained: Hub id or directory
    hidden_dropout: float | None = None  # None: the teacher's
    attention_dropout: float | None = None
    # None: the teacher's family. distilbert (BERT teachers, init teacher_layers or shape): a
    # DistilBERT-architecture student that DistilBertFor* loads. It has no token types, so it
    # trains without them: the teacher's token-type-0 embedding is folded into the position
    # embeddings (exact for single sentences; pairs lose the segment signal, as in DistilBERT).
    export_as: str | None = None

    def __post_init__(self):
        _check(self.init in ("teacher_layers", "shape", "pretrained"), "student.init",
               f"must be teacher_layers, shape or pretrained, got {self.init!r}")
        _check(self.export_as is None or self.export_as in EXPORT_AS, "student.export_as",
               f"must be null (the teacher's family) or one of {', '.join(EXPORT_AS)}, got "
               f"{self.export_as!r}{nearest(str(self.export_as), EXPORT_AS)}")
        _check(self.export_as is None or self.init != "pretrained", "student.export_as",
               "does not apply to student.init pretrained (that student keeps its checkpoint's "
               "family): remove it, or use teacher_layers or shape")
        _check(self.init != "pretrained" or self.pretrained, "student.pretrained",
               "must name a checkpoint when student.init is pretrained")
        _check(len(self.layers) > 0, "student.layers", "must list at least one teacher layer")

    def summary(self) -> dict:
        """The keys that shape this student: `init`, the keys that init reads (not the other
        inits' defaults), the dropouts and `export_as`; for report.json."""
        used = {"teacher_layers": ("layers",),
                "shape": ("num_layers", "hidden_size", "num_heads", "intermediate_size"),
                "pretrained": ("pretrained",)}[self.init]
        keys = ("init", *used, "hidden_dropout", "attention_dropout", "export_as")
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in keys}


@dataclasses.dataclass(frozen=True)
class DistillConfig(LossConfig):
    """Distillation stage: the loss terms (every `LossConfig` field: temperature, alpha,
    hidden_weight, ..., layer_map, relation_heads) and how long to train.

    Loss: alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * hard-label loss, plus the
    intermediate terms with their weights.
    """

    steps: int | None = None  # None: derive from epochs; 0: no distillation training
    epochs: float = 1.0
    teacher_cache: bool = True  # record teacher logits once, on disk, and stream them
    # How the cache stores them: float32, or float16 (half the file, values rounded to fp16;
    # widened to float32 in each batch).
    teacher_cache_dtype: str = "float32"
    eval_every: int | None = None  # None: once per epoch and at the end
    # Variants of the labelled examples (masked, replaced, n-gram-cut words: jaxkd.transfer),
    # labelled by the teacher and trained with the KD term only, for the task kinds that take
    # them (sentence(-pair) and token classification; see each kind's TRANSFER); None: none.
    augment: AugmentConfig | None = None
    # Train the same student (init, steps, seed, batches) on the hard labels alone as well, and
    # report it beside the KD student (the KD gain); a `baseline` stage after distill.
    baseline: bool = False
    # temperature and alpha chosen on the eval split (jaxkd.search): {temperature: [...],
    # alpha: [...], steps: N}; None: the values above.
    search: SearchConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        _check(self.steps is None or self.steps >= 0, "distill.steps", "must be >= 0")
        _check(self.epochs > 0, "distill.epochs", "must be > 0")
        _check(self.teacher_cache_dtype in CACHE_STORAGE, "distill.teacher_cache_dtype",
               f"must be one of {', '.join(CACHE_STORAGE)}, got {self.teacher_cache_dtype!r}")
        _check(not self.baseline or self.alpha > 0 or self.any_intermediate, "distill.baseline",
               "compares KD with training on the labels alone, but this distill section already "
               "trains on the labels alone (alpha 0, no intermediate terms): remove "
               "distill.baseline, or set distill.alpha > 0")
        _check(self.search is None or bool(self.search.temperature or self.search.alpha),
               "distill.search", "lists no candidates: give temperature: [...] and/or alpha: [...]")
        _check(self.search is None or self.alpha > 0, "distill.search",
               "searches the KD term's settings, but distill.alpha is 0 (labels only): remove "
               "distill.search, or set distill.alpha > 0")

    def labels_only(self) -> "DistillConfig":
        """The labels-only baseline's section: no teacher terms, no search, no baseline."""
        return LossConfig.labels_only(dataclasses.replace(self, search=None, baseline=False))


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    compute: str = "float32"  # float32 | bfloat16; params, optimizer state and losses stay fp32

    def __post_init__(self):
        _check(self.compute in ("float32", "bfloat16"), "precision.compute",
               f"must be float32 or bfloat16, got {self.compute!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2  # newest checkpoints kept, besides the best one
    keep_best: bool = True  # also keep the best by the task metric on the eval split

    def __post_init__(self):
        _check(self.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        _check(self.keep > 0, "checkpoint.keep", "must be > 0")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host: passed to jax.distributed.initialize. On Cloud TPU VMs set initialize: true only."""

    initialize: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    fsdp: bool = False  # shard teacher and student params over the data axis
    cpu_devices: int | None = None  # simulate this many CPU devices (testing)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 50
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the export stage writes into workdir/student beside the Hugging Face files, and the
    report's deployment table of what was written (`jaxkd.deploy`)."""

    # model.onnx: true, false, or auto (when the onnx extra, onnx and onnxruntime, is installed)
    onnx: bool | str = "auto"
    int8: bool = True  # with onnx: model.int8.onnx too (ONNX Runtime dynamic quantisation)
    # The report's deployment table: metric, agreement, size, batch-1 latency and throughput of
    # the student in JAX fp32 and bf16 and of the ONNX files written, on the report split.
    deployment: bool = True
    latency_inputs: int = 64  # real inputs of the report split timed at batch 1
    throughput_batch: int = 32

    def __post_init__(self):
        _check(self.onnx in (True, False, "auto"), "export.onnx",
               f"must be true, false or auto, got {self.onnx!r}")
        _check(self.latency_inputs >= 1, "export.latency_inputs", f"must be >= 1, got {self.latency_inputs}")
        _check(self.throughput_batch >= 1, "export.throughput_batch",
               f"must be >= 1, got {self.throughput_batch}")

    def writes_onnx(self) -> bool:
        """Whether the export stage writes model.onnx (auto: whether the extra is installed)."""
        from jaxkd import deploy

        return deploy.available() if self.onnx == "auto" else bool(self.onnx)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    seed: int = 0
    # XLA's persistent compilation cache: a relaunch, a resume or a second run of the same
    # shapes loads the compiled steps instead of compiling them again. None: JAX's own setting
    # (off unless JAX_COMPILATION_CACHE_DIR is set). Trusted: share it only with trusted users.
    compilation_cache: str | None = None
    # Typed per kind: the class is chosen by task.type, else by the preset task.name.
    task: TaskConfig = dataclasses.field(default_factory=task_config)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig()
    precision: PrecisionConfig = PrecisionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    log: LogConfig = LogConfig()
    export: ExportConfig = ExportConfig()

    def __post_init__(self):
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
               "seed", f"must be an integer >= 0, got {self.seed!r}")
        # Transfer rows (teacher-labelled only) have hard-label weight 0: without the KD term
        # they would carry no loss at all.
        for key, given in (("data.unlabeled", self.data.unlabeled),
                           ("distill.augment", self.distill.augment)):
            if given is None:
                continue
            _check(self.distill.alpha > 0, key,
                   f"gives rows that only the teacher labels and trains them with the KD term "
                   f"alone, so it needs distill.alpha > 0 (the teacher's logits, live or cached); "
                   f"got alpha {self.distill.alpha:g}. Set distill.alpha, or remove {key}")
            check_transfer(self.task, key, self.distill.augment)
        check_run(self.task, self.distill, self.teacher)


def _suggest(key: str, choices) -> str:
    return util.did_you_mean(key, choices, cutoff=0.5, hint="; did you mean {!r}?",
                             otherwise=f"; valid keys: {', '.join(sorted(choices))}")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key} has the wrong type: got {value!r}, expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give it as a mapping of keys, got {value!r}")
        if hasattr(tp, "choose"):  # a section typed per kind: the mapping says which class
            try:
                tp = tp.choose(value)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from e
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls, mapping: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if hasattr(cls, "unknown_key"):
                raise ConfigError(cls.unknown_key(str(key)))
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _override_value(raw: str) -> Any:
    """A command-line value read as YAML, except where YAML would lose the text typed.

    `task.text=#1 String` is a YAML comment (nothing), and text YAML cannot parse is no value
    at all: both are taken as the string given. An empty value or an explicit null (`null`, `~`)
    unsets the key.
    """
    text = raw.strip()
    if not text or text in _YAML_NULLS:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if value is None else value


def parse_overrides(overrides: list[str]) -> dict:
    """`["distill.temperature=4", "data.batch_size=64"]` -> nested dict (values read as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. distill.temperature=4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _override_value(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(mapping: dict) -> Config:
    return _build(Config, mapping or {})


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply dotted overrides, and validate everything."""
    mapping: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        with open(path, encoding="utf-8") as f:
            try:
                mapping = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(_yaml_error(path, err)) from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"{path} must hold a mapping of sections at the top level")
    return from_dict(_merge(mapping, parse_overrides(list(overrides))))


def _yaml_error(path: pathlib.Path, err: yaml.YAMLError) -> str:
    """One line for a file YAML cannot read: where, and what is wrong there."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err)
    if isinstance(err, yaml.constructor.ConstructorError):
        return (f"{where}: {problem.strip()}: a config holds plain data only (mappings, lists, "
                "strings, numbers, booleans, null); remove the tag")
    context = getattr(err, "context", None)
    return f"{where}: {problem.strip()}" + (f" ({context.strip()})" if context else "")


def to_dict(cfg) -> dict:
    """Plain YAML-able dict (tuples become lists)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        return x
    return plain(cfg)


def dump_config(cfg: Config, path: str | pathlib.Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def section_help() -> str:
    """One line per section and its keys, for `train.py --help`."""
    lines = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if f.name == "task":
            for type_, module in KINDS.items():
                keys = [g.name for g in dataclasses.fields(module.CONFIG)]
                lines.append(f"  task (type {type_}): {', '.join(keys)}")
        elif _is_dataclass_type(tp):
            keys = [g.name for g in dataclasses.fields(tp)]
            lines.append(f"  {f.name}: {', '.join(keys)}")
        else:
            lines.append(f"  {f.name}")
    return "\n".join(lines)
