"""Which unlabeled queries the teacher labels next: uncertainty scores and a diverse batch of the most uncertain.

Pure functions of arrays (class probabilities, embeddings): no model, no files. The teacher stage feeds them
the vote's probabilities over the pool (`distill.active`), and `python -m distill pool` the same
for served traffic.

A batch of only the most uncertain queries is full of near-duplicates (one confusing phrasing, many
times); so the batch is chosen among the `batch x candidates` most uncertain, either farthest-first from
everything labeled so far (k-center greedy) or one per k-means cluster (the most uncertain of each).
"""

from __future__ import annotations

import warnings
from typing import Literal, Sequence

import numpy as np

Signal = Literal["margin", "entropy", "least_confidence"]
Diversity = Literal["kcenter", "cluster"]


def uncertainty(proba: np.ndarray, signal: Signal = "margin") -> np.ndarray:
    """One score per row of class probabilities, higher = less sure, in [0, 1].

    margin: 1 - (p1 - p2); least_confidence: 1 - p1; entropy: normalised by log(n_classes).
    """
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"uncertainty needs rows of >= 2 class probabilities, got shape {p.shape}")
    if signal == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    if signal == "least_confidence":
        return 1.0 - p.max(axis=1)
    if signal == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        return h / np.log(p.shape[1])
    raise ValueError(f"unknown uncertainty signal {signal!r} (margin, entropy, least_confidence)")


def top_uncertain(scores: np.ndarray, available: Sequence[int], n: int) -> list[int]:
    """The `n` available rows with the highest score, highest first; ties to the lower row (stable)."""
    avail = np.asarray(list(available), dtype=np.int64)
    order = np.lexsort((avail, -np.asarray(scores)[avail]))  # by score descending, then row ascending
    return [int(i) for i in avail[order[:n]]]


def kcenter_greedy(x: np.ndarray, candidates: Sequence[int], centers: np.ndarray | None, k: int) -> list[int]:
    """k rows of `candidates`, each the farthest (euclidean) from the centers and the rows picked before it.

    `centers` are the vectors already labeled (gold and earlier rounds); none: the first pick is the first
    candidate (the most uncertain, as `top_uncertain` orders them).
    """
    cand = np.asarray(list(candidates), dtype=np.int64)
    if k <= 0 or cand.size == 0:
        return []
    xc = x[cand]
    if centers is not None and len(centers):
        from sklearn.metrics import pairwise_distances

        dist = pairwise_distances(xc, centers).min(axis=1)
    else:
        dist = np.full(len(cand), np.inf)
    picked: list[int] = []
    for _ in range(min(k, len(cand))):
        j = int(np.argmax(dist))  # the first maximum: ties go to the more uncertain candidate
        picked.append(int(cand[j]))
        dist = np.minimum(dist, np.linalg.norm(xc - xc[j], axis=1))
        dist[j] = -1.0  # never again
    return picked


def cluster_pick(x: np.ndarray, scores: np.ndarray, candidates: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """k-means (k clusters) over the candidates, then the most uncertain candidate of each cluster,
    most uncertain first."""
    from sklearn.cluster import KMeans

    cand = np.asarray(list(candidates), dtype=np.int64)
    if k <= 0 or cand.size == 0:
        return []
    if cand.size <= k:
        return top_uncertain(scores, cand, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-duplicate rows: fewer distinct points than clusters
        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x[cand])
    best: dict[int, int] = {}
    for row, c in zip(cand, assign):
        if int(c) not in best or (scores[row], -row) > (scores[best[int(c)]], -best[int(c)]):
            best[int(c)] = int(row)
    return top_uncertain(scores, list(best.values()), k)


def select_batch(x: np.ndarray, scores: np.ndarray, available: Sequence[int], k: int,
                 diversity: Diversity = "kcenter", candidates: int = 5, centers: np.ndarray | None = None,
                 seed: int = 0) -> list[int]:
    """The next `k` rows to label from `available`: diverse among the `k x candidates` most uncertain.

    `x` holds one embedding per row, `scores` one uncertainty per row (`uncertainty`); `centers` the
    embeddings of what is labeled already (k-center keeps away from them).
    """
    if len(x) != len(scores):
        raise ValueError(f"{len(x)} embeddings but {len(scores)} scores")
    pool = top_uncertain(scores, available, k * candidates)
    if diversity == "kcenter":
        return kcenter_greedy(x, pool, centers, k)
    if diversity == "cluster":
        return cluster_pick(x, scores, pool, k, seed)
    raise ValueError(f"unknown diversity {diversity!r} (kcenter, cluster)")
