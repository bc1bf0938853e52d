"""The PyTorch references the benchmarks compare with: the reference step script run as is or
under bf16 autocast (`torch_step_cmd`), and the epoch a PyTorch + transformers user would write
(`torch_epoch`), with its readers of the training files and its students and losses.

torch and transformers are imported inside the functions that use them: jaxkd runs without them.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxkd import hf, util
from jaxkd.bench.common import spread_layers

if TYPE_CHECKING:
    from jaxkd.bench.epoch import EpochSetup


# Runs the reference script unchanged inside torch.autocast: sys.argv[1] is the script.
_TORCH_AUTOCAST = ("import runpy, sys, torch\n"
                   "sys.argv = sys.argv[1:]\n"
                   "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
                   "    runpy.run_path(sys.argv[0], run_name='__main__')\n")


def torch_step_cmd(script: pathlib.Path, args: Sequence[str], dtype: str) -> list[str]:
    """The PyTorch reference step as is (fp32), or inside bf16 autocast on the CPU."""
    if dtype == "float32":
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", _TORCH_AUTOCAST, str(script), *args]


def read_tsv(setup: EpochSetup) -> tuple[list[str], list[int]]:
    """sentence/label columns as a plain PyTorch user would read them (no quoting, as GLUE)."""
    with open(setup.train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows if setup.limit is None else rows[:setup.limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def read_conll(setup: EpochSetup) -> tuple[list[list[str]], list[list[int]]]:
    """Words and tag ids of the first --limit sentences, as a plain PyTorch user reads CoNLL
    columns: token first, tag last, a blank line between sentences. Tag ids follow jaxkd's
    label order, so both sides train the same label set."""
    tag_id = {name: i for i, name in enumerate(setup.resolved_task.label_names)}
    sentences: list[list[tuple[str, int]]] = [[]]
    with open(setup.train, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] != "-DOCSTART-":
                sentences[-1].append((fields[0], tag_id[fields[-1]]))
            elif sentences[-1]:
                sentences.append([])
    sentences = [s for s in sentences if s][:setup.limit]
    return [[w for w, _ in s] for s in sentences], [[t for _, t in s] for s in sentences]


def first_subtoken_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """The usual transformers alignment: a word's tag on its first sub-token, -100 (ignored by
    the losses) on its other sub-tokens and on [CLS] and [SEP]: jaxkd's labelling."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def read_squad(setup: EpochSetup) -> list[tuple[str, str, str, int]]:
    """(question, context, first answer, its start) of the first --limit questions."""
    with open(setup.train, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    rows = [(qa["question"], paragraph["context"], qa["answers"][0]["text"], qa["answers"][0]["answer_start"])
            for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    return rows[:setup.limit]


def squad_features(setup: EpochSetup, tokenizer: Any) -> list[dict]:
    """transformers' SQuAD training features: windows of --max-seq-len tokens overlapping by
    the task's doc stride, each labelled with its answer's start and end token, or [CLS] (0)
    when the answer is not wholly inside it."""
    rows = read_squad(setup)
    enc = tokenizer([r[0] for r in rows], [r[1] for r in rows], truncation="only_second",
                    max_length=setup.max_seq_len, stride=setup.resolved_task.doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    features = []
    for w, offsets in enumerate(enc["offset_mapping"]):
        _, _, answer, start_char = rows[enc["overflow_to_sample_mapping"][w]]
        end_char = start_char + len(answer)
        context = [k for k, sequence in enumerate(enc.sequence_ids(w)) if sequence == 1]
        start = end = 0
        if offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
            start = next(k for k in context if offsets[k][1] > start_char)
            end = next(k for k in reversed(context) if offsets[k][0] < end_char)
        features.append({"input_ids": enc["input_ids"][w], "token_type_ids": enc["token_type_ids"][w],
                         "attention_mask": enc["attention_mask"][w], "labels": [start, end]})
    return features


def torch_features(setup: EpochSetup, tokenizer: Any) -> list[dict]:
    """The training examples tokenised (truncated to --max-seq-len) with their labels."""
    if setup.task == "squad":
        return squad_features(setup, tokenizer)
    if setup.per_token:
        words, tags = read_conll(setup)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=setup.max_seq_len)
        labels: list = [first_subtoken_labels(enc.word_ids(k), t) for k, t in enumerate(tags)]
    else:
        texts, labels = read_tsv(setup)
        enc = tokenizer(texts, truncation=True, max_length=setup.max_seq_len)
    return [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": y}
            for ids, types, mask, y in zip(enc["input_ids"], enc["token_type_ids"],
                                           enc["attention_mask"], labels)]


def torch_classes(task: Any) -> tuple[Any, Any]:
    """The transformers model (BERT's class of the task's head) and padding collator of a task
    (`Task.torch_collator`: the token one pads labels with -100 as well as the inputs)."""
    import transformers  # pylint: disable=import-outside-toplevel

    return (getattr(transformers, f"Bert{task.head().spec.hf_suffix}"),
            getattr(transformers, task.torch_collator))


def torch_student(teacher: Any, layers: Sequence[int]) -> Any:
    """DistilBERT-style: a model of the teacher's class copying embeddings, layers, the pooler
    (a token classifier has none) and the head."""
    import copy  # pylint: disable=import-outside-toplevel

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    student = type(teacher)(cfg)
    for name in ("embeddings", "pooler"):
        if getattr(teacher.bert, name) is not None:
            getattr(student.bert, name).load_state_dict(getattr(teacher.bert, name).state_dict())
    for j, i in enumerate(layers):
        student.bert.encoder.layer[j].load_state_dict(teacher.bert.encoder.layer[i].state_dict())
    head = "qa_outputs" if hasattr(teacher, "qa_outputs") else "classifier"
    getattr(student, head).load_state_dict(getattr(teacher, head).state_dict())
    return student


def torch_kd_loss(s_logits: Any, t_logits: Any, labels: Any, temperature: float, alpha: float) -> Any:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student at T), both averaged over the
    labelled rows: every example, or the tokens whose label is not -100 ([B, L, C] logits)."""
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    keep = labels != -100
    s_logits, t_logits, labels = s_logits[keep], t_logits[keep], labels[keep]
    T = temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.softmax(t_logits / T, -1),
                  reduction="batchmean") * T * T
    return alpha * F.cross_entropy(s_logits, labels) + (1 - alpha) * kl


def torch_span_kd_loss(student: Any, teacher: Any, labels: Any, mask: Any, temperature: float,
                       alpha: float) -> Any:
    """DistilBERT's SQuAD loss: alpha * the mean start/end CE + (1 - alpha) * T^2 * the mean
    start/end KL, each distribution over the window's real tokens (padding masked)."""
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    T, pad = temperature, mask == 0
    ce = kl = 0.0
    for side, (s, t) in enumerate(((student.start_logits, teacher.start_logits),
                                   (student.end_logits, teacher.end_logits))):
        s, t = s.masked_fill(pad, -1e9), t.masked_fill(pad, -1e9)
        ce = ce + F.cross_entropy(s, labels[:, side]) / 2
        kl = kl + F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T / 2
    return alpha * ce + (1 - alpha) * kl


def _check_finite(loss: float) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(f"the distillation loss became {loss}")


def read_sentences(setup: EpochSetup) -> list[str]:
    """The sentences of an STS file as released (both of each of the first --limit pairs: all
    first sentences, then all second ones, as jaxkd's rows), or of a TSV's sentence column."""
    with open(setup.train, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if rows and rows[0] and rows[0][0] == "sentence":
        return [r[0] for r in rows[1:]][:setup.limit]
    rows = rows[:setup.limit]
    return [r[5] for r in rows] + [r[6] for r in rows]


def _mean_pool_unit(hidden: Any, mask: Any) -> Any:
    """sentence-transformers' mean pooling over the real tokens, then Normalize."""
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def torch_embedding_epoch(setup: EpochSetup) -> dict[str, float]:
    """sentence-transformers' embedding distillation as a plain PyTorch loop: the teacher's
    embeddings (mean pooling, unit length) of every sentence computed once under no_grad
    (`cache_fill_s`), then one epoch of the student (the teacher's spread layers) on the MSE to
    them over shuffled, dynamically padded batches, AdamW."""
    # pylint: disable=import-outside-toplevel
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import BertModel, BertTokenizer

    task = setup.teacher_task
    if tuple(task.pooling) != ("mean",) or not task.normalize:
        raise ValueError(f"the PyTorch reference pools by mean and normalises; the teacher "
                         f"computes {list(task.pooling)}, normalize {task.normalize}")
    torch.set_num_threads(util.usable_cores())
    torch.manual_seed(setup.seed)
    directory = task.encoder_dir(hf.resolve_dir(setup.teacher))
    teacher = BertModel.from_pretrained(str(directory), add_pooling_layer=False).eval()
    layers = spread_layers(teacher.config.num_hidden_layers, setup.student_layers)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    student = BertModel(cfg, add_pooling_layer=False)
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for j, i in enumerate(layers):
        student.encoder.layer[j].load_state_dict(teacher.encoder.layer[i].state_dict())
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    enc = tokenizer(read_sentences(setup), truncation=True, max_length=setup.max_seq_len)
    features = [{k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask")}
                for i in range(len(enc["input_ids"]))]
    out["data_s"] = time.perf_counter() - t0

    def padded(rows):
        return tokenizer.pad(rows, return_tensors="pt")

    t0 = time.perf_counter()
    targets = []
    with torch.no_grad():
        for start in range(0, len(features), setup.batch):
            b = padded(features[start:start + setup.batch])
            targets.append(_mean_pool_unit(teacher(**b).last_hidden_state, b["attention_mask"]))
    targets = torch.cat(targets)
    out["cache_fill_s"] = time.perf_counter() - t0

    def collate(rows):
        batch = padded([r[0] for r in rows])
        batch["labels"] = torch.stack([r[1] for r in rows])
        return batch

    loader = torch.utils.data.DataLoader(
        list(zip(features, targets)), batch_size=setup.batch, shuffle=True, drop_last=True,
        collate_fn=collate, generator=torch.Generator().manual_seed(setup.seed))
    t0 = time.perf_counter()
    for batch in loader:
        y = batch.pop("labels")
        emb = _mean_pool_unit(student(**batch).last_hidden_state, batch["attention_mask"])
        loss = F.mse_loss(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.item())
    out["epoch_s"] = time.perf_counter() - t0
    out.update(examples=len(loader) * setup.batch, steps=len(loader))
    # Warm: the embeddings already computed (as jaxkd's warm run reads its cache); cold: with them.
    out["warm_s"] = out["data_s"] + out["epoch_s"]
    out["cold_s"] = out["warm_s"] + out["cache_fill_s"]
    return out


def torch_epoch(setup: EpochSetup) -> dict[str, float]:
    """The PyTorch + transformers loop a user would write: dynamic padding over shuffled
    batches, the teacher recomputed under no_grad each step, AdamW; same student and batch
    (for an embedding task, `torch_embedding_epoch`)."""
    # pylint: disable=import-outside-toplevel
    import torch
    from transformers import BertTokenizer

    if setup.resolved_task.torch_embeddings:
        return torch_embedding_epoch(setup)

    torch.set_num_threads(util.usable_cores())
    torch.manual_seed(setup.seed)
    model_class, collator_class = torch_classes(setup.resolved_task)
    directory = hf.resolve_dir(setup.teacher)
    # A classifier of another label count is replaced by a fresh one, as jaxkd's load_teacher does.
    teacher = model_class.from_pretrained(str(directory), num_labels=setup.resolved_task.num_labels,
                                          ignore_mismatched_sizes=True).eval()
    layers = spread_layers(teacher.config.num_hidden_layers, setup.student_layers)
    student = torch_student(teacher, layers).train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    features = torch_features(setup, tokenizer)
    out["data_s"] = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(
        features, batch_size=setup.batch, shuffle=True, drop_last=True,
        collate_fn=collator_class(tokenizer), generator=torch.Generator().manual_seed(setup.seed))
    t0 = time.perf_counter()
    for batch in loader:
        y = batch.pop("labels")
        with torch.no_grad():
            t_out = teacher(**batch)
        s_out = student(**batch)
        if setup.resolved_task.start_end_outputs:
            loss = torch_span_kd_loss(s_out, t_out, y, batch["attention_mask"], setup.temperature,
                                      setup.alpha)
        else:
            loss = torch_kd_loss(s_out.logits, t_out.logits, y, setup.temperature, setup.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.item())
    out["epoch_s"] = time.perf_counter() - t0
    out.update(examples=len(loader) * setup.batch, steps=len(loader))
    out["warm_s"] = out["cold_s"] = out["data_s"] + out["epoch_s"]
    return out
