"""Classical baselines over the same gold examples the teacher sees: what do the LLMs add?

Both work on the sentence embeddings the teacher retrieves with (all-MiniLM-L6-v2 on `local`):
- 1-NN: the label of the nearest gold example (the teacher's own retriever, used alone);
- logistic regression on the gold embeddings, its C chosen by cross-validation on the gold labels only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import dspy
import numpy as np

from distill.teacher import embed


@dataclass
class BaselineResult:
    accuracy: float
    predictions: list[str] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)


def nearest_neighbour(gold_vecs: np.ndarray, gold_labels: Sequence[str], vecs: np.ndarray) -> list[str]:
    """The label of the most similar gold example (cosine: the vectors are normalised)."""
    return [gold_labels[i] for i in np.argmax(vecs @ gold_vecs.T, axis=1)]


def fit_logistic_regression(gold_vecs: np.ndarray, gold_labels: Sequence[str], seed: int) -> Any:
    """Logistic regression; C picked by stratified CV accuracy on the gold labels (never the test set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    search = GridSearchCV(
        LogisticRegression(max_iter=2000), {"C": [0.1, 1.0, 10.0, 100.0, 1000.0]}, scoring="accuracy",
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
    )
    with warnings.catch_warnings():
        # 100 gold labels over 25 intents: some intents have fewer examples than folds. sklearn warns;
        # those folds simply lack that intent, which is the honest estimate with this little data.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return search.fit(gold_vecs, list(gold_labels)).best_estimator_


def run_baselines(gold: Sequence[dspy.Example], test: Sequence[dspy.Example], embedder: str,
                  seed: int = 0) -> dict[str, BaselineResult]:
    gold_vecs = embed(embedder, [ex.text for ex in gold])
    test_vecs = embed(embedder, [ex.text for ex in test])
    gold_labels = [ex.label for ex in gold]
    truth = [ex.label for ex in test]

    def accuracy(pred: Sequence[str]) -> float:
        return round(sum(p == t for p, t in zip(pred, truth)) / max(1, len(truth)), 4)

    nn = nearest_neighbour(gold_vecs, gold_labels, test_vecs)
    lr = fit_logistic_regression(gold_vecs, gold_labels, seed)
    lr_pred = [str(p) for p in lr.predict(test_vecs)]
    return {
        "nearest_neighbour": BaselineResult(accuracy(nn), nn),
        "logistic_regression": BaselineResult(accuracy(lr_pred), lr_pred, {"C": float(lr.C)}),
    }
