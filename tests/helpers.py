"""Plain helpers shared by the test modules (fixtures live in conftest.py).

`import helpers` works from every test directory: pytest puts `tests/` on sys.path (rootdir
conftest), and the multi-process scripts run from `tests/`. Nothing here creates an array at
import, so a process may still set its device count after importing it.

Sections: tiny models; runs of the pipeline (config, in-process run, train.py launches, kill -9
resume); generated CoNLL data; the transfer tests' small vocabulary; the distillation world of
the step and sharding tests; the synthetic encoded rows of the data tests.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- tiny models

TINY_ENCODER = dict(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position_embeddings=64)


def tiny_model_config(head_kind: str = "sequence", num_labels: int = 2, **overrides):
    """A ModelConfig small enough to compile in a second: `TINY_ENCODER` (other encoder fields at
    BertConfig's defaults) under a `head_kind` head; `overrides` set encoder or head fields by
    name (as ModelConfig.replace), e.g. hidden_dropout=0.0 or dropout=0.2 (the head's)."""
    from jaxkd.model import BertConfig, HeadConfig, ModelConfig

    return ModelConfig(BertConfig(**TINY_ENCODER), HeadConfig(head_kind, num_labels)).replace(**overrides)


# The pipeline tests' random teacher (a sequence classifier with the MiniLM's vocabulary).
TINY_TEACHER = tiny_model_config(vocab_size=30522, hidden_size=32, num_layers=4, num_heads=4,
                                 intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, options: tuple):
    import jax

    from jaxkd.model import Model

    def apply(params, ids, mask, types, rngs):
        return Model(cfg).apply({"params": params}, ids, mask, types, rngs=rngs, **dict(options))

    return jax.jit(apply)


def forward(cfg, params, ids, mask=None, types=None, rngs=None, **options):
    """`Model(cfg).apply({"params": params}, ids, mask, types, rngs=rngs, **options)`, jitted
    (one program per config, options and shapes; the options, e.g. output_hidden_states or
    deterministic, are static). Eager, the forward dispatches hundreds of small ops, each
    compiled on first use; tests/test_steps.py::test_jit_equals_eager checks jit against eager."""
    return _jitted_apply(cfg, tuple(sorted(options.items())))(params, ids, mask, types, rngs)


def assert_trees_close(a, b, atol, rtol=0):
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b), "the trees differ in structure"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for a coordinator of a multi-process test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- pipeline runs


def with_overrides(cfg: dict, over: dict) -> dict:
    """`cfg` with dotted keys set ({"distill.steps": 8} sets cfg["distill"]["steps"])."""
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def tiny_run_sections() -> dict:
    """The distill, optim, checkpoint, log and export sections every tiny pipeline test runs
    with: 24 distillation steps evaluated twice, checkpoints every 4 steps, no progress output,
    no ONNX files or deployment table (the tests of those turn them on)."""
    return {"distill": {"steps": 24, "eval_every": 12, "temperature": 2.0, "alpha": 0.5},
            "optim": {"learning_rate": 1e-3},
            "checkpoint": {"every_steps": 4, "keep": 2},
            "log": {"every_steps": 4, "progress": False, "tensorboard": False, "plots": False},
            "export": {"onnx": False, "deployment": False}}


def tiny_config(workdir, teacher, data, **over) -> dict:
    """A short SST-2 run of `teacher` on `data` (train.tsv, eval.tsv), dotted overrides `over`."""
    cfg = {
        "workdir": str(workdir), "seed": 3,
        "task": {"name": "sst2"},
        "data": {"train": str(data / "train.tsv"), "eval": str(data / "eval.tsv"),
                 "batch_size": 8, "max_seq_len": 32, "bucket_multiple": 16},
        "teacher": {"model": str(teacher), "finetune": {"steps": 6}},
        "student": {"layers": [1, 3]},
        **tiny_run_sections(),
    }
    return with_overrides(cfg, over)


def run_in_process(cfg: dict) -> dict:
    from jaxkd import config as config_lib
    from jaxkd import trainer

    return trainer.run(config_lib.from_dict(cfg))


def student_params(workdir):
    from jaxkd import hf

    return hf.load_hf(pathlib.Path(workdir) / "student")[1]


def train_env() -> dict:
    """The environment of a train.py subprocess: offline, CPU."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def launch(cfg: dict, path: pathlib.Path) -> subprocess.Popen:
    """`python train.py --config path` (cfg written there as YAML), output piped."""
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(path)],
                            cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_distill_step(workdir: pathlib.Path, proc: subprocess.Popen, step: int,
                          stage: str = "distill") -> None:
    """Block until the run has logged step >= `step` of `stage` (default: distillation)."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r.get("stage") == stage and r.get("step", 0) >= step for r in rows):
                return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run")


def wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen, stage: str = "distill") -> int:
    """Block until a step of `stage` is checkpointed whole (orbax names a step's folder by its
    number once its save is complete); returns the newest such step."""
    directory = workdir / "checkpoints" / stage
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
        if steps:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint of {stage}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for a checkpoint of {stage}")


