"""Classical baselines over the same gold examples the teacher sees: what do the LLMs add?

Both work on the sentence embeddings the teacher retrieves with (all-MiniLM-L6-v2 on `local`):
- 1-NN: the label of the nearest gold example (the teacher's own retriever, used alone);
- logistic regression on the gold embeddings, its C chosen by leave-one-out on the gold labels only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import dspy
import numpy as np

from distill.teacher.program import embed
from distill.teacher.vote import choose_c, fit_lr


@dataclass
class BaselineResult:
    accuracy: float
    predictions: list[str] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)


def nearest_neighbour(gold_vecs: np.ndarray, gold_labels: Sequence[str], vecs: np.ndarray) -> list[str]:
    """The label of the most similar gold example (cosine: the vectors are normalised)."""
    return [gold_labels[i] for i in np.argmax(vecs @ gold_vecs.T, axis=1)]


def fit_logistic_regression(gold_vecs: np.ndarray, gold_labels: Sequence[str]) -> Any:
    """Logistic regression; C picked by leave-one-out accuracy on the gold labels (never the test set)."""
    c, _ = choose_c(gold_vecs, gold_labels)
    return fit_lr(gold_vecs, gold_labels, c)


def run_baselines(gold: Sequence[dspy.Example], test: Sequence[dspy.Example], embedder: str) -> dict[str, BaselineResult]:
    gold_vecs = embed(embedder, [ex.text for ex in gold])
    test_vecs = embed(embedder, [ex.text for ex in test])
    gold_labels = [ex.label for ex in gold]
    truth = [ex.label for ex in test]

    def accuracy(pred: Sequence[str]) -> float:
        return round(sum(p == t for p, t in zip(pred, truth)) / max(1, len(truth)), 4)

    nn = nearest_neighbour(gold_vecs, gold_labels, test_vecs)
    lr = fit_logistic_regression(gold_vecs, gold_labels)
    lr_pred = [str(p) for p in lr.predict(test_vecs)]
    return {
        "nearest_neighbour": BaselineResult(accuracy(nn), nn),
        "logistic_regression": BaselineResult(accuracy(lr_pred), lr_pred, {"C": float(lr.C)}),
    }
