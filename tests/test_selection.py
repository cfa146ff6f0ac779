"""Active selection's pure parts: uncertainty signals, k-center greedy, clustering, and the profile's budget."""

from __future__ import annotations

import numpy as np
import pytest

from distill.config import load_config
from distill.data.selection import cluster_pick, kcenter_greedy, select_batch, top_uncertain, uncertainty
from distill.errors import ConfigError


def test_uncertainty_signals_order_rows_by_doubt() -> None:
    p = np.array([[0.98, 0.01, 0.01],   # sure
                  [0.5, 0.45, 0.05],    # two labels nearly tied
                  [0.4, 0.3, 0.3]])     # flat
    margin = uncertainty(p, "margin")
    assert margin == pytest.approx([1 - 0.97, 1 - 0.05, 1 - 0.1])
    assert uncertainty(p, "least_confidence") == pytest.approx([0.02, 0.5, 0.6])
    ent = uncertainty(p, "entropy")
    assert ent[0] < ent[1] < ent[2] <= 1.0
    assert uncertainty(np.full((1, 4), 0.25), "entropy") == pytest.approx([1.0])
    with pytest.raises(ValueError, match="signal"):
        uncertainty(p, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class probabilities"):
        uncertainty(np.array([0.5, 0.5]))


def test_top_uncertain_only_from_available_ties_to_lower_row() -> None:
    scores = np.array([0.9, 0.1, 0.9, 0.5, 0.95])
    assert top_uncertain(scores, [0, 1, 2, 3], 3) == [0, 2, 3]
    assert top_uncertain(scores, [1, 3, 4], 10) == [4, 3, 1]


def test_kcenter_skips_near_duplicates_and_what_is_labeled() -> None:
    # Three tight groups; the candidates are two near-copies in group A, one in B, one in C.
    x = np.array([[0.0, 0.0], [0.01, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    picked = kcenter_greedy(x, [0, 1, 2, 3], centers=None, k=3)
    assert picked[0] == 0 and sorted(picked) == [0, 2, 3]  # never both 0 and 1
    # Group B already labeled (a center): the first pick is the farthest from it.
    assert kcenter_greedy(x, [0, 2, 3], centers=np.array([[10.0, 0.2]]), k=1) == [3]
    assert kcenter_greedy(x, [0, 1], centers=None, k=5) == [0, 1]  # no more than there are


def test_cluster_pick_takes_the_most_uncertain_of_each_cluster() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (5, 2))
    b = rng.normal(0, 0.01, (5, 2)) + 5
    x = np.vstack([a, b])
    scores = np.array([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.99, 0.1, 0.2])
    assert cluster_pick(x, scores, range(10), 2) == [7, 1]


def test_select_batch_is_diverse_among_the_most_uncertain() -> None:
    rng = np.random.default_rng(1)
    # 20 near-copies of one confusing query (very uncertain) and 20 spread-out, somewhat uncertain ones.
    dup = rng.normal(0, 0.001, (20, 8))
    spread = rng.normal(0, 1.0, (20, 8)) + 3
    x = np.vstack([dup, spread])
    scores = np.concatenate([np.full(20, 0.9), np.full(20, 0.8)]) + rng.uniform(0, 0.01, 40)
    plain = top_uncertain(scores, range(40), 5)
    assert all(i < 20 for i in plain)  # uncertainty alone: five copies of the same query
    for diversity in ("kcenter", "cluster"):
        batch = select_batch(x, scores, range(40), 5, diversity, candidates=8)
        assert len(set(batch)) == 5
        assert sum(i < 20 for i in batch) <= 1, diversity  # at most one of the near-copies
    assert sorted(select_batch(x, scores, [3, 25], 5)) == [3, 25]  # fewer available than asked: all of them
    with pytest.raises(ValueError, match="diversity"):
        select_batch(x, scores, range(40), 5, "bogus")  # type: ignore[arg-type]


def test_random_stays_the_default_and_active_checks_its_budget() -> None:
    cfg = load_config("local")
    assert cfg.data.selection == "random"
    active = load_config("local", overrides={"data": {"selection": "active", "active": {"rounds": 3, "batch_size": 100}}})
    assert active.data.seed_size == 200  # 500 - 3 x 100, holding devset 100 + optimizer val 50
    with pytest.raises(ConfigError, match="seed round"):
        load_config("local", overrides={"data": {"selection": "active", "active": {"rounds": 4, "batch_size": 100}}})
    with pytest.raises(ConfigError, match="num_to_label"):
        load_config("local", overrides={"data": {"selection": "active", "num_to_label": None}})
