"""Evaluation metrics of GLUE, SuperGLUE and the embedded task, in plain numpy.

These run on the host after predictions are gathered, so they are numpy (exact float64, no
tracing) rather than jax. Each metric takes ``(predictions, labels)`` and returns a Python float;
:func:`compute_metrics` picks a task's metrics from its :class:`~kdjax.data.tasks.TaskSpec` and
adds ``"score"``, the mean of those metrics (the per-task number GLUE and SuperGLUE average).

Conventions follow the official scorers: binary F1 and MultiRC F1a count class 1 as positive;
MCC and correlations are 0.0 (not NaN) when undefined, like scikit-learn's MCC; ReCoRD
EM/F1 normalize answers SQuAD-style and take the max over the gold answers.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "accuracy",
    "binary_f1",
    "compute_metrics",
    "exact_match",
    "macro_f1",
    "matthews_corrcoef",
    "multirc_em",
    "multirc_f1a",
    "normalize_answer",
    "pearson",
    "spearman",
    "token_f1",
]


def _class_ids(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int [N]; predictions as ids [N], or logits [N, C] reduced with argmax."""
    labels_n = np.asarray(labels)
    preds = np.asarray(predictions)
    if preds.ndim == labels_n.ndim + 1:
        preds = preds.argmax(-1)
    if preds.shape != labels_n.shape or labels_n.ndim != 1:
        raise ValueError(
            f"predictions {np.shape(predictions)} do not match labels {labels_n.shape}; pass ids [N] or logits [N, C] with labels [N]"
        )
    if labels_n.size == 0:
        raise ValueError("no examples to score; pass at least one prediction")
    return preds.astype(np.int64), labels_n.astype(np.int64)


def _floats(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions, dtype=np.float64).reshape(-1)
    labels_n = np.asarray(labels, dtype=np.float64).reshape(-1)
    if preds.shape != labels_n.shape or preds.size < 2:
        raise ValueError(f"need equal-length score vectors of >= 2 values, got {preds.shape} and {labels_n.shape}")
    return preds, labels_n


def accuracy(predictions, labels) -> float:
    preds, labels_n = _class_ids(predictions, labels)
    return float(np.mean(preds == labels_n))


def _f1_for_class(preds: np.ndarray, labels_n: np.ndarray, cls: int) -> float:
    tp = np.sum((preds == cls) & (labels_n == cls))
    fp = np.sum((preds == cls) & (labels_n != cls))
    fn = np.sum((preds != cls) & (labels_n == cls))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def binary_f1(predictions, labels) -> float:
    """F1 of class 1 (MRPC "equivalent", QQP "duplicate")."""
    preds, labels_n = _class_ids(predictions, labels)
    return _f1_for_class(preds, labels_n, 1)


def macro_f1(predictions, labels) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions (CB)."""
    preds, labels_n = _class_ids(predictions, labels)
    classes = np.union1d(preds, labels_n)
    return float(np.mean([_f1_for_class(preds, labels_n, int(c)) for c in classes]))


def matthews_corrcoef(predictions, labels) -> float:
    """Multiclass MCC (Gorodkin's R_K), the CoLA metric; 0.0 when a marginal is constant."""
    preds, labels_n = _class_ids(predictions, labels)
    classes, inv = np.unique(np.concatenate([labels_n, preds]), return_inverse=True)
    k, n = len(classes), len(labels_n)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (inv[:n], inv[n:]), 1.0)
    t_k, p_k = confusion.sum(1), confusion.sum(0)
    c, s = np.trace(confusion), float(n)
    cov_pred = s * s - p_k @ p_k
    cov_true = s * s - t_k @ t_k
    if cov_pred == 0 or cov_true == 0:
        return 0.0
    return float((c * s - t_k @ p_k) / np.sqrt(cov_pred * cov_true))


