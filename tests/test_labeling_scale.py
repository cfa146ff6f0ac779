"""The labeling scale simulation at a small size: the Ray Data labeling job, against the fixed-latency fake
endpoint, labels 5k synthetic queries exactly once, and more concurrency buys throughput until the
endpoint saturates (benchmarks/labeling_scale.py runs the full sweep and 100k queries)."""

from __future__ import annotations

import pytest

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill_harness.labeling_scale import ScaleResult, plot_scale, simulate, to_markdown


@pytest.mark.slow
def test_the_simulation_labels_5k_queries_exactly_once_and_scales_with_concurrency(banking77_dir, monkeypatch,
                                                                                   tmp_path) -> None:
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    cfg = load_config("local_ci")
    data = prepare_data(cfg)
    # One replica that serves 4 at a time, 20 ms each: it saturates at 200 queries/s.
    result = simulate(cfg, data.labels, [ex.text for ex in data.unlabeled], sweep_n=400,
                      concurrency=[(1, 1), (2, 2)], replicas=[1], sizes=[5000], size_concurrency=(2, 2),
                      latency_s=0.02, max_ongoing=4, work_dir=tmp_path)
    points = result.throughput + result.memory
    assert all(p.exactly_once and p.failed == 0 for p in points)
    (one, four), (big,) = result.throughput, result.memory
    assert big.n == big.labeled == 5000
    assert four.queries_per_s > 1.5 * one.queries_per_s  # the actors' calls really overlap
    assert all(p.queries_per_s <= 1.05 * p.endpoint_capacity_qps for p in points)
    assert big.peak_rss_driver_mb > 0 and big.peak_rss_total_mb > big.peak_rss_driver_mb
    # what the benchmark writes to docs/ and the README reads back
    assert ScaleResult.model_validate_json(result.model_dump_json()) == result
    assert "| 5,000 | 2x2 |" in to_markdown(result)
    assert plot_scale(result, tmp_path / "scale.png").stat().st_size > 0
