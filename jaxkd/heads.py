"""The head registry: one `HeadSpec` per head kind, written by the task kind that owns it
(`jaxkd.tasks.<kind>.HEAD`) and registered here; the model (`jaxkd.model`, which re-exports
these names), the family adapters and the Hugging Face names read it from there."""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a head kind is: one descriptor per kind, written by the task kind that owns it
    (`jaxkd.tasks.<kind>.HEAD`) and registered in `HEADS`; the model, the family adapters and
    the Hugging Face names read it from there.

    module        the Flax module: `module(encoder: BertConfig, head: HeadConfig)` maps the
                  encoder's last hidden states [B, L, H] to logits
    hf_suffix     the transformers class is the family's prefix and this ("ForTokenClassification")
    hf_modules    family base ("bert", "roberta", ...; "*" for every other) -> ((Flax module under
                  "head", checkpoint module), ...): where the head's dense layers live
    reads_cls_only   the head reads the first position alone (the last layer may skip the rest)
    num_labels    a fixed output count (start and end: 2), or None for any
    single_output_regression   one output means a regression (MSE, problem_type "regression")
    dropout_keys  family base -> the config.json key of the head's dropout (None: the encoder's
                  hidden dropout); "classifier_dropout" where the base is not named
    reads_mask    the module also takes the attention mask [B, L] (poolings over real tokens):
                  `module(...)(hidden, deterministic, mask)`
    bare          the transformers class is the family's bare encoder (hf_suffix "Model"), so a
                  checkpoint's architecture never names this kind (`hf.checkpoint_head_kind`)
    onnx          the head as ONNX ops: `onnx(g, encoder, head, params, hidden, mask) -> value`,
                  `g` a `jaxkd.deploy.graph.Graph`, `params` the head's (fp32 NumPy), `hidden` the
                  last hidden states [B, L, H] and `mask` the attention mask [B, L] as float;
                  None: the kind cannot be exported to ONNX
    onnx_output   the ONNX graph's output name
    ties_word_embeddings   the module also takes the word-embedding table [V, E] (a decoder
                  tied to it: masked-LM heads)
    reads_positions   the module also takes `positions` [B, P] (the batch's), the positions it
                  scores, or None for every position
    tied_decoder  family base -> the checkpoint key of the decoder matrix a tied head stands in
                  for: a checkpoint whose decoder is not its word-embedding table is refused
    """

    kind: str
    module: Any
    hf_suffix: str
    hf_modules: Mapping[str, tuple[tuple[str, str], ...]]
    reads_cls_only: bool = False
    num_labels: int | None = None
    single_output_regression: bool = False
    dropout_keys: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    reads_mask: bool = False
    bare: bool = False
    onnx: Any = None
    onnx_output: str = "logits"
    ties_word_embeddings: bool = False
    reads_positions: bool = False
    tied_decoder: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def modules(self, base: str) -> tuple[tuple[str, str], ...]:
        """The head's (Flax module, checkpoint module) pairs in the family whose base is `base`."""
        return self.hf_modules.get(base, self.hf_modules.get("*", ()))

    def dropout_key(self, base: str) -> str | None:
        return self.dropout_keys.get(base, "classifier_dropout")


def _load_kinds() -> None:
    """Imports the task kinds, which register their heads (a dict lookup once imported, or
    while being imported)."""
    importlib.import_module("jaxkd.tasks")


class _Registry(MutableMapping):
    """Head kind -> its descriptor, in registration order. The task kinds register theirs when
    `jaxkd.tasks` is imported, which any read of the registry does first (so a process that
    imports only `jaxkd.model` still sees every kind); writing does not."""

    def __init__(self):
        self._specs: dict[str, HeadSpec] = {}

    def __getitem__(self, kind: str) -> HeadSpec:
        _load_kinds()
        return self._specs[kind]

    def __iter__(self):
        _load_kinds()
        return iter(self._specs)

    def __len__(self) -> int:
        _load_kinds()
        return len(self._specs)

    def __setitem__(self, kind: str, spec: HeadSpec) -> None:
        self._specs[kind] = spec

    def __delitem__(self, kind: str) -> None:
        del self._specs[kind]


# The first kind registered with default=True is the head of a checkpoint that has none (a bare
# encoder).
HEADS = _Registry()
_DEFAULT_HEAD: list[str] = []


def register_head(spec: HeadSpec, default: bool = False) -> HeadSpec:
    HEADS[spec.kind] = spec
    if default and not _DEFAULT_HEAD:
        _DEFAULT_HEAD.append(spec.kind)
    return spec


def head_spec(kind: str) -> HeadSpec:
    """The descriptor of a head kind, or a ValueError naming the known ones."""
    if kind not in HEADS:
        raise ValueError(f"head kind {kind!r} is not one of {sorted(HEADS)}")
    return HEADS[kind]


def default_head_kind() -> str:
    """The head kind given to a checkpoint that has no head of its own."""
    _load_kinds()
    return _DEFAULT_HEAD[0]