def pearson(predictions, labels) -> float:
    preds, labels_n = _floats(predictions, labels)
    dp, dl = preds - preds.mean(), labels_n - labels_n.mean()
    denom = np.sqrt((dp @ dp) * (dl @ dl))
    return float(dp @ dl / denom) if denom > 0 else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    preds, labels_n = _floats(predictions, labels)
    return pearson(_average_ranks(preds), _average_ranks(labels_n))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/ReCoRD normalization: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1_one(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _max_over_answers(fn, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"need one prediction per example with >= 1 example, got {len(predictions)} vs {len(answers)}")
    scores = []
    for pred, golds in zip(predictions, answers):
        golds = [golds] if isinstance(golds, (str, bytes)) else list(golds)
        golds = [g.decode() if isinstance(g, bytes) else g for g in golds]
        pred = pred.decode() if isinstance(pred, bytes) else pred
        scores.append(max((fn(pred, g) for g in golds), default=0.0))
    return float(np.mean(scores))


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """ReCoRD EM: normalized string equality with any gold answer, averaged over examples."""
    return _max_over_answers(lambda p, g: float(normalize_answer(p) == normalize_answer(g)), predictions, answers)


def token_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """ReCoRD F1: bag-of-tokens F1 against the best-matching gold answer, averaged over examples."""
    return _max_over_answers(_token_f1_one, predictions, answers)


def multirc_f1a(predictions, labels) -> float:
    """MultiRC F1a: binary F1 over every (question, answer-option) pair, class 1 = correct."""
    return binary_f1(predictions, labels)


def multirc_em(predictions, labels, question_ids) -> float:
    """MultiRC EM: fraction of questions whose answer options are *all* labeled correctly.

    ``question_ids`` [N] groups answer options; any hashable per-row id works (tfds gives
    ``idx/paragraph`` and ``idx/question``: combine them, e.g. ``paragraph * 100_000 + question``).
    """
    preds, labels_n = _class_ids(predictions, labels)
    qids = np.asarray(question_ids)
    if qids.shape[0] != preds.shape[0]:
        raise ValueError(f"question_ids has {qids.shape[0]} rows but there are {preds.shape[0]} predictions; pass one id per answer option")
    if qids.ndim > 1:  # e.g. [N, 2] (paragraph, question) pairs
        _, qids = np.unique(qids.reshape(len(qids), -1), axis=0, return_inverse=True)
    _, group = np.unique(qids, return_inverse=True)
    wrong = np.zeros(group.max() + 1, dtype=bool)
    np.logical_or.at(wrong, group, preds != labels_n)
    return float(np.mean(~wrong))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": macro_f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
    "exact_match": exact_match,
    "token_f1": token_f1,
    "f1a": multirc_f1a,
    "multirc_em": multirc_em,
}

# Metrics that need an extra keyword from `compute_metrics(**extra)`.
_EXTRA_ARGS = {"multirc_em": ("question_ids",)}


def compute_metrics(task, predictions, labels, **extra) -> dict[str, float]:
    """All metrics of ``task`` (a TaskSpec or a registered name) plus ``"score"``, their mean.

    Args:
      task: :class:`~kdjax.data.tasks.TaskSpec` or a name accepted by ``get_task``.
      predictions: class ids [N] or logits [N, C]; floats [N] for regression; strings for ReCoRD.
      labels: ids [N], floats [N], or for ReCoRD a list of gold-answer lists.
      **extra: metric-specific inputs, e.g. ``question_ids`` for MultiRC EM.
    """
    from kdjax.data import tasks as tasks_lib

    spec = tasks_lib.get_task(task) if isinstance(task, str) else task
    if not spec.metrics:
        raise ValueError(f"task {spec.name!r} has no evaluation metrics (it is a corpus); evaluate it with LM loss instead")
    results = {}
    for name in spec.metrics:
        kwargs = {}
        for arg in _EXTRA_ARGS.get(name, ()):
            if arg not in extra:
                raise ValueError(f"metric {name!r} of task {spec.name!r} needs {arg}=...; pass it to compute_metrics")
            kwargs[arg] = extra[arg]
        results[name] = METRICS[name](predictions, labels, **kwargs)
    results["score"] = float(np.mean([results[m] for m in spec.metrics]))
    return results
