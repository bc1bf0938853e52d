"""GLUE task metrics on host NumPy arrays (predictions are gathered first)."""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(pred == label))


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    tp = float(np.sum((pred == 1) & (label == 1)))
    fp = float(np.sum((pred == 1) & (label != 1)))
    fn = float(np.sum((pred != 1) & (label == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation over every class (Gorodkin's R_K; the usual MCC for two classes),
    0 where it is undefined."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    classes = np.union1d(pred, label)
    p_K = np.array([np.sum(pred == k) for k in classes], np.float64)
    t_K = np.array([np.sum(label == k) for k in classes], np.float64)
    n, correct = float(len(label)), float(np.sum(pred == label))
    denom = np.sqrt((n * n - p_K @ p_K) * (n * n - t_K @ t_K))
    return 0.0 if denom == 0 else float((correct * n - p_K @ t_K) / denom)


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    if pred.std() == 0 or label.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, label)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(pred, np.float64)), _ranks(np.asarray(label, np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson,
           "spearman": spearman}


def compute(names, logits_NxC: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    """Task metrics from logits; C == 1 means regression (the logit is the prediction)."""
    pred = logits_NxC[:, 0] if logits_NxC.shape[1] == 1 else np.argmax(logits_NxC, axis=-1)
    return {name: METRICS[name](pred, labels_N) for name in names}


def agreement(student_logits_NxC: np.ndarray, teacher_logits_NxC: np.ndarray) -> float:
    """Fraction of examples where student and teacher predict the same class."""
    if student_logits_NxC.shape[1] == 1:
        return float("nan")
    return accuracy(np.argmax(student_logits_NxC, -1), np.argmax(teacher_logits_NxC, -1))
