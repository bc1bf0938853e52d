"""Sentence-transformers directories and what their modules compute, for `jaxkd.tasks.embedding`.

A sentence-transformers directory (`modules.json`) is a list of modules run in order; jaxkd
reproduces the ones an encoder-based sentence embedder is made of: a `Transformer` (the Hugging
Face encoder, at the module's path), a `Pooling` over its last hidden states (`mean`, `cls`,
`max`, `mean_sqrt_len_tokens`, or several of them concatenated), an optional `Dense` without
an activation (a linear map of the pooled vector, as jaxkd exports a student of another width
than its teacher) and an optional `Normalize` (unit L2 length). Any other module (LayerNorm,
WordEmbeddings, a Dense with an activation, ...) or pooling mode is an error naming it: jaxkd would otherwise compute other embeddings than the teacher's. Both the 2.x-5.x
layout (`pooling_mode_*_tokens` flags, `max_seq_length` in sentence_bert_config.json) and the 6.x
one (`pooling_mode`, `model_max_length` in tokenizer_config.json) are read; `write_modules`
writes the older one, which every sentence-transformers version loads.

Pooling and normalisation are pure JAX functions of the hidden states [B, L, H] and the
attention mask [B, L] (1 on real tokens), written as sentence-transformers computes them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import weights
from jaxkd.data import DataError

Array = jax.Array
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens")
# The 2.x-5.x config flags, in the order sentence-transformers concatenates their outputs.
_LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}
MASK_EPS = 1e-9  # sentence-transformers' clamp of the token count
NORM_EPS = 1e-12  # torch.nn.functional.normalize's


# ----------------------------------------------------------------------------- computing


def pool(hidden_BxLxH: Array, mask_BxL: Array, mode: str) -> Array:
    """One pooling mode's sentence vectors [B, H], as sentence-transformers' `Pooling` computes
    them. A row without any real token (a padding row) gives zeros, never inf or NaN."""
    x = jnp.asarray(hidden_BxLxH, jnp.float32)
    mask = jnp.asarray(mask_BxL) > 0
    real_B = jnp.any(mask, axis=1)
    if mode == "cls":  # the first real token (position 0 when padding is on the right)
        first_B = jnp.argmax(mask, axis=1)
        return jnp.take_along_axis(x, first_B[:, None, None], axis=1)[:, 0]
    if mode == "max":
        top = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=1)
        return jnp.where(real_B[:, None], top, 0.0)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = jnp.sum(x * mask[..., None], axis=1)
        count = jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.float32), MASK_EPS)[:, None]
        return total / (count if mode == "mean" else jnp.sqrt(count))
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")


def onnx_pool(g, hidden: str, mask: str, mode: str) -> str:
    """`pool` as ONNX ops (`jaxkd.deploy.graph.Graph` `g`): hidden [B, L, H], mask [B, L] float."""
    mask3 = g.op("Unsqueeze", mask, g.ints([-1], "axes"))  # [B, L, 1]
    if mode == "cls":  # a one-hot of the first real position, summed over positions
        first = g.op("ArgMax", mask, axis=1, keepdims=1)  # [B, 1]
        length = g.op("Gather", g.op("Shape", mask), g.ints(1, "dim"), axis=0)
        onehot = g.op("Equal", g.op("Range", g.ints(0, "start"), length, g.ints(1, "delta")), first)
        weights = g.op("Unsqueeze", g.op("Cast", onehot, to=1), g.ints([-1], "axes"))
        return g.op("ReduceSum", g.op("Mul", hidden, weights), g.ints([1], "axes"), keepdims=0)
    if mode == "max":
        real3 = g.op("Greater", mask3, g.const(0.0, "zero"))
        top = g.op("ReduceMax", g.op("Where", real3, hidden, g.const(-np.inf, "neg_inf")),
                   axes=[1], keepdims=0)  # opset 17: axes an attribute
        real = g.op("Greater", g.op("ReduceMax", mask, axes=[1], keepdims=1), g.const(0.0, "zero"))
        return g.op("Where", real, top, g.const(0.0, "zero"))
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = g.op("ReduceSum", g.op("Mul", hidden, mask3), g.ints([1], "axes"), keepdims=0)
        count = g.op("Max", g.op("ReduceSum", mask, g.ints([1], "axes"), keepdims=1),
                     g.const(MASK_EPS, "eps"))
        return g.op("Div", total, count if mode == "mean" else g.op("Sqrt", count))
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")


def l2_normalize(x_BxD: Array) -> Array:
    """Rows of unit L2 length (torch's F.normalize: x / max(|x|, 1e-12))."""
    x = jnp.asarray(x_BxD, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def sentence_embeddings(hidden_BxLxH: Array, mask_BxL: Array, pooling: Sequence[str] | str,
                        normalize: bool, dense: Callable[[Array], Array] | None = None) -> Array:
    """The embeddings: each mode's vectors concatenated in order ([B, len(pooling) * H]), the
    `dense` map where there is one, then normalised if asked: a sentence-transformers model's
    Pooling, (Dense,) (Normalize)."""
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    out = jnp.concatenate([pool(hidden_BxLxH, mask_BxL, m) for m in modes], axis=-1)
    if dense is not None:
        out = dense(out)
    return l2_normalize(out) if normalize else out


# ----------------------------------------------------------------------------- directories


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a sentence embedder computes on top of its encoder.

    encoder_dir      the Hugging Face encoder's directory (config.json and weights)
    pooling          pooling modes, concatenated in this order
    normalize        unit-length embeddings
    max_seq_length   the longest input it reads (tokens), None where the directory says nothing
    lowercase        the text is lower-cased before tokenising (sentence_bert_config's do_lower_case)
    from_modules     read from a sentence-transformers directory (else a plain encoder's settings)
    dense_dir        the Dense module's directory (a linear map after the pooling), or None
    dense_width      its output width (0 without one)
    """

    encoder_dir: pathlib.Path
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False
    from_modules: bool = False
    dense_dir: pathlib.Path | None = None
    dense_width: int = 0

    def __post_init__(self):
        if not self.pooling:
            raise DataError("a sentence embedder needs at least one pooling mode")
        for mode in self.pooling:
            if mode not in POOLING_MODES:
                raise DataError(f"pooling mode {mode!r} is not one jaxkd computes; use one of "
                                f"{', '.join(POOLING_MODES)}")


def is_sentence_transformers_dir(directory: str | pathlib.Path) -> bool:
    return (pathlib.Path(directory) / "modules.json").is_file()


def layout(directory: str | pathlib.Path, pooling: Sequence[str] | str | None = None,
           normalize: bool | None = None) -> Layout:
    """The layout of a teacher directory. A sentence-transformers directory is read from its
    modules (a `pooling` or `normalize` given that contradicts them is an error); a plain Hugging
    Face encoder takes `pooling` (default mean) and `normalize` (default false), as
    sentence-transformers builds a model from one."""
    directory = pathlib.Path(directory)
    modes = None if pooling is None else ((pooling,) if isinstance(pooling, str) else tuple(pooling))
    if not is_sentence_transformers_dir(directory):
        return Layout(directory, modes or ("mean",), bool(normalize), None)
    found = read_modules(directory)
    for key, given, own in (("task.pooling", modes, found.pooling),
                            ("task.normalize", normalize, found.normalize)):
        if given is not None and given != own:
            shown = list(own) if isinstance(own, tuple) else own
            raise DataError(f"{key} is {given!r} but the sentence-transformers model {directory} "
                            f"computes {shown!r} (modules.json); remove {key} or use a plain encoder")
    return found


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: the {what} of the sentence-transformers model") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None


def read_modules(directory: str | pathlib.Path) -> Layout:
    """The `Layout` of a sentence-transformers directory; a `DataError` naming any module or
    setting jaxkd cannot reproduce."""
    directory = pathlib.Path(directory)
    modules_path = directory / "modules.json"
    modules = _read_json(modules_path, "module list")
    if not isinstance(modules, list) or not modules:
        raise DataError(f"{modules_path}: expected a non-empty list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [m.get("type") for m, k in zip(modules, kinds)
               if k not in ("Transformer", "Pooling", "Dense", "Normalize")]
    if unknown:
        raise DataError(f"{modules_path}: module {unknown[0]!r} is not one jaxkd reproduces (it "
                        f"computes Transformer, Pooling, Dense and Normalize only); a model with it "
                        f"would give other embeddings than sentence-transformers does")
    rest = kinds[2:]
    if kinds[:2] != ["Transformer", "Pooling"] or rest not in ([], ["Dense"], ["Normalize"],
                                                               ["Dense", "Normalize"]):
        raise DataError(f"{modules_path}: modules {kinds}; jaxkd reproduces Transformer, Pooling, "
                        f"an optional Dense and an optional Normalize, in this order")
    paths = dict(zip(kinds, (directory / str(m.get("path", "")) for m in modules)))
    encoder_dir, pooling_dir = paths["Transformer"], paths["Pooling"]
    if "Normalize" in paths:
        _check_normalize(paths["Normalize"])
    modes = _pooling_modes(pooling_dir / "config.json")
    dense_width = _dense_width(paths["Dense"]) if "Dense" in paths else 0
    settings_path = encoder_dir / "sentence_bert_config.json"
    if not settings_path.is_file():
        settings_path = directory / "sentence_bert_config.json"
    settings = _read_json(settings_path, "settings") if settings_path.is_file() else {}
    _check_prompts(directory / "config_sentence_transformers.json")
    return Layout(encoder_dir, modes, "Normalize" in paths, _max_seq_length(encoder_dir, settings),
                  bool(settings.get("do_lower_case", False)), from_modules=True,
                  dense_dir=paths.get("Dense"), dense_width=dense_width)


_IDENTITY = "torch.nn.modules.linear.Identity"


def _dense_width(path: pathlib.Path) -> int:
    cfg = _read_json(path / "config.json", "Dense config")
    activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation != _IDENTITY:
        raise DataError(f"{path / 'config.json'}: a Dense module with activation {activation!r} is "
                        f"not one jaxkd reproduces (it computes a linear map, {_IDENTITY})")
    if not cfg.get("bias", True):
        raise DataError(f"{path / 'config.json'}: a Dense module without a bias is not one jaxkd "
                        f"reproduces")
    return int(cfg["out_features"])


def read_dense(path: pathlib.Path, in_features: int) -> dict[str, np.ndarray]:
    """A Dense module's weights as the embedding head's `projection` {"kernel" [in, out],
    "bias" [out]} (safetensors; a PyTorch file is read with weights_only)."""
    try:
        tensors = weights.read_tensors(weights.weight_files(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: the Dense module has no weights ({err})") from err
    weight, bias = (np.asarray(tensors[k], np.float32) for k in ("linear.weight", "linear.bias"))
    if weight.shape[1] != in_features:
        raise DataError(f"{path}: the Dense module maps {weight.shape[1]} features, but the pooling "
                        f"gives {in_features}")
    return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}


def _pooling_modes(path: pathlib.Path) -> tuple[str, ...]:
    cfg = _read_json(path, "pooling config")
    if "pooling_mode" in cfg:
        given = cfg["pooling_mode"]
        modes = (given,) if isinstance(given, str) else tuple(given)
    else:
        modes = tuple(mode for flag, mode in _LEGACY_FLAGS.items() if cfg.get(flag)) or ("mean",)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise DataError(f"{path}: pooling mode {mode!r} is not one jaxkd reproduces; it "
                            f"computes {', '.join(POOLING_MODES)}")
    # include_prompt only matters with a prompt, which jaxkd never adds (_check_prompts).
    return modes


def _check_normalize(path: pathlib.Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        return
    cfg = _read_json(config, "Normalize config")
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") != "sentence_embedding":
            raise DataError(f"{config}: Normalize of {cfg[key]!r} is not one jaxkd reproduces (it "
                            f"normalises the sentence embedding only)")


def _check_prompts(path: pathlib.Path) -> None:
    if not path.is_file():
        return
    cfg = _read_json(path, "settings")
    name = cfg.get("default_prompt_name")
    if name:
        raise DataError(f"{path}: default_prompt_name {name!r}: the model prepends a prompt to "
                        f"every text, which jaxkd does not reproduce")


def _max_seq_length(encoder_dir: pathlib.Path, settings: dict) -> int | None:
    if settings.get("max_seq_length"):
        return int(settings["max_seq_length"])
    tokenizer_config = encoder_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():  # sentence-transformers 6 keeps it as the tokenizer's limit
        limit = _read_json(tokenizer_config, "tokenizer config").get("model_max_length")
        if isinstance(limit, int) and 0 < limit < 1_000_000:  # "no limit" is written as ~1e30
            return limit
    return None


def check_writable(modes: Sequence[str]) -> None:
    """Refuses pooling modes that a sentence-transformers Pooling config cannot say: its flags
    name each mode once, concatenated in its own order (cls, max, mean, mean_sqrt_len_tokens)."""
    order = [mode for mode in _LEGACY_FLAGS.values() if mode in modes]
    if list(modes) != order:
        raise DataError(f"pooling modes {list(modes)} cannot be written as a sentence-transformers "
                        f"Pooling, which concatenates each mode once in the order "
                        f"{[m for m in _LEGACY_FLAGS.values() if m in POOLING_MODES]}: "
                        f"use {order}")


def write_modules(out_dir: str | pathlib.Path, pooling: Sequence[str], normalize: bool,
                  width: int, max_seq_length: int,
                  dense: dict[str, np.ndarray] | None = None, lowercase: bool = False) -> pathlib.Path:
    """The sentence-transformers files of a directory whose root holds the Hugging Face encoder
    (`jaxkd.hf.save_hf`): modules.json, sentence_bert_config.json, 1_Pooling/config.json, with
    `dense` (a projection {"kernel" [in, out], "bias"}) 2_Dense/ and with `normalize` a
    Normalize module after it. `width` is the encoder's hidden size; `lowercase`: the text is
    lower-cased before tokenising (sentence_bert_config's do_lower_case)."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    modes = tuple(pooling)
    Layout(out, modes, normalize)  # validates the modes before anything is written
    check_writable(modes)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if dense is not None:
        modules.append(("2_Dense", "Dense"))
    if normalize:
        modules.append((f"{len(modules)}_Normalize", "Normalize"))
    for path, _ in modules[1:]:
        (out / path).mkdir(parents=True, exist_ok=True)
    pooling_cfg = {"word_embedding_dimension": width}
    pooling_cfg.update({flag: mode in modes for flag, mode in _LEGACY_FLAGS.items()
                        if mode in POOLING_MODES})
    _write_json(out / "1_Pooling" / "config.json", pooling_cfg)
    if dense is not None:
        kernel = np.asarray(dense["kernel"], np.float32)
        _write_json(out / "2_Dense" / "config.json",
                    {"in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]),
                     "bias": True, "activation_function": _IDENTITY})
        save_file({"linear.weight": np.ascontiguousarray(kernel.T),
                   "linear.bias": np.asarray(dense["bias"], np.float32)},
                  str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "sentence_bert_config.json",
                {"max_seq_length": int(max_seq_length), "do_lower_case": bool(lowercase)})
    _write_json(out / "modules.json",
                [{"idx": i, "name": str(i), "path": path,
                  "type": f"sentence_transformers.models.{kind}"}
                 for i, (path, kind) in enumerate(modules)])
    return out


def _write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def save(out_dir: str | pathlib.Path, config, params, tokenizer,
         settings: dict | None = None, lowercase: bool = False) -> pathlib.Path:
    """A sentence-transformers directory of a model with the embedding head (`config`, a
    `ModelConfig`, and its `params`) that `SentenceTransformer(out_dir)` loads: the encoder as
    its family's bare model (`BertModel`, `RobertaModel`, ...: `jaxkd.hf.save_hf`, with
    `settings` in its config.json), the tokenizer, and the module files (`write_modules`: the
    head's pooling, its projection as a Dense module, its normalisation; the window
    `settings["max_seq_len"]`, else the encoder's; `lowercase` as the teacher's)."""
    from jaxkd import hf  # pylint: disable=import-outside-toplevel

    head = config.head
    dense = None
    if head.projection:
        dense = {k: np.asarray(v) for k, v in params["head"]["projection"].items()}
    encoder_cfg = config.replace(projection=0)
    encoder_params = {k: v for k, v in params.items() if k != "head"}
    out = hf.save_hf(encoder_cfg, encoder_params, out_dir, tokenizer=tokenizer, settings=settings)
    raw = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key in ("num_labels", "id2label", "label2id", "problem_type"):
        raw.pop(key, None)
    _write_json(out / "config.json", raw)
    window = (settings or {}).get("max_seq_len") or config.encoder.max_length
    write_modules(out, head.pooling, head.normalize, config.encoder.hidden_size, window, dense,
                  lowercase)
    return out