def assert_resumed(out: str, stage: str = "distill") -> int:
    """The step a relaunched run's `stage` resumed at, from its log (an error when it started
    afresh: a rerun from scratch would end the same, so only this shows a resume)."""
    found = re.findall(rf"{re.escape(stage)}: resuming at step (\d+)", out)
    assert found and int(found[-1]) > 0, f"{stage} did not resume from a checkpoint:\n{out[-3000:]}"
    return int(found[-1])


def assert_kill_resume_matches(make_config: Callable[..., dict], tmp_path: pathlib.Path, over: dict,
                               kill_at: int, stage: str = "distill", rtol: float = 0.0) -> dict:
    """A run killed (-9) at step `kill_at` of `stage` (default: distillation) and started again
    ends as one that was never stopped: the same scores (within `rtol`: the reference runs in
    this process over 4 simulated devices, the resumed run over one, so sums of floats may be
    ordered differently), the same student. `make_config(workdir, **over)`. Returns the resumed
    run's report. The relaunch must resume from the killed run's checkpoint (its log says so),
    not start afresh, which would end the same."""
    reference = run_in_process(make_config(tmp_path / "ref", **over))
    workdir = tmp_path / "run"
    cfg = make_config(workdir, **over)
    proc = launch(cfg, tmp_path / "cfg.yaml")
    wait_for_distill_step(workdir, proc, kill_at, stage)
    wait_for_checkpoint(workdir, proc, stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (workdir / "report.json").exists(), "the run ended before it was killed"
    proc = launch(cfg, tmp_path / "cfg.yaml")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_resumed(out, stage)
    resumed = json.loads((workdir / "report.json").read_text())
    if rtol:
        assert resumed["student"]["splits"].keys() == reference["student"]["splits"].keys()
        for split, scores in reference["student"]["splits"].items():
            for name, value in scores.items():
                np.testing.assert_allclose(resumed["student"]["splits"][split][name], value,
                                           rtol=rtol, err_msg=f"{split} {name}")
    else:
        assert resumed["student"]["splits"] == reference["student"]["splits"]
    assert_trees_close(student_params(workdir), student_params(tmp_path / "ref"), 1e-6)
    return resumed


# ----------------------------------------------------------------------------- CoNLL files

ENTITY_WORDS = {"PER": ["john", "mary", "smith", "anna", "peter"],
                "LOC": ["paris", "berlin", "london", "texas"], "ORG": ["google", "reuters", "fifa", "nasa"]}
NER_FILLER = ["the", "said", "in", "on", "visited", "met", "with", "today", "and", "a", "report"]


def ner_sentences(rng: np.random.Generator, n: int) -> list[tuple[list[str], list[str]]]:
    """`n` sentences of filler words and 1-2 word entities, with their BIO tags."""
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.integers(2, 7)):
            if rng.random() < 0.4:
                kind = rng.choice(list(ENTITY_WORDS))
                span = rng.choice(ENTITY_WORDS[kind], rng.integers(1, 3))
                words += list(span)
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
            else:
                words.append(rng.choice(NER_FILLER))
                tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path: pathlib.Path, sentences) -> pathlib.Path:
    # Token first, tag last, other columns between, as in the CoNLL-2003 files.
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ner_config(workdir, teacher, data, **over) -> dict:
    """A short CoNLL-2003 run of `teacher` on `data` (train.txt, dev.txt, test.txt)."""
    cfg = {
        "workdir": str(workdir), "seed": 1,
        "task": {"name": "conll2003", "type": "token_classification"},
        "data": {"train": str(data / "train.txt"), "eval": str(data / "dev.txt"),
                 "test": str(data / "test.txt"), "batch_size": 8, "max_seq_len": 32},
        "teacher": {"model": str(teacher), "finetune": {"steps": 40, "learning_rate": 3e-3}},
        "student": {"layers": [0, 2]},
        **tiny_run_sections(),
    }
    return with_overrides(cfg, over)


