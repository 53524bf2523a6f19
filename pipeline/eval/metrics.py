"""The one metrics implementation: every results table, finetune, train-head, refine and evaluate use it.

Top-1 and top-5 accuracy, mean class accuracy (the mean of the per-class recalls over the classes present, as TSN
reports it), per-class accuracy and the confusion matrix (rows: true class, columns: prediction).

Top-5: the fraction of videos whose true class is among the 5 highest scores. With fewer than 5 classes it is
NaN (``None`` in JSON), not a trivial 1.0: a table never shows a top-5 that means nothing. Ties at the 5th
score are broken by the lower class index (a stable descending sort), as top-1's ``argmax``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass
class Evaluation:
    """Accuracy figures of video scores against labels."""

    top1: float
    top5: float  # NaN with fewer than 5 classes
    mean_class_accuracy: float
    per_class_accuracy: np.ndarray  # (C,), NaN for classes absent from the labels
    confusion: np.ndarray  # (C, C) int64, rows = true class, columns = predicted class
    class_names: list[str]

    def as_dict(self) -> dict:
        """JSON-friendly copy (NaN accuracies as None)."""
        return {
            "top1": self.top1,
            "top5": None if math.isnan(self.top5) else self.top5,
            "mean_class_accuracy": self.mean_class_accuracy,
            "per_class_accuracy": {n: (None if math.isnan(a) else float(a))
                                   for n, a in zip(self.class_names, self.per_class_accuracy)},
            "confusion": self.confusion.tolist(),
            "class_names": list(self.class_names),
        }


def accuracy_metrics(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray,
             class_names: Sequence[str] | None = None) -> Evaluation:
    """Top-1, top-5 (NaN for C < 5), mean class accuracy (over classes present), per-class accuracy, confusion matrix.

    scores (V, C), labels (V,) integers in [0, C).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"need scores (V, C) and labels (V,), got {scores.shape} and {labels.shape}")
    c = scores.shape[1]
    names = [str(i) for i in range(c)] if class_names is None else list(class_names)
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} score columns")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    pred = scores.argmax(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    if c >= 5:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        top5 = float((top == labels[:, None]).any(axis=1).mean())
    else:
        top5 = math.nan
    return Evaluation(top1=float((pred == labels).mean()), top5=top5,
                      mean_class_accuracy=float(np.nanmean(per_class)),
                      per_class_accuracy=per_class, confusion=confusion, class_names=names)


def per_class_report(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Per class: support (test videos of the class), predicted (videos predicted as it), precision, recall
    (= the class's accuracy) and F1 from a confusion matrix (rows = true class, columns = predicted).
    Precision is None for a class never predicted, recall for a class absent from the labels, F1 when either
    is None or both are 0."""
    confusion = np.asarray(confusion, dtype=np.int64)
    out = []
    for i, name in enumerate(class_names):
        tp, support, predicted = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (2 * precision * recall / (precision + recall)
              if precision is not None and recall is not None and precision + recall > 0 else None)
        out.append({"class": str(name), "support": support, "predicted": predicted, "precision": precision,
                    "recall": recall, "f1": f1})
    return out

