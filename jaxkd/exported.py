"""Exported models: inspect a Hugging Face directory, rebuild its task, load it, run it.

The library behind `jaxkd.predict` and `jaxkd.evaluate` (thin command lines over it), for tests
and notebooks too. A model directory is config.json naming a head class jaxkd knows
(`*ForSequenceClassification`, `*ForTokenClassification`, `*ForQuestionAnswering`) with its
id2label, the weights and the tokenizer files; jaxkd writes one per run (`student/`, `teacher/`).

Contract:
  inspect_model(dir) -> ModelInfo          config.json alone: head, labels, sizes, settings
  export_settings(task, data_cfg) -> dict  what scoring needs, for `hf.save_hf(settings=...)`
  run_settings(info, flags, ...)           max_seq_len / doc_stride / columns: flag > config >
                                           the model's settings > built-in default, with origins
  model_task(info, ...) -> Task            the task an exported model solves
  load_tokenizer, load_model, model_outputs, load_input
  predict_examples(...) -> predictions with their input `line`; evaluate_model(...) -> metrics

Every problem with the inputs is a `UsageError` raised before weights are loaded where it can
be; nothing here parses arguments or prints results (only a progress bar on stderr).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd import hf, tasks, util
from jaxkd.data import DataConfig, DataError, is_local_path

# Built-in defaults of the run settings (a QA stride: a quarter of max_seq_len, DataConfig's).
DEFAULTS = {"max_seq_len": 128, "batch_size": 32, "bucket_multiple": 8}
# Task attributes of the columns and scheme predict's flags name, where the two names differ.
_TASK_ATTRS = {"tag_scheme": "scheme"}


class UsageError(Exception):
    """A problem with the command's inputs, reported (exit code 2) before any work starts."""


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model directory is, read from its config.json alone (no weights loaded)."""

    directory: pathlib.Path
    hf_config: dict
    head: Any  # jaxkd.model.HeadConfig, from the architecture and label count
    label_names: tuple[str, ...]  # id -> name, from id2label
    max_length: int  # the longest input its position table holds
    vocab_size: int
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # export_settings
    onnx: pathlib.Path | None = None  # run this ONNX file (in `directory`) instead of the weights

    @property
    def head_kind(self) -> str:
        return self.head.kind

    @property
    def regression(self) -> bool:
        return self.head.regression

    @property
    def architecture(self) -> str:
        return hf.architecture(self.hf_config, self.head_kind)


def inspect_model(model_dir: str | os.PathLike) -> ModelInfo:
    """The model directory's head, labels and settings; a `UsageError` if it is not a model of a
    task of a supported family."""
    from jaxkd.model import HEADS

    text = str(model_dir)
    if text.endswith(".onnx"):
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"ONNX file not found: {text}")
        return dataclasses.replace(inspect_model(path.parent), onnx=path)
    if text.startswith("pkg:"):
        try:
            directory = hf.resolve_dir(text)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
    else:
        directory = pathlib.Path(text).expanduser()
        if not directory.exists():
            raise UsageError(f"model directory not found: {text}")
        if not directory.is_dir():
            raise UsageError(f"{text} is a file; pass the model directory (config.json, "
                             "model.safetensors and the tokenizer files) or a .onnx file in it")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = hf.read_hf_config(directory)
    except json.JSONDecodeError as err:
        raise UsageError(f"{directory / 'config.json'} is not valid JSON ({err.msg})") from err
    try:
        encoder = hf.config_from_hf(raw)
    except hf.CheckpointError as err:
        raise UsageError(f"{directory}: {err}") from err
    try:
        head = tasks.directory_head(directory, raw)
    except DataError as err:
        raise UsageError(f"{directory}: {err}") from err
    if head is not None:
        return ModelInfo(directory=directory, hf_config=raw, head=head, label_names=(),
                         max_length=encoder.max_length, vocab_size=encoder.vocab_size,
                         settings=_read_settings(raw, directory))
    kind = hf.checkpoint_head_kind(raw)
    if kind is None:
        archs = raw.get("architectures") or []
        known = [hf.architecture(raw, k) for k in HEADS]
        raise UsageError(
            f"{directory} is not a model of a task jaxkd knows: config.json names architectures "
            f"{archs}, not {' or '.join(known)}. Pass a fine-tuned model, "
            "e.g. the student/ or teacher/ directory of a jaxkd run")
    return ModelInfo(directory=directory, hf_config=raw, head=hf.head_from_hf(raw, kind),
                     label_names=_label_names(raw, directory), max_length=encoder.max_length,
                     vocab_size=encoder.vocab_size, settings=_read_settings(raw, directory))


def _label_names(raw: dict, directory: pathlib.Path) -> tuple[str, ...]:
    try:
        return hf.label_names(raw)
    except ValueError as err:
        raise UsageError(f"{directory / 'config.json'}: {err}") from err


# ----------------------------------------------------------------------------- settings


def export_settings(task, data_cfg: DataConfig) -> dict[str, Any]:
    """What scoring an exported model needs beyond its weights and id2label, for
    `hf.save_hf(settings=...)`: `task_type`, `task_name`, `labels`, `max_seq_len`, `doc_stride`
    (tasks that cut inputs into windows) and the input columns and tag scheme predict's flags
    name (the kind's `INPUT_FLAGS`: `text`, `text_pair`, `tokens`, `tag_scheme`) where set."""
    settings: dict[str, Any] = {"task_type": task.type, "task_name": task.name,
                                "labels": list(task.label_names),
                                "max_seq_len": data_cfg.max_seq_len}
    stride = getattr(task, "doc_stride", None)  # the stride the task encodes with
    if stride is not None:
        settings["doc_stride"] = int(stride)
    for key in tasks.kind_of_head(task.head_kind).INPUT_FLAGS:
        value = getattr(task, _TASK_ATTRS.get(key, key), None)
        if value is not None:
            settings[key] = value
    return settings


def _read_settings(raw: dict, directory: pathlib.Path) -> dict[str, Any]:
    found = raw.get(hf.SETTINGS_KEY)
    if found is None:
        return {}
    where = f"{directory / 'config.json'}: {hf.SETTINGS_KEY}"
    if not isinstance(found, dict):
        raise UsageError(f"{where} must be an object, got {found!r}")
    for key in ("max_seq_len", "doc_stride"):
        value = found.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{where}.{key} must be a positive integer, got {value!r}")
    return dict(found)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings a run uses, each with where it came from: a flag (`--max-seq-len`), `config`
    (evaluate's --config), `model` (the directory's settings) or `default`. A doc_stride of None
    is DataConfig's default for the window length (a quarter of it)."""

    values: dict[str, Any]
    origins: dict[str, str]

    def data_config(self, base: DataConfig | None = None, **extra) -> DataConfig:
        """A DataConfig of these values; over `base` (a training config's data section), only
        those that did not come from it, and a batch size flag sets eval_batch_size too."""
        keys = {k: self.values[k] for k in ("max_seq_len", "batch_size", "bucket_multiple",
                                            "doc_stride")
                if k in self.values and self.origins[k] != "config"}
        if base is not None and "batch_size" in keys:
            keys["eval_batch_size"] = keys["batch_size"]
        try:
            return DataConfig(**keys, **extra) if base is None else \
                dataclasses.replace(base, **keys, **extra)
        except DataError as err:
            raise UsageError(str(err)) from err

    def describe(self, task, data_cfg: DataConfig) -> str:
        """`windows of 384 tokens (the model's max_seq_len), stride 128 (the model's doc_stride)`
        for a task that cuts windows, else `max_seq_len 128 (default)`; then the columns taken
        from the model."""
        said = {"model": "the model's ", "config": "the config's ", "default": "default "}

        def origin(key: str) -> str:
            found = self.origins.get(key, "default")
            return found if found.startswith("--") else said[found] + key

        if uses_windows(task):
            parts = [f"windows of {data_cfg.max_seq_len} tokens ({origin('max_seq_len')}), "
                     f"stride {task.doc_stride} ({origin('doc_stride')})"]
        else:
            parts = [f"max_seq_len {data_cfg.max_seq_len} ({origin('max_seq_len')})"]
        parts += [f"{key} {self.values[key]} (the model's)" for key in self.values
                  if key not in DATA_KEYS and self.origins[key] == "model"]
        return ", ".join(parts)


DATA_KEYS = ("max_seq_len", "doc_stride", "batch_size", "bucket_multiple")


def run_settings(info: ModelInfo, flags: Mapping[str, Any], *,
                 config: Mapping[str, Any] | None = None,
                 columns: bool = False) -> RunSettings:
    """max_seq_len, doc_stride, batch_size and bucket_multiple (and, with `columns`, the kind's
    input columns and tag scheme, `INPUT_FLAGS`) for a run. Each: a flag given (not None) wins;
    then `config` (a training config's data section, which describes the run); then the model's
    settings (`export_settings`, read by `inspect_model`); then `DEFAULTS` (doc_stride: None,
    a quarter of max_seq_len; a column: the kind's own default).

    The model's doc_stride goes with its max_seq_len: with another window length and no stride
    given, the stride is the default for that length."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    model = info.settings
    keys = list(DATA_KEYS)
    if columns:
        keys += list(tasks.kind_of_head(info.head_kind).INPUT_FLAGS)
    for key in keys:
        if flags.get(key) is not None:
            values[key], origins[key] = flags[key], "--" + key.replace("_", "-")
        elif config is not None and key in config:
            values[key], origins[key] = config[key], "config"
        elif model.get(key) is not None and (key != "doc_stride" or
                                             values["max_seq_len"] == model.get("max_seq_len")):
            values[key], origins[key] = model[key], "model"
        elif key in DATA_KEYS:
            values[key], origins[key] = DEFAULTS.get(key), "default"
    return RunSettings(values, origins)


def uses_windows(task) -> bool:
    """Whether the task cuts long inputs into overlapping windows (it has a `doc_stride`)."""
    return getattr(task, "doc_stride", None) is not None


# ----------------------------------------------------------------------------- the task


def model_task(info: ModelInfo, *, text: str | None = None, text_pair: str | None = None,
               tokens: str | None = None, tag_scheme: str | None = None, data_cfg=None,
               defaults: Mapping[str, Any] | None = None):
    """The task a model directory solves: its head's task kind over its own label names.
    `defaults`: column and scheme values used where the flag is None (the model's settings)."""
    kind = tasks.kind_of_head(info.head_kind)
    given = {k: v for k, v in (("text", text), ("text_pair", text_pair), ("tokens", tokens),
                               ("tag_scheme", tag_scheme)) if v is not None}
    foreign = [k for k in given if k not in kind.INPUT_FLAGS]
    if foreign:
        owners = [m.MODELS for m in tasks.KINDS.values() if set(foreign) & set(m.INPUT_FLAGS)]
        flags = [f"--{k.replace('_', '-')}" for k in foreign]
        listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise UsageError(f"{listed} {'is' if len(flags) == 1 else 'are'} for {' and '.join(owners)}; "
                         f"{info.directory} is a {info.architecture} ({kind.INPUT_HINT})")
    for key, value in (defaults or {}).items():
        if key in kind.INPUT_FLAGS and value is not None:
            given.setdefault(key, value)
    try:
        return tasks.resolve(kind.exported_config(info.label_names, info.regression, given), data_cfg)
    except DataError as err:
        raise UsageError(f"{info.directory}: {err}") from err


def label_order(task, info: ModelInfo, by_position: bool = False) -> np.ndarray | None:
    """Columns of the model's outputs in the task's label order (None: already in it); a
    `UsageError` when model and task do not predict the same thing."""
    if task.head_kind != info.head_kind:
        raise UsageError(f"{info.directory} is a {info.architecture} but task {task.name!r} is "
                         f"{task.type}")
    try:
        return task.label_order(info.label_names, info.regression, str(info.directory),
                                by_position)
    except DataError as err:
        raise UsageError(str(err)) from err


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedModel:
    info: ModelInfo
    config: Any  # jaxkd.model.ModelConfig; None for an ONNX model
    params: Any
    tokenizer: Any
    runner: Callable | None = None  # an ONNX model's (params, batch) -> outputs, on the host


def load_tokenizer(info: ModelInfo, max_seq_len: int, words: bool = False):
    """The directory's tokenizer, checked against the model's vocabulary and positions; `words`:
    it will be given words split beforehand (`Task.pretokenized`)."""
    if max_seq_len > info.max_length:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the {info.max_length} positions of "
                         f"the model's max_position_embeddings")
    try:
        tokenizer = hf.load_tokenizer(info.directory, words=words)
    except FileNotFoundError as err:
        raise UsageError(f"{info.directory} has no usable tokenizer files: {err}") from err
    if len(tokenizer) > info.vocab_size:
        raise UsageError(f"{info.directory}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"model's vocabulary holds {info.vocab_size}")
    return tokenizer


def load_model(info: ModelInfo, tokenizer, dtype: str | None = None, task=None) -> LoadedModel:
    """The weights (as `task`, resolved for the directory by `Task.for_teacher`, reads its
    models: `Task.load_model`), refusing a checkpoint whose classifier would have to be made up.
    An ONNX model (`info.onnx`) runs in ONNX Runtime; its directory's weights are not read."""
    if info.onnx is not None:
        return _load_onnx(info, tokenizer, dtype)
    try:
        if task is None:
            cfg, params, report = hf.load_hf(info.directory, dtype=dtype, return_report=True)
        else:
            cfg, params, report = task.load_model(task.encoder_dir(info.directory), info.head,
                                                  dtype=dtype, return_report=True)
    except (FileNotFoundError, hf.CheckpointError, DataError) as err:
        raise UsageError(f"{info.directory}: {err}") from err
    if report.fresh:
        raise UsageError(f"{info.directory}: the weights lack the trained {', '.join(report.fresh)} "
                         f"of a {info.architecture}; predictions would be random")
    return LoadedModel(info, cfg, params, tokenizer)


def _load_onnx(info: ModelInfo, tokenizer, dtype: str | None) -> LoadedModel:
    if dtype is not None:
        raise UsageError(f"{info.onnx} is an ONNX model: it runs as it was exported, so a dtype "
                         f"({dtype}) cannot be chosen; pass the model directory to run it in JAX")
    from jaxkd import deploy
    try:
        return LoadedModel(info, None, None, tokenizer, runner=deploy.runner(info.onnx))
    except (ImportError, ValueError) as err:
        raise UsageError(str(err)) from err


def load_weights(info: ModelInfo) -> LoadedModel:
    """The directory's model as its own task reads it, without a tokenizer (export)."""
    return load_model(info, None, task=_for_directory(model_task(info), info))


# ----------------------------------------------------------------------------- running


def progress_bar(desc: str, enabled: bool) -> Callable:
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, file=sys.stderr, leave=False, disable=not enabled,
                           unit="batch")


def model_outputs(model: LoadedModel, encoded, *, per_token: bool, batch_size: int,
                  max_seq_len: int, bucket_multiple: int, progress: Callable | None = None,
                  mesh=None):
    """Outputs ([N, C], or flat [T, C] for token heads) of every row of `encoded`, through the
    one prediction path (`jaxkd.inference.predict`), on all local devices."""
    import jax

    from jaxkd import inference, sharding

    if model.runner is not None:  # an ONNX model: host batches, one session
        return inference.predict(model.runner, None, encoded, batch_size=max(1, batch_size),
                                 mesh=None, bucket_multiple=bucket_multiple,
                                 max_seq_len=max_seq_len, per_token=per_token, progress=progress)
    mesh = sharding.make_mesh() if mesh is None else mesh
    devices = mesh.size
    # Every device gets rows; no batch is larger than the input needs.
    rows = max(1, min(batch_size, len(encoded)))
    batch_size = -(-rows // devices) * devices
    logits_fn = inference.jit_logits_fn(model.config, mesh)
    params = jax.device_put(model.params, sharding.replicated(mesh))
    return inference.predict(logits_fn, params, encoded, batch_size=batch_size, mesh=mesh,
                             bucket_multiple=bucket_multiple, max_seq_len=max_seq_len,
                             per_token=per_token, progress=progress)


def _run(model: LoadedModel, task, examples, data_cfg: DataConfig, progress: Callable | None):
    encoded = task.encode(examples, model.tokenizer, data_cfg.max_seq_len)
    outputs = model_outputs(model, encoded, per_token=task.outputs_per_token,
                            batch_size=data_cfg.eval_batch_size or data_cfg.batch_size,
                            max_seq_len=data_cfg.max_seq_len,
                            bucket_multiple=data_cfg.bucket_multiple, progress=progress)
    return encoded, outputs


def _for_directory(task, info: ModelInfo):
    """The task with what it reads from the model's directory (`Task.for_teacher`: a sentence
    embedder's pooling and lower-casing), read once for loading and encoding."""
    try:
        return task.for_teacher(info.directory)
    except DataError as err:
        raise UsageError(f"{info.directory}: {err}") from err


def predict_examples(info: ModelInfo, task, examples, lines: Sequence[int], data_cfg: DataConfig,
                     *, dtype: str | None = None, progress: Callable | None = None,
                     with_outputs: bool = False):
    """One prediction per example (`load_input`'s), each led by its input `line`; with
    `with_outputs`, also the model's output rows ([N, C]: logits, or embeddings; a pair of
    sentences to embed is two rows, all first sentences then all second ones)."""
    task = _for_directory(task, info)
    tokenizer = load_tokenizer(info, data_cfg.max_seq_len, words=task.pretokenized)
    model = load_model(info, tokenizer, dtype, task)
    encoded, outputs = _run(model, task, examples, data_cfg, progress)
    predictions = task.predictions(outputs, encoded, examples)
    if len(predictions) != len(lines):
        raise AssertionError(f"{len(predictions)} predictions for {len(lines)} input rows")
    predictions = [{"line": line, **prediction} for line, prediction in zip(lines, predictions)]
    return (predictions, outputs) if with_outputs else predictions


def evaluate_model(model_dir, task, data_cfg: DataConfig, source: str, *, by_position: bool = False,
                   dtype: str | None = None, quiet: bool = True,
                   format_flag: str = "data.format") -> dict[str, float]:
    """Task metrics (primary first) of the model in `model_dir` (or its `ModelInfo`) on the
    labelled `source`."""
    info = model_dir if isinstance(model_dir, ModelInfo) else inspect_model(model_dir)
    order = label_order(task, info, by_position)
    examples, _ = load_input(task, data_cfg, source, require_labels=True, format_flag=format_flag)
    task = _for_directory(task, info)
    tokenizer = load_tokenizer(info, data_cfg.max_seq_len, words=task.pretokenized)
    model = load_model(info, tokenizer, dtype, task)
    encoded, outputs = _run(model, task, examples, data_cfg, progress_bar("evaluate", not quiet))
    if order is not None:
        outputs = outputs[:, order]
    if not quiet:
        print(f"evaluate: {util.count(len(examples), 'example')} of {source}", file=sys.stderr)
    return task.scores(outputs, encoded, examples)


# ----------------------------------------------------------------------------- input


def _stdin_records(task, lines: Sequence[str]) -> list[dict | None]:
    """One record per stdin line (None for a blank one): the task's own column names."""
    records: list[dict | None] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            records.append(None)
            continue
        try:
            records.append(task.stdin_record(line, number))
        except DataError as err:
            raise UsageError(str(err)) from err
    return records


def _write_jsonl(path: pathlib.Path, records: Sequence[dict | None]) -> None:
    # A blank line for a blank input line keeps line numbers in messages those of the input.
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write("" if record is None else json.dumps(record, ensure_ascii=False))
            f.write("\n")


def load_input(task, data_cfg: DataConfig, source: str, *, stdin=None,
               require_labels: bool = False, format_flag: str = "data.format"):
    """The task's validated examples of a file, or of stdin when `source` is `-`, and the line
    of each: on stdin the physical line (1-based; blank lines are counted and give no
    example), in a file the example's 1-based row number (a data row of tsv/csv, header not
    counted; a record of jsonl/json/parquet; a CoNLL sentence; a SQuAD question), as no bad row
    is skipped unless data.skip_invalid is set (then rows are numbered among those kept).
    `format_flag`: how the caller's user sets the format (`--format`, or `data.format` for a
    config), as messages say it."""
    with tempfile.TemporaryDirectory(prefix="jaxkd-predict-") as tmp:
        shown, path, lines = source, source, None
        if source == "-":
            # Lines end at "\n" alone (str.splitlines also cuts at \x0c, \x85, \u2028, ...).
            text = (stdin or sys.stdin).read()
            records = _stdin_records(task, text.removesuffix("\n").split("\n") if text else [])
            if not any(records):
                raise UsageError("<stdin> holds no input lines")
            lines = [i for i, record in enumerate(records, start=1) if record is not None]
            shown, path = "<stdin>", str(pathlib.Path(tmp) / "stdin.jsonl")
            _write_jsonl(pathlib.Path(path), records)
            data_cfg = dataclasses.replace(data_cfg, format="jsonl")
        elif not os.path.isfile(source) and (format_flag != "data.format"
                                             or is_local_path(source)):
            # A config may name a Hub split (`test: validation` with data.dataset) instead.
            raise UsageError(f"input file not found: {source}")
        try:
            examples = task.load(data_cfg, path, require_labels=require_labels)
        except (DataError, FileNotFoundError) as err:
            message = str(err).replace(path, shown)
            if format_flag != "data.format":  # data/read.py says it as a config key
                message = message.replace("set data.format", f"pass {format_flag}")
                message = message.replace("data.format", format_flag)
            raise UsageError(message) from err
    return examples, lines if lines is not None else list(range(1, len(examples) + 1))


__all__ = ["DEFAULTS", "LoadedModel", "ModelInfo", "RunSettings", "UsageError", "evaluate_model",
           "export_settings", "inspect_model", "label_order", "load_input", "load_model",
           "load_tokenizer", "model_outputs", "model_task", "predict_examples", "progress_bar",
           "run_settings", "uses_windows"]