# ----------------------------------------------------------------------------- transfer vocabulary

# A WordPiece vocabulary small enough to know every whole word by eye: bracketed entries are
# special or reserved, ## entries are sub-word pieces; "unbelievable" splits into three pieces.
TRANSFER_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "the", "a", "movie", "film",
                  "good", "bad", "great", "awful", "is", "was", "not", "very", "fun", "dull", "plot",
                  "story", "actor", "cast", "un", "##believ", "##able", "##s", "##ing", ",", ".", "!"]
NEIGHBOURS = 3


def expected_neighbours(word: str, embeddings_VxE: np.ndarray) -> set[str]:
    """The NEIGHBOURS nearest whole words of `word` by cosine similarity, computed from scratch."""
    vocab = TRANSFER_VOCAB
    whole = [i for i, t in enumerate(vocab) if not t.startswith("##")
             and not (t.startswith("[") and t.endswith("]"))]
    unit = embeddings_VxE / np.linalg.norm(embeddings_VxE, axis=1, keepdims=True)
    me = vocab.index(word)
    others = [i for i in whole if i != me]
    sims = unit[others] @ unit[me]
    return {vocab[others[j]] for j in np.argsort(-sims)[:NEIGHBOURS]}


# ----------------------------------------------------------------------------- distillation world

# The step and sharding tests, and tests/_multiprocess_steps.py (its processes): STEPS steps on
# BATCH x LENGTH batches.
STEPS = 3
BATCH, LENGTH = 8, 12


def distill_configs(kind: str = "sequence"):
    """(student_cfg, teacher_cfg, loss_cfg, optim_cfg) of a 1-layer student, 2-layer teacher."""
    from jaxkd.losses import LossConfig
    from jaxkd.optim import OptimConfig

    student = tiny_model_config(kind, 2 if kind == "span" else 3, hidden_size=32, num_layers=1,
                                num_heads=4, intermediate_size=64, max_position_embeddings=32,
                                hidden_dropout=0.0, attention_dropout=0.0)
    teacher = student.replace(hidden_size=48, num_layers=2, intermediate_size=96)
    loss = LossConfig(temperature=2.0, alpha=0.5, hidden_weight=1.0, attention_kl_weight=1.0)
    # eps well above fp32 noise: Adam would blow the rounding noise of gradients that are zero
    # in exact arithmetic (the attention key bias) up to full-size steps that differ per layout.
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=1, clip_norm=1.0, eps=1e-4)
    return student, teacher, loss, optim


