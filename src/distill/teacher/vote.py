"""A linear vote over sentence embeddings: logistic regression on the gold examples.

Its C is chosen by leave-one-out accuracy on the gold labels. With 100 gold examples over 25 labels
(1-10 per label), k-fold CV leaves folds without a label and picks a far too strong regularisation;
leave-one-out scores every example against a model that saw all the others.

The teacher's vote adds two things the program already knows, both measured on the gold/test split
(gold leave-one-out, `docs/teacher.md`): balanced class weights (gold is skewed, the queries it
labels are not) and each label's name as one more training example.
"""

from __future__ import annotations

import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

C_GRID = (1.0, 10.0, 100.0, 1000.0)


def fit_lr(x: np.ndarray, y: Sequence[str], c: float, balanced: bool = False) -> Any:
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        # Large C on separable data: lbfgs may stop just short of its tolerance; the fit is usable.
        warnings.simplefilter("ignore")
        return LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None).fit(x, list(y))


def loo_predictions(x: np.ndarray, y: Sequence[str], c: float, n_jobs: int = 1) -> list[str]:
    # n_jobs > 1 runs folds in threads; on 2 cores BLAS's own threads already use them (measured slower).
    """Each row predicted by a model fitted on every other row, from scratch.

    Cold fits on purpose: a fit warm-started from the all-rows model stops at its tolerance still carrying
    the held-out row (far too high a leave-one-out score at large C), and LogisticRegressionCV's warm path
    over C shifts the large-C scores too (and was slower than these fits).
    """
    from joblib import Parallel, delayed

    y = list(y)

    def one(i: int) -> str:
        keep = [j for j in range(len(y)) if j != i]
        return str(fit_lr(x[keep], [y[j] for j in keep], c).predict(x[i : i + 1])[0])

    return list(Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(i) for i in range(len(y))))


def choose_c(x: np.ndarray, y: Sequence[str], grid: Sequence[float] = C_GRID) -> tuple[float, dict[float, float]]:
    """The C with the best leave-one-out accuracy on (x, y); ties go to the smaller C.

    It is hundreds of fits, asked of the same gold embeddings by the baselines and the teacher's vote, in
    every run and test process: the answer is kept per content of (x, y, grid) in memory and on disk
    (joblib.Memory under ~/.cache/distill, keyed by the arguments and this function's code).
    """
    return _choose_c(x.astype(np.float32).tobytes(), x.shape, tuple(y), tuple(grid))


@lru_cache(maxsize=4)
def _choose_c(x_bytes: bytes, shape: tuple[int, ...], y: tuple[str, ...],
              grid: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    return _choose_c_on_disk()(x_bytes, shape, y, grid, _sklearn_version())


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


@lru_cache(maxsize=1)
def _choose_c_on_disk() -> Any:
    from joblib import Memory

    location = Path(os.environ.get("DISTILL_CACHE_DIR", "~/.cache/distill")).expanduser() / "joblib"
    return Memory(location, verbose=0).cache(_loo_grid)


def _loo_grid(x_bytes: bytes, shape: tuple[int, ...], y: tuple[str, ...], grid: tuple[float, ...],
              sklearn_version: str) -> tuple[float, dict[float, float]]:
    x = np.frombuffer(x_bytes, dtype=np.float32).reshape(shape)
    scores = {c: float(np.mean([p == t for p, t in zip(loo_predictions(x, y, c), y)])) for c in grid}
    return max(grid, key=lambda c: (scores[c], -c)), scores


def label_text(label: str) -> str:
    """A label's name as a query-like text: 'card_arrival' -> 'card arrival'."""
    return label.replace("_", " ")


class LabelVote:
    """P(label | query embedding): balanced logistic regression on the gold embeddings + label names."""

    def __init__(self, gold_vecs: np.ndarray, gold_labels: Sequence[str], name_vecs: np.ndarray,
                 labels: Sequence[str], grid: Sequence[float] = C_GRID) -> None:
        self.gold_vecs, self.gold_labels = gold_vecs, list(gold_labels)
        self.names = (name_vecs, list(labels))
        # C as the logistic-regression baseline chooses it (gold only). Not re-chosen with the names and
        # weights: those flatten the probabilities at small C, and `vote_confidence` is a probability.
        self.c, loo = choose_c(gold_vecs, self.gold_labels, grid=grid)
        self.loo_accuracy = dict(loo)  # a copy: the cached answer is shared
        self.model = self._fit(range(len(self.gold_labels)))
        self._without: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships the teacher (and this vote) to its labeling actors by pickling; a lock does not pickle.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fit(self, rows: Any) -> Any:
        rows = list(rows)
        x = np.vstack([self.gold_vecs[rows], self.names[0]])
        return fit_lr(x, [self.gold_labels[i] for i in rows] + self.names[1], self.c, balanced=True)

    def without(self, i: int) -> Any:
        """The vote refitted without gold example i, for leave-one-out scoring (cached per example)."""
        with self._lock:
            if i not in self._without:
                self._without[i] = self._fit(j for j in range(len(self.gold_labels)) if j != i)
            return self._without[i]

    @staticmethod
    def ranked(model: Any, vec: np.ndarray) -> tuple[list[str], list[float]]:
        """Labels by decreasing probability, with their probabilities."""
        p = model.predict_proba(vec[None, :])[0]
        order = np.argsort(-p)
        return [str(model.classes_[j]) for j in order], [float(p[j]) for j in order]
