"""Exact match and F1 of an exported QA student on a SQuAD v1.1 file, computed outside jaxkd:
transformers' AutoModelForQuestionAnswering, windows from the tokenizer's overflowing tokens, the
best span over a question's windows from the n best starts and ends (context tokens only, at most
max_answer tokens), scored with the official v1.1 evaluation's definitions. Prints both beside the
run's report.json.

  python scripts/check_qa_export.py runs/exp/squad_kd_s0 ../shared/data/squad/dev-half-v1.1.json 256 96
"""
import collections
import json
import re
import string
import sys

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

N_BEST, MAX_ANSWER = 20, 30


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


def best_answer(model, tok, question, context, max_len, stride):
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
        for i in np.argsort(start)[::-1][:N_BEST]:
            for j in np.argsort(end)[::-1][:N_BEST]:
                if seq[i] != 1 or seq[j] != 1 or j < i or j - i + 1 > MAX_ANSWER:
                    continue
                if start[i] + end[j] > best:
                    best, text = start[i] + end[j], context[offsets[w][i][0]:offsets[w][j][1]]
    return text


def main(run, data, max_len, stride):
    model = AutoModelForQuestionAnswering.from_pretrained(f"{run}/student").eval()
    tok = AutoTokenizer.from_pretrained(f"{run}/student")
    torch.set_num_threads(1)
    em, f1s = [], []
    for article in json.load(open(data, encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = best_answer(model, tok, qa["question"], paragraph["context"], max_len, stride)
                golds = [a["text"] for a in qa["answers"]]
                em.append(max(float(normalize(answer) == normalize(g)) for g in golds))
                f1s.append(max(f1(answer, g) for g in golds))
    report = json.load(open(f"{run}/report.json"))["student"]["metrics"]
    print(f"{len(f1s)} questions: outside jaxkd EM {np.mean(em):.4f} F1 {np.mean(f1s):.4f}; "
          f"report.json EM {report['exact_match']:.4f} F1 {report['f1']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