def random_batch(rng: np.random.Generator, rows: int = BATCH, length: int = LENGTH,
                 full_mask: bool = False, kind: str = "sequence") -> dict[str, np.ndarray]:
    """Random rows with padded tokens (unless full_mask) and padding rows of weight 0.

    Token labels are -1 on padding and (unless full_mask) on a random part of the real tokens,
    as on the non-first sub-tokens of words."""
    from jaxkd.data import make_batch

    lengths = np.full(rows, length) if full_mask else rng.integers(3, length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    weights = np.ones(rows, np.float32)
    weights[rng.choice(rows, size=rows // 4, replace=False)] = 0.0
    if kind == "token":
        labels = rng.integers(0, 3, (rows, length))
        if not full_mask:
            labels[rng.random((rows, length)) < 0.3] = -1
        labels = np.where(mask > 0, labels, -1)
    elif kind == "span":  # start <= end inside each row's real tokens
        ends = rng.integers(0, lengths)
        labels = np.stack([rng.integers(0, ends + 1), ends], axis=1)
    else:
        labels = rng.integers(0, 3, rows)
    return make_batch((rng.integers(1, 100, (rows, length)) * mask), mask,
                      np.zeros((rows, length), np.int32), labels.astype(np.int32), weights)


def build_world(kind: str = "sequence"):
    """(student_cfg, teacher_cfg, loss_cfg, optim_cfg, state, teacher_params, batches)."""
    import jax

    from jaxkd.losses import init_projections
    from jaxkd.model import init_params
    from jaxkd.optim import make_optimizer
    from jaxkd.steps import TrainState

    student_cfg, teacher_cfg, loss_cfg, optim_cfg = distill_configs(kind)
    params = init_params(student_cfg, jax.random.key(0))
    teacher_params = init_params(teacher_cfg, jax.random.key(1))
    proj = init_projections(loss_cfg, student_cfg.encoder, teacher_cfg.encoder, jax.random.key(2))
    state = TrainState.create(params, make_optimizer(optim_cfg, total_steps=10), proj)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, kind=kind) for _ in range(STEPS)]
    return student_cfg, teacher_cfg, loss_cfg, optim_cfg, state, teacher_params, batches


def general_world():
    """(student_cfg, teacher_cfg, loss_cfg, objective, state, teacher_params, batches) of
    general distillation: masked-LM student and teacher of different widths and head counts,
    the masked-LM objectives with MiniLM-v2 relations, STEPS masked batches of 8 packed rows."""
    import jax

    from jaxkd import steps
    from jaxkd.data.masked import MaskedBatches, Vocabulary
    from jaxkd.data.masking import MaskingConfig
    from jaxkd.losses import LossConfig
    from jaxkd.model import init_params
    from jaxkd.optim import OptimConfig, make_optimizer
    from jaxkd.tasks import general

    student = tiny_model_config("masked_lm", 1, vocab_size=60, hidden_size=32, num_layers=1,
                                num_heads=4, intermediate_size=64, max_position_embeddings=32,
                                hidden_dropout=0.0, attention_dropout=0.0)
    teacher = student.replace(hidden_size=48, num_layers=2, intermediate_size=96, num_heads=6)
    loss_cfg = LossConfig(temperature=2.0, relation_weight=1.0, relation_heads=4)
    objective = general.GeneralObjective(mlm_weight=1.0, kd_weight=2.0)
    state = steps.TrainState.create(init_params(student, jax.random.key(0)),
                                    make_optimizer(OptimConfig(learning_rate=1e-2, eps=1e-4), 10))

    class Rows:
        def __len__(self):
            return 64

        def rows(self, idx):
            return (5 + (np.asarray(idx)[:, None] * 3 + np.arange(16)) % 55).astype(np.int32)

    it = MaskedBatches(Rows(), 8, cfg=MaskingConfig(), seed=0,
                       vocab=Vocabulary(mask_id=4, special_ids=(0, 1, 2, 3, 4), size=60))
    return (student, teacher, loss_cfg, objective, state, init_params(teacher, jax.random.key(1)),
            [next(it) for _ in range(STEPS)])


def two_process_result(kind: str, tmp_path: pathlib.Path):
    """tests/_multiprocess_steps.py run as 2 processes x 2 CPU devices for `kind`: process 0's
    saved losses and final student params (an npz)."""
    out, port = tmp_path / "result.npz", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    script = pathlib.Path(__file__).with_name("_multiprocess_steps.py")
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(out), kind],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for pid in (0, 1)]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log.decode()[-3000:]
    return np.load(out)


def compile_mesh_step(step_fn, mesh, state, teacher_params):
    """The distillation step jitted for `mesh`: state and teacher replicated, rows sharded."""
    from jaxkd import sharding

    return sharding.jit_distill_step(step_fn, mesh, sharding.tree_shardings(mesh, state),
                                     sharding.tree_shardings(mesh, teacher_params))


