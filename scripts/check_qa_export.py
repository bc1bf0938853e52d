"""Exact match and F1 of an exported QA student on a SQuAD v1.1 file, computed outside jaxkd:
transformers' AutoModelForQuestionAnswering, windows from the tokenizer's overflowing tokens, the
best span over a question's windows from the n best starts and ends (context tokens only, at most
max_answer tokens), scored with the official v1.1 evaluation's definitions. The window length,
stride, n-best and answer length are read from the run's config.yaml (the file too, its
data.test, unless given). Prints both beside the run's report.json and exits 1 when the F1s differ
by more than 0.02.

  python scripts/check_qa_export.py runs/exp/squad_kd_s0 [../shared/data/squad/dev-half-v1.1.json]
"""
import collections
import json
import re
import string
import sys

import numpy as np
import torch
import yaml
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

N_BEST, MAX_ANSWER = 20, 30  # the squad preset's task.n_best and task.max_answer_len
TOLERANCE = 0.02


def normalize(text):  # the official evaluate-v1.1.py normalize_answer
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(prediction, gold):
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_answer(model, tok, question, context, max_len, stride, n_best=N_BEST, max_answer=MAX_ANSWER):
    enc = tok(question, context, truncation="only_second", max_length=max_len, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding=True,
              return_tensors="pt")
    offsets = enc.pop("offset_mapping").numpy()
    enc.pop("overflow_to_sample_mapping")
    with torch.no_grad():
        out = model(**enc)
    best, text = -np.inf, ""
    for w in range(len(offsets)):
        seq = enc.sequence_ids(w)
        start, end = out.start_logits[w].numpy(), out.end_logits[w].numpy()
        for i in np.argsort(start)[::-1][:n_best]:
            for j in np.argsort(end)[::-1][:n_best]:
                if seq[i] != 1 or seq[j] != 1 or j < i or j - i + 1 > max_answer:
                    continue
                if start[i] + end[j] > best:
                    best, text = start[i] + end[j], context[offsets[w][i][0]:offsets[w][j][1]]
    return text


def run_settings(run):
    """(max_len, stride, n_best, max_answer, test file) as the run's config.yaml sets them."""
    with open(f"{run}/config.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    data, task = cfg["data"], cfg["task"]
    stride = data.get("doc_stride") or max(1, data["max_seq_len"] // 4)  # DataConfig.window_stride: the stride used
    return (data["max_seq_len"], stride, task.get("n_best") or N_BEST,
            task.get("max_answer_len") or MAX_ANSWER, data.get("test"))


def main(run, data=None):
    max_len, stride, n_best, max_answer, test = run_settings(run)
    data = data or test
    model = AutoModelForQuestionAnswering.from_pretrained(f"{run}/student").eval()
    tok = AutoTokenizer.from_pretrained(f"{run}/student")
    torch.set_num_threads(1)
    em, f1s = [], []
    for article in json.load(open(data, encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = best_answer(model, tok, qa["question"], paragraph["context"], max_len, stride,
                                     n_best, max_answer)
                golds = [a["text"] for a in qa["answers"]]
                em.append(max(float(normalize(answer) == normalize(g)) for g in golds))
                f1s.append(max(f1(answer, g) for g in golds))
    report = json.load(open(f"{run}/report.json"))["student"]["metrics"]
    print(f"{len(f1s)} questions (windows {max_len}, stride {stride}, n-best {n_best}, answers up to "
          f"{max_answer} tokens): outside jaxkd EM {np.mean(em):.4f} F1 {np.mean(f1s):.4f}; "
          f"report.json EM {report['exact_match']:.4f} F1 {report['f1']:.4f}")
    return 0 if abs(np.mean(f1s) - report["f1"]) <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