def run_mesh_steps(step, mesh, state, teacher_params, batches):
    """A compiled step run over `batches`; each process feeds its own slice of every batch.
    Returns the final state and every step's metrics."""
    import jax

    from jaxkd import sharding

    state = sharding.shard_state(state, mesh)
    teacher_params = sharding.shard_state(teacher_params, mesh)
    n, i = jax.process_count(), jax.process_index()
    history = []
    for k, batch in enumerate(batches):
        rows = len(batch["weights"]) // n
        local = {key: v[i * rows:(i + 1) * rows] for key, v in batch.items()}
        state, metrics = step(state, teacher_params, sharding.global_batch(local, mesh),
                              jax.random.key(100 + k))
        history.append(metrics)
    return state, history


# ----------------------------------------------------------------------------- encoded rows

# The data tests and tests/_multiprocess_data.py (its processes).
DATA_TRAIN_STEPS = 5
DATA_BATCH_SIZE = 8
DATA_MAX_SEQ_LEN = 32


def synthetic_encoded(num_examples: int = 29, seed: int = 0):
    """Token lists of random lengths; the same on every process."""
    from jaxkd import data

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, DATA_MAX_SEQ_LEN + 1, size=num_examples)
    ids = [list(rng.integers(1000, 2000, size=n)) for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    return data.Encoded.from_lists(ids, types, labels=rng.integers(0, 3, size=num_examples))


def collect_global_batches(mesh, process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """Training and evaluation batches of `synthetic_encoded()`, assembled over `mesh` and
    gathered back to the host."""
    from jax.experimental import multihost_utils

    from jaxkd import data, sharding

    encoded = synthetic_encoded()
    layout = dict(bucket_multiple=8, max_seq_len=DATA_MAX_SEQ_LEN, process_index=process_index,
                  process_count=process_count)
    train = data.TrainBatches(encoded, DATA_BATCH_SIZE, seed=7, **layout)
    named = [(f"train{i}", next(train)) for i in range(DATA_TRAIN_STEPS)]
    named += [(f"eval{i}", batch)
              for i, batch in enumerate(data.EvalBatches(encoded, DATA_BATCH_SIZE, **layout))]
    out = {}
    for name, batch in named:
        for key, value in sharding.global_batch(batch, mesh).items():
            out[f"{name}/{key}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return out


# ----------------------------------------------------------------------------- encoder families

# Tiny random transformers models of each family (tests/families); torch and transformers are
# imported on first use, so that the modules that need them can skip without them.
FAMILY_VOCAB, FAMILY_HIDDEN = 100, 32
FAMILY_SIZES = dict(vocab_size=FAMILY_VOCAB, hidden_size=FAMILY_HIDDEN, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=37, hidden_act="gelu")
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]
# Head kinds and label counts that every family's import, export and students are checked with.
FAMILY_HEADS = [("sequence", 3), ("sequence", 1), ("token", 5), ("span", 2), ("masked_lm", 1)]


def family_hf_config(model_type: str):
    """A tiny transformers config of the family; the shapes differ from BERT's where the family's do."""
    import transformers

    if model_type == "bert":
        return transformers.BertConfig(**FAMILY_SIZES, max_position_embeddings=40)
    if model_type in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if model_type == "roberta" else transformers.XLMRobertaConfig
        return cls(**FAMILY_SIZES, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                   bos_token_id=0, eos_token_id=2)
    if model_type == "distilbert":
        return transformers.DistilBertConfig(vocab_size=FAMILY_VOCAB, dim=FAMILY_HIDDEN, n_layers=2,
                                             n_heads=4, hidden_dim=37, max_position_embeddings=40)
    if model_type == "electra":
        return transformers.ElectraConfig(**FAMILY_SIZES, embedding_size=24, max_position_embeddings=40)
    raise KeyError(model_type)


def auto_model(kind: str):
    """The transformers Auto class of a head kind ("base": the bare encoder)."""
    import transformers

    return {"base": transformers.AutoModel,
            "sequence": transformers.AutoModelForSequenceClassification,
            "token": transformers.AutoModelForTokenClassification,
            "span": transformers.AutoModelForQuestionAnswering,
            "masked_lm": transformers.AutoModelForMaskedLM}[kind]


def torch_model(model_type: str, kind: str, num_labels: int, seed: int = 0, **config_changes):
    """A randomly initialised transformers model, with weights large enough that a mix-up shows
    (the default init of a model this small gives logits near 0 whatever the wiring)."""
    import torch

    config = family_hf_config(model_type)
    config.num_labels = num_labels
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = auto_model(kind).from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def family_batch(model_type: str, L: int = 9):
    """Right-padded ids (no pad id among the real tokens), mask, and token types where the family
    has them (two segments for BERT and ELECTRA)."""
    pad = family_hf_config(model_type).pad_token_id
    rng = np.random.default_rng(1)
    ids = rng.integers(3, FAMILY_VOCAB, (3, L))
    mask = np.ones((3, L), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = np.where(mask > 0, ids, pad)
    types = None
    if model_type in ("bert", "electra"):
        types = np.zeros((3, L), np.int64)
        types[:, 4:] = 1
        types *= mask
    return ids, mask, types


def torch_logits(model, ids, mask, types) -> np.ndarray:
    import torch

    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if types is not None:
        inputs["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], -1).numpy()
    return out.logits.numpy()


def jaxkd_logits(cfg, params, ids, mask, types) -> np.ndarray:
    from jaxkd.model import apply_model

    return np.asarray(apply_model(cfg, params, ids, mask, types).logits)


def assert_same_logits(a, b, kind, mask, atol=1e-4):
    if kind == "sequence":
        np.testing.assert_allclose(a, b, atol=atol)
    else:  # per token: padding positions are whatever each implementation leaves there
        valid = mask.astype(bool)
        np.testing.assert_allclose(a[valid], b[valid], atol=atol)


def family_tokenizer(model_type: str, texts):
    """A small tokenizer trained here: byte-level BPE for RoBERTa, WordPiece for the others."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if model_type == "roberta":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return transformers.RobertaTokenizerFast(
            tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    cls = transformers.ElectraTokenizerFast if model_type == "electra" else transformers.BertTokenizerFast
    return cls(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
               sep_token="[SEP]", mask_token="[MASK]")


def family_teacher_dir(path, model_type: str, data):
    """A 2-layer random teacher of the family (a bare sequence classifier) with its tokenizer,
    trained on the sentence pairs of `data / "train.tsv"`."""
    texts = [field for line in (data / "train.tsv").read_text().splitlines()[1:]
             for field in line.split("\t")[:2]]
    tokenizer = family_tokenizer(model_type, texts)
    model = torch_model(model_type, "sequence", 2, vocab_size=len(tokenizer), max_position_embeddings=66)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- SQuAD data

NAMES = ["john", "mary", "peter", "anna", "paul", "susan"]
CITIES = ["paris", "berlin", "london", "madrid", "rome", "vienna"]
JOBS = ["teacher", "doctor", "pilot", "farmer", "lawyer", "baker"]
FILLER = "the weather was mild and the streets were quiet on that long day".split()


def _squad_paragraph(rng, k):
    people = rng.choice(NAMES, 3, replace=False)
    facts = [(p, rng.choice(CITIES), rng.choice(JOBS)) for p in people]
    parts = []
    for p, city, job in facts:
        parts.append(" ".join(rng.choice(FILLER, rng.integers(3, 12))))
        parts.append(f"{p} lives in {city} and works as a {job}.")
    context = " ".join(parts)
    qas = []
    for n, (p, city, job) in enumerate(facts):
        for question, answer in ((f"where does {p} live?", city), (f"what does {p} work as?", job)):
            start = context.index(f"{p} lives in {city}") + (len(f"{p} lives in ") if answer == city else
                                                              len(f"{p} lives in {city} and works as a "))
            qas.append({"id": f"p{k}q{n}{answer}", "question": question,
                        "answers": [{"text": answer, "answer_start": start}]})
    return {"context": context, "qas": qas}


def write_squad(path, rng, paragraphs):
    """A SQuAD v1.1 file of generated paragraphs: three people per paragraph, where each
    lives and works, two questions each, answers located by character offset."""
    data = {"version": "1.1", "data": [{"title": "x", "paragraphs": [_squad_paragraph(rng, k)
                                                                     for k in range(paragraphs)]}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
